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
"""Relabelling phantom label maps to TotalSegmentator indices, and per-structure statistics (pure functions)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from ctfm_bundles.tools.synthetic.anatomy import BODY_LABELS, HEAD_LABELS, PHANTOM_KINDS, TOTALSEG_INDEX

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
