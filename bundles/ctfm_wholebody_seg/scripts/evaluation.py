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
"""Per-class Dice and normalised surface Dice per case, with a CSV + JSON + PNG report.

Metrics are MONAI's (``compute_dice``, ``compute_surface_dice``), applied class by class on
the bounding box of each structure so that 118 classes on a full-resolution CT need no
118-channel one-hot volume. Scores are computed on the label map's own grid (the
prediction is inverted to it first), so they match a hand computation on the files.

An evaluation goes on past a case that cannot be used: one that fails the header checks is left
out by ``load_datalist(skip_bad=True)``, one that fails while loading (a truncated file whose header
is fine, NaN voxels) by ``ctfm_common.failed_cases`` (``EvaluationDataset``, ``SkipFailedCases``; the
triage evaluation uses them too). Each is named with its problem in the log (``failed: <file>:
<problem>``) and in ``metrics_errors.csv`` / ``metrics.json``; only a run where every case failed ends
in an error.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.metrics import compute_dice, compute_surface_dice

from .ctfm_common.failed_cases import ERROR_FIELDS, check_evaluated, named_failures, write_failures
from .ctfm_common.inputs import case_name, case_names, case_source
from .ctfm_common.runtime import atomic_write_csv
from .labels import read_label_names
from .segment import write_bytes_atomic

logger = logging.getLogger("ctfm_wholebody_seg")

CASE_FIELDS = ("case", "index", "name", "dice", "nsd", "reference_voxels", "predicted_voxels")


def _crop(pred: np.ndarray, label: np.ndarray, margin: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Both masks cut to the bounding box of their union plus ``margin`` voxels (surfaces stay exact)."""
    union = np.argwhere(pred | label)
    low = np.maximum(union.min(0) - margin, 0)
    high = np.minimum(union.max(0) + margin + 1, pred.shape)
    box = tuple(slice(lo, hi) for lo, hi in zip(low, high))
    return pred[box], label[box]


def score_case(
    pred: np.ndarray,
    label: np.ndarray,
    spacing: Sequence[float],
    names: Mapping[int, str],
    tolerance_mm: float = 3.0,
    classes: Sequence[int] | None = None,
) -> list[dict]:
    """Dice and normalised surface Dice of every structure present in ``pred`` or ``label``.

    Args:
        pred: predicted label map.
        label: reference label map on the same grid.
        spacing: voxel size in mm (for the surface distances).
        names: index -> structure name.
        tolerance_mm: NSD tolerance (TotalSegmentator reports NSD at 3 mm).
        classes: indices to score (default: every non-zero index in either map).

    Returns:
        One row per structure: ``index, name, dice, nsd, reference_voxels, predicted_voxels``;
        a structure missing from one map scores 0.
    """
    pred, label = np.asarray(pred).astype(np.int64), np.asarray(label).astype(np.int64)
    if pred.shape != label.shape:
        raise ValueError(f"prediction {pred.shape} and reference {label.shape} are not on the same grid")
    present = sorted((set(np.unique(pred).tolist()) | set(np.unique(label).tolist())) - {0})
    rows = []
    for index in classes if classes is not None else present:
        p, r = pred == index, label == index
        if not p.any() and not r.any():
            continue
        p, r = _crop(p, r)
        onehot_p = torch.as_tensor(np.stack([~p, p]))[None].float()
        onehot_r = torch.as_tensor(np.stack([~r, r]))[None].float()
        dice = float(compute_dice(onehot_p, onehot_r, include_background=False, ignore_empty=False)[0, 0])
        nsd = 0.0
        if p.any() and r.any():
            surface = compute_surface_dice(
                onehot_p, onehot_r, [tolerance_mm], include_background=False, spacing=list(spacing)
            )
            nsd = float(surface[0, 0])
        rows.append({
            "index": int(index),
            "name": names.get(int(index), f"class_{index}"),
            "dice": round(dice, 6),
            "nsd": round(nsd, 6),
            "reference_voxels": int(r.sum()),
            "predicted_voxels": int(p.sum()),
        })
    return rows


