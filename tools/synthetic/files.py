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
"""Writing phantoms as NIfTI (int16 HU image, uint8 label map, the RAS affine), atomically."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ctfm_bundles.tools.synthetic.volumes import make_phantom
from ctfm_common.runtime import atomic_write

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
