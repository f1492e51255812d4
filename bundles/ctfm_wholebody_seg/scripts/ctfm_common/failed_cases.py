# GENERATED from ctfm_common/failed_cases.py by ctfm-sync-bundles: edit the source, not this copy.
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
"""Cases that fail while loading (a truncated file whose header passes, garbage bytes): an evaluation
reports and skips them, a training run stops with one line naming the file.

Evaluation (segmentation and triage): :class:`EvaluationDataset` turns a case whose transforms fail into
a record, :class:`SkipFailedCases` logs it (``failed: <file>: <problem>; going on with the other cases``),
drops it from the evaluator's data and adds it to a list that :func:`write_failures` writes as
``metrics_errors.csv`` (``case, source, error``) and the report lists in ``metrics.json`` (``num_failed``,
``failed``). :func:`check_evaluated` ends a run where every case failed in one line.

Training: :class:`CacheDatasetNamingFailures` is MONAI's ``CacheDataset`` whose loading failure is an
``InputError`` naming the file, so the run ends with that one line (``error: <file>: <problem>``)
instead of a traceback. Training does not skip: a model trained on a silently reduced set is a wrong
result nobody sees.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import NoReturn
from pathlib import Path

from .inputs import case_name, case_source
from .runtime import UsageError, write_error_list
from .validate import InputError, describe_failure, root_cause

logger = logging.getLogger(__name__)

#: columns of ``metrics_errors.csv`` (the shape of the retrieval bundle's ``errors.csv``)
ERROR_FIELDS = ("case", "source", "error")
#: the entry of a data dict standing for a case that could not be loaded (:class:`EvaluationDataset`)
FAILED_KEY = "failed_case"
#: the file an evaluation lists its failed cases in
ERRORS_FILE = "metrics_errors.csv"


def _first_unloadable(item: Mapping, keys: Sequence[str]) -> str | None:
    """The first of an item's files that fails to load alone, ``None`` when each loads."""
    from monai.transforms import LoadImage

    for path in [os.fspath(item[k]) for k in keys if isinstance(item.get(k), (str, os.PathLike))]:
        try:
            LoadImage(image_only=True)(path)
        except Exception:
            return path
    return None


def load_failure(
    item: Mapping, keys: Sequence[str], error: BaseException, blame_image: bool = True
) -> InputError | None:
    """The failure of an item's transforms as an ``InputError`` naming the file at fault (its own when the
    checks raised one).

    Args:
        item: the data dict whose transforms failed.
        keys: its file entries, image first.
        error: what the transforms raised.
        blame_image: when every file loads alone, name the image (``False``: return ``None``, the failure
            is not the files').
    """
    cause = root_cause(error)
    if isinstance(cause, InputError):
        return cause
    source = _first_unloadable(item, keys)
    if source is None and not blame_image:
        return None
    if source is None:  # each file loads alone: the image is named
        paths = [os.fspath(item[k]) for k in keys if isinstance(item.get(k), (str, os.PathLike))]
        source = paths[0] if paths else "<case>"
    return InputError(source, describe_failure(source, error)[len(source) + 2:])


def _monai_dataset() -> type:
    from monai.data import Dataset

    return Dataset


def _monai_cache_dataset() -> type:
    from monai.data import CacheDataset

    return CacheDataset


class EvaluationDataset(_monai_dataset()):
    """MONAI's ``Dataset`` for an evaluation: a case whose transforms fail (a truncated file, NaN voxels)
    becomes ``{FAILED_KEY: "<file>: <problem>", "failed_source": <file>, "failed_image": <image>}``
    instead of ending the run; :class:`SkipFailedCases` reports and drops it (batch size 1).

    Args:
        data: the evaluation's data dicts.
        transform: their preprocessing.
        keys: the file entries of an item, image first (what a failure may name).
    """

    def __init__(self, data: Sequence, transform: Callable | None = None, keys: Sequence[str] = ("image", "label")):
        super().__init__(data=data, transform=transform)
        self.keys = list(keys)

    def _transform(self, index: int):
        try:
            return super()._transform(index)
        except Exception as error:  # any reader or transform failure: one case, not the whole evaluation
            item = self.data[index]
            failure = load_failure(item, self.keys, error)
            return {FAILED_KEY: str(failure), "failed_source": failure.source,
                    "failed_image": os.fspath(item.get(self.keys[0], failure.source))}