def summarise(rows: Sequence[Mapping]) -> dict:
    """Mean Dice / NSD per structure over the cases, and overall (mean of the per-case means)."""
    per_class: dict[int, dict] = {}
    for row in rows:
        entry = per_class.setdefault(row["index"], {"index": row["index"], "name": row["name"], "dice": [], "nsd": []})
        entry["dice"].append(row["dice"])
        entry["nsd"].append(row["nsd"])
    classes = [
        {"index": e["index"], "name": e["name"], "cases": len(e["dice"]),
         "dice": round(float(np.mean(e["dice"])), 6), "nsd": round(float(np.mean(e["nsd"])), 6)}
        for e in sorted(per_class.values(), key=lambda e: e["index"])
    ]
    cases: dict[str, list[Mapping]] = {}
    for row in rows:
        cases.setdefault(row["case"], []).append(row)
    case_means = {c: {"dice": float(np.mean([r["dice"] for r in rs])), "nsd": float(np.mean([r["nsd"] for r in rs]))}
                  for c, rs in cases.items()}
    def mean(key: str) -> float:
        return round(float(np.mean([m[key] for m in case_means.values()])), 6) if case_means else math.nan

    return {"num_cases": len(cases), "mean_dice": mean("dice"), "mean_nsd": mean("nsd"), "cases": case_means,
            "classes": classes}


