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
"""Writing triage results: per-scan predictions (CSV + JSON), evaluation metrics (CSV + JSON)
and the ROC curve (PNG). Every file is written atomically (temp file, then ``os.replace``).
Computing is elsewhere (:mod:`scripts.metrics`); this module only writes."""

from __future__ import annotations

import io
import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .ctfm_common.inputs import case_names, case_source
from .ctfm_common.runtime import atomic_write, atomic_write_csv, atomic_write_text, merge_case_records

logger = logging.getLogger(__name__)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (float, np.floating)):
        return None if not math.isfinite(float(value)) else float(value)  # JSON has no NaN
    if isinstance(value, np.integer):
        return int(value)
    return value


def write_json(path: str | os.PathLike, content: Any) -> Path:
    """Write ``content`` as indented JSON (NaN/inf become ``null``), atomically."""
    return atomic_write_text(path, json.dumps(_jsonable(content), indent=2) + "\n")


def prediction_columns(label_names: Sequence[str]) -> list[str]:
    """CSV columns of per-scan predictions."""
    return (["case", "image"] + [f"probability_{n}" for n in label_names] + [f"decision_{n}" for n in label_names]
            + [f"threshold_{n}" for n in label_names] + [f"label_{n}" for n in label_names] + ["error"])


def prediction_rows(cases: Sequence[dict], label_names: Sequence[str]) -> list[dict]:
    """Flatten per-scan records (``{"case", "image", "probabilities", "decisions", "thresholds", ...}``) to CSV rows."""
    rows = []
    for case in cases:
        row = {"case": case.get("case"), "image": case.get("image"), "error": case.get("error")}
        for field in ("probabilities", "decisions", "thresholds", "labels"):
            for name in label_names:
                value = (case.get(field) or {}).get(name)
                row[f"{field[:-1] if field != 'probabilities' else 'probability'}_{name}"] = value
        rows.append(row)
    return rows


def write_predictions(cases: Sequence[dict], *, label_names: Sequence[str], output_dir: str | os.PathLike,
                      extra: dict | None = None, basename: str = "predictions", merge: bool = False) -> dict[str, str]:
    """Write per-scan predictions to ``<output_dir>/<basename>.csv`` and ``.json``.

    Cases are named by :func:`ctfm_common.inputs.case_names` (two scans never share a name) and,
    with ``merge``, joined by their input path with the cases of earlier runs already in the
    files, under a lock: earlier runs' cases stay, a rescored scan replaces its own record, and
    runs writing into one folder at once do not drop each other's rows.

    Args:
        cases: one record per scan (``case``, ``image``, ``probabilities``/``decisions``/``thresholds``
            by label name, ``error`` for scans that failed).
        label_names: label order of the columns.
        output_dir: output folder (created).
        extra: more top-level JSON entries (the checkpoint, the thresholds); with ``merge``, each
            case of this run also records them.
        basename: file name without extension.
        merge: keep the cases of earlier runs (inference); without it the files hold this run only.

    Returns:
        ``{"csv": path, "json": path}``.
    """
    out = Path(output_dir)
    json_file = out / f"{basename}.json"

    def this_run(earlier: list[dict]) -> list[dict]:
        # named against the earlier cases, under the lock: two scans never share a name
        taken = {c.get("case"): c.get("image") or "" for c in earlier}
        names = case_names([c.get("image") or c.get("case") or "case" for c in cases], taken, logger)
        return [{**c, "case": n, **(dict(extra or {}) if merge else {})} for c, n in zip(cases, names)]

    paths: dict[str, str] = {}

    def write(merged: list[dict]) -> None:
        paths["csv"] = str(atomic_write_csv(out / f"{basename}.csv", prediction_rows(merged, label_names),
                                     prediction_columns(label_names)))
        failed = [c for c in merged if c.get("error")]
        paths["json"] = str(write_json(json_file, {
            **(extra or {}), "label_names": list(label_names), "num_cases": len(merged), "num_failed": len(failed),
            "cases": list(merged)}))

    # a rescored scan (same input path) replaces its own record; without merge the files hold this run only
    merge_case_records(json_file, this_run, write,
                       key=lambda c: case_source(c["image"]) if c.get("image") else None,
                       expect={"label_names": list(label_names)}, keep_earlier=merge)
    return paths


def metrics_rows(report: dict) -> list[dict]:
    """Flatten :func:`scripts.metrics.evaluate_predictions` output to one row per (label, metric)."""
    rows = []
    for name, entry in report["labels"].items():
        for metric, value in entry["metrics"].items():
            rows.append({"label": name, "metric": metric, "value": value["value"], "ci_low": value["ci_low"],
                         "ci_high": value["ci_high"], "threshold": entry["threshold"],
                         "num_cases": report["num_cases"], "num_positive": entry["num_positive"]})
    return rows


def plot_roc(report: dict, path: str | os.PathLike, title: str = "ROC") -> Path:
    """ROC curve of each label with its AUC (95% CI) and the operating point, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5.0), dpi=120)
    ax.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=1, label="chance")
    for name, entry in report["labels"].items():
        auc = entry["metrics"]["auc"]
        line = ax.plot(entry["roc"]["fpr"], entry["roc"]["tpr"], linewidth=1.8,
                       label=f"{name}: AUC {auc['value']:.3f} [{auc['ci_low']:.3f}, {auc['ci_high']:.3f}]")[0]
        sens, spec = entry["metrics"]["sensitivity"]["value"], entry["metrics"]["specificity"]["value"]
        if math.isfinite(sens) and math.isfinite(spec):
            ax.plot([1 - spec], [sens], "o", color=line.get_color(), markersize=7,
                    label=f"{name}: threshold {entry['threshold']:.3f}")
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), xlabel="1 - specificity", ylabel="sensitivity",
           title=f"{title} (n={report['num_cases']})")
    ax.legend(loc="lower right", fontsize=7)
    ax.grid(alpha=0.3)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    plt.close(fig)
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(buffer.getvalue()))
