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
"""Step 3, ``convert``: DICOM series -> NIfTI after the geometry and CT-FM header checks, in parallel, sharded;
then the corpus files (datalist, sources.csv, rejected.csv, ATTRIBUTION.md)."""

from __future__ import annotations

import json
import multiprocessing
import os
import traceback
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ctfm_bundles.tools.data.idc_manifest import (
    CTFM_FILTERS,
    IDC_CITATION,
    path_part,
    read_manifest,
    series_folder,
    write_table,
)
from ctfm_common.runtime import atomic_write, atomic_write_text, resolve_shard, shard_items
from ctfm_common.validate import modality_problem, read_dicom_headers, series_problem


# ---------------------------------------------------------------------------------------
# 3. convert
# ---------------------------------------------------------------------------------------


def read_headers(folder: str | os.PathLike) -> list[dict[str, Any]]:
    """The geometry-relevant header fields of every DICOM image file in a folder (pixel data not read).

    Files pydicom cannot read as DICOM (a DICOMDIR, a stray text file) and objects without pixels
    (a structured report next to the series) are left out (``ctfm_common.validate.read_dicom_headers``).
    """
    return read_dicom_headers(folder)[0]


def check_series_geometry(
    headers: Sequence[dict[str, Any]], *, ctfm_filters: bool = True
) -> tuple[str, list[dict[str, Any]]]:
    """Validate one folder's DICOM headers as a single regular 3D volume.

    Args:
        headers: :func:`read_headers` output for one folder.
        ctfm_filters: also enforce the CT-FM header filters (slice thickness range, no localizer).

    Returns:
        ``(reason, sorted_headers)``: ``reason`` is "" when the volume is valid, else one line saying
        what is wrong; ``sorted_headers`` are ordered along the slice normal (ascending).
    """
    return series_problem(headers, filters=_ctfm_header_filters if ctfm_filters else None)


def _ctfm_header_filters(headers: Sequence[dict[str, Any]]) -> str:
    """The CT-FM header rules: no localizer, slice thickness in range ("" when they hold)."""
    localizers = [h for h in headers if set(h["image_type"]) & set(CTFM_FILTERS["excluded_image_types"])]
    if localizers:
        return f"{len(localizers)} LOCALIZER image(s) (ImageType {list(localizers[0]['image_type'])})"
    low, high = CTFM_FILTERS["slice_thickness_mm"]
    thickness = {h["slice_thickness"] for h in headers}
    if None in thickness:
        return "SliceThickness missing: cannot check the CT-FM 1-5 mm range"
    outside = sorted(t for t in thickness if not low <= t <= high)
    if outside:
        return f"slice thickness {outside[0]:g} mm outside the CT-FM range {low:g}-{high:g} mm"
    return ""


def _read_volume(paths: Sequence[str]) -> Any:
    """Read an ordered slice list with ITK (GDCM applies the rescale slope/intercept), int16 when lossless."""
    import itk

    image = itk.imread(list(paths), itk.F)
    array = itk.array_view_from_image(image)
    lossless = np.all(np.isfinite(array)) and np.all(array == np.round(array))
    if lossless and array.min() >= np.iinfo(np.int16).min and array.max() <= np.iinfo(np.int16).max:
        small = itk.image_from_array(np.asarray(array, dtype=np.int16))
        small.CopyInformation(image)
        return small
    return image


def convert_series(folder: str, image_path: str, *, ctfm_filters: bool = True) -> dict[str, Any]:
    """Validate one DICOM series folder and write it as a NIfTI (atomically).

    Args:
        folder: the series folder.
        image_path: the NIfTI file to write (``.nii.gz``).
        ctfm_filters: also enforce the CT-FM header filters (see :func:`check_series_geometry`).

    Returns:
        ``{"status": "converted" | "rejected", "reason": ..., "series_uid": ..., "shape": ..., "spacing": ...}``.
    """
    headers = read_headers(folder)
    # the corpus is CT image slices only: an MR series, a SEG or a secondary capture is refused first
    reason = modality_problem(headers, "CT") if headers else ""
    if not reason:
        reason, ordered = check_series_geometry(headers, ctfm_filters=ctfm_filters)
    if reason:
        return {"status": "rejected", "reason": reason, "series_uid": headers[0]["series_uid"] if headers else ""}
    import itk

    image = _read_volume([h["path"] for h in ordered])
    size = tuple(int(s) for s in itk.size(image))
    expected = (ordered[0]["columns"], ordered[0]["rows"], len(ordered))
    origin = np.array(itk.origin(image), float)
    if size != expected or np.abs(origin - np.array(ordered[0]["position"])).max() > 1e-2:
        return {
            "status": "rejected",
            "reason": f"ITK read {size} voxels at origin {origin.round(2).tolist()}, the headers say {expected} "
            f"at {list(ordered[0]['position'])}",
            "series_uid": ordered[0]["series_uid"],
        }
    atomic_write(image_path, lambda tmp: itk.imwrite(image, str(tmp), compression=True))
    return {
        "status": "converted",
        "reason": "",
        "series_uid": ordered[0]["series_uid"],
        "shape": list(size),
        "spacing": [round(float(s), 5) for s in itk.spacing(image)],
    }