def write_report(
    rows: Sequence[Mapping], output_dir: str | os.PathLike, title: str = "", failures: Sequence[Mapping] = ()
) -> dict:
    """Write ``metrics_per_case.csv``, ``metrics_per_class.csv``, ``metrics.json`` and ``metrics.png``.

    Args:
        rows: :func:`score_case` rows with a ``case`` entry.
        output_dir: report folder.
        title: chart title.
        failures: the cases left out (``case``, ``source``, ``error``): listed in ``metrics.json``
            (``failed``, ``num_failed``).

    Returns:
        The :func:`summarise` summary (also in ``metrics.json``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output_dir = Path(output_dir)
    summary = summarise(rows)
    atomic_write_csv(output_dir / "metrics_per_case.csv", rows, CASE_FIELDS)
    atomic_write_csv(output_dir / "metrics_per_class.csv", summary["classes"], ("index", "name", "cases", "dice", "nsd"))
    failed = [{k: str(f.get(k, "")) for k in ERROR_FIELDS} for f in failures]
    report = json.dumps({**summary, "num_failed": len(failed), "failed": failed, "per_case": list(rows)}, indent=2)
    report += "\n"
    write_bytes_atomic(report.encode(), output_dir / "metrics.json")
    classes = summary["classes"]
    height = max(2.5, 0.22 * len(classes) + 1.2)
    fig, ax = plt.subplots(figsize=(7, height))
    positions = np.arange(len(classes))
    ax.barh(positions - 0.2, [c["dice"] for c in classes], height=0.4, label="Dice")
    ax.barh(positions + 0.2, [c["nsd"] for c in classes], height=0.4, label="NSD")
    ax.set_yticks(positions, [c["name"] for c in classes], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_title(f"{title} mean Dice {summary['mean_dice']:.3f}, NSD {summary['mean_nsd']:.3f} "
                 f"({summary['num_cases']} cases)", fontsize=9)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    write_bytes_atomic(buffer.getvalue(), output_dir / "metrics.png")
    return summary


class CaseNames:
    """The output names of an evaluation's cases (:func:`ctfm_common.inputs.case_names` over the
    whole data list), so two scans with one file name (``<case>/ct.nii.gz``) never share one.

    ``formatter`` is a ``SaveImaged`` ``output_name_formatter``: predictions are written as
    ``<name>_seg.nii.gz``, one file per case.

    Args:
        items: the evaluation's data dicts.
        key: their image key.
    """

    def __init__(self, items: Sequence[Mapping], key: str = "image") -> None:
        paths = [str(item[key]) for item in items]
        self.by_source = {case_source(p): n for p, n in zip(paths, case_names(paths, logger=logger))}

    def __call__(self, source: str | os.PathLike) -> str:
        return self.by_source.get(case_source(source)) or case_names([source])[0]

    def formatter(self, metadict: Mapping, saver: object = None) -> dict:
        return {"subject": self(str(metadict["filename_or_obj"])), "idx": None}


class SegmentationReport:
    """Evaluator handler: scores each case (:func:`score_case`) and writes the report at the end.

    Expects decollated outputs whose ``pred`` and ``label`` are integer label maps on the
    label's grid (``Invertd`` the prediction first). Sets ``engine.state.metrics["mean_dice"]``
    and ``["mean_nsd"]``.

    Args:
        output_dir: report folder.
        label_names: index -> structure name (or a JSON file of them).
        tolerance_mm: NSD tolerance.
        pred_key: prediction key.
        label_key: reference key.
        failures: the cases left out (``case``, ``source``, ``error``; :class:`SkipFailedCases` fills it):
            written to ``metrics_errors.csv`` and listed in ``metrics.json``. When no case is left to
            score, the earlier report is kept and :meth:`check_scored` raises.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        label_names: Mapping[int, str] | str,
        tolerance_mm: float = 3.0,
        pred_key: str = "pred",
        label_key: str = "label",
        failures: Sequence[Mapping] | None = None,
    ) -> None:
        self.output_dir = output_dir
        self.failures = failures if failures is not None else []
        self.names = read_label_names(label_names)
        self.tolerance_mm = float(tolerance_mm)
        self.pred_key, self.label_key = pred_key, label_key
        self.rows: list[dict] = []

    def attach(self, engine: Engine) -> None:
        """Register with the evaluator."""
        engine.add_event_handler(Events.STARTED, lambda e: self.rows.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.score)
        engine.add_event_handler(Events.COMPLETED, self.report)

    def score(self, engine: Engine) -> None:
        """Score the cases of the current batch."""
        outputs = engine.state.output if isinstance(engine.state.output, list) else [engine.state.output]
        for item in outputs:
            pred, label = item[self.pred_key], item[self.label_key]
            source = str(label.meta.get("filename_or_obj", f"case_{len(self.rows)}"))
            image_source = str(pred.meta.get("filename_or_obj", source)) if hasattr(pred, "meta") else source
            spacing = [float(s) for s in label.pixdim[:3]]
            rows = score_case(np.asarray(pred.detach().cpu())[0].round(), np.asarray(label.detach().cpu())[0].round(),
                              spacing, self.names, self.tolerance_mm)
            self.rows += [{"case": case_source(image_source), **row} for row in rows]  # named in report()
            if rows:
                logger.info(f"{case_name(image_source)}: mean Dice {np.mean([r['dice'] for r in rows]):.4f} over {len(rows)} structures")

    def report(self, engine: Engine) -> None:
        """Write the report files and publish the means as engine metrics."""
        sources = list(dict.fromkeys(row["case"] for row in self.rows))  # one identity per scanned file
        names = dict(zip(sources, case_names(sources, logger=logger)))
        self.rows = [{**row, "case": names[row["case"]]} for row in self.rows]
        failures = named_failures(self.failures)
        write_failures(failures, self.output_dir)
        if failures and not self.rows and engine.state.iteration == 0:
            return  # nothing scored: the earlier report stays, check_scored() ends the run
        summary = write_report(self.rows, self.output_dir, failures=failures)
        engine.state.metrics["mean_dice"] = summary["mean_dice"]
        engine.state.metrics["mean_nsd"] = summary["mean_nsd"]
        logger.info(f"evaluation: mean Dice {summary['mean_dice']:.4f}, mean NSD {summary['mean_nsd']:.4f} over "
                    f"{summary['num_cases']} cases; report in {self.output_dir}")

    def check_scored(self) -> None:
        """After the run: refuse an evaluation where every case failed (each is named above and in the CSV).

        Raises:
            UsageError: one line naming the error list and the first failure.
        """
        check_evaluated(self.failures, len(self.rows), self.output_dir)
