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
"""The body phantom: torso, fat, lungs, heart, liver, spleen, kidneys, spine, ribs and aorta, on any grid."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ctfm_bundles.tools.synthetic.anatomy import (
    AORTA,
    BODY_ELLIPSOIDS,
    BODY_HU,
    BODY_LABELS,
    FAT_MM,
    FILL,
    RIBS,
    SKIN_MM,
    SPINE,
    TORSO_HALF_X,
    TORSO_HALF_Y,
    TORSO_LENGTH,
)
from ctfm_bundles.tools.synthetic.geometry import (
    check_span,
    in_ellipse,
    index_range,
    jitter,
    paint_ellipsoid,
    phantom_affine,
    render,
    validate_grid,
    validate_non_negative,
    validate_seed,
    world_axes,
)

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
    shape_t, spacing_t = validate_grid(shape, spacing)
    noise_hu = validate_non_negative("noise_hu", noise_hu)
    blur_mm = validate_non_negative("blur_mm", blur_mm)
    rng = np.random.default_rng(validate_seed(seed))
    affine = phantom_affine(shape_t, spacing_t)
    axes = world_axes(shape_t, affine)
    x, y, z = axes
    sp_x, sp_y, sp_z = spacing_t
    fov = [n * s for n, s in zip(shape_t, spacing_t)]
    z_low = z[0] - sp_z / 2.0
    # One in-plane scale keeps the axial aspect ratio; S-I is scaled to fill the length.
    scale = min(FILL * fov[0] / (2 * TORSO_HALF_X), FILL * fov[1] / (2 * TORSO_HALF_Y))
    scale_z = fov[2] / TORSO_LENGTH
    check_span("torso", (TORSO_HALF_X * scale, TORSO_HALF_Y * scale), spacing_t, shape_t)
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
    half_x = jitter(rng, TORSO_HALF_X, 0.05) * scale
    half_y = jitter(rng, TORSO_HALF_Y, 0.05) * scale
    skin = max(SKIN_MM * scale, 0.5 * min(sp_x, sp_y))
    fat = max(jitter(rng, FAT_MM, 0.3) * scale, 1.0 * max(sp_x, sp_y))
    inner_x, inner_y = half_x - skin - fat, half_y - skin - fat
    body2d = in_ellipse(x, y, 0.0, 0.0, half_x, half_y)
    fat2d = in_ellipse(x, y, 0.0, 0.0, half_x - skin, half_y - skin)
    inner2d = in_ellipse(x, y, 0.0, 0.0, inner_x, inner_y)
    plane = np.zeros(shape_t[:2], dtype=np.uint8)
    plane[body2d] = lbl["soft_tissue"]
    plane[fat2d & ~inner2d] = lbl["fat"]
    labels[:] = plane[:, :, None]

    # Organs, in painting order.
    for organ in BODY_ELLIPSOIDS:
        cx, cy, cz = organ["centre"]
        a, b, c = organ["semi"]
        sa, sb = jitter(rng, a), jitter(rng, b)
        centre = (
            (cx + rng.uniform(-0.1, 0.1) * a) * scale,
            (cy + rng.uniform(-0.1, 0.1) * b) * scale,
            z_at(cz + rng.uniform(-0.1, 0.1) * c),
        )
        semi = (in_plane(sa), in_plane(sb), max(jitter(rng, c) * fov[2], sp_z))
        paint_over = [lbl[name] for name in organ["paint_over"]]
        yaw = organ["yaw"] + rng.uniform(-5.0, 5.0)
        paint_ellipsoid(labels, axes, centre, semi, lbl[organ["name"]], paint_over, yaw)

    # Descending aorta: a tube from the inferior edge up to the arch.
    ax, ay = (v * scale for v in AORTA["centre"])
    radius = max(jitter(rng, AORTA["radius"]) * scale, max(sp_x, sp_y))
    top = z_at(AORTA["top"] + rng.uniform(-0.02, 0.02))
    tube = in_ellipse(x, y, ax, ay, radius, radius)[:, :, None] & (z <= top)[None, None, :]
    allowed = np.isin(labels, [lbl[n] for n in ("soft_tissue", "lung_left", "lung_right", "heart")])
    labels[tube & allowed] = lbl["aorta"]

    # Vertebral column: body + arch + spinous process in-plane, segmented by discs.
    spine = SPINE
    body_y = spine["body_y"] * scale
    body_a, body_b = in_plane(spine["body_semi"][0]), in_plane(spine["body_semi"][1])
    canal_r = spine["canal_radius"] * scale
    canal_y = body_y - body_b - canal_r
    arch_r = canal_r + in_plane(spine["arch_thickness"])
    rr = np.hypot(x[:, None], y[None, :] - canal_y)
    arch = (rr <= arch_r) & (rr > canal_r) & (y[None, :] <= canal_y + 0.5 * canal_r)
    spinous = (np.abs(x[:, None]) <= in_plane(spine["spinous_half_width"])) & (
        (y[None, :] <= canal_y) & (y[None, :] >= canal_y - arch_r - spine["spinous_length"] * scale))
    vertebra2d = in_ellipse(x, y, 0.0, body_y, body_a, body_b) | arch | spinous
    period = fov[2] / spine["segments"]
    disc_half = 0.5 * spine["disc_fraction"] * period
    phase = np.mod(z - z_low + rng.uniform(0.0, period), period)
    # Discs only where they are resolved: at coarse S-I spacing the column is continuous.
    bone_z = np.abs(phase - 0.5 * period) >= disc_half if 2 * disc_half >= sp_z else np.ones_like(z, bool)
    column = vertebra2d[:, :, None] & bone_z[None, None, :]
    labels[column & (labels != lbl["fat"]) & (labels != 0)] = lbl["vertebrae"]

    # Ribs: tilted arcs in the thorax, one per side and level.
    ribs = RIBS
    rib_a, rib_b = inner_x - ribs["inset"] * scale, inner_y - ribs["inset"] * scale
    thickness = in_plane(ribs["thickness"])
    ring = in_ellipse(x, y, 0.0, 0.0, rib_a + thickness / 2, rib_b + thickness / 2) & ~in_ellipse(
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
        kk = index_range(z, z0 - tilt - z_half, z0 + tilt + z_half)
        zs = z[kk]
        hit = np.abs(zs[None, :] - z_centre[:, None]) <= z_half
        pi, pk = np.nonzero(hit)
        vi, vj, vk = ii[pi], jj[pi], kk.start + pk
        current = labels[vi, vj, vk]
        ok = np.isin(current, rib_paint_over)
        side = np.where(x[vi] > 0, lbl["rib_right"], lbl["rib_left"]).astype(np.uint8)
        labels[vi[ok], vj[ok], vk[ok]] = side[ok]

    labels[labels == lbl["perirenal_fat"]] = lbl["fat"]
    image = render(labels, BODY_HU, BODY_LABELS, spacing_t, rng, noise_hu, blur_mm)
    return image, labels, affine
