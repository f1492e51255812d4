# GENERATED from ctfm_common/cases.py by ctfm-sync-bundles: edit the source, not this copy.
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
"""One per-case runner for batch inference (segmentation, triage, embedding).

:func:`run_cases` loads each scan through a MONAI data loader, hands it to the bundle's
``process`` (network, outputs written atomically), collects the cases that failed, writes
their list and the run's summary, and stops with one line when every case failed.

Loading: a ``monai.data.ThreadDataLoader`` with ``buffer_size=1`` and no worker processes. A
background thread reads and preprocesses the next scan while the network works on the current
one; a thread (not a worker process) because the preprocessing may run on the GPU, nothing is
pickled between processes, and on two cores one loader beside the network is all that helps.
At most two scans wait beside the one being processed (the one queued, the next one read), so
the memory held ahead is bounded by ``buffer_size + 1`` preprocessed scans.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .runtime import write_error_list
from .validate import describe_failure

logger = logging.getLogger("ctfm_common")

#: Entries :class:`LoadCase` adds to a loaded case.
SOURCE_KEY = "source"  # not "image_path": MONAI's Spacingd treats "image_*" entries as meta dicts
ERROR_KEY = "error"
TRACE_KEY = "trace"
LOAD_SECONDS_KEY = "load_s"
#: Seconds :func:`run_cases` waited for the case to be loaded (0 when it was read ahead in time).
WAIT_SECONDS_KEY = "wait_s"


class AllCasesFailed(RuntimeError):
    """Every case of a run failed: one line naming how many, and each scan with its problem."""


class LoadCase:
    """Preprocess one data dict; a scan that fails to load or transform becomes an error entry instead of
    stopping the batch (use it as a MONAI ``Dataset``'s ``transform``).

    The result holds the preprocessed dict plus ``source`` (the input path) and ``load_s`` (seconds
    spent); a failure holds the item's other entries, ``source`` and ``error`` (one line naming the
    scan and its problem, :func:`describe_failure`) and ``trace`` (the traceback, for debug logs).

    Args:
        transform: the preprocessing (e.g. a MONAI ``Compose``).
        key: the image key whose path names the scan.
    """

    def __init__(self, transform: Callable, key: str = "image") -> None:
        self.transform, self.key = transform, key

    def __call__(self, data: Mapping) -> dict:
        source = str(data[self.key])
        start = time.perf_counter()
        try:
            result = dict(self.transform(dict(data)))
        except Exception as e:  # any reader/transform failure is reported per scan
            return {**{k: v for k, v in data.items() if k != self.key}, SOURCE_KEY: source,
                    ERROR_KEY: describe_failure(source, e), TRACE_KEY: traceback.format_exc()}
        result[SOURCE_KEY] = source
        result[LOAD_SECONDS_KEY] = round(time.perf_counter() - start, 3)
        return result


def first_item(batch: Sequence[Any]) -> Any:
    """Collate function for ``batch_size=1`` loaders that keep each item's own structure."""
    return batch[0]


def case_loader(items: Sequence[Mapping], load: Callable, *, key: str = "image", num_workers: int = 0,
                buffer_size: int = 1) -> Iterable:
    """A ``monai.data.ThreadDataLoader`` over ``items`` that reads the next case in the background.

    Args:
        items: data dicts ``{key: path, ...}``.
        load: the preprocessing (wrapped in :class:`LoadCase`).
        key: the image key.
        num_workers: worker processes under the thread (0: the thread itself loads, see the module notes).
        buffer_size: loaded cases queued ahead of the one being processed.
    """
    from monai.data import Dataset, ThreadDataLoader

    return ThreadDataLoader(Dataset(list(items), transform=LoadCase(load, key)), batch_size=1, shuffle=False,
                            num_workers=int(num_workers), buffer_size=int(buffer_size), collate_fn=first_item)


def _progress(iterable: Iterable, total: int, desc: str, unit: str) -> Iterable:
    try:
        from tqdm import tqdm
    except ImportError:  # progress bars are optional
        return iterable
    return tqdm(iterable, total=total, desc=desc, unit=unit)