def find_series_folders(input_dir: str | os.PathLike) -> list[Path]:
    """Every folder under ``input_dir`` (itself included) that directly holds files, except partial downloads."""
    root = Path(input_dir)
    folders = []
    for current, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.endswith(".partial") and not d.startswith("."))
        if any(not f.startswith(".") and not f.endswith(".json") for f in files):
            folders.append(Path(current))
    return sorted(folders)


def _relative_name(folder: Path, root: Path) -> str:
    rel = folder.relative_to(root).as_posix()
    return rel if rel != "." else path_part(root.resolve().name)


def _status_path(output_dir: Path, rel: str) -> Path:
    return output_dir / "status" / f"{rel}.json"


def _convert_one(folder: str, rel: str, output_dir: str, ctfm_filters: bool) -> dict[str, Any]:
    out = Path(output_dir)
    image = Path("images") / f"{rel}.nii.gz"
    try:
        record = convert_series(folder, str(out / image), ctfm_filters=ctfm_filters)
    except Exception as error:  # one unreadable series must not stop the corpus
        record = {
            "status": "failed",
            "reason": f"{type(error).__name__}: {error}",
            "traceback": traceback.format_exc(limit=3),
        }
    record.update({"folder": rel, "image": image.as_posix() if record["status"] == "converted" else ""})
    atomic_write_text(_status_path(out, rel), json.dumps(record, indent=2) + "\n")
    return record


