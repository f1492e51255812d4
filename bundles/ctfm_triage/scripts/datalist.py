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
"""Triage data lists: a decathlon datalist JSON or a CSV of ``path,label[,label...]``.

A CSV has one scan per row: the image (NIfTI/NRRD/MHA file or DICOM series folder, relative
to ``dataset_dir`` unless absolute) and one 0/1 column per label. An optional header row
names the labels (``path,any,epidural,...``); an optional ``split`` column assigns rows to
``training`` / ``validation`` / ``testing``, otherwise the rows are split at random,
stratified on the first label. Every row is validated: a missing file, a label that is not
0 or 1, or a wrong number of columns is reported with its line number, all at once.

This module imports nothing from the rest of the bundle, so ``ctfm-triage-datalist`` (tools/data/triage_csv_to_datalist.py)
can load it on its own.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

SECTIONS = ("training", "validation", "testing")
POSITIVE, NEGATIVE = ("1", "1.0", "true", "yes"), ("0", "0.0", "false", "no")


class DatalistError(ValueError):
    """A data list (CSV or JSON) that cannot be used; the message names the rows at fault."""


def _parse_label(text: str) -> int | None:
    value = text.strip().lower()
    if value in POSITIVE:
        return 1
    if value in NEGATIVE:
        return 0
    return None


def _image_exists(path: str) -> bool:
    return os.path.isfile(path) or os.path.isdir(path)


def read_label_csv(csv_path: str | os.PathLike, *, dataset_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Read and validate a ``path,label[,label...]`` CSV.

    Args:
        csv_path: the CSV file.
        dataset_dir: folder that relative image paths are relative to (default: the CSV's folder).

    Returns:
        ``{"label_names": [...], "items": [{"image": path as written, "label": [0/1, ...],
        "split": str or None, "line": int}, ...]}``.

    Raises:
        FileNotFoundError: the CSV itself does not exist.
        DatalistError: malformed rows, listed by line number with the problem of each.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"label CSV not found: {csv_path}")
    base = Path(dataset_dir) if dataset_dir else csv_path.parent
    with open(csv_path, newline="") as f:
        rows = [(n, row) for n, row in enumerate(csv.reader(f), start=1) if any(cell.strip() for cell in row)]
    if not rows:
        raise DatalistError(f"{csv_path}: the CSV is empty (expected rows of path,label[,label...]).")
    first_line, first = rows[0]
    has_header = len(first) > 1 and _parse_label(first[-1]) is None and not _image_exists(str(base / first[0].strip()))
    columns = [c.strip() for c in first] if has_header else []
    split_column = columns.index("split") if "split" in columns else None
    label_columns = [i for i in range(1, len(first)) if i != split_column]
    if not label_columns:
        raise DatalistError(f"{csv_path}, line {first_line}: no label column (expected path,label[,label...]).")
    label_names = [columns[i] for i in label_columns] if has_header else (
        ["abnormal"] if len(label_columns) == 1 else [f"label_{k}" for k in range(len(label_columns))])
    errors: list[str] = []
    items: list[dict[str, Any]] = []
    for line, row in rows[1:] if has_header else rows:
        cells = [c.strip() for c in row]
        if len(cells) != len(first):
            errors.append(f"line {line}: {len(cells)} columns, expected {len(first)} "
                          f"({', '.join(columns) if columns else 'path + ' + str(len(label_columns)) + ' label(s)'})")
            continue
        image = cells[0]
        problems = []
        if not image:
            problems.append("empty image path")
        else:
            full = image if os.path.isabs(image) else str(base / image)
            if not _image_exists(full):
                problems.append(f"image file not found: '{image}' (looked for {full})")
        labels = []
        for name, column in zip(label_names, label_columns):
            value = _parse_label(cells[column])
            if value is None:
                problems.append(f"bad label '{cells[column]}' in column '{name}' (must be 0 or 1)")
            labels.append(value)
        split = cells[split_column] if split_column is not None else None
        if split is not None and split not in SECTIONS:
            problems.append(f"bad split '{split}' (must be one of {', '.join(SECTIONS)})")
        if problems:
            errors.append(f"line {line}: " + "; ".join(problems))
            continue
        items.append({"image": image, "label": labels, "split": split, "line": line})
    if errors:
        raise DatalistError(f"{csv_path}: {len(errors)} invalid row(s):\n  " + "\n  ".join(errors))
    if not items:
        raise DatalistError(f"{csv_path}: no data rows after the header.")
    return {"label_names": label_names, "items": items}


def stratified_split(labels: Sequence[int], fractions: Sequence[float], *, seed: int = 0) -> list[int]:
    """Assign each case to a part, stratified on ``labels`` (e.g. the first label).

    Args:
        labels: one class per case.
        fractions: fraction of cases in parts 1, 2, ... (part 0 takes the rest).
        seed: random seed.

    Returns:
        The part index of each case.
    """
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    parts = np.zeros(len(labels), dtype=int)
    for value in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == value))
        start = 0
        for part, fraction in enumerate(fractions, start=1):
            count = int(round(fraction * len(members)))
            parts[members[start:start + count]] = part
            start += count
    return parts.tolist()


def csv_to_datalist(
    csv_path: str | os.PathLike,
    *,
    dataset_dir: str | os.PathLike | None = None,
    validation_fraction: float = 0.2,
    testing_fraction: float = 0.0,
    seed: int = 0,
) -> dict[str, Any]:
    """A decathlon-style datalist from a label CSV (validated by :func:`read_label_csv`).

    Rows with a ``split`` value keep it; the others are split at random (stratified on the
    first label) into ``validation_fraction`` / ``testing_fraction`` / the rest for training.

    Args:
        csv_path: the CSV file.
        dataset_dir: folder of relative image paths (default: the CSV's folder).
        validation_fraction: fraction of unassigned rows for ``validation``.
        testing_fraction: fraction of unassigned rows for ``testing``.
        seed: random seed of the split.

    Returns:
        ``{"labels": {index: name}, "training": [...], "validation": [...], "testing": [...]}`` with
        items ``{"image": path as in the CSV, "label": int or [ints]}``.
    """
    if not (0.0 <= validation_fraction and 0.0 <= testing_fraction and validation_fraction + testing_fraction < 1.0):
        raise ValueError(f"validation_fraction {validation_fraction} + testing_fraction {testing_fraction} "
                         "must be in [0, 1)")
    table = read_label_csv(csv_path, dataset_dir=dataset_dir)
    items = table["items"]
    free = [i for i, item in enumerate(items) if item["split"] is None]
    parts = stratified_split([items[i]["label"][0] for i in free], [validation_fraction, testing_fraction], seed=seed)
    sections = {i: SECTIONS[p] for i, p in zip(free, parts)}
    single = len(table["label_names"]) == 1
    datalist: dict[str, Any] = {
        "name": f"triage labels from {Path(csv_path).name}",
        "labels": {str(k): name for k, name in enumerate(table["label_names"])},
        **{s: [] for s in SECTIONS},
    }
    for i, item in enumerate(items):
        section = item["split"] or sections[i]
        datalist[section].append({"image": item["image"], "label": item["label"][0] if single else item["label"]})
    return datalist


def load_datalist(
    datalist: str | os.PathLike,
    section: str,
    *,
    dataset_dir: str | os.PathLike | None = None,
    num_labels: int = 1,
    validation_fraction: float = 0.2,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Items of one section of a datalist JSON or label CSV, with absolute image paths.

    Args:
        datalist: decathlon datalist JSON, or a label CSV (split as in :func:`csv_to_datalist`).
        section: ``training``, ``validation`` or ``testing``.
        dataset_dir: folder of relative image paths (default: the datalist's folder).
        num_labels: labels per item; every item's ``label`` must have this many 0/1 values.
        validation_fraction: for a CSV without a ``split`` column.
        seed: for a CSV without a ``split`` column.

    Returns:
        ``[{"image": absolute path, "label": [0/1, ...], ...}, ...]`` (other item keys kept).

    Raises:
        DatalistError: an unknown section, an empty section, or an item without a valid label.
    """
    path = Path(datalist)
    if not path.is_file():
        raise FileNotFoundError(f"datalist not found: {path} (expected a decathlon datalist JSON or a label CSV)")
    base = Path(dataset_dir) if dataset_dir else path.parent
    if path.suffix.lower() == ".csv":
        content = csv_to_datalist(path, dataset_dir=base, validation_fraction=validation_fraction, seed=seed)
    else:
        try:
            content = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise DatalistError(f"{path}: not a valid datalist JSON ({e}).") from e
    if section not in SECTIONS:
        raise DatalistError(f"unknown datalist section '{section}' (expected one of {', '.join(SECTIONS)}).")
    items = content.get(section) or []
    if not items:
        raise DatalistError(f"{path}: the '{section}' list is empty or missing.")
    resolved = []
    for index, item in enumerate(items):
        if not isinstance(item, dict) or "image" not in item or "label" not in item:
            raise DatalistError(f"{path}: item {index} of '{section}' needs 'image' and 'label' entries: {item}")
        label = item["label"] if isinstance(item["label"], list) else [item["label"]]
        if len(label) != num_labels or any(v not in (0, 1) for v in label):
            raise DatalistError(f"{path}: item {index} of '{section}' ({item['image']}): label {item['label']} is not "
                                f"{num_labels} value(s) of 0 or 1 (num_labels={num_labels}).")
        image = item["image"] if os.path.isabs(item["image"]) else str(base / item["image"])
        resolved.append({**item, "image": image, "label": [int(v) for v in label]})
    if section == "training":  # a classifier needs both classes of every label to learn anything
        labels = np.array([item["label"] for item in resolved])
        for k in range(num_labels):
            present = sorted({int(v) for v in labels[:, k]})
            if len(present) < 2:
                raise DatalistError(
                    f"{path}: every one of the {len(resolved)} '{section}' items has label {k} = {present[0]}: a "
                    f"classifier needs positive and negative cases of each label (its AUC would be undefined)."
                )
    return resolved


def subsample(items: Sequence[dict], fraction: float = 1.0, *, seed: int = 0) -> list[dict]:
    """A stratified random fraction of the items (label-efficiency studies).

    Stratified on the first label; each class present keeps at least one item. The same seed
    gives the same subset, and a smaller fraction gives a subset of a larger one's order.

    Args:
        items: datalist items with a ``label`` list.
        fraction: in (0, 1]; 1 keeps everything.
        seed: random seed.

    Returns:
        The kept items, in their original order.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"data_fraction must be in (0, 1], got {fraction}")
    if fraction == 1.0:
        return list(items)
    rng = np.random.default_rng(seed)
    first = np.asarray([item["label"][0] for item in items])
    keep: list[int] = []
    for value in np.unique(first):
        members = rng.permutation(np.flatnonzero(first == value))
        keep += members[: max(1, int(round(fraction * len(members))))].tolist()
    return [items[i] for i in sorted(keep)]


def positive_weight(items: Sequence[dict], num_labels: int) -> list[float]:
    """``pos_weight`` for BCE-with-logits from the class balance: negatives / positives per label."""
    labels = np.asarray([item["label"] for item in items], dtype=float).reshape(len(items), num_labels)
    positives = labels.sum(0)
    return [float((len(items) - p) / p) if p > 0 else 1.0 for p in positives]
