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
"""Convert a triage label CSV (``path,label[,label...]``) into a decathlon datalist JSON.

Every row is validated first: a missing image file, a label that is not 0 or 1, a bad
``split`` value or a wrong number of columns is reported with its line number, and nothing
is written. Rows without a ``split`` column value are split at random, stratified on the
first label. The parsing lives in the triage bundle (``bundles/ctfm_triage/scripts/datalist.py``,
which training also uses to read CSVs directly), loaded here by file path so the two never
disagree.

Usage::

    ctfm-triage-datalist --csv labels.csv --output datalist.json \
        --dataset_dir /data/head_ct --validation_fraction 0.1 --testing_fraction 0.1 --seed 0

CSV examples::

    path,abnormal            path,any,epidural,subdural,split
    scans/a.nii.gz,1         dicom/series_001,1,0,1,training
    scans/b.nii.gz,0         dicom/series_002,0,0,0,validation
"""

from __future__ import annotations

import importlib.util
import json
import sys
from types import ModuleType

from ctfm_bundles.tools import REPO_ROOT
from ctfm_common.runtime import atomic_write_text

DATALIST_MODULE = REPO_ROOT / "bundles" / "ctfm_triage" / "scripts" / "datalist.py"


def _datalist_module() -> ModuleType:
    """The bundle's ``datalist`` module, under a name that cannot collide with another ``scripts``."""
    name = "ctfm_triage_datalist"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, DATALIST_MODULE)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def triage_csv_to_datalist(
    *,
    csv: str,
    output: str,
    dataset_dir: str | None = None,
    validation_fraction: float = 0.2,
    testing_fraction: float = 0.0,
    seed: int = 0,
) -> dict:
    """Validate a label CSV and write it as a decathlon datalist JSON (atomically).

    Args:
        csv: the CSV: one row per scan, ``path,label[,label...]``, optional header naming the labels
            and optional ``split`` column (``training``/``validation``/``testing``).
        output: the datalist JSON to write.
        dataset_dir: folder that relative image paths are relative to (default: the CSV's folder).
            Paths are written as in the CSV, so train with the same ``--dataset_dir``.
        validation_fraction: fraction of rows without a split that go to ``validation``.
        testing_fraction: fraction of rows without a split that go to ``testing``.
        seed: seed of the random split.

    Returns:
        A summary: the output path, label names and the number of items per section.

    Raises:
        ValueError: invalid rows, each named by its line number and problem (nothing is written).
    """
    module = _datalist_module()
    datalist = module.csv_to_datalist(csv, dataset_dir=dataset_dir, validation_fraction=validation_fraction,
                                      testing_fraction=testing_fraction, seed=seed)
    path = atomic_write_text(output, json.dumps(datalist, indent=2) + "\n")
    summary = {"output": str(path), "label_names": list(datalist["labels"].values()),
               **{section: len(datalist[section]) for section in module.SECTIONS}}
    print(json.dumps(summary))
    return summary


def cli() -> None:
    """The console command (``[project.scripts]`` of pyproject.toml)."""
    import fire

    fire.Fire(triage_csv_to_datalist)


if __name__ == "__main__":
    cli()
