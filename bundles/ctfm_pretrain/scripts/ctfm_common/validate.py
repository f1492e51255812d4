# GENERATED from ctfm_common/validate.py by ctfm-sync-bundles: edit the source, not this copy.
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
"""Input checks every bundle and tool shares: one place that says what is wrong with a scan.

Two steps, both MONAI dictionary transforms so configs put them around ``LoadImaged``:

- :class:`CheckInputd`, before loading, from the headers only (no voxel is read): the file
  exists and is not empty, its header is readable, it holds one 3-D volume (not 2-D, not 4-D
  with several volumes), its size is plausible (an enormous header is refused before any
  memory is allocated), and a DICOM folder holds exactly one CT image series whose slices are
  evenly spaced with none missing (:func:`check_dicom_folder`).
- :class:`CheckVolumed`, after ``EnsureChannelFirstd``: one channel, three spatial dimensions,
  only finite values; a warning (not an error) when the intensities do not look like CT in
  Hounsfield units (no air: MR, or a CT without its rescale).

Every refusal is an :class:`InputError` whose message starts with the file and says the
problem in one line; :func:`describe_failure` turns any exception of a per-scan pipeline into
such a line for batch summaries. Volumes smaller than a patch are not refused here: every
bundle pads them.
"""

from __future__ import annotations

import gzip
import logging
import math
import os
import re
import zlib
from collections import Counter
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger("ctfm_common.validate")

#: Largest volume accepted (voxels): 2^31, e.g. 1024 x 1024 x 2048; 8 GiB as float32.
MAX_VOXELS = 2**31
#: Bytes per voxel once loaded (MONAI's readers give float32).
LOADED_BYTES_PER_VOXEL = 4
#: A CT in HU has air (about -1000 HU) around or inside the body; without any voxel below this
#: the intensities are probably not HU (MR, PET, or a CT stored without its rescale).
CT_AIR_HU = -200.0

#: Geometry tolerances of a DICOM series (:func:`series_problem`).
GEOMETRY_TOLERANCES: dict[str, float] = {
    "orientation": 1e-4,  # max difference between direction cosines of two instances
    "pixel_spacing_mm": 1e-3,
    "duplicate_position_mm": 1e-2,  # two instances closer than this share a position
    "relative_slice_spacing": 0.01,  # max |interval - median| / median (as IDC's volume_geometry_index)
    "missing_slice_factor": 1.5,  # an interval above this many median spacings is a gap
    "tilt_degrees": 0.1,  # max shear of the slice stack (and max GantryDetectorTilt)
}

#: Accepted voxel spacing per axis (mm): from micro-CT to the thickest clinical slabs. Outside it the
#: affine is corrupt (a spacing of 3e-6 mm resamples a CT into one voxel, 1e6 mm into nothing).
SPACING_RANGE_MM = (0.01, 50.0)
#: Largest relative difference between the affine's axis lengths and the header's pixdim.
AFFINE_PIXDIM_TOLERANCE = 0.01

_NIFTI_SUFFIXES = (".nii", ".nii.gz")
_TEXT_HEADER_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")


class InputError(ValueError):
    """A scan that cannot be used; the message is ``<file>: <problem>`` on one line."""

    def __init__(self, source: str | os.PathLike, problem: str) -> None:
        self.source, self.problem = os.fspath(source), problem
        super().__init__(f"{self.source}: {problem}")


def root_cause(error: BaseException) -> BaseException:
    """The innermost cause of an exception (MONAI wraps transform errors in ``RuntimeError``).

    A chain that loops back (an error re-raised from one of its own causes) ends at the last error
    before the loop.
    """
    seen = {id(error)}
    while error.__cause__ is not None and id(error.__cause__) not in seen:
        error = error.__cause__
        seen.add(id(error))
    return error


def describe_failure(source: str | os.PathLike, error: BaseException) -> str:
    """One line naming the scan and its problem, for logs and batch summaries.

    Args:
        source: the scan (file or DICOM folder).
        error: what the pipeline raised.

    Returns:
        ``"<source>: <problem>"`` (an :class:`InputError`'s own message), else
        ``"<source>: <Type>: <first line of the message>"``.
    """
    cause = root_cause(error)
    if isinstance(cause, InputError):
        return str(cause)
    message = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
    if len(message) > 300:
        message = message[:297] + "..."
    hint = "truncated or corrupt file: " if isinstance(cause, (EOFError, zlib.error, gzip.BadGzipFile)) else ""
    return f"{os.fspath(source)}: {hint}{type(cause).__name__}: {message}"


