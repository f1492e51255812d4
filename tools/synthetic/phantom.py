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

Tests, the demo and the benchmarks use these phantoms wherever real data is not needed. This module is the
public face (every name below, and the ``ctfm-phantom`` command); the work is split by responsibility:
``anatomy`` (registries and the nominal anatomy, data only), ``geometry`` (grid checks, affine, painting),
``body`` and ``head`` (the two phantoms), ``volumes`` (either kind, varied phantoms), ``labels``
(TotalSegmentator relabelling, statistics), ``files`` (NIfTI writing) and ``datasets`` (cases + datalists).

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

from collections.abc import Sequence
from typing import Any

import numpy as np

from ctfm_bundles.tools.synthetic.anatomy import (
    BODY_HU,
    BODY_LABELS,
    HEAD_HU,
    HEAD_LABELS,
    MIN_SIZE,
    MIN_SPAN_VOXELS,
    PHANTOM_KINDS,
    TOTALSEG_INDEX,
)
from ctfm_bundles.tools.synthetic.body import make_body_phantom
from ctfm_bundles.tools.synthetic.datasets import make_dataset, make_triage_dataset
from ctfm_bundles.tools.synthetic.files import default_label_path, save_phantom, write_phantom
from ctfm_bundles.tools.synthetic.geometry import phantom_affine
from ctfm_bundles.tools.synthetic.head import make_head_phantom
from ctfm_bundles.tools.synthetic.labels import label_statistics, to_totalseg_labels
from ctfm_bundles.tools.synthetic.volumes import VARIED_RANGES, make_phantom, make_varied_phantom

# the public API, one import away (``from ctfm_bundles.tools.synthetic import phantom``)
__all__ = [
    "BODY_HU",
    "BODY_LABELS",
    "HEAD_HU",
    "HEAD_LABELS",
    "MIN_SIZE",
    "MIN_SPAN_VOXELS",
    "PHANTOM_KINDS",
    "TOTALSEG_INDEX",
    "VARIED_RANGES",
    "cli",
    "default_label_path",
    "label_statistics",
    "make_body_phantom",
    "make_dataset",
    "make_head_phantom",
    "make_phantom",
    "make_triage_dataset",
    "make_varied_phantom",
    "phantom_affine",
    "phantom_stats",
    "save_phantom",
    "to_totalseg_labels",
    "write_body_phantom",
    "write_head_phantom",
    "write_phantom",
]


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
