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
"""Grid checks, the RAS affine, and the painting primitives (ellipsoids, ellipses, jitter, rendering to HU)
that the body and head phantoms are drawn with."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ctfm_bundles.tools.synthetic.anatomy import MIN_SIZE, MIN_SPAN_VOXELS, HU_MAX, HU_MIN

# ---------------------------------------------------------------------------------------
# Geometry helpers.
# ---------------------------------------------------------------------------------------


def validate_grid(shape: Any, spacing: Any) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
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


def check_span(kind: str, half_widths: Sequence[float], spacing: Sequence[float], shape: Sequence[int]) -> None:
    """Raise when the torso/head would span too few voxels in-plane to hold every organ."""
    for axis, name in ((0, "i (R-L)"), (1, "j (A-P)")):
        span = 2.0 * half_widths[axis] / spacing[axis]
        if span < MIN_SPAN_VOXELS:
            raise ValueError(
                f"the {kind} would span only {span:.1f} voxels along {name} with shape {tuple(shape)} and "
                f"spacing {tuple(spacing)} mm (at least {MIN_SPAN_VOXELS} needed): give the field of "
                "view a more even in-plane aspect ratio or use more voxels")


def validate_non_negative(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return value


def validate_seed(seed: Any) -> int:
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
    shape_t, spacing_t = validate_grid(shape, spacing)
    affine = np.diag([*spacing_t, 1.0])
    affine[:3, 3] = [-(n - 1) / 2.0 * s for n, s in zip(shape_t, spacing_t)]
    return affine


def world_axes(shape: tuple[int, int, int], affine: np.ndarray) -> tuple[np.ndarray, ...]:
    """World coordinates (mm) of the voxel centres along each axis of a diagonal affine."""
    return tuple(affine[a, 3] + affine[a, a] * np.arange(n, dtype=np.float64) for a, n in enumerate(shape))


def index_range(coords: np.ndarray, low: float, high: float) -> slice:
    """The slice of ascending ``coords`` inside ``[low, high]``."""
    return slice(int(np.searchsorted(coords, low, "left")), int(np.searchsorted(coords, high, "right")))


def paint_ellipsoid(
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
    box = (index_range(x, cx - half_x, cx + half_x), index_range(y, cy - half_y, cy + half_y),
           index_range(z, cz - c, cz + c))
    dx, dy, dz = x[box[0]][:, None] - cx, y[box[1]][None, :] - cy, z[box[2]] - cz
    u, v = cos_t * dx + sin_t * dy, -sin_t * dx + cos_t * dy
    inside = ((u / a) ** 2 + (v / b) ** 2)[:, :, None] + ((dz / c) ** 2)[None, None, :] <= 1.0
    region = labels[box]
    region[inside & np.isin(region, paint_over)] = value


def in_ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, a: float, b: float) -> np.ndarray:
    """Boolean 2D (len(x), len(y)) mask of an axis-aligned ellipse."""
    return (((x[:, None] - cx) / a) ** 2 + ((y[None, :] - cy) / b) ** 2) <= 1.0


def jitter(rng: np.random.Generator, value: float, fraction: float = 0.1) -> float:
    """``value`` scaled by a uniform factor in ``[1 - fraction, 1 + fraction]``."""
    return float(value * rng.uniform(1.0 - fraction, 1.0 + fraction))


def render(
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
    return np.clip(np.rint(image), HU_MIN, HU_MAX).astype(np.int16)