# ---------------------------------------------------------------------------------------------
# headers
# ---------------------------------------------------------------------------------------------


def available_memory_bytes() -> int | None:
    """Memory available to a new allocation (Linux ``MemAvailable``), or ``None`` when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _gib(n: float) -> str:
    return f"{n / 2**30:.3g} GiB" if n < 2**50 else f"{n / 2**50:.3g} PiB"


def check_size(source: str | os.PathLike, shape: Sequence[int], max_voxels: int = MAX_VOXELS) -> None:
    """Refuse a volume whose size would not fit: more than ``max_voxels`` voxels or more memory than is available.

    Raises:
        InputError: naming the declared shape and the limit it breaks.
    """
    voxels = math.prod(int(s) for s in shape)
    needed = voxels * LOADED_BYTES_PER_VOXEL
    dims = " x ".join(str(int(s)) for s in shape)
    if voxels > max_voxels:
        raise InputError(
            source,
            f"header declares {dims} voxels ({voxels:.3g}, {_gib(needed)} as float32), above "
            f"the limit of {max_voxels:.3g} voxels; refusing to load it",
        )
    available = available_memory_bytes()
    if available is not None and needed > available:
        raise InputError(
            source,
            f"header declares {dims} voxels ({_gib(needed)} as float32), more than the "
            f"{_gib(available)} of memory available; refusing to load it",
        )


def _spatial_shape(source: str, shape: Sequence[int]) -> tuple[int, ...]:
    """The 3-D shape of a header's dimensions (trailing singleton dimensions dropped), or refuse."""
    dims = [int(s) for s in shape]
    while len(dims) > 3 and dims[-1] == 1:
        dims.pop()
    if any(d < 1 for d in dims):
        raise InputError(source, f"header declares an empty image (dimensions {tuple(dims)})")
    if len(dims) < 3:
        raise InputError(source, f"{len(dims)}-D image {tuple(dims)}: expected a 3-D CT volume")
    if len(dims) > 3:
        raise InputError(
            source,
            f"{len(dims)}-D image {tuple(dims)}: expected one 3-D CT volume, not a series of "
            f"{math.prod(dims[3:])} volumes; split it first",
        )
    if min(dims) < 2:
        raise InputError(source, f"image {tuple(dims)} is a single 2-D slice: expected a 3-D CT volume")
    return tuple(dims)


def check_affine(source: str | os.PathLike, affine: Any, pixdim: Sequence[float] | None = None) -> None:
    """Refuse an implausible voxel-to-world affine: not finite, singular, a spacing outside
    :data:`SPACING_RANGE_MM`, or (given the header's ``pixdim``) axis lengths that contradict it.

    Raises:
        InputError: the file, the values found and the accepted range.
    """
    matrix = np.asarray(affine, dtype=np.float64)[:3, :3]
    if not np.isfinite(np.asarray(affine, dtype=np.float64)).all():
        raise InputError(source, "corrupt affine: it holds NaN or infinite values (voxel positions are unknown)")
    spacing = np.linalg.norm(matrix, axis=0)
    shown = ", ".join(f"{v:.3g}" for v in spacing)
    low, high = SPACING_RANGE_MM
    if not ((spacing >= low) & (spacing <= high)).all():
        raise InputError(
            source, f"implausible voxel spacing ({shown}) mm: the accepted range is {low:g} to {high:g} mm per axis"
        )
    if abs(float(np.linalg.det(matrix))) < 1e-6 * float(np.prod(spacing)):
        raise InputError(source, f"corrupt affine: its axes are (nearly) parallel, spacing ({shown}) mm")
    if pixdim is not None:
        declared = np.abs(np.asarray(pixdim, dtype=np.float64)[:3])
        if (np.abs(spacing - declared) > AFFINE_PIXDIM_TOLERANCE * np.maximum(declared, 1e-12)).any():
            raise InputError(
                source,
                f"corrupt affine: its axis lengths ({shown}) mm contradict the header's pixdim "
                f"({', '.join(f'{v:.3g}' for v in declared)}) mm (a sheared or damaged sform)",
            )


