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
"""The bad-input corpus of the reliability tests, generated on the fly (no binaries are committed).

:func:`write_corpus` writes every case into a folder and returns ``{case: path}`` together with
:data:`EXPECTED`: for each case, either ``None`` (the pipelines run it, possibly with a
warning) or a fragment of the one-line problem the checks must report.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np

from ctfm_bundles.tools import use_bundle_scripts
from ctfm_bundles.tools.synthetic import phantom

#: case -> fragment of the reported problem (``None``: accepted).
EXPECTED: dict[str, str | None] = {
    "good": None,
    "tiny": None,  # smaller than every patch: the pipelines pad it
    "mr_like": None,  # accepted with a warning: no air, does not look like HU
    "dicom_good": None,
    "zero_byte": "empty file (0 bytes)",
    "truncated": "truncated or corrupt file: EOFError",
    "image_2d": "2-D image (64, 64): expected a 3-D CT volume",
    "image_4d": "4-D image (32, 32, 16, 3): expected one 3-D CT volume",
    "nan": "voxels are NaN or infinite",
    "huge_header": "refusing to load it",
    "missing_file": "file does not exist",
    "dicom_two_series": "folder mixes 2 series",
    "dicom_missing_slice": "missing slice(s): 1 gap(s)",
    "dicom_uneven_spacing": "inconsistent slice spacing",
    "dicom_sr": "no image in this DICOM folder, only 1 non-image object(s): SR",
    "dicom_seg": "Modality SEG: 4 files; expected CT images",
    "dicom_truncated_pixels": "1 file(s) with truncated pixel data, e.g. ",
    "affine_nan": "corrupt affine: it holds NaN or infinite values",
    "affine_shear": "contradict the header's pixdim (3, 3, 3) mm",
    "spacing_tiny": "implausible voxel spacing (3e-06, 3e-06, 3e-06) mm: the accepted range is 0.01 to 50 mm",
    "spacing_zero": "implausible voxel spacing (3, 3, 0) mm: the accepted range is 0.01 to 50 mm",
    "spacing_huge": "implausible voxel spacing (1e+06, 1e+06, 1e+06) mm: the accepted range is 0.01 to 50 mm",
}
#: cases added with the second reliability round (each failed silently or obscurely before it)
ROUND_2 = ("dicom_truncated_pixels", "affine_nan", "affine_shear", "spacing_tiny", "spacing_zero", "spacing_huge")

MR_WARNING = "does not look like a CT in Hounsfield units"
SHAPE = (40, 40, 16)  # 3 mm body phantom voxels
SPACING = 3.0


def _affine(spacing: float = SPACING) -> np.ndarray:
    return np.diag([spacing, spacing, spacing, 1.0])


def _save(array: np.ndarray, path: Path) -> None:
    nib.save(nib.Nifti1Image(array, _affine()), str(path))


def body_volume(shape=SHAPE, seed: int = 0) -> np.ndarray:
    """A body phantom in HU (int16)."""
    image, _, _ = phantom.make_body_phantom(shape=shape, spacing=SPACING, seed=seed)
    return np.asarray(image, dtype=np.int16)


def write_huge_header(path: Path, size: int = 100_000) -> None:
    """A gzipped NIfTI-2 whose header declares ``size``^3 int16 voxels (NIfTI-1 dimensions stop at
    32767), with almost no data behind it."""
    header = nib.Nifti2Header()
    header.set_data_shape((size, size, size))
    header.set_data_dtype(np.int16)
    header["vox_offset"] = 544
    header.set_sform(_affine(), code=1)
    with gzip.open(path, "wb") as f:
        f.write(header.binaryblock + b"\x00" * 4 + b"\x00" * 4096)


def write_ct_series(
    folder: Path,
    positions,
    *,
    size: int = 32,
    series_uid: str | None = None,
    modality: str = "CT",
    study_uid: str | None = None,
    frames: int = 1,
    sop_class: str | None = None,
) -> list[Path]:
    """A synthetic single-frame DICOM series, one file per slice position (mm), pixels in HU."""
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    study_uid = study_uid or generate_uid()
    frame_uid = generate_uid()
    volume = body_volume(shape=(size, size, max(len(positions), 16)))
    sop_class = sop_class or ("1.2.840.10008.5.1.4.1.1.2" if modality == "CT" else "1.2.840.10008.5.1.4.1.1.66.4")
    paths = []
    for i, z in enumerate(positions):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"slice_{i:03d}_{series_uid[-6:]}.dcm"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\x00" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PatientID, ds.PatientName = modality, "PHANTOM", "Phantom^Body"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.InstanceNumber, ds.SeriesNumber = i + 1, 1
        ds.ImagePositionPatient = [0.0, 0.0, float(z)]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing, ds.SliceThickness = [2.0, 2.0], 2.0
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        if frames > 1:
            ds.NumberOfFrames = frames
        pixels = np.ascontiguousarray(np.repeat(volume[:, :, i % volume.shape[2]].T[None], frames, 0))
        ds.PixelData = pixels.astype(np.int16).tobytes()
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.save_as(str(path), write_like_original=False)
        paths.append(path)
    assert all(pydicom.dcmread(p, stop_before_pixels=True).Modality == modality for p in paths)
    return paths


def write_sr(folder: Path) -> Path:
    """A folder holding one DICOM structured report (no pixels)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = folder / "report.dcm"
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\x00" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = "SR", "PHANTOM"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.is_little_endian, ds.is_implicit_VR = True, False
    ds.save_as(str(path), write_like_original=False)
    return path