def run_cases(
    *,
    process: Callable[[int, dict], dict],
    items: Sequence[Mapping] | None = None,
    load: Callable | None = None,
    loader: Iterable | None = None,
    failed: Callable[[int, Mapping, str], dict] | None = None,
    summary: Callable[[list[dict]], Any] | None = None,
    error_list: str | Path | None = None,
    error_fields: Sequence[str] = ("case", "source", "error"),
    lineterminator: str = "\r\n",
    all_failed: str = "every case failed ({count})",
    summary_when_all_failed: bool = True,
    ok_before: int = 0,
    key: str = "image",
    desc: str = "cases",
    unit: str = "case",
    num_workers: int = 0,
    buffer_size: int = 1,
    log: logging.Logger | None = None,
) -> list[dict]:
    """Run every case: load (prefetched), ``process``, collect failures, write the error list and summary.

    Args:
        process: ``process(index, data)`` for a loaded case (``data`` from :class:`LoadCase`): runs the
            network, writes the case's outputs (atomically) and returns its record. Whatever it raises
            fails that case only.
        items: data dicts ``{key: path, ...}``; with ``load``, read through :func:`case_loader`.
        load: the preprocessing.
        loader: instead of ``items``/``load``: an iterable of :class:`LoadCase` results (e.g. a configured
            MONAI ``DataLoader``), one case at a time.
        failed: ``failed(index, data, message)`` -> the record of a failed case (``message`` names the
            scan and its problem); default ``{"source", "error"}``. The bundle logs its own line here.
        summary: writes the run's summary from all records (e.g. a merge under lock into ``summary.json``).
        error_list: CSV listing the failed cases (their records' ``error_fields``), removed when none failed.
        error_fields: the error list's columns.
        lineterminator: the error list's line ending.
        all_failed: first words of the error when every case failed; ``{count}`` is the number of cases.
        summary_when_all_failed: write the summary even when every case failed (``False`` keeps earlier
            results as they are).
        ok_before: cases that count as done without running (resumed), so the run did not fail as a whole.
        key: the image key of ``items``.
        desc: the progress bar's label.
        unit: the progress bar's unit.
        num_workers: see :func:`case_loader`.
        buffer_size: see :func:`case_loader`.
        log: where failures are logged (default: ``ctfm_common``).

    Returns:
        One record per case, in input order.

    Raises:
        AllCasesFailed: every case failed (one line: the count, then each scan and its problem).
        RuntimeError: the loader stopped before the last case.
    """
    log = log or logger
    if loader is None:
        if items is None or load is None:
            raise ValueError("run_cases needs items and load, or a loader")
        loader = case_loader(items, load, key=key, num_workers=num_workers, buffer_size=buffer_size)
    total = len(items) if items is not None else len(loader)  # type: ignore[arg-type]
    records: list[dict] = []
    failures: list[dict] = []
    waited = time.perf_counter()
    for index, data in enumerate(_progress(loader, total, desc, unit)):
        data[WAIT_SECONDS_KEY] = round(time.perf_counter() - waited, 3)
        message = data.get(ERROR_KEY)
        if not message:
            try:
                records.append(process(index, data))
                waited = time.perf_counter()
                continue
            except Exception as e:  # one bad scan must not stop the batch: report it and go on
                message = describe_failure(data.get(SOURCE_KEY) or "<case>", e)
                data = {**data, TRACE_KEY: traceback.format_exc()}
        log.debug(data.get(TRACE_KEY, ""))
        record = failed(index, data, message) if failed else {"source": data.get(SOURCE_KEY), "error": message}
        records.append(record)
        failures.append({**record, "_message": message})
        waited = time.perf_counter()
    if len(records) != total:
        raise RuntimeError(f"the case loader stopped after {len(records)} of {total} cases")
    if error_list is not None and write_error_list(error_list, failures, error_fields, lineterminator):
        log.error(f"{len(failures)} {unit}(s) failed, listed in {error_list}")
    every = bool(failures) and len(failures) == len(records) and not ok_before
    if summary is not None and (summary_when_all_failed or not every):
        summary(records)
    messages = [f["_message"] for f in failures]
    for message in messages:
        log.error(f"failed: {message}")
    if every:
        raise AllCasesFailed(all_failed.format(count=len(failures)) + ": " + "; ".join(messages))
    return records