def _nifti_shape(path: Path, max_voxels: int) -> tuple[int, ...]:
    import nibabel as nib

    try:
        image = nib.load(str(path))  # reads the header only; voxels stay on disk
    except Exception as e:  # nibabel raises several types for broken headers
        raise InputError(path, f"not a readable NIfTI header ({type(e).__name__}: {e})") from None
    header = image.header
    shape = _spatial_shape(str(path), image.shape)
    check_size(path, shape, max_voxels)
    # the affine MONAI's reader uses: the sform when set, else the qform (whose lengths are pixdim)
    sform_set = int(header.get("sform_code", 0)) > 0
    zooms = header.get_zooms()[:3]
    if not np.isfinite(np.asarray(zooms, dtype=np.float64)).all():
        raise InputError(path, f"corrupt header: pixdim {tuple(float(z) for z in zooms)} is not finite")
    check_affine(path, header.get_best_affine(), pixdim=zooms if sform_set else None)
    if path.name.lower().endswith(".nii"):  # uncompressed: the file must hold every voxel
        itemsize = np.dtype(header.get_data_dtype()).itemsize
        expected = int(header.get_data_offset()) + math.prod(image.shape) * itemsize
        actual = path.stat().st_size
        if actual < expected:
            raise InputError(path, f"truncated file: {actual} bytes where the header needs {expected}")
    return shape


_TEXT_FIELDS = {"sizes": r"^sizes:\s*(.+)$", "DimSize": r"^DimSize\s*=\s*(.+)$"}


def _text_header_shape(path: Path, max_voxels: int) -> tuple[int, ...]:
    """Dimensions from an NRRD (``sizes:``) or MetaImage (``DimSize =``) text header."""
    with open(path, "rb") as f:
        head = f.read(65536)
    text = head.split(b"\n\n", 1)[0].decode("latin-1", errors="replace")  # NRRD: blank line ends the header
    for pattern in _TEXT_FIELDS.values():
        match = re.search(pattern, text, flags=re.MULTILINE)
        if match:
            try:
                shape = [int(v) for v in match.group(1).split()]
            except ValueError:
                raise InputError(path, f"unreadable image size in the header: '{match.group(1).strip()}'") from None
            shape = _spatial_shape(str(path), shape)
            check_size(path, shape, max_voxels)
            return shape
    raise InputError(path, "no image size in the header (not an NRRD/MetaImage file?)")


