# Copyright (c) CT-FM bundles contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Synthetic CT phantoms (body and head) in Hounsfield units with matching label maps.

Tests, the demo and the benchmarks use these phantoms wherever real data is not needed.

Conventions:
    * Arrays are indexed ``(i, j, k)`` in RAS+ voxel order: ``i`` increases towards the
      patient's Right, ``j`` towards Anterior, ``k`` towards Superior. The affine is
      ``diag(spacing)`` with the volume centre at world ``(0, 0, 0)``, so
      ``nibabel.aff2axcodes(affine) == ("R", "A", "S")``; the torso and head are centred
      on the world origin, the patient's right side has world ``x > 0``.
    * Anatomy is defined in physical millimetres on a nominal torso (350 mm L-R x
      250 mm A-P x 400 mm S-I) or head and scaled to the requested field of view, so
      any shape and spacing give the same anatomy. Thin structures (skin, fat, ribs,
      skull, small organs) are at least one voxel thick along every axis, so every
      organ is present even on very anisotropic grids, as long as the torso (or head)
      spans at least ``MIN_SPAN_VOXELS`` voxels along ``i`` and ``j`` (else ValueError).
    * A seed jitters the size, position and HU of each organ (about +-10%) while the
      left/right, anterior/posterior and superior/inferior order is always kept.

Python API::

    image, labels, affine = make_body_phantom(shape=(96, 96, 64), spacing=(3.0, 3.0, 3.0), seed=0)
    save_phantom(image, labels, affine, image_path="ct.nii.gz", label_path="ct_labels.nii.gz")

CLI::

    ctfm-phantom body --output ct.nii.gz --shape 96,96,64 --spacing 3,3,3 --seed 1
    # -> ct.nii.gz (int16 HU) and ct_labels.nii.gz (uint8 BODY_LABELS)
    ctfm-phantom head --output head.nii.gz --lesion True
    ctfm-phantom dataset --output_dir data/phantoms --num_cases 8 --kind body
    ctfm-phantom stats --image ct.nii.gz --label ct_labels.nii.gz
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ctfm_common.runtime import atomic_write, atomic_write_text

# ---------------------------------------------------------------------------------------
# Registries (data only: the CLI, the bundles and the tests all read these).
# ---------------------------------------------------------------------------------------

#: Label value of each structure in a body phantom label map (0 = air / background).
BODY_LABELS: dict[str, int] = {
    "soft_tissue": 1,
    "fat": 2,
    "lung_left": 3,
    "lung_right": 4,
    "heart": 5,
    "liver": 6,
    "spleen": 7,
    "kidney_left": 8,
    "kidney_right": 9,
    "vertebrae": 10,
    "rib_left": 11,
    "rib_right": 12,
    "aorta": 13,
}

#: Label value of each structure in a head phantom label map (0 = air / background).
HEAD_LABELS: dict[str, int] = {
    "brain": 1,
    "skull": 2,
    "lesion": 3,
    "scalp": 4,
}

#: TotalSegmentator v2 (task ``total``) class index of each phantom structure that has
#: one; structures absent here (soft tissue, fat, scalp) map to background 0. Single
#: phantom structures stand in for one representative TotalSegmentator class.
TOTALSEG_INDEX: dict[str, int] = {
    "spleen": 1,
    "kidney_right": 2,
    "kidney_left": 3,
    "liver": 5,
    "lung_left": 10,  # lung_upper_lobe_left
    "lung_right": 12,  # lung_upper_lobe_right
    "vertebrae": 31,  # vertebrae_L1
    "heart": 51,
    "aorta": 52,
    "brain": 90,
    "skull": 91,
    "rib_left": 96,  # rib_left_5
    "rib_right": 108,  # rib_right_5
    "lesion": 90,  # a haemorrhage lies inside the brain: TotalSegmentator calls it brain
}

#: Typical HU of each body structure and the +- range a seed jitters it by.
BODY_HU: dict[str, tuple[float, float]] = {
    "air": (-1000.0, 0.0),
    "soft_tissue": (40.0, 5.0),
    "fat": (-100.0, 10.0),
    "lung_left": (-850.0, 25.0),
    "lung_right": (-850.0, 25.0),
    "heart": (45.0, 5.0),
    "liver": (60.0, 5.0),
    "spleen": (50.0, 5.0),
    "kidney_left": (35.0, 5.0),
    "kidney_right": (35.0, 5.0),
    "vertebrae": (550.0, 100.0),
    "rib_left": (650.0, 100.0),
    "rib_right": (650.0, 100.0),
    "aorta": (50.0, 5.0),
}

#: Typical HU of each head structure and the +- range a seed jitters it by.
HEAD_HU: dict[str, tuple[float, float]] = {
    "air": (-1000.0, 0.0),
    "brain": (35.0, 3.0),
    "skull": (1000.0, 80.0),
    "lesion": (70.0, 5.0),  # acute (hyperdense) haemorrhage
    "scalp": (40.0, 5.0),
}

PHANTOM_KINDS: tuple[str, ...] = ("body", "head")

#: Smallest number of voxels per axis a phantom may have.
MIN_SIZE = 16

#: Fewest voxels the torso or head must span along ``i`` and ``j``: below this the
#: organs cannot all be resolved and the phantom functions raise ValueError.
MIN_SPAN_VOXELS = 12

# HU range written to the int16 image (the usual CT storage range).
_HU_MIN, _HU_MAX = -1024, 3071

# Nominal body (mm): torso half-widths; every in-plane length below is on this scale.
_TORSO_HALF_X, _TORSO_HALF_Y, _TORSO_LENGTH = 175.0, 125.0, 400.0
# Nominal head (mm): outer (scalp) half-widths.
_HEAD_HALF = (75.0, 95.0, 80.0)
# Fraction of the field of view the body or head fills on its limiting axis.
_FILL = 0.92