def convert(
    *,
    input_dir: str,
    output_dir: str,
    manifest: str | None = None,
    num_workers: int = 2,
    ctfm_filters: bool = True,
    retry_rejected: bool = False,
    shard_index: int | None = None,
    num_shards: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Convert DICOM series folders to NIfTI, validating geometry, and write the corpus files.

    Series folders are the manifest's (``input_dir/<collection_id>/<PatientID>/<SeriesInstanceUID>``)
    or, without a manifest, every folder under ``input_dir`` that holds files. Each series becomes
    ``output_dir/images/<folder>.nii.gz`` (int16 HU when lossless), its outcome is kept in
    ``output_dir/status/<folder>.json``, and a rerun skips finished series.

    Args:
        input_dir: root of the DICOM series folders (``download``'s ``output_dir``).
        output_dir: corpus root (the ``dataset_dir`` of ctfm_pretrain).
        manifest: the manifest from :func:`select` (for the licence/attribution files; optional).
        num_workers: series converted at once (processes; 1 converts in this process).
        ctfm_filters: also enforce the CT-FM header filters (slice thickness 1-5 mm, no localizer).
        retry_rejected: convert series rejected by an earlier run again (e.g. after a fix).
        shard_index: this shard (default from RANK or SLURM_ARRAY_TASK_ID, else 0).
        num_shards: number of shards (default from WORLD_SIZE or SLURM_ARRAY_TASK_COUNT, else 1).
        progress: show a progress bar.

    Returns:
        The corpus summary from :func:`write_corpus_files` (covering every shard's results so far)
        plus this run's counts.
    """
    from tqdm import tqdm

    root, out = Path(input_dir), Path(output_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"input_dir not found: {root}")
    if manifest:
        rows = read_manifest(manifest).to_dict("records")
        folders = [root / series_folder(row) for row in rows]
    else:
        folders = find_series_folders(root)
    shard_index, num_shards = resolve_shard(shard_index, num_shards)
    folders = shard_items(sorted(folders), shard_index, num_shards)
    todo, this_run = [], Counter()
    for folder in folders:
        rel = _relative_name(folder, root)
        status_file = _status_path(out, rel)
        if status_file.is_file():
            previous = json.loads(status_file.read_text())
            done = previous["status"] == "converted" and (out / previous["image"]).is_file()
            if done or (previous["status"] == "rejected" and not retry_rejected):
                this_run["skipped"] += 1
                continue
        if not folder.is_dir():
            record = {"status": "failed", "reason": f"series folder not found (not downloaded?): {folder}"}
            record.update({"folder": rel, "image": ""})
            atomic_write_text(status_file, json.dumps(record, indent=2) + "\n")
            this_run["failed"] += 1
            continue
        todo.append((str(folder), rel))
    bar = tqdm(total=len(todo), unit="series", desc=f"convert shard {shard_index}/{num_shards}", disable=not progress)
    args = [(folder, rel, str(out), ctfm_filters) for folder, rel in todo]
    if int(num_workers) > 1 and len(args) > 1:
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if "fork" in methods else None)
        with ProcessPoolExecutor(max_workers=int(num_workers), mp_context=context) as pool:
            for record in pool.map(_convert_one, *zip(*args)):
                this_run[record["status"]] += 1
                bar.update(1)
    else:
        for arg in args:
            this_run[_convert_one(*arg)["status"]] += 1
            bar.update(1)
    bar.close()
    summary = write_corpus_files(output_dir=output_dir, manifest=manifest, quiet=not progress)
    summary["this_run"] = dict(this_run)
    return summary


def _manifest_lookup(manifest: str | None) -> tuple[dict[str, dict], dict[str, dict]]:
    if not manifest:
        return {}, {}
    rows = read_manifest(manifest).to_dict("records")
    return {series_folder(r): r for r in rows}, {str(r["SeriesInstanceUID"]): r for r in rows}


def write_corpus_files(*, output_dir: str, manifest: str | None = None, quiet: bool = False) -> dict[str, Any]:
    """(Re)write the corpus files from every series' status: datalist, sources, rejections, attribution.

    Run it after a sharded ``convert`` to gather all shards (``convert`` calls it at its end).

    Args:
        output_dir: corpus root written by :func:`convert`.
        manifest: the manifest from :func:`select` (licence, DOI, collection of each series).
        quiet: do not print the summary.

    Returns:
        ``{"converted": n, "rejected": n, "failed": n, "datalist": path, ...}``.
    """
    import pandas as pd

    out = Path(output_dir)
    by_folder, by_uid = _manifest_lookup(manifest)
    records = [json.loads(p.read_text()) for p in sorted((out / "status").rglob("*.json"))]
    converted, problems = [], []
    for record in records:
        done = record["status"] == "converted" and (out / record["image"]).is_file()
        (converted if done else problems).append(record)
    datalist = {"training": [{"image": r["image"]} for r in converted]}
    atomic_write_text(out / "datalist.json", json.dumps(datalist, indent=2) + "\n")
    sources = []
    for r in converted:
        row = by_folder.get(r["folder"]) or by_uid.get(r.get("series_uid", "")) or {}
        sources.append(
            {
                "image": r["image"],
                "SeriesInstanceUID": row.get("SeriesInstanceUID", r.get("series_uid", "")),
                "collection_id": row.get("collection_id", ""),
                "PatientID": row.get("PatientID", ""),
                "license_short_name": row.get("license_short_name", ""),
                "source_DOI": row.get("source_DOI", ""),
            }
        )
    source_columns = ["image", "SeriesInstanceUID", "collection_id", "PatientID", "license_short_name", "source_DOI"]
    write_table(pd.DataFrame(sources, columns=source_columns), out / "sources.csv")
    rejected = pd.DataFrame(
        [{"folder": r["folder"], "status": r["status"], "reason": r["reason"]} for r in problems],
        columns=["folder", "status", "reason"],
    )
    write_table(rejected, out / "rejected.csv")
    atomic_write_text(out / "ATTRIBUTION.md", attribution_text(sources))
    summary = {
        "converted": len(converted),
        "rejected": sum(r["status"] == "rejected" for r in problems),
        "failed": sum(r["status"] != "rejected" for r in problems),
        "datalist": str(out / "datalist.json"),
        "attribution": str(out / "ATTRIBUTION.md"),
        "rejections": str(out / "rejected.csv"),
    }
    if not quiet:
        print(
            f"convert: {summary['converted']} series in {summary['datalist']}, {summary['rejected']} rejected, "
            f"{summary['failed']} failed (reasons in {summary['rejections']})"
        )
    return summary


def attribution_text(sources: Sequence[dict[str, Any]]) -> str:
    """The corpus's licence and attribution notice (Markdown): one line per collection, with its DOI."""
    groups: dict[tuple[str, str, str], int] = Counter(
        (s["collection_id"] or "(not in the manifest)", s["license_short_name"] or "unknown", s["source_DOI"] or "")
        for s in sources
    )
    lines = [
        "# Licences and attribution of this CT corpus",
        "",
        "The images were downloaded from the NCI Imaging Data Commons (IDC) and converted to NIfTI.",
        "Each collection keeps its own licence: respect it (non-commercial licences forbid commercial use),",
        "and cite each collection's DOI and IDC itself in any work that uses this corpus.",
        "",
        f"IDC: {IDC_CITATION}",
        "",
        "| collection | licence | source DOI | series |",
        "| --- | --- | --- | --- |",
    ]
    for (collection, licence, doi), count in sorted(groups.items()):
        link = f"https://doi.org/{doi}" if doi else "unknown"
        lines.append(f"| {collection} | {licence} | {link} | {count} |")
    licences = Counter()
    for (_, licence, _), count in groups.items():
        licences[licence] += count
    lines += ["", "Series per licence: " + ", ".join(f"{k}: {v}" for k, v in sorted(licences.items())), ""]
    lines.append("`sources.csv` maps every image to its SeriesInstanceUID, collection, patient, licence and DOI.")
    return "\n".join(lines) + "\n"