def check_image_file(path: str | os.PathLike, max_voxels: int = MAX_VOXELS) -> tuple[int, ...] | None:
    """Check one image file from its header: exists, not empty, one plausible 3-D volume.

    Args:
        path: a NIfTI / NRRD / MetaImage file (other formats are left to the reader).
        max_voxels: largest volume accepted.

    Returns:
        The 3-D shape the header declares (``None`` for a format not checked here).

    Raises:
        InputError: the file and its problem.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "file does not exist")
    if not path.is_file():
        raise InputError(path, "not a file")
    if path.stat().st_size == 0:
        raise InputError(path, "empty file (0 bytes)")
    name = path.name.lower()
    if name.endswith(".gz"):
        try:
            with gzip.open(path, "rb") as f:
                f.read(1)
        except (OSError, EOFError) as e:
            raise InputError(path, f"not a readable gzip file ({type(e).__name__}: {e})") from None
    if name.endswith(_NIFTI_SUFFIXES):
        return _nifti_shape(path, max_voxels)
    if name.endswith(_TEXT_HEADER_SUFFIXES):
        return _text_header_shape(path, max_voxels)
    return None


# ---------------------------------------------------------------------------------------------
# DICOM series
# ---------------------------------------------------------------------------------------------


def read_dicom_headers(folder: str | os.PathLike) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """The geometry-relevant header fields of every DICOM file in a folder (pixel data not read).

    Returns:
        ``(images, others)``: one dict per image instance (path, series UID, modality, position,
        orientation, pixel spacing, size, frames, image type, slice thickness, gantry tilt), and
        ``{"path", "modality", "sop_class"}`` of DICOM objects without pixels (a structured report
        ...). Files that are not DICOM (a DICOMDIR, a stray text file) are left out.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    def floats(value: Any) -> tuple[float, ...] | None:
        return None if value is None else tuple(float(v) for v in value)

    images, others = [], []
    for path in sorted(Path(folder).iterdir()):
        if not path.is_file() or path.name.upper() == "DICOMDIR" or path.name.startswith("."):
            continue
        try:
            with open(path, "rb") as f:
                ds = pydicom.dcmread(f, stop_before_pixels=True)
                pixel_start = f.tell()  # where the pixel data element starts (or the end of the file)
        except (InvalidDicomError, OSError, ValueError, EOFError):
            continue
        modality = str(ds.get("Modality", "") or "")
        if "PixelData" not in ds and "Rows" not in ds:
            sop = ds.get("SOPClassUID")
            others.append({"path": str(path), "modality": modality, "sop_class": getattr(sop, "name", str(sop or ""))})
            continue
        thickness = ds.get("SliceThickness")
        tilt = ds.get("GantryDetectorTilt")
        images.append(
            {
                "path": str(path),
                "series_uid": str(ds.get("SeriesInstanceUID", "") or ""),
                "modality": modality,
                "position": floats(ds.get("ImagePositionPatient")),
                "orientation": floats(ds.get("ImageOrientationPatient")),
                "pixel_spacing": floats(ds.get("PixelSpacing")),
                "rows": int(ds.get("Rows", 0) or 0),
                "columns": int(ds.get("Columns", 0) or 0),
                "frames": int(ds.get("NumberOfFrames", 1) or 1),
                "image_type": tuple(str(v).upper() for v in (ds.get("ImageType") or ())),
                "sop_class": str(ds.get("SOPClassUID", "") or ""),
                "slice_thickness": None if thickness in (None, "") else float(thickness),
                "gantry_tilt": None if tilt in (None, "") else float(tilt),
                **_pixel_bytes(ds, path, pixel_start),
            }
        )
    return images, others


def _pixel_bytes(ds: Any, path: Path, pixel_start: int) -> dict[str, int | None]:
    """``pixel_bytes`` (in the file after the pixel data element's header) and ``pixel_bytes_needed`` (what
    Rows x Columns x frames x samples x BitsAllocated declare; ``None`` for compressed pixel data, whose
    size the header does not give)."""
    meta = getattr(ds, "file_meta", None)
    syntax = getattr(meta, "TransferSyntaxUID", None) if meta is not None else None
    if syntax is not None and getattr(syntax, "is_compressed", False):
        return {"pixel_bytes": None, "pixel_bytes_needed": None}
    element_header = 8 if getattr(ds, "is_implicit_VR", False) else 12
    bits = int(ds.get("BitsAllocated", 16) or 16)
    count = (int(ds.get("Rows", 0) or 0) * int(ds.get("Columns", 0) or 0) * int(ds.get("NumberOfFrames", 1) or 1)
             * int(ds.get("SamplesPerPixel", 1) or 1))
    return {
        "pixel_bytes": max(path.stat().st_size - pixel_start - element_header, 0),
        "pixel_bytes_needed": (count * bits + 7) // 8,
    }


