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
"""The head phantom: scalp, skull and brain, optionally with a hyperdense lesion, on any grid."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ctfm_bundles.tools.synthetic.anatomy import HEAD_HU, HEAD_LABELS, FILL, HEAD_HALF
from ctfm_bundles.tools.synthetic.geometry import (
    check_span,
    jitter,
    paint_ellipsoid,
    phantom_affine,
    render,
    validate_grid,
    validate_non_negative,
    validate_seed,
    world_axes,
)

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
    shape_t, spacing_t = validate_grid(shape, spacing)
    noise_hu = validate_non_negative("noise_hu", noise_hu)
    blur_mm = validate_non_negative("blur_mm", blur_mm)
    seed = validate_seed(seed)
    rng = np.random.default_rng(seed)
    affine = phantom_affine(shape_t, spacing_t)
    axes = world_axes(shape_t, affine)
    fov = [n * s for n, s in zip(shape_t, spacing_t)]
    scale_xy = min(FILL * fov[0] / (2 * HEAD_HALF[0]), FILL * fov[1] / (2 * HEAD_HALF[1]))
    scales = (scale_xy, scale_xy, FILL * fov[2] / (2 * HEAD_HALF[2]))
    check_span("head", (HEAD_HALF[0] * scale_xy, HEAD_HALF[1] * scale_xy), spacing_t, shape_t)

    lbl = HEAD_LABELS
    labels = np.zeros(shape_t, dtype=np.uint8)
    outer = [jitter(rng, h, 0.05) * s for h, s in zip(HEAD_HALF, scales)]
    centre = [rng.uniform(-0.03, 0.03) * o for o in outer]
    scalp = [max(4.0 * s, sp) for s, sp in zip(scales, spacing_t)]
    skull_t = [max(jitter(rng, 7.0) * s, sp) for s, sp in zip(scales, spacing_t)]
    skull_outer = [o - t for o, t in zip(outer, scalp)]
    brain = [o - t for o, t in zip(skull_outer, skull_t)]
    everything = list(range(256))
    paint_ellipsoid(labels, axes, centre, outer, lbl["scalp"], everything)
    paint_ellipsoid(labels, axes, centre, skull_outer, lbl["skull"], everything)
    paint_ellipsoid(labels, axes, centre, brain, lbl["brain"], everything)

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
        paint_ellipsoid(labels, axes, lesion_centre, lesion_semi, lbl["lesion"], [lbl["brain"]],
                         lesion_rng.uniform(0.0, 180.0))

    image = render(labels, HEAD_HU, HEAD_LABELS, spacing_t, rng, noise_hu, blur_mm)
    return image, labels, affine
