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
from .labels import display_colours, structure_codes

logger = logging.getLogger("ctfm_wholebody_seg")

# sRGB (linear) -> CIE XYZ under D50, the DICOM profile connection space (Bradford-adapted sRGB matrix)
_SRGB_TO_XYZ_D50 = np.array([[0.4360747, 0.3850649, 0.1430804],
                             [0.2225045, 0.7168786, 0.0606169],
                             [0.0139322, 0.0971045, 0.7141733]])
_D50_WHITE = np.array([0.9642, 1.0, 0.8249])


def bundle_version(bundle_root: str | os.PathLike | None = None) -> str:
    """The bundle's version, read from its ``configs/metadata.json``."""
    import json

    root = Path(bundle_root) if bundle_root else Path(__file__).resolve().parents[1]
    return str(json.loads((root / "configs" / "metadata.json").read_text())["version"])


def rgb_to_dicom_lab(rgb: tuple[int, int, int]) -> list[int]:
    """An sRGB colour (0-255) as a DICOM ``RecommendedDisplayCIELabValue`` (CIELab under D50, scaled to
    0-65535: L* over 0..100, a* and b* over -128..127)."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = _SRGB_TO_XYZ_D50 @ linear / _D50_WHITE
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    lab = (116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2]))
    scaled = (lab[0] * 65535 / 100, (lab[1] + 128) * 65535 / 255, (lab[2] + 128) * 65535 / 255)
    return [int(round(min(max(v, 0), 65535))) for v in scaled]


def _coded(entry: list | None):
    from highdicom.sr.coding import CodedConcept

    return None if not entry else CodedConcept(value=entry[1], scheme_designator=entry[0], meaning=entry[2])


def segment_description(hd, number: int, name: str, entry: dict | None, algorithm, rgb: tuple[int, int, int] | None):
    """The DICOM segment description of one structure: its coded category and type (SNOMED CT), with
    laterality as the type modifier, the anatomic region (and its modifier) where the table gives one,
    and the recommended display colour. Structures outside the table are coded as Tissue / Organ."""
    from pydicom.sr.codedict import codes

    category = _coded(entry and entry.get("category")) or codes.SCT.Tissue
    kind = _coded(entry and entry.get("type")) or codes.SCT.Organ
    region = _coded(entry and entry.get("region"))
    description = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=name[:64],
        segmented_property_category=category,
        segmented_property_type=kind,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        anatomic_regions=[region] if region is not None else None,
    )
    # highdicom 0.22 has no arguments for these two modifiers nor the colour: set the attributes directly
    if entry and entry.get("type_modifier"):
        description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
            _coded(entry["type_modifier"])
        ]
    if region is not None and entry.get("region_modifier"):
        description.AnatomicRegionSequence[0].AnatomicRegionModifierSequence = [_coded(entry["region_modifier"])]
    if rgb is not None:
        description.RecommendedDisplayCIELabValue = rgb_to_dicom_lab(rgb)
    return description


def _read_series(folder: str | os.PathLike) -> list:
    import pydicom

    datasets = []
    for path in sorted(Path(folder).iterdir()):
        if path.is_file():
            try:
                ds = pydicom.dcmread(str(path), defer_size="64 KB")  # the pixels were read by the load already
            except Exception:  # not a DICOM file (DICOMDIR helpers, notes): ignored
                continue
            if "ImagePositionPatient" in ds and "PixelData" in ds:
                datasets.append(ds)
    if not datasets:
        raise ValueError(f"{folder}: no DICOM image slices found for the DICOM-SEG")
    _fill_blank_uids(datasets, str(folder))
    _fill_missing_type2(datasets)
    return datasets


#: Patient and study attributes of type 2 (required, may be empty) that a DICOM-SEG copies from its
#: source: de-identified series often drop them altogether, which highdicom cannot copy.
_TYPE2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                 "ReferringPhysicianName", "StudyID", "AccessionNumber")


def _fill_missing_type2(datasets: list) -> None:
    """Add the absent type-2 attributes a DICOM-SEG copies, empty as the standard allows (in memory only)."""
    for ds in datasets:
        for keyword in _TYPE2_COPIED:
            if keyword not in ds:
                setattr(ds, keyword, "")


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
    version: str = "",
) -> Path:
    """Write ``labels`` (on the series' grid, as read by MONAI's ITK reader) as a DICOM-SEG.

    Each slice of the series is matched to a plane of ``labels`` through ``affine`` (RAS, mm),
    so the slice order of the files does not matter. One segment per structure present.

    Args:
        labels: label map ``(columns, rows, slices)`` on the series' grid.
        affine: its voxel-to-world matrix (RAS).
        dicom_folder: the source series.
        path: ``.dcm`` file to write (atomically).
        names: index -> structure name (structures of ``scripts/structure_codes.json`` get its codes and
            colours).
        version: the bundle's version (SoftwareVersions; default: read from ``configs/metadata.json``).

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
    version = version or bundle_version()
    algorithm = hd.AlgorithmIdentificationSequence(
        name="CT-FM whole-body segmentation", version=version, family=codes.cid7162.ArtificialIntelligence
    )
    table = structure_codes()
    colours = display_colours({value: names.get(value, f"class_{value}") for value in present}, table)
    descriptions = []
    for n, value in enumerate(present):
        name = names.get(value, f"class_{value}")
        descriptions.append(segment_description(hd, n + 1, name, table.get(name), algorithm, colours.get(value)))
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
        software_versions=version,
        device_serial_number="0",
        series_description="CT-FM whole-body segmentation (research use only)",
    )
    return atomic_write(path, lambda tmp: seg.save_as(str(tmp)))