def series_problem(
    headers: Sequence[dict[str, Any]], *, filters: Callable[[Sequence[dict[str, Any]]], str] | None = None
) -> tuple[str, list[dict[str, Any]]]:
    """Validate one folder's DICOM image headers as a single regular 3D volume.

    Args:
        headers: the images of :func:`read_dicom_headers` for one folder.
        filters: extra header rules (e.g. a corpus's slice-thickness range), run once the folder is
            known to hold one single-frame series with positions; returns a reason or ``""``.

    Returns:
        ``(reason, sorted_headers)``: ``reason`` is "" when the volume is valid, else one line saying
        what is wrong; ``sorted_headers`` are ordered along the slice normal (ascending).
    """
    tol = GEOMETRY_TOLERANCES
    if not headers:
        return "no DICOM image files", []
    series = Counter(h["series_uid"] for h in headers)
    if len(series) > 1:
        parts = ", ".join(f"{uid or '(empty)'}: {n} files" for uid, n in sorted(series.items()))
        return f"folder mixes {len(series)} series (SeriesInstanceUID {parts}); put one series per folder", []
    truncated = [h for h in headers if h.get("pixel_bytes_needed") and h["pixel_bytes"] < h["pixel_bytes_needed"]]
    if truncated:
        first = truncated[0]
        return (
            f"{len(truncated)} file(s) with truncated pixel data, e.g. {first['path']}: {first['pixel_bytes']} of "
            f"the {first['pixel_bytes_needed']} bytes its header declares (a partial download or copy?)"
        ), []
    if any(h["frames"] > 1 for h in headers):
        return "multi-frame (enhanced) DICOM is not supported: expected one instance per slice", []
    for key, tag in (("position", "ImagePositionPatient"), ("orientation", "ImageOrientationPatient")):
        lacking = [h for h in headers if h[key] is None]
        if lacking:
            return f"{len(lacking)} of {len(headers)} files lack {tag}, e.g. {Path(lacking[0]['path']).name}", []
    if any(h["pixel_spacing"] is None for h in headers):
        return "files lack PixelSpacing", []
    if filters is not None:
        reason = filters(headers)
        if reason:
            return reason, []
    orientations = np.array([h["orientation"] for h in headers])
    if np.abs(orientations - orientations[0]).max() > tol["orientation"]:
        return "inconsistent ImageOrientationPatient across instances", []
    spacings = np.array([h["pixel_spacing"] for h in headers])
    if np.abs(spacings - spacings[0]).max() > tol["pixel_spacing_mm"]:
        values = sorted({tuple(np.round(s, 4)) for s in spacings})
        return f"inconsistent PixelSpacing across instances: {values[:3]}", []
    sizes = sorted({(h["rows"], h["columns"]) for h in headers})
    if len(sizes) > 1:
        return f"inconsistent image size (Rows, Columns) across instances: {sizes[:3]}", []
    if len(headers) < 3:
        return f"only {len(headers)} slice(s): not a 3D volume", []
    row_dir, col_dir = orientations[0][:3], orientations[0][3:]
    normal = np.cross(row_dir, col_dir)
    positions = np.array([h["position"] for h in headers])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    ordered = [headers[i] for i in order]
    along, positions = along[order], positions[order]
    intervals = np.diff(along)
    duplicates = int((intervals < tol["duplicate_position_mm"]).sum())
    if duplicates:
        return f"{duplicates} slice position(s) hold more than one instance (expected one instance per position)", []
    tilts = {h["gantry_tilt"] for h in headers if h["gantry_tilt"] is not None}
    tilted = [t for t in tilts if abs(t) > tol["tilt_degrees"]]
    if tilted:
        return f"gantry tilt {tilted[0]:g} degrees (GantryDetectorTilt): slices are not an orthogonal volume", []
    drift = positions[-1] - positions[0]
    in_plane = math.hypot(float(drift @ row_dir), float(drift @ col_dir))
    shear = math.degrees(math.atan2(in_plane, float(along[-1] - along[0])))
    if shear > tol["tilt_degrees"]:
        return f"gantry tilt: the slice stack is sheared by {shear:.2f} degrees (slice origins drift in-plane)", []
    spacing = float(np.median(intervals))
    gaps = np.nonzero(intervals > tol["missing_slice_factor"] * spacing)[0]
    if gaps.size:
        i = int(gaps[0])
        missing = int(round(float(intervals[gaps].sum()) / spacing)) - gaps.size
        return (
            f"missing slice(s): {gaps.size} gap(s), the first of {intervals[i]:.3g} mm between slice positions "
            f"{along[i]:.2f} and {along[i + 1]:.2f} mm where the spacing is {spacing:.3g} mm "
            f"(about {missing} slice(s) missing)"
        ), []
    deviation = float(np.abs(intervals - spacing).max())
    if deviation > max(tol["relative_slice_spacing"] * spacing, 1e-3):
        return (
            f"inconsistent slice spacing: intervals from {intervals.min():.3g} to {intervals.max():.3g} mm "
            f"(median {spacing:.3g} mm)"
        ), []
    return "", ordered


#: SOP classes of CT image slices (CT Image Storage; Legacy Converted Enhanced CT). Other objects
#: that carry pixels and Modality CT (secondary captures: screenshots, dose reports) are no scan.
CT_IMAGE_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2": "CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.2": "Legacy Converted Enhanced CT Image Storage",
}