# Body organs modelled as ellipsoids. centre = (x mm, y mm, z as a fraction of the
# field of view length from its inferior edge), semi = (x mm, y mm, z fraction), yaw in
# degrees (rotation about the S-I axis), paint_over = labels the organ may replace.
# +x is the patient's right, +y anterior (RAS).
_BODY_ELLIPSOIDS: tuple[dict[str, Any], ...] = (
    {"name": "lung_right", "centre": (72.0, 0.0, 0.77), "semi": (58.0, 78.0, 0.19), "yaw": 0.0,
     "paint_over": ("soft_tissue",)},
    {"name": "lung_left", "centre": (-72.0, 0.0, 0.76), "semi": (56.0, 78.0, 0.20), "yaw": 0.0,
     "paint_over": ("soft_tissue",)},
    {"name": "heart", "centre": (-15.0, 30.0, 0.64), "semi": (55.0, 48.0, 0.10), "yaw": -25.0,
     "paint_over": ("soft_tissue", "lung_left", "lung_right")},
    {"name": "liver", "centre": (70.0, 5.0, 0.44), "semi": (78.0, 80.0, 0.13), "yaw": 0.0,
     "paint_over": ("soft_tissue", "lung_right")},
    {"name": "liver", "centre": (10.0, 45.0, 0.47), "semi": (50.0, 32.0, 0.07), "yaw": 0.0,
     "paint_over": ("soft_tissue",)},  # left lobe, crossing the midline anteriorly
    {"name": "spleen", "centre": (-92.0, -35.0, 0.46), "semi": (28.0, 50.0, 0.07), "yaw": 30.0,
     "paint_over": ("soft_tissue", "lung_left")},
    # Perirenal fat first, so the kidneys stand out from the soft tissue as on real CT.
    {"name": "perirenal_fat", "centre": (62.0, -60.0, 0.28), "semi": (40.0, 48.0, 0.11), "yaw": -30.0,
     "paint_over": ("soft_tissue",)},
    {"name": "perirenal_fat", "centre": (-62.0, -60.0, 0.31), "semi": (40.0, 48.0, 0.11), "yaw": 30.0,
     "paint_over": ("soft_tissue",)},
    {"name": "kidney_right", "centre": (62.0, -60.0, 0.28), "semi": (26.0, 34.0, 0.08), "yaw": -30.0,
     "paint_over": ("soft_tissue", "perirenal_fat", "liver")},
    {"name": "kidney_left", "centre": (-62.0, -60.0, 0.31), "semi": (26.0, 34.0, 0.08), "yaw": 30.0,
     "paint_over": ("soft_tissue", "perirenal_fat", "spleen")},
)
# Descending aorta: a vertical tube left-anterior of the spine up to the aortic arch.
_AORTA = {"centre": (-28.0, -28.0), "radius": 12.0, "top": 0.72}
# Vertebral column (mm): body ellipse, spinal canal, arch and spinous process; segments.
_SPINE = {"body_y": -55.0, "body_semi": (20.0, 16.0), "canal_radius": 9.0, "arch_thickness": 6.0,
          "spinous_length": 16.0, "spinous_half_width": 3.5, "segments": 12, "disc_fraction": 0.22}
# Ribs: arcs on an ellipse just inside the subcutaneous fat, anterior ends lower.
_RIBS = {"count": 5, "z_first": 0.60, "z_last": 0.92, "inset": 12.0, "thickness": 8.0,
         "z_half_thickness": 5.0, "tilt": 22.0, "posterior_gap": 24.0, "anterior_gap": 42.0}
_SKIN_MM, _FAT_MM = 3.0, 20.0


# ---------------------------------------------------------------------------------------
# Geometry helpers.
# ---------------------------------------------------------------------------------------


def _validate_grid(shape: Any, spacing: Any) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """Check and normalise a grid shape and spacing.

    Args:
        shape: three voxel counts ``(i, j, k)``, each at least ``MIN_SIZE``.
        spacing: three positive voxel sizes in mm, or one number for isotropic voxels.

    Returns:
        ``(shape, spacing)`` as tuples of ints and floats.

    Raises:
        ValueError: when either is malformed.
    """
    if isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence) or len(shape) != 3:
        raise ValueError(f"shape must be 3 voxel counts (i, j, k), got {shape!r}")
    try:
        ints = tuple(int(n) for n in shape)
    except (TypeError, ValueError):
        raise ValueError(f"shape must be 3 integer voxel counts (i, j, k), got {shape!r}") from None
    if any(n != float(v) for n, v in zip(ints, shape)) or min(ints) < MIN_SIZE:
        raise ValueError(f"shape must be 3 integers >= {MIN_SIZE}, got {shape!r}")
    given = spacing
    if isinstance(spacing, (int, float, np.number)) and not isinstance(spacing, bool):
        spacing = (spacing,) * 3
    if isinstance(spacing, (str, bytes)) or not isinstance(spacing, Sequence) or len(spacing) != 3:
        raise ValueError(f"spacing must be 3 voxel sizes in mm (or one number), got {given!r}")
    try:
        floats = tuple(float(s) for s in spacing)
    except (TypeError, ValueError):
        raise ValueError(f"spacing must be 3 numbers in mm, got {given!r}") from None
    if not all(math.isfinite(s) and s > 0 for s in floats):
        raise ValueError(f"spacing must be 3 positive finite sizes in mm, got {given!r}")
    return ints, floats  # type: ignore[return-value]


def _check_span(kind: str, half_widths: Sequence[float], spacing: Sequence[float], shape: Sequence[int]) -> None:
    """Raise when the torso/head would span too few voxels in-plane to hold every organ."""
    for axis, name in ((0, "i (R-L)"), (1, "j (A-P)")):
        span = 2.0 * half_widths[axis] / spacing[axis]
        if span < MIN_SPAN_VOXELS:
            raise ValueError(
                f"the {kind} would span only {span:.1f} voxels along {name} with shape {tuple(shape)} and "
                f"spacing {tuple(spacing)} mm (at least {MIN_SPAN_VOXELS} needed): give the field of "
                "view a more even in-plane aspect ratio or use more voxels")


