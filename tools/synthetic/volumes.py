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
"""A phantom of either kind (``make_phantom``), and varied phantoms: seeded field of view, noise, blur and
habitus on top of the seeded anatomy (``make_varied_phantom``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ctfm_bundles.tools.synthetic.anatomy import HEAD_HU, MIN_SIZE, PHANTOM_KINDS, HU_MAX, HU_MIN
from ctfm_bundles.tools.synthetic.body import make_body_phantom
from ctfm_bundles.tools.synthetic.geometry import validate_grid, validate_seed, phantom_affine
from ctfm_bundles.tools.synthetic.head import make_head_phantom

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
    shape_t, _ = validate_grid(shape, 1.0)
    rng = np.random.default_rng([validate_seed(seed), 7])
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
    image = np.clip(np.rint(image), HU_MIN, HU_MAX).astype(np.int16)
    image[box] = small_image
    labels = np.zeros(shape_t, dtype=np.uint8)
    labels[box] = small_labels
    return image, labels, phantom_affine(shape_t, spacing), drawn