def modality_problem(headers: Sequence[dict[str, Any]], modality: str = "CT") -> str:
    """Why a folder's image headers are not ``modality`` image slices ("" when they are): another Modality (MR,
    SEG, ...) or, for CT, a SOP class that is no CT image (a secondary capture with Modality CT)."""
    modalities = Counter(h["modality"] for h in headers)
    if modality and set(modalities) != {modality}:
        found = ", ".join(f"{m or '(empty)'}: {n} files" for m, n in sorted(modalities.items()))
        return (f"Modality {found}; expected {modality} images (a segmentation, MR or other object is not a "
                f"{modality} scan)")
    if modality == "CT":
        others = Counter(h.get("sop_class", "") for h in headers if h.get("sop_class", "") not in CT_IMAGE_SOP_CLASSES)
        others.pop("", None)  # no SOPClassUID: leave it to the other checks
        if others:
            uid, count = others.most_common(1)[0]
            try:
                from pydicom.uid import UID

                name = UID(uid).name
            except Exception:
                name = uid
            return (f"SOP class {name} ({uid}): {count} file(s) that are no CT image slices (expected "
                    f"{', '.join(sorted(set(CT_IMAGE_SOP_CLASSES.values())))})")
    return ""


def check_dicom_folder(
    folder: str | os.PathLike, max_voxels: int = MAX_VOXELS, modality: str = "CT"
) -> tuple[int, ...]:
    """Check a DICOM folder from its headers: one ``modality`` image series, a regular 3-D volume.

    Returns:
        The volume's shape (columns, rows, slices).

    Raises:
        InputError: the folder and what is wrong (two series, a missing slice, uneven spacing, an
            SR or SEG object instead of CT images, ...).
    """
    images, others = read_dicom_headers(folder)
    if not images:
        if others:
            kinds = sorted({f"{o['modality'] or '?'} ({o['sop_class']})" for o in others})
            raise InputError(
                folder,
                f"no image in this DICOM folder, only {len(others)} non-image object(s): "
                f"{', '.join(kinds)}; expected a {modality} image series",
            )
        raise InputError(folder, "no readable DICOM image files")
    problem = modality_problem(images, modality)
    if problem:
        raise InputError(folder, problem)
    reason, ordered = series_problem(images)
    if reason:
        raise InputError(folder, reason)
    shape = (ordered[0]["columns"], ordered[0]["rows"], len(ordered))
    check_size(folder, shape, max_voxels)
    return shape


def check_input(source: str | os.PathLike, max_voxels: int = MAX_VOXELS) -> tuple[int, ...] | None:
    """:func:`check_dicom_folder` for a folder, :func:`check_image_file` for anything else."""
    if os.path.isdir(source):
        return check_dicom_folder(source, max_voxels)
    return check_image_file(source, max_voxels)


# ---------------------------------------------------------------------------------------------
# loaded volumes
# ---------------------------------------------------------------------------------------------


def source_of(image: Any, default: str = "<image>") -> str:
    """The file a loaded MetaTensor came from (its ``filename_or_obj``), else ``default``."""
    meta = getattr(image, "meta", None) or {}
    return str(meta.get("filename_or_obj") or default)


def check_volume(image: Any, source: str | os.PathLike | None = None, *, channels: int = 1) -> None:
    """Check a loaded, channel-first image: ``channels`` channels, 3 spatial dimensions, finite values.

    Logs a warning when no voxel is below :data:`CT_AIR_HU` (the intensities do not look like CT
    in HU: an MR scan, or a CT without its rescale slope/intercept applied).

    Raises:
        InputError: the file and what is wrong.
    """
    import torch

    source = os.fspath(source) if source is not None else source_of(image)
    data = image.as_tensor() if hasattr(image, "as_tensor") else torch.as_tensor(np.asarray(image))
    if data.ndim != 4:
        raise InputError(
            source, f"loaded image has shape {tuple(data.shape)}: expected one channel and 3 spatial dimensions"
        )
    if channels and data.shape[0] != channels:
        raise InputError(
            source,
            f"loaded image has {data.shape[0]} channels {tuple(data.shape)}: expected {channels} (one 3-D CT volume)",
        )
    affine = getattr(image, "affine", None)
    if affine is not None:
        check_affine(source, affine.detach().cpu().numpy() if hasattr(affine, "detach") else affine)
    if data.is_floating_point():
        finite = torch.isfinite(data)
        if not bool(finite.all()):
            bad = int((~finite).sum())
            raise InputError(source, f"{bad} of {data.numel()} voxels are NaN or infinite")
    low, high = float(data.min()), float(data.max())
    if low >= CT_AIR_HU:
        logger.warning(
            f"{source}: intensities {low:g}..{high:g} have no voxel below {CT_AIR_HU:g} HU (no air): this does not "
            f"look like a CT in Hounsfield units (MR, or a CT without its rescale?); results may be meaningless"
        )