class SkipFailedCases:
    """An evaluator's data: the batches of ``dataloader`` less the cases :class:`EvaluationDataset` could not
    load, each logged in one line (``failed: <file>: <problem>``) and added to ``failures``.

    Args:
        dataloader: the evaluation's ``DataLoader`` (batch size 1) over an :class:`EvaluationDataset`.
        failures: the list the failed cases are added to (``case``, ``source``, ``error``); it may already
            hold the items a datalist check left out.
        output_dir: the report folder. When given and no case loaded, the pass ends by writing
            ``metrics_errors.csv`` there and raising :func:`check_evaluated`'s one line (before any handler
            computes a metric over nothing; earlier reports are kept).
    """

    def __init__(
        self, dataloader: Iterable, failures: list | None = None, output_dir: str | os.PathLike | None = None
    ) -> None:
        self.dataloader = dataloader
        self.failures = failures if failures is not None else []
        self.output_dir = output_dir

    def __iter__(self):
        loaded = 0
        for batch in self.dataloader:
            if isinstance(batch, Mapping) and FAILED_KEY in batch:
                for line, source, image in zip(batch[FAILED_KEY], batch["failed_source"], batch["failed_image"]):
                    logger.error(f"failed: {line}; going on with the other cases")
                    failure = {"case": case_source(image), "source": source, "error": line[len(source) + 2:]}
                    if failure not in self.failures:
                        self.failures.append(failure)
                continue
            loaded += 1
            yield batch
        if self.output_dir is not None and not loaded and self.failures:
            write_failures(named_failures(self.failures), self.output_dir)
            check_evaluated(self.failures, 0, self.output_dir)


def named_failures(failures: Sequence[Mapping]) -> list[dict]:
    """The failed cases with their case names (``case`` holds the image path until then)."""
    return [{k: str(f.get(k, "")) for k in ERROR_FIELDS} | {"case": case_name(str(f.get("case", "")))}
            for f in failures]


def write_failures(failures: Sequence[Mapping], output_dir: str | os.PathLike) -> Path | None:
    """Write ``metrics_errors.csv`` (``case, source, error``) into ``output_dir`` (atomically), or remove
    the stale list of an earlier run when nothing failed.

    Returns:
        The CSV path, ``None`` when nothing failed.
    """
    errors_csv = write_error_list(Path(output_dir) / ERRORS_FILE, failures, ERROR_FIELDS)
    if errors_csv is not None:
        logger.error(f"{len(failures)} case(s) failed, listed in {errors_csv}")
    return errors_csv


def check_evaluated(failures: Sequence[Mapping], num_evaluated: int, output_dir: str | os.PathLike) -> None:
    """Refuse an evaluation where every case failed (each is named in the log and in the CSV).

    Raises:
        UsageError: one line naming the error list and the first failure.
    """
    if failures and not num_evaluated:
        first = failures[0]
        errors_csv = Path(output_dir) / ERRORS_FILE
        raise UsageError(f"{errors_csv}: every case of the evaluation failed ({len(failures)}), nothing was "
                         f"scored; the first: {first['source']}: {first['error']}")


class CacheDatasetNamingFailures(_monai_cache_dataset()):
    """MONAI's ``CacheDataset`` for training: an item whose transforms fail (a truncated file whose header
    passed the checks) raises an ``InputError`` naming the file, so the run ends in that one line.

    Args:
        keys: the file entries of an item, image first (what a failure may name).
        **kwargs: ``CacheDataset``'s (``data``, ``transform``, ``cache_rate``, ``num_workers``, ...).
    """

    def __init__(self, *args, keys: Sequence[str] = ("image", "label"), **kwargs) -> None:
        self.keys = list(keys)
        super().__init__(*args, **kwargs)

    def _raise_named(self, index: int, error: Exception) -> NoReturn:
        """Raise ``error`` as the failure that names item ``index``'s file; as it was when it is not the files'
        fault or already names the file."""
        named = load_failure(self.data[index], self.keys, error, blame_image=False)
        if named is None or named is error or named is root_cause(error):
            raise error
        raise named from error

    def _load_cache_item(self, idx: int):
        try:
            return super()._load_cache_item(idx)
        except Exception as error:
            self._raise_named(idx, error)

    def _transform(self, index: int):
        try:
            return super()._transform(index)
        except Exception as error:
            self._raise_named(index, error)
