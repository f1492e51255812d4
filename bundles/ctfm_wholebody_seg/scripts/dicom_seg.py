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
"""DICOM-SEG output (highdicom) for label maps segmented from a DICOM series.

highdicom is optional (``pip install highdicom==0.22.0``: the newest release that accepts
pydicom 2.x, which MONAI Label needs); it is imported only here. highdicom 0.22 refers to
``numpy.float_``, which NumPy 2 removed; the alias (``numpy.float64``) is restored before use.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from .ctfm_common.runtime import atomic_write

VERSION = "0.2.0"
logger = logging.getLogger("ctfm_wholebody_seg")


def _read_series(folder: str | os.PathLike) -> list:
    import pydicom

    datasets = []
    for path in sorted(Path(folder).iterdir()):
        if path.is_file():
            try:
                ds = pydicom.dcmread(str(path))
            except Exception:  # not a DICOM file (DICOMDIR helpers, notes): ignored
                continue
            if "ImagePositionPatient" in ds and "PixelData" in ds:
                datasets.append(ds)
    if not datasets:
        raise ValueError(f"{folder}: no DICOM image slices found for the DICOM-SEG")
    _fill_blank_uids(datasets, str(folder))
    return datasets


def _fill_blank_uids(datasets: list, folder: str) -> None:
    """Give anonymised series whose UIDs were blanked usable ones (in memory only; a warning names them).

    The SOP class comes from the file meta; study and series UIDs are derived from the folder
    path, so repeated runs reference the same (made-up) study.
    """
    from pydicom.uid import generate_uid

    filled = set()
    for n, ds in enumerate(datasets):
        meta = getattr(ds, "file_meta", None)
        if not ds.get("SOPClassUID"):
            ds.SOPClassUID = getattr(meta, "MediaStorageSOPClassUID", "") or "1.2.840.10008.5.1.4.1.1.2"
            filled.add("SOPClassUID")
        if not ds.get("SOPInstanceUID"):
            ds.SOPInstanceUID = getattr(meta, "MediaStorageSOPInstanceUID", "") or generate_uid(
                entropy_srcs=[folder, str(n)]
            )
            filled.add("SOPInstanceUID")
        for key in ("StudyInstanceUID", "SeriesInstanceUID"):
            if not ds.get(key):
                ds[key] = pydicom_element(key, generate_uid(entropy_srcs=[folder, key]))
                filled.add(key)
    if filled:
        logger.warning(f"{folder}: blank {', '.join(sorted(filled))} in the series (anonymised?); the DICOM-SEG "
                       "references generated UIDs")


def pydicom_element(keyword: str, value: str):
    """A UI data element for ``keyword``."""
    from pydicom.dataelem import DataElement
    from pydicom.datadict import tag_for_keyword

    return DataElement(tag_for_keyword(keyword), "UI", value)


def write_dicom_seg(
    labels: np.ndarray,
    affine: np.ndarray,
    dicom_folder: str | os.PathLike,
    path: str | os.PathLike,
    names: Mapping[int, str],
) -> Path:
    """Write ``labels`` (on the series' grid, as read by MONAI's ITK reader) as a DICOM-SEG.

    Each slice of the series is matched to a plane of ``labels`` through ``affine`` (RAS, mm),
    so the slice order of the files does not matter. One segment per structure present.

    Args:
        labels: label map ``(columns, rows, slices)`` on the series' grid.
        affine: its voxel-to-world matrix (RAS).
        dicom_folder: the source series.
        path: ``.dcm`` file to write (atomically).
        names: index -> structure name.

    Returns:
        The path written.

    Raises:
        ImportError: highdicom is missing, with the pip command.
        ValueError: the label map is not on the series' grid.
    """
    try:
        import highdicom as hd
        from pydicom.sr.codedict import codes
    except ImportError as e:
        raise ImportError("DICOM-SEG output needs highdicom: pip install highdicom==0.22.0") from e

    if not hasattr(np, "float_"):  # highdicom 0.22 still names np.float_, removed in NumPy 2.0 (same type)
        np.float_ = np.float64
    datasets = _read_series(dicom_folder)
    to_voxel = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    frames = np.zeros((len(datasets), int(datasets[0].Rows), int(datasets[0].Columns)), dtype=np.int32)
    for n, ds in enumerate(datasets):
        origin = to_voxel @ np.append(lps_to_ras @ np.asarray(ds.ImagePositionPatient, dtype=float), 1.0)
        row_dir = lps_to_ras @ np.asarray(ds.ImageOrientationPatient[:3], dtype=float)  # along a row: columns
        step = to_voxel[:3, :3] @ (row_dir * float(ds.PixelSpacing[1]))
        i, j, k = np.round(origin[:3]).astype(int)
        if not (np.allclose(origin[:3], (i, j, k), atol=0.05) and np.allclose(step, (1, 0, 0), atol=0.05)
                and 0 <= k < labels.shape[2] and (i, j) == (0, 0) and labels.shape[:2] == (ds.Columns, ds.Rows)):
            raise ValueError(f"{dicom_folder}: the label map {labels.shape} is not on the series' grid")
        frames[n] = labels[:, :, k].T
    present = [int(v) for v in np.unique(frames) if v > 0]
    if not present:
        raise ValueError("no structure segmented: a DICOM-SEG needs at least one segment")
    lut = np.zeros(int(frames.max()) + 1, dtype=np.int32)
    lut[present] = np.arange(1, len(present) + 1)
    algorithm = hd.AlgorithmIdentificationSequence(
        name="CT-FM whole-body segmentation", version=VERSION, family=codes.cid7162.ArtificialIntelligence
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=n + 1,
            segment_label=names.get(value, f"class_{value}")[:64],
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Organ,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        for n, value in enumerate(present)
    ]
    seg = hd.seg.Segmentation(
        source_images=datasets,
        pixel_array=lut[frames].astype(np.uint16),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=900,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="CT-FM bundles",
        manufacturer_model_name="ctfm_wholebody_seg",
        software_versions=VERSION,
        device_serial_number="0",
        series_description="CT-FM whole-body segmentation (research use only)",
    )
    return atomic_write(path, lambda tmp: seg.save_as(str(tmp)))