def _validate_non_negative(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return value


def _validate_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    return int(seed)


def phantom_affine(shape: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
    """The RAS+ affine of a phantom grid: ``diag(spacing)``, volume centre at world 0.

    Args:
        shape: voxel counts ``(i, j, k)``.
        spacing: voxel sizes in mm along ``i`` (R), ``j`` (A), ``k`` (S).

    Returns:
        A 4 x 4 float64 voxel-to-world (mm) matrix; ``aff2axcodes`` gives ``("R", "A", "S")``.
    """
    shape_t, spacing_t = _validate_grid(shape, spacing)
    affine = np.diag([*spacing_t, 1.0])
    affine[:3, 3] = [-(n - 1) / 2.0 * s for n, s in zip(shape_t, spacing_t)]
    return affine


def _world_axes(shape: tuple[int, int, int], affine: np.ndarray) -> tuple[np.ndarray, ...]:
    """World coordinates (mm) of the voxel centres along each axis of a diagonal affine."""
    return tuple(affine[a, 3] + affine[a, a] * np.arange(n, dtype=np.float64) for a, n in enumerate(shape))


def _index_range(coords: np.ndarray, low: float, high: float) -> slice:
    """The slice of ascending ``coords`` inside ``[low, high]``."""
    return slice(int(np.searchsorted(coords, low, "left")), int(np.searchsorted(coords, high, "right")))


def _paint_ellipsoid(
    labels: np.ndarray,
    axes: tuple[np.ndarray, ...],
    centre: Sequence[float],
    semi: Sequence[float],
    value: int,
    paint_over: Sequence[int],
    yaw_deg: float = 0.0,
) -> None:
    """Set ``value`` inside an ellipsoid (rotated by ``yaw_deg`` about S-I) where the
    current label is one of ``paint_over``; works on the ellipsoid's bounding box only."""
    x, y, z = axes
    (cx, cy, cz), (a, b, c) = centre, semi
    theta = math.radians(yaw_deg)
    cos_t, sin_t = math.cos(theta), math.sin(theta)
    half_x = math.sqrt((a * cos_t) ** 2 + (b * sin_t) ** 2)
    half_y = math.sqrt((a * sin_t) ** 2 + (b * cos_t) ** 2)
    box = (_index_range(x, cx - half_x, cx + half_x), _index_range(y, cy - half_y, cy + half_y),
           _index_range(z, cz - c, cz + c))
    dx, dy, dz = x[box[0]][:, None] - cx, y[box[1]][None, :] - cy, z[box[2]] - cz
    u, v = cos_t * dx + sin_t * dy, -sin_t * dx + cos_t * dy
    inside = ((u / a) ** 2 + (v / b) ** 2)[:, :, None] + ((dz / c) ** 2)[None, None, :] <= 1.0
    region = labels[box]
    region[inside & np.isin(region, paint_over)] = value


def _in_ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, a: float, b: float) -> np.ndarray:
    """Boolean 2D (len(x), len(y)) mask of an axis-aligned ellipse."""
    return (((x[:, None] - cx) / a) ** 2 + ((y[None, :] - cy) / b) ** 2) <= 1.0


def _jitter(rng: np.random.Generator, value: float, fraction: float = 0.1) -> float:
    """``value`` scaled by a uniform factor in ``[1 - fraction, 1 + fraction]``."""
    return float(value * rng.uniform(1.0 - fraction, 1.0 + fraction))


def _render(
    labels: np.ndarray,
    hu_table: Mapping[str, tuple[float, float]],
    label_values: Mapping[str, int],
    spacing: tuple[float, float, float],
    rng: np.random.Generator,
    noise_hu: float,
    blur_mm: float,
) -> np.ndarray:
    """Turn a label map into an int16 HU image: per-case HU per label, blur, noise."""
    lut = np.full(256, hu_table["air"][0], dtype=np.float32)
    offsets: dict[str, float] = {}
    for name, value in label_values.items():
        mean, spread = hu_table[name]
        # Left and right copies of one tissue share the case's HU.
        tissue = name.removesuffix("_left").removesuffix("_right")
        offsets.setdefault(tissue, rng.uniform(-spread, spread))
        lut[value] = mean + offsets[tissue]
    image = lut[labels]
    if blur_mm > 0:
        from scipy.ndimage import gaussian_filter

        image = gaussian_filter(image, sigma=[blur_mm / s for s in spacing], mode="nearest")
    if noise_hu > 0:
        image += rng.standard_normal(image.shape, dtype=np.float32) * np.float32(noise_hu)
    return np.clip(np.rint(image), _HU_MIN, _HU_MAX).astype(np.int16)


# ---------------------------------------------------------------------------------------
# Phantoms.
# ---------------------------------------------------------------------------------------


def make_body_phantom(
    *,
    shape: Sequence[int] = (96, 96, 64),
    spacing: float | Sequence[float] = (3.0, 3.0, 3.0),
    seed: int = 0,
    noise_hu: float = 15.0,
    blur_mm: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A synthetic thorax-abdomen CT with a matching label map (``BODY_LABELS``).

    An elliptical torso along S-I fills most of the field of view, surrounded by air,
    with skin, subcutaneous fat, two lungs (superior), the heart between them
    (anterior, to the left), the descending aorta, the liver (patient's right, below the
    right lung), the spleen (left), two kidneys (posterior, inferior), a segmented
    vertebral column (posterior midline, whole length) and a few rib arcs around the
    thorax.

    Args:
        shape: voxel counts ``(i, j, k)`` along R, A, S; each at least ``MIN_SIZE``.
        spacing: voxel sizes in mm along ``i``, ``j``, ``k`` (one number: isotropic).
        seed: seeds the organ size/position/HU jitter and the noise.
        noise_hu: standard deviation of the additive Gaussian noise in HU.
        blur_mm: Gaussian blur (sigma, mm) applied before the noise; 0 turns it off.

    Returns:
        ``(image, labels, affine)``: int16 HU array, uint8 label array (both indexed
        ``(i, j, k)`` in RAS+ voxel order) and the 4 x 4 affine (``phantom_affine``).

    Raises:
        ValueError: on a malformed shape, spacing, seed, noise or blur.
    """
    shape_t, spacing_t = _validate_grid(shape, spacing)
    noise_hu = _validate_non_negative("noise_hu", noise_hu)
    blur_mm = _validate_non_negative("blur_mm", blur_mm)
    rng = np.random.default_rng(_validate_seed(seed))
    affine = phantom_affine(shape_t, spacing_t)
    axes = _world_axes(shape_t, affine)
    x, y, z = axes
    sp_x, sp_y, sp_z = spacing_t
    fov = [n * s for n, s in zip(shape_t, spacing_t)]
    z_low = z[0] - sp_z / 2.0
    # One in-plane scale keeps the axial aspect ratio; S-I is scaled to fill the length.
    scale = min(_FILL * fov[0] / (2 * _TORSO_HALF_X), _FILL * fov[1] / (2 * _TORSO_HALF_Y))
    scale_z = fov[2] / _TORSO_LENGTH
    _check_span("torso", (_TORSO_HALF_X * scale, _TORSO_HALF_Y * scale), spacing_t, shape_t)
    # Thin parts are at least one voxel: the larger in-plane spacing keeps rotated
    # ellipsoids non-empty too.
    min_in_plane = max(sp_x, sp_y)

    def in_plane(length_mm: float) -> float:
        """A nominal in-plane length scaled, at least one voxel."""
        return max(length_mm * scale, min_in_plane)

    def z_at(fraction: float) -> float:
        return z_low + fraction * fov[2]

    # Perirenal fat is painted with its own value so that kidneys may replace it but not
    # the subcutaneous fat; it becomes "fat" at the end.
    lbl = {**BODY_LABELS, "perirenal_fat": 255}
    labels = np.zeros(shape_t, dtype=np.uint8)

    # Torso, skin and subcutaneous fat: 2D masks repeated along S-I.
    half_x = _jitter(rng, _TORSO_HALF_X, 0.05) * scale
    half_y = _jitter(rng, _TORSO_HALF_Y, 0.05) * scale
    skin = max(_SKIN_MM * scale, 0.5 * min(sp_x, sp_y))
    fat = max(_jitter(rng, _FAT_MM, 0.3) * scale, 1.0 * max(sp_x, sp_y))
    inner_x, inner_y = half_x - skin - fat, half_y - skin - fat
    body2d = _in_ellipse(x, y, 0.0, 0.0, half_x, half_y)
    fat2d = _in_ellipse(x, y, 0.0, 0.0, half_x - skin, half_y - skin)
    inner2d = _in_ellipse(x, y, 0.0, 0.0, inner_x, inner_y)
    plane = np.zeros(shape_t[:2], dtype=np.uint8)
    plane[body2d] = lbl["soft_tissue"]
    plane[fat2d & ~inner2d] = lbl["fat"]
    labels[:] = plane[:, :, None]

    # Organs, in painting order.
    for organ in _BODY_ELLIPSOIDS:
        cx, cy, cz = organ["centre"]
        a, b, c = organ["semi"]
        sa, sb = _jitter(rng, a), _jitter(rng, b)
        centre = (
            (cx + rng.uniform(-0.1, 0.1) * a) * scale,
            (cy + rng.uniform(-0.1, 0.1) * b) * scale,
            z_at(cz + rng.uniform(-0.1, 0.1) * c),
        )
        semi = (in_plane(sa), in_plane(sb), max(_jitter(rng, c) * fov[2], sp_z))
        paint_over = [lbl[name] for name in organ["paint_over"]]
        yaw = organ["yaw"] + rng.uniform(-5.0, 5.0)
        _paint_ellipsoid(labels, axes, centre, semi, lbl[organ["name"]], paint_over, yaw)

    # Descending aorta: a tube from the inferior edge up to the arch.
    ax, ay = (v * scale for v in _AORTA["centre"])
    radius = max(_jitter(rng, _AORTA["radius"]) * scale, max(sp_x, sp_y))
    top = z_at(_AORTA["top"] + rng.uniform(-0.02, 0.02))
    tube = _in_ellipse(x, y, ax, ay, radius, radius)[:, :, None] & (z <= top)[None, None, :]
    allowed = np.isin(labels, [lbl[n] for n in ("soft_tissue", "lung_left", "lung_right", "heart")])
    labels[tube & allowed] = lbl["aorta"]

    # Vertebral column: body + arch + spinous process in-plane, segmented by discs.
    spine = _SPINE
    body_y = spine["body_y"] * scale
    body_a, body_b = in_plane(spine["body_semi"][0]), in_plane(spine["body_semi"][1])
    canal_r = spine["canal_radius"] * scale
    canal_y = body_y - body_b - canal_r
    arch_r = canal_r + in_plane(spine["arch_thickness"])
    rr = np.hypot(x[:, None], y[None, :] - canal_y)
    arch = (rr <= arch_r) & (rr > canal_r) & (y[None, :] <= canal_y + 0.5 * canal_r)
    spinous = (np.abs(x[:, None]) <= in_plane(spine["spinous_half_width"])) & (
        (y[None, :] <= canal_y) & (y[None, :] >= canal_y - arch_r - spine["spinous_length"] * scale))
    vertebra2d = _in_ellipse(x, y, 0.0, body_y, body_a, body_b) | arch | spinous
    period = fov[2] / spine["segments"]
    disc_half = 0.5 * spine["disc_fraction"] * period
    phase = np.mod(z - z_low + rng.uniform(0.0, period), period)
    # Discs only where they are resolved: at coarse S-I spacing the column is continuous.
    bone_z = np.abs(phase - 0.5 * period) >= disc_half if 2 * disc_half >= sp_z else np.ones_like(z, bool)
    column = vertebra2d[:, :, None] & bone_z[None, None, :]
    labels[column & (labels != lbl["fat"]) & (labels != 0)] = lbl["vertebrae"]

    # Ribs: tilted arcs in the thorax, one per side and level.
    ribs = _RIBS
    rib_a, rib_b = inner_x - ribs["inset"] * scale, inner_y - ribs["inset"] * scale
    thickness = in_plane(ribs["thickness"])
    ring = _in_ellipse(x, y, 0.0, 0.0, rib_a + thickness / 2, rib_b + thickness / 2) & ~_in_ellipse(
        x, y, 0.0, 0.0, rib_a - thickness / 2, rib_b - thickness / 2)
    gap = np.where(y[None, :] > 0, ribs["anterior_gap"], ribs["posterior_gap"]) * scale
    ring &= np.abs(x)[:, None] >= np.maximum(gap, np.abs(x[1] - x[0]))
    ii, jj = np.nonzero(ring)
    tilt = ribs["tilt"] * scale_z
    z_half = max(ribs["z_half_thickness"] * scale_z, 0.55 * sp_z)
    rib_paint_over = [lbl[n] for n in ("soft_tissue", "lung_left", "lung_right", "heart", "liver", "spleen")]
    for level in np.linspace(ribs["z_first"], ribs["z_last"], ribs["count"]):
        z0 = z_at(level + rng.uniform(-0.01, 0.01))
        # Posterior ends (y < 0) sit higher than anterior ends.
        z_centre = z0 - tilt * y[jj] / rib_b
        kk = _index_range(z, z0 - tilt - z_half, z0 + tilt + z_half)
        zs = z[kk]
        hit = np.abs(zs[None, :] - z_centre[:, None]) <= z_half
        pi, pk = np.nonzero(hit)
        vi, vj, vk = ii[pi], jj[pi], kk.start + pk
        current = labels[vi, vj, vk]
        ok = np.isin(current, rib_paint_over)
        side = np.where(x[vi] > 0, lbl["rib_right"], lbl["rib_left"]).astype(np.uint8)
        labels[vi[ok], vj[ok], vk[ok]] = side[ok]

    labels[labels == lbl["perirenal_fat"]] = lbl["fat"]
    image = _render(labels, BODY_HU, BODY_LABELS, spacing_t, rng, noise_hu, blur_mm)
    return image, labels, affine


def make_head_phantom(
    *,
    shape: Sequence[int] = (64, 64, 40),
    spacing: float | Sequence[float] = (3.0, 3.0, 4.0),
    seed: int = 0,
    lesion: bool = False,
    noise_hu: float = 10.0,
    blur_mm: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A synthetic head CT (``HEAD_LABELS``): scalp, skull shell and brain, optionally a
    hyperdense (haemorrhage-like, about 70 HU) lesion inside the brain.

    Args:
        shape: voxel counts ``(i, j, k)`` along R, A, S; each at least ``MIN_SIZE``.
        spacing: voxel sizes in mm along ``i``, ``j``, ``k`` (one number: isotropic).
        seed: seeds the head size, the lesion size and position, the HU and the noise.
        lesion: add one ellipsoidal lesion (5-20 mm across on the nominal head, at least
            one voxel) at a seeded position inside the brain, labelled ``lesion``; the
            rest of the image and labels equals the same seed's phantom without it.
        noise_hu: standard deviation of the additive Gaussian noise in HU.
        blur_mm: Gaussian blur (sigma, mm) applied before the noise; 0 turns it off.

    Returns:
        ``(image, labels, affine)`` as for ``make_body_phantom``.

    Raises:
        ValueError: on a malformed shape, spacing, seed, noise or blur.
    """
    shape_t, spacing_t = _validate_grid(shape, spacing)
    noise_hu = _validate_non_negative("noise_hu", noise_hu)
    blur_mm = _validate_non_negative("blur_mm", blur_mm)
    seed = _validate_seed(seed)
    rng = np.random.default_rng(seed)
    affine = phantom_affine(shape_t, spacing_t)
    axes = _world_axes(shape_t, affine)
    fov = [n * s for n, s in zip(shape_t, spacing_t)]
    scale_xy = min(_FILL * fov[0] / (2 * _HEAD_HALF[0]), _FILL * fov[1] / (2 * _HEAD_HALF[1]))
    scales = (scale_xy, scale_xy, _FILL * fov[2] / (2 * _HEAD_HALF[2]))
    _check_span("head", (_HEAD_HALF[0] * scale_xy, _HEAD_HALF[1] * scale_xy), spacing_t, shape_t)

    lbl = HEAD_LABELS
    labels = np.zeros(shape_t, dtype=np.uint8)
    outer = [_jitter(rng, h, 0.05) * s for h, s in zip(_HEAD_HALF, scales)]
    centre = [rng.uniform(-0.03, 0.03) * o for o in outer]
    scalp = [max(4.0 * s, sp) for s, sp in zip(scales, spacing_t)]
    skull_t = [max(_jitter(rng, 7.0) * s, sp) for s, sp in zip(scales, spacing_t)]
    skull_outer = [o - t for o, t in zip(outer, scalp)]
    brain = [o - t for o, t in zip(skull_outer, skull_t)]
    everything = list(range(256))
    _paint_ellipsoid(labels, axes, centre, outer, lbl["scalp"], everything)
    _paint_ellipsoid(labels, axes, centre, skull_outer, lbl["skull"], everything)
    _paint_ellipsoid(labels, axes, centre, brain, lbl["brain"], everything)

    if lesion:
        # A separate stream for the lesion keeps the rest of the case (shapes, HU, noise)
        # identical to the same seed without a lesion: a matched control pair.
        lesion_rng = np.random.default_rng([seed, 1])
        # Seeded position well inside the brain (normalised radius <= 0.55).
        direction = lesion_rng.standard_normal(3)
        direction /= np.linalg.norm(direction)
        radius = 0.55 * lesion_rng.uniform(0.0, 1.0) ** (1.0 / 3.0)
        lesion_centre = [c + radius * d * h for c, d, h in zip(centre, direction, brain)]
        # At least one voxel (the larger in-plane spacing in-plane, as it is rotated).
        minimum = (max(spacing_t[:2]), max(spacing_t[:2]), spacing_t[2])
        lesion_semi = [max(lesion_rng.uniform(2.5, 10.0) * s, m) for s, m in zip(scales, minimum)]
        _paint_ellipsoid(labels, axes, lesion_centre, lesion_semi, lbl["lesion"], [lbl["brain"]],
                         lesion_rng.uniform(0.0, 180.0))

    image = _render(labels, HEAD_HU, HEAD_LABELS, spacing_t, rng, noise_hu, blur_mm)
    return image, labels, affine


def make_phantom(*, kind: str = "body", **kwargs: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dispatch to ``make_body_phantom`` or ``make_head_phantom``.

    Args:
        kind: ``"body"`` or ``"head"``.
        **kwargs: keyword arguments of that function (``None`` values take its default).

    Returns:
        ``(image, labels, affine)``.
    """
    if kind not in PHANTOM_KINDS:
        raise ValueError(f"kind must be one of {PHANTOM_KINDS}, got {kind!r}")
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return make_body_phantom(**kwargs) if kind == "body" else make_head_phantom(**kwargs)


#: Ranges a varied phantom draws its acquisition and habitus from (``make_varied_phantom``):
#: field of view in mm per axis (the spacing is field of view / shape), Gaussian noise
#: sigma in HU, blur sigma in mm, and the fraction of the in-plane field of view the body
#: or head fills (the rest is air: thin and broad patients at one field of view).
VARIED_RANGES: dict[str, dict[str, tuple[float, float] | tuple[tuple[float, float], ...]]] = {
    "body": {"fov_mm": ((330.0, 480.0), (330.0, 480.0), (260.0, 420.0)), "noise_hu": (5.0, 30.0),
             "blur_mm": (0.0, 2.0), "fill": (0.65, 1.0)},
    "head": {"fov_mm": ((170.0, 240.0), (200.0, 260.0), (150.0, 200.0)), "noise_hu": (3.0, 20.0),
             "blur_mm": (0.0, 1.5), "fill": (0.8, 1.0)},
}


def make_varied_phantom(
    *, kind: str = "body", shape: Sequence[int] = (64, 64, 48), seed: int = 0, lesion: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """A phantom with seeded acquisition and habitus on top of the seeded anatomy.

    The seed draws, from ``VARIED_RANGES[kind]``: the field of view (hence the spacing, per
    axis), the noise, the blur and how much of the in-plane field of view the patient fills;
    ``make_body_phantom`` / ``make_head_phantom`` then jitter the organs' sizes, positions
    and HU with a seed drawn from the same stream. A head drawn with and without ``lesion``
    is the same head (a matched pair). For corpora of varied cases (pretraining, probes).

    Args:
        kind: ``"body"`` or ``"head"``.
        shape: voxel counts ``(i, j, k)`` of the returned grid.
        seed: seeds everything drawn.
        lesion: head only: add a hyperdense lesion.

    Returns:
        ``(image, labels, affine, drawn)``: as ``make_phantom``, plus the drawn
        ``spacing``, ``noise_hu``, ``blur_mm``, ``fill`` and ``anatomy_seed``.

    Raises:
        ValueError: on a malformed kind, shape or seed, or a lesion on a body phantom.
    """
    if kind not in PHANTOM_KINDS:
        raise ValueError(f"kind must be one of {PHANTOM_KINDS}, got {kind!r}")
    if kind == "body" and lesion:
        raise ValueError("lesion=True is only available for head phantoms (kind='head')")
    shape_t, _ = _validate_grid(shape, 1.0)
    rng = np.random.default_rng([_validate_seed(seed), 7])
    ranges = VARIED_RANGES[kind]
    spacing = tuple(float(rng.uniform(*r)) / n for r, n in zip(ranges["fov_mm"], shape_t))
    drawn: dict[str, Any] = {
        "spacing": spacing,
        "noise_hu": float(rng.uniform(*ranges["noise_hu"])),
        "blur_mm": float(rng.uniform(*ranges["blur_mm"])),
        "fill": float(rng.uniform(*ranges["fill"])),
        "anatomy_seed": int(rng.integers(0, 2**31 - 1)),
    }
    # The patient is drawn on an inner grid (same spacing) and padded with noisy air.
    in_plane = [max(MIN_SIZE, int(round(drawn["fill"] * n))) for n in shape_t[:2]]
    inner = (*in_plane, shape_t[2]) if kind == "body" else (*in_plane, max(MIN_SIZE, int(round(drawn["fill"] * shape_t[2]))))
    options: dict[str, Any] = {"shape": inner, "spacing": spacing, "seed": drawn["anatomy_seed"],
                               "noise_hu": drawn["noise_hu"], "blur_mm": drawn["blur_mm"]}
    if kind == "head":
        options["lesion"] = bool(lesion)
    small_image, small_labels, _ = make_phantom(kind=kind, **options)
    before = [(n - m) // 2 for n, m in zip(shape_t, inner)]
    box = tuple(slice(b, b + m) for b, m in zip(before, inner))
    image = rng.standard_normal(shape_t).astype(np.float32) * np.float32(drawn["noise_hu"]) + np.float32(HEAD_HU["air"][0])
    image = np.clip(np.rint(image), _HU_MIN, _HU_MAX).astype(np.int16)
    image[box] = small_image
    labels = np.zeros(shape_t, dtype=np.uint8)
    labels[box] = small_labels
    return image, labels, phantom_affine(shape_t, spacing), drawn


# ---------------------------------------------------------------------------------------
# Relabelling and statistics (pure functions).
# ---------------------------------------------------------------------------------------


def to_totalseg_labels(labels: np.ndarray, *, kind: str = "body") -> np.ndarray:
    """Relabel a phantom label map to TotalSegmentator v2 class indices (``TOTALSEG_INDEX``).

    Structures without a TotalSegmentator class (soft tissue, fat, scalp) become 0.

    Args:
        labels: a phantom label map (``BODY_LABELS`` or ``HEAD_LABELS`` values).
        kind: ``"body"`` or ``"head"``: which registry ``labels`` uses.

    Returns:
        A uint8 array of the same shape with values in ``0..117``.
    """
    if kind not in PHANTOM_KINDS:
        raise ValueError(f"kind must be one of {PHANTOM_KINDS}, got {kind!r}")
    registry = BODY_LABELS if kind == "body" else HEAD_LABELS
    lut = np.zeros(256, dtype=np.uint8)
    for name, value in registry.items():
        lut[value] = TOTALSEG_INDEX.get(name, 0)
    return lut[np.asarray(labels, dtype=np.uint8)]


def label_statistics(
    image: np.ndarray, labels: np.ndarray, affine: np.ndarray, *, registry: Mapping[str, int]
) -> dict[str, dict[str, Any]]:
    """Per-structure voxel count, HU mean/std and world centroid.

    Args:
        image: HU array.
        labels: label array on the same grid.
        affine: 4 x 4 voxel-to-world matrix (mm).
        registry: structure name -> label value (``BODY_LABELS`` or ``HEAD_LABELS``).

    Returns:
        ``{name: {"voxels": int, "mean_hu": float, "std_hu": float, "centroid_mm": [x, y, z]}}``
        for every registry entry; empty structures have ``voxels == 0`` and NaN values.
    """
    image = np.asarray(image)
    labels = np.asarray(labels)
    if image.shape != labels.shape or image.ndim != 3:
        raise ValueError(f"image and labels must be 3D arrays of one shape, got {image.shape} and {labels.shape}")
    flat = labels.ravel().astype(np.intp)
    size = max(int(flat.max(initial=0)), *registry.values()) + 1
    counts = np.bincount(flat, minlength=size).astype(np.float64)
    values = image.ravel().astype(np.float64)
    sums = np.bincount(flat, weights=values, minlength=size)
    squares = np.bincount(flat, weights=values * values, minlength=size)
    index_sums = []
    for axis, n in enumerate(labels.shape):
        shape = [1, 1, 1]
        shape[axis] = n
        index = np.broadcast_to(np.arange(n, dtype=np.float64).reshape(shape), labels.shape)
        index_sums.append(np.bincount(flat, weights=index.ravel(), minlength=size))
    stats: dict[str, dict[str, Any]] = {}
    for name, value in registry.items():
        count = counts[value]
        if count == 0:
            stats[name] = {"voxels": 0, "mean_hu": math.nan, "std_hu": math.nan, "centroid_mm": [math.nan] * 3}
            continue
        mean = sums[value] / count
        centroid_vox = np.array([s[value] / count for s in index_sums] + [1.0])
        stats[name] = {
            "voxels": int(count),
            "mean_hu": float(mean),
            "std_hu": float(math.sqrt(max(squares[value] / count - mean * mean, 0.0))),
            "centroid_mm": [float(c) for c in (np.asarray(affine, dtype=np.float64) @ centroid_vox)[:3]],
        }
    return stats


# ---------------------------------------------------------------------------------------
# Writing files.
# ---------------------------------------------------------------------------------------


def _save_nifti(image: Any, path: Path) -> None:
    """Save a nibabel image atomically (the temporary name keeps ``.nii.gz``, so nibabel gzips it)."""
    import nibabel as nib

    atomic_write(path, lambda tmp: nib.save(image, tmp))


def _nifti(array: np.ndarray, affine: np.ndarray, *, is_label: bool) -> Any:
    import nibabel as nib

    image = nib.Nifti1Image(array, affine)
    header = image.header
    header.set_data_dtype(array.dtype)
    image.set_qform(affine, code=1)  # scanner anatomical
    image.set_sform(affine, code=1)
    header.set_xyzt_units(xyz="mm", t="sec")
    header["descrip"] = b"CT-FM phantom labels" if is_label else b"CT-FM phantom CT (HU)"
    if is_label:
        header.set_intent("label")
    return image


def save_phantom(
    image: np.ndarray,
    labels: np.ndarray | None,
    affine: np.ndarray,
    *,
    image_path: str | os.PathLike,
    label_path: str | os.PathLike | None = None,
) -> dict[str, str]:
    """Write a phantom (and optionally its label map) as NIfTI, atomically.

    Both files carry the same affine as qform and sform (code 1, scanner anatomical)
    and mm units; the image is int16 HU, the labels uint8.

    Args:
        image: int16 HU array.
        labels: label array (written only when ``label_path`` is given).
        affine: 4 x 4 voxel-to-world matrix.
        image_path: output ``.nii.gz`` (or ``.nii``) path for the image.
        label_path: output path for the label map, or ``None`` to skip it.

    Returns:
        ``{"image": path}`` plus ``"label"`` when a label map was written.
    """
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"image must be a 3D array, got shape {image.shape}")
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be 4 x 4, got shape {affine.shape}")
    written = {}
    path = Path(image_path)
    _save_nifti(_nifti(image.astype(np.int16, copy=False), affine, is_label=False), path)
    written["image"] = str(path)
    if label_path is not None:
        if labels is None or np.shape(labels) != image.shape:
            raise ValueError(f"labels must have the image's shape {image.shape} to write {label_path}")
        path = Path(label_path)
        _save_nifti(_nifti(np.asarray(labels).astype(np.uint8, copy=False), affine, is_label=True), path)
        written["label"] = str(path)
    return written


def default_label_path(image_path: str | os.PathLike) -> str:
    """``ct.nii.gz`` -> ``ct_labels.nii.gz`` (beside the image)."""
    path = Path(image_path)
    for ext in (".nii.gz", ".nii"):
        if path.name.endswith(ext):
            return str(path.with_name(path.name[: -len(ext)] + "_labels" + ext))
    return str(path.with_name(path.name + "_labels.nii.gz"))


def write_phantom(
    *,
    output: str,
    kind: str = "body",
    label_output: str | None = None,
    shape: Sequence[int] | None = None,
    spacing: float | Sequence[float] | None = None,
    seed: int = 0,
    lesion: bool = False,
    noise_hu: float | None = None,
    blur_mm: float = 0.0,
) -> dict[str, str]:
    """Make one body or head phantom and write it (CLI verbs ``body`` and ``head``).

    Args:
        output: image path (``.nii.gz``).
        kind: ``"body"`` or ``"head"``.
        label_output: label map path; default ``<output stem>_labels.nii.gz``.
        shape: voxel counts; default that of the phantom function.
        spacing: voxel sizes in mm; default that of the phantom function.
        seed: random seed.
        lesion: head only: add a hyperdense lesion.
        noise_hu: Gaussian noise sigma in HU; default that of the phantom function.
        blur_mm: Gaussian blur sigma in mm before the noise (0: none).

    Returns:
        The written paths, ``{"image": ..., "label": ...}``.
    """
    if kind == "body" and lesion:
        raise ValueError("lesion=True is only available for head phantoms (kind='head')")
    options = {"shape": shape, "spacing": spacing, "seed": seed, "noise_hu": noise_hu, "blur_mm": blur_mm}
    if kind == "head":
        options["lesion"] = bool(lesion)
    image, labels, affine = make_phantom(kind=kind, **options)
    return save_phantom(image, labels, affine, image_path=output,
                        label_path=label_output or default_label_path(output))


def _case_seed(seed: int, index: int) -> int:
    """An independent, reproducible seed for case ``index`` of a dataset."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def make_dataset(
    *,
    output_dir: str,
    num_cases: int,
    kind: str = "body",
    seed: int = 0,
    shape: Sequence[int] | None = None,
    spacing: float | Sequence[float] | None = None,
    lesion_fraction: float = 0.5,
    validation_fraction: float = 0.2,
    noise_hu: float | None = None,
    datalist_name: str = "datalist.json",
) -> str:
    """Write ``num_cases`` phantoms and a MONAI decathlon-style datalist.

    Layout: ``imagesTr/<kind>_NNN.nii.gz`` and ``labelsTr/<kind>_NNN.nii.gz`` under
    ``output_dir``, and ``<output_dir>/<datalist_name>`` with ``training`` and
    ``validation`` lists whose paths are relative to ``output_dir``. Body items are
    ``{"image", "label"}`` (label map path). Head items are ``{"image", "label": 0|1,
    "lesion_mask"}``: ``label`` is the lesion flag, ``lesion_mask`` a binary uint8 mask.
    Lesion cases are stratified over the two lists.

    Args:
        output_dir: dataset folder (created).
        num_cases: number of cases, at least 1.
        kind: ``"body"`` or ``"head"``.
        seed: dataset seed; each case gets its own seed derived from it.
        shape: voxel counts; default that of the phantom function.
        spacing: voxel sizes in mm; default that of the phantom function.
        lesion_fraction: head only: fraction of cases with a lesion.
        validation_fraction: fraction of cases in ``validation`` (at least one when
            ``num_cases >= 2``).
        noise_hu: Gaussian noise sigma in HU; default that of the phantom function.
        datalist_name: datalist file name.

    Returns:
        The datalist path.
    """
    if kind not in PHANTOM_KINDS:
        raise ValueError(f"kind must be one of {PHANTOM_KINDS}, got {kind!r}")
    if isinstance(num_cases, bool) or not isinstance(num_cases, (int, np.integer)) or num_cases < 1:
        raise ValueError(f"num_cases must be an integer >= 1, got {num_cases!r}")
    for name, fraction in (("lesion_fraction", lesion_fraction), ("validation_fraction", validation_fraction)):
        if not 0.0 <= float(fraction) <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {fraction!r}")
    seed = _validate_seed(seed)
    if shape is not None or spacing is not None:  # fail before writing anything
        _validate_grid(shape if shape is not None else (MIN_SIZE,) * 3, spacing if spacing is not None else 1.0)

    num_validation = min(max(round(validation_fraction * num_cases), 1), num_cases - 1) if num_cases >= 2 else 0
    is_validation = np.zeros(num_cases, dtype=bool)
    is_validation[num_cases - num_validation:] = True
    has_lesion = np.zeros(num_cases, dtype=bool)
    if kind == "head":
        rng = np.random.default_rng(seed)
        num_lesion = round(lesion_fraction * num_cases)
        val_lesion = round(num_lesion * num_validation / num_cases)
        for part, count in ((is_validation, val_lesion), (~is_validation, num_lesion - val_lesion)):
            members = np.flatnonzero(part)
            has_lesion[rng.permutation(members)[:count]] = True

    root = Path(output_dir)
    datalist: dict[str, Any] = {
        "name": f"CT-FM {kind} phantoms",
        "description": f"synthetic {kind} CT phantoms from tools/synthetic/phantom.py (seed {seed})",
        "labels": ({"0": "background", **{str(v): k for k, v in BODY_LABELS.items()}} if kind == "body"
                   else {"0": "no_lesion", "1": "hyperdense_lesion"}),
        "numTraining": int(num_cases - num_validation),
        "training": [],
        "validation": [],
    }
    for index in range(num_cases):
        case = f"{kind}_{index:03d}"
        image_rel, label_rel = f"imagesTr/{case}.nii.gz", f"labelsTr/{case}.nii.gz"
        options = {"shape": shape, "spacing": spacing, "seed": _case_seed(seed, index), "noise_hu": noise_hu}
        if kind == "head":
            options["lesion"] = bool(has_lesion[index])
        image, labels, affine = make_phantom(kind=kind, **options)
        if kind == "head":
            mask = (labels == HEAD_LABELS["lesion"]).astype(np.uint8)
            save_phantom(image, mask, affine, image_path=root / image_rel, label_path=root / label_rel)
            item: dict[str, Any] = {"image": image_rel, "label": int(has_lesion[index]), "lesion_mask": label_rel}
        else:
            save_phantom(image, labels, affine, image_path=root / image_rel, label_path=root / label_rel)
            item = {"image": image_rel, "label": label_rel}
        datalist["validation" if is_validation[index] else "training"].append(item)
    path = root / datalist_name
    atomic_write_text(path, json.dumps(datalist, indent=2) + "\n")
    return str(path)


def make_triage_dataset(
    *,
    output_dir: str,
    pairs: int = 16,
    validation: int = 10,
    testing: int = 24,
    seed: int = 0,
    shape: Sequence[int] = (64, 64, 32),
    spacing: float | Sequence[float] = (3.0, 3.0, 5.0),
    noise_hu: float = 2.0,
) -> str:
    """Head phantoms for triage (bleed vs none) and a datalist with held-out heads.

    ``training`` holds matched pairs: each head once with and once without a lesion (the
    same head otherwise), so the lesion is the only thing telling the classes apart.
    ``validation`` (model selection) and ``testing`` (held out from training and
    selection) hold distinct heads, alternately without and with a lesion. Item labels
    are ``0``/``1``; paths are relative to ``output_dir``
    (``<section>/head_NNN_<label>.nii.gz``).

    Args:
        output_dir: folder of the images and of ``datalist.json``.
        pairs: matched training pairs (``2 * pairs`` training scans).
        validation: validation heads.
        testing: held-out test heads.
        seed: offsets every head's seed (heads are seeded ``seed + 1``, ``seed + 2``, ...).
        shape: voxel counts of each head.
        spacing: voxel sizes in mm.
        noise_hu: Gaussian noise sigma in HU.

    Returns:
        The datalist path.
    """
    root = Path(output_dir)
    items: dict[str, list[dict[str, Any]]] = {"training": [], "validation": [], "testing": []}
    head_seed = _validate_seed(seed)
    for section, count in (("training", pairs), ("validation", validation), ("testing", testing)):
        for i in range(count):
            head_seed += 1
            for lesion in (False, True) if section == "training" else (bool(i % 2),):
                name = f"{section}/head_{head_seed:03d}_{int(lesion)}.nii.gz"
                image, _, affine = make_head_phantom(shape=shape, spacing=spacing, seed=head_seed, lesion=lesion,
                                                     noise_hu=noise_hu)
                save_phantom(image, None, affine, image_path=root / name)
                items[section].append({"image": name, "label": int(lesion)})
    path = root / "datalist.json"
    atomic_write_text(path, json.dumps(items, indent=1) + "\n")
    return str(path)


def phantom_stats(*, image: str, label: str, kind: str = "body") -> dict[str, dict[str, Any]]:
    """Per-structure statistics of a written phantom (CLI verb ``stats``).

    Args:
        image: image NIfTI path.
        label: label map NIfTI path (same grid).
        kind: ``"body"`` or ``"head"``: which registry the label map uses.

    Returns:
        ``label_statistics`` of the files.
    """
    import nibabel as nib

    if kind not in PHANTOM_KINDS:
        raise ValueError(f"kind must be one of {PHANTOM_KINDS}, got {kind!r}")
    image_nii, label_nii = nib.load(image), nib.load(label)
    if image_nii.shape != label_nii.shape or not np.allclose(image_nii.affine, label_nii.affine, atol=1e-4):
        raise ValueError(f"{label} is not on the grid of {image}")
    return label_statistics(np.asanyarray(image_nii.dataobj), np.asanyarray(label_nii.dataobj).astype(np.uint8),
                            image_nii.affine, registry=BODY_LABELS if kind == "body" else HEAD_LABELS)


def write_body_phantom(
    *,
    output: str,
    label_output: str | None = None,
    shape: Sequence[int] | None = None,
    spacing: float | Sequence[float] | None = None,
    seed: int = 0,
    noise_hu: float | None = None,
    blur_mm: float = 0.0,
) -> dict[str, str]:
    """Write a body phantom and its label map (CLI verb ``body``).

    Args:
        output: image path (``.nii.gz``).
        label_output: label map path; default ``<output stem>_labels.nii.gz``.
        shape: voxel counts, e.g. ``96,96,64``; default that of ``make_body_phantom``.
        spacing: voxel sizes in mm, e.g. ``3,3,3`` or ``1.5``; default that of ``make_body_phantom``.
        seed: random seed.
        noise_hu: Gaussian noise sigma in HU; default that of ``make_body_phantom``.
        blur_mm: Gaussian blur sigma in mm before the noise (0: none).

    Returns:
        The written paths, ``{"image": ..., "label": ...}``.
    """
    return write_phantom(output=output, kind="body", label_output=label_output, shape=shape, spacing=spacing,
                         seed=seed, noise_hu=noise_hu, blur_mm=blur_mm)


def write_head_phantom(
    *,
    output: str,
    lesion: bool = False,
    label_output: str | None = None,
    shape: Sequence[int] | None = None,
    spacing: float | Sequence[float] | None = None,
    seed: int = 0,
    noise_hu: float | None = None,
    blur_mm: float = 0.0,
) -> dict[str, str]:
    """Write a head phantom and its label map (CLI verb ``head``).

    Args:
        output: image path (``.nii.gz``).
        lesion: add a hyperdense (about 70 HU) lesion inside the brain.
        label_output: label map path; default ``<output stem>_labels.nii.gz``.
        shape: voxel counts, e.g. ``64,64,40``; default that of ``make_head_phantom``.
        spacing: voxel sizes in mm, e.g. ``3,3,4``; default that of ``make_head_phantom``.
        seed: random seed.
        noise_hu: Gaussian noise sigma in HU; default that of ``make_head_phantom``.
        blur_mm: Gaussian blur sigma in mm before the noise (0: none).

    Returns:
        The written paths, ``{"image": ..., "label": ...}``.
    """
    return write_phantom(output=output, kind="head", label_output=label_output, shape=shape, spacing=spacing,
                         seed=seed, lesion=lesion, noise_hu=noise_hu, blur_mm=blur_mm)


def cli() -> None:
    """The console command (``[project.scripts]`` of pyproject.toml)."""
    import fire

    fire.Fire({"body": write_body_phantom, "head": write_head_phantom, "dataset": make_dataset, "stats": phantom_stats})


if __name__ == "__main__":
    cli()