def write_corpus(root: Path) -> dict[str, Path]:
    """Write every case of :data:`EXPECTED` under ``root``; returns ``{case: path}``."""
    root.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}

    def nifti(name: str) -> Path:
        paths[name] = root / f"{name}.nii.gz"
        return paths[name]

    _save(body_volume(), nifti("good"))
    tiny = np.full((8, 8, 4), -1000, np.int16)
    tiny[2:6, 2:6, 1:3] = 40
    _save(tiny, nifti("tiny"))
    mr = body_volume().astype(np.float32) + 1024.0  # positive "MR" intensities, no air
    _save(np.clip(mr, 0, None) * 0.8, nifti("mr_like"))
    nifti("zero_byte").write_bytes(b"")
    data = paths["good"].read_bytes()
    nifti("truncated").write_bytes(data[: len(data) // 2])
    _save(np.zeros((64, 64), np.int16), nifti("image_2d"))
    _save(np.full((32, 32, 16, 3), -1000, np.int16), nifti("image_4d"))
    nan = body_volume().astype(np.float32)
    nan[10:20, 10:20, 4:8] = np.nan
    _save(nan, nifti("nan"))
    write_huge_header(nifti("huge_header"))
    paths["missing_file"] = root / "missing_file.nii.gz"  # never written

    dicom = root / "dicom"
    paths["dicom_good"] = dicom / "dicom_good"
    write_ct_series(paths["dicom_good"], [2.0 * i for i in range(8)])
    paths["dicom_two_series"] = dicom / "dicom_two_series"
    study = "1.2.826.0.1.3680043.8.498.1"
    write_ct_series(paths["dicom_two_series"], [2.0 * i for i in range(8)], study_uid=study)
    write_ct_series(paths["dicom_two_series"], [2.0 * i for i in range(8)], study_uid=study)
    paths["dicom_missing_slice"] = dicom / "dicom_missing_slice"
    write_ct_series(paths["dicom_missing_slice"], [2.0 * i for i in range(10) if i != 5])
    paths["dicom_uneven_spacing"] = dicom / "dicom_uneven_spacing"
    write_ct_series(paths["dicom_uneven_spacing"], [0.0, 2.0, 4.0, 6.0, 7.0, 9.0, 11.0, 13.0])
    paths["dicom_sr"] = dicom / "dicom_sr"
    write_sr(paths["dicom_sr"])
    paths["dicom_seg"] = dicom / "dicom_seg"
    write_ct_series(paths["dicom_seg"], [2.0 * i for i in range(4)], modality="SEG")
    paths["dicom_truncated_pixels"] = dicom / "dicom_truncated_pixels"
    slices = write_ct_series(paths["dicom_truncated_pixels"], [2.0 * i for i in range(8)])
    data = slices[4].read_bytes()
    slices[4].write_bytes(data[: len(data) - 700])  # a partial copy: the slice ends inside its pixel data

    def nifti_affine(name: str, affine: np.ndarray, pixdim=None) -> None:
        image = nib.Nifti1Image(body_volume(), None)
        image.header.set_qform(np.diag([3.0, 3.0, 3.0, 1.0]), code=0)
        image.header["sform_code"] = 1
        for row, key in enumerate(("srow_x", "srow_y", "srow_z")):
            image.header[key] = affine[row]
        image.header["pixdim"][1:4] = pixdim if pixdim is not None else np.linalg.norm(affine[:3, :3], axis=0)
        nib.save(image, str(nifti(name)))

    nan_affine = _affine()
    nan_affine[0, 3] = np.nan
    nifti_affine("affine_nan", nan_affine, pixdim=(3.0, 3.0, 3.0))
    sheared = _affine()
    sheared[0, 1] = 2.0  # the second axis leans 34 degrees: its length is 3.6 mm, pixdim says 3
    nifti_affine("affine_shear", sheared, pixdim=(3.0, 3.0, 3.0))
    nifti_affine("spacing_tiny", np.diag([3e-6, 3e-6, 3e-6, 1.0]))
    nifti_affine("spacing_zero", np.diag([3.0, 3.0, 0.0, 1.0]))
    nifti_affine("spacing_huge", np.diag([1e6, 1e6, 1e6, 1.0]))
    assert set(paths) == set(EXPECTED), sorted(set(EXPECTED) ^ set(paths))
    return paths


# ------------------------------------------------------------------------------------------------
# bad settings: many cases through one bundle's runners in one interpreter
# ------------------------------------------------------------------------------------------------

#: case -> fragment of the one error line every runner reading that kind of input must end with
#: (the file or folder at fault is checked separately: it is named on the same line).
SETTINGS_EXPECTED: dict[str, str] = {
    "datalist_malformed": "not a valid datalist JSON",
    "datalist_empty": "list is empty or missing",
    "item_without_label": "item 0 of '",
    "output_dir_is_a_file": "a file is in the way where a folder is needed",
    "device_cuda_without_cuda": "a CUDA device was requested but this machine has none usable",
    "label_other_grid": "label map is not on the voxel grid of its image",
    "label_shifted_30mm": "label map is not on the voxel grid of its image",
    "output_dir_unwritable": "pick a writable --output_dir",
    "evaluate_every_case_fails_to_load": "every case of the evaluation failed",
    "train_truncated_image": "truncated or corrupt file: EOFError",
}
#: cases of image/label pairs (label maps: the segmentation runners only)
LABEL_MAP_CASES = ("label_other_grid", "label_shifted_30mm")
#: cases of the evaluate runners only (a batch that goes on past bad cases; one where all fail)
EVALUATE_CASES = ("evaluate_past_bad_pairs", "evaluate_past_load_failures", "evaluate_every_case_fails_to_load")
#: evaluate cases of image/label pairs (the segmentation evaluation only)
SEG_EVALUATE_CASES = ("evaluate_past_bad_pairs",)
#: cases of the training runners only: supervised training stops with the one line; pretraining skips the
#: scan (a warning naming it, a ``.bad.txt`` marker in its cache) and goes on
TRAIN_CASES = ("train_truncated_image",)
#: a folder nobody can create, root included: sysfs refuses new folders (or is mounted read-only)
UNWRITABLE_FOLDER = "/sys/ctfm_unwritable_output"


def unwritable_folder() -> str | None:
    """:data:`UNWRITABLE_FOLDER` when creating it fails here as it would on a read-only mount (``EROFS``,
    ``EACCES`` or ``EPERM``), else ``None`` (no such place on this machine: the case is left out)."""
    import errno
    import os

    try:
        os.mkdir(UNWRITABLE_FOLDER)
    except OSError as e:
        return UNWRITABLE_FOLDER if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM) else None
    os.rmdir(UNWRITABLE_FOLDER)
    return None


def run_cases_in_one_process(bundle_root: str, cases: list[dict]) -> list[dict]:
    """Run ``monai.bundle.run`` for each case in this interpreter (one bundle: one ``scripts``), and return
    for each the one line a user would see (``runtime.user_error_line``) or the traceback they would get.

    Each case: ``{"name", "config_files", "run_id", "overrides"}``.
    """
    import time
    import traceback

    use_bundle_scripts(bundle_root)  # as monai.bundle run does
    from monai.bundle import run

    from scripts.ctfm_common import runtime

    import logging

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    results = []
    for case in cases:
        result = {"name": case["name"], "runner": case["runner"], "line": None, "traceback": None, "ok": False,
                  "output_dir": case.get("output_dir")}
        messages: list[str] = []
        result["log"] = messages
        collect = Collect(logging.WARNING)
        loggers = [logging.getLogger(n) for n in ("ctfm_common.validate", "ctfm_wholebody_seg", "ctfm_pretrain",
                                                  "scripts")]
        for logger in loggers:
            logger.addHandler(collect)
        start = time.perf_counter()
        try:
            run(case["run_id"], config_file=case["config_files"], **case["overrides"])
            result["ok"] = True
        except SystemExit as e:
            result["line"] = f"exit {e.code}"
        except Exception as e:  # what the excepthook would print
            result["line"] = runtime.user_error_line(e)
            if result["line"] is None:
                result["traceback"] = "".join(traceback.format_exception(e))[-3000:]
        for logger in loggers:
            logger.removeHandler(collect)
        result["seconds"] = round(time.perf_counter() - start, 2)  # what each case costs the suite
        results.append(result)
    return results


if __name__ == "__main__":  # python bad_inputs.py BUNDLE_ROOT CASES_JSON RESULTS_JSON
    import json
    import sys

    cases = json.loads(Path(sys.argv[2]).read_text())
    Path(sys.argv[3]).write_text(json.dumps(run_cases_in_one_process(sys.argv[1], cases), indent=1))