def _map_transform_base() -> type:
    from monai.transforms import MapTransform

    return MapTransform


class CheckInputd(_map_transform_base()):
    """Check each key's file or DICOM folder from its headers before ``LoadImaged`` (:func:`check_input`).

    Args:
        keys: keys of the image paths.
        max_voxels: largest volume accepted.
        allow_missing_keys: skip absent keys.
    """

    def __init__(self, keys: Any, max_voxels: int = MAX_VOXELS, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.max_voxels = int(max_voxels)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            if isinstance(d[key], (str, os.PathLike)):
                check_input(d[key], self.max_voxels)
        return d


class CheckVolumed(_map_transform_base()):
    """Check each loaded, channel-first image (:func:`check_volume`); put it after ``EnsureChannelFirstd``.

    Args:
        keys: image keys.
        channels: expected channel count (0: any).
        allow_missing_keys: skip absent keys.
    """

    def __init__(self, keys: Any, channels: int = 1, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.channels = int(channels)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            check_volume(d[key], channels=self.channels)
        return d


def run_engine(engine: Any) -> Any:
    """``engine.run()`` (an Ignite trainer), saying in one log line which file stopped it and why.

    A bad scan met during training surfaces deep inside MONAI's and Ignite's wrappers
    (``applying transform ...``); this names the root problem before the error propagates.
    """
    try:
        return engine.run()
    except Exception as e:
        cause = root_cause(e)
        if isinstance(cause, InputError):
            logger.error(f"training stopped by a bad input: {cause}")
        else:
            logger.error(f"training stopped: {type(cause).__name__}: {str(cause).strip()[:500]}")
        raise


# ---------------------------------------------------------------------------------------------
# datalists and image/label pairs
# ---------------------------------------------------------------------------------------------

#: Largest difference between an image's and its label map's affines: the 3 x 3 part, relative to
#: the spacing, and the origin (mm). Float32 headers round at about 1e-5 relative.
GRID_TOLERANCE = {"relative_axes": 1e-3, "origin_mm": 0.05}


def _nifti_grid(path: str) -> tuple[tuple[int, ...], np.ndarray] | None:
    if not path.lower().endswith(_NIFTI_SUFFIXES) or not os.path.isfile(path):
        return None
    import nibabel as nib

    try:
        image = nib.load(path)
    except Exception:  # the header checks name the problem
        return None
    return tuple(int(s) for s in image.shape[:3]), np.asarray(image.affine, dtype=np.float64)


def check_same_grid(image: str | os.PathLike, label: str | os.PathLike) -> None:
    """Refuse a label map that is not on its image's voxel grid (shape and affine, from the NIfTI headers).

    A label map on another grid, or shifted, would train or score the network against the wrong
    voxels without any error. Formats other than NIfTI are left to the loaded-volume checks.

    Raises:
        InputError: naming the label map, its image and the difference.
    """
    image, label = os.fspath(image), os.fspath(label)
    grids = _nifti_grid(image), _nifti_grid(label)
    if None in grids:
        return
    (image_shape, image_affine), (label_shape, label_affine) = grids
    where = f"label map is not on the voxel grid of its image {image}"
    if image_shape != label_shape:
        raise InputError(label, f"{where}: shape {label_shape} vs the image's {image_shape}")
    spacing = np.linalg.norm(image_affine[:3, :3], axis=0)
    axes = float((np.abs(label_affine[:3, :3] - image_affine[:3, :3]) / np.maximum(spacing, 1e-6)).max())
    origin = float(np.abs(label_affine[:3, 3] - image_affine[:3, 3]).max())
    if axes > GRID_TOLERANCE["relative_axes"] or origin > GRID_TOLERANCE["origin_mm"]:
        shown = lambda a: "[" + "; ".join(" ".join(f"{v:.4g}" for v in row) for row in a[:3]) + "]"  # noqa: E731
        raise InputError(
            label,
            f"{where}: the affines differ by up to {max(origin, axes * float(spacing.max())):.3g} mm "
            f"(label {shown(label_affine)} vs image {shown(image_affine)})",
        )


def load_datalist(
    datalist: str | os.PathLike,
    section: str,
    *,
    dataset_dir: str | os.PathLike | None = None,
    keys: Sequence[str] = ("image",),
    check_files: bool = True,
    skip_bad: bool = False,
    failures: list | None = None,
) -> list[dict[str, Any]]:
    """The items of one section of a decathlon datalist, checked before any training or evaluation starts.

    Refused, each in one line naming the datalist (and the item): a missing or malformed JSON file,
    an empty or missing section, an item without one of ``keys``. With ``check_files`` every item's
    files pass the header checks (:func:`check_input`) and an ``image``/``label`` pair must share
    its voxel grid (:func:`check_same_grid`).

    Args:
        datalist: the datalist JSON.
        section: ``training``, ``validation`` or ``testing``.
        dataset_dir: folder of relative paths (default: the datalist's folder).
        keys: entries every item needs; their relative paths are resolved.
        check_files: run the header and grid checks on every item.
        skip_bad: log and leave out items whose files fail (a batch evaluation goes on); otherwise
            the first bad item stops the run (training must not quietly drop data).
        failures: with ``skip_bad``, a list the left-out items are added to (``case``: the image,
            ``source``: the file at fault, ``error``: the problem), for a batch's error report.

    Returns:
        The items, with absolute paths.

    Raises:
        UsageError: a datalist problem; InputError: a bad file (``skip_bad`` off, or every item bad).
    """
    import json

    from .runtime import UsageError

    path = Path(datalist)
    if not path.is_file():
        raise UsageError(f"{path}: datalist not found (expected a decathlon datalist JSON)")
    try:
        content = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: not a valid datalist JSON ({e})") from None
    if not isinstance(content, dict):
        raise UsageError(f"{path}: a datalist is a JSON object with 'training'/'validation'/'testing' lists")
    entries = content.get(section)
    if not entries:
        found = ", ".join(f"'{k}' ({len(v)})" for k, v in content.items() if isinstance(v, list)) or "none"
        raise UsageError(f"{path}: the '{section}' list is empty or missing (lists found: {found})")
    if not isinstance(entries, list):
        raise UsageError(f"{path}: '{section}' must be a list of items")
    base = Path(dataset_dir) if dataset_dir else path.parent
    items, skipped = [], []
    for index, entry in enumerate(entries):
        item = {keys[0]: entry} if isinstance(entry, str) else entry
        if not isinstance(item, dict) or any(k not in item for k in keys):
            missing = [k for k in keys if not isinstance(item, dict) or k not in item]
            raise UsageError(f"{path}: item {index} of '{section}' has no '{', '.join(missing)}' entry: {entry}")
        item = dict(item)
        for key in keys:
            if isinstance(item[key], str) and not os.path.isabs(item[key]):
                item[key] = str(base / item[key])
        if check_files:
            try:
                for key in keys:
                    if isinstance(item[key], str):
                        check_input(item[key])
                if "image" in keys and "label" in keys:
                    check_same_grid(item["image"], item["label"])
            except InputError as e:
                if not skip_bad:
                    raise InputError(e.source, f"{e.problem} (item {index} of '{section}' in {path})") from None
                logger.error(f"skipped: {e}")
                skipped.append(str(e))
                if failures is not None:
                    failures.append({"case": str(item[keys[0]]), "source": e.source, "error": e.problem})
                continue
        items.append(item)
    if skipped:
        logger.warning(f"{len(skipped)} of {len(entries)} item(s) of '{section}' in {path} skipped (listed above)")
    if not items:
        raise UsageError(f"{path}: no usable item in '{section}': {len(skipped)} bad, the first: {skipped[0]}")
    return items
