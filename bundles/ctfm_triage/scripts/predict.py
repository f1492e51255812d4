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
"""Per-scan triage inference that reports bad scans and goes on, and the evaluation report."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
from torch import nn

from . import metrics
from .ctfm_common.failed_cases import check_evaluated, named_failures, write_failures
from .ctfm_common.cases import SOURCE_KEY, run_cases
from .ctfm_common.inputs import case_name
from .ctfm_common.runtime import UsageError, atomic_write_csv
from .handlers import PredictionCollector
from .ctfm_common.encoder import unwrap
from .report import metrics_rows, plot_roc, write_json, write_predictions

logger = logging.getLogger(__name__)


def prepare_item(batchdata: Mapping, device: torch.device | str | None = None, non_blocking: bool = False,
                 **kwargs: Any) -> tuple[torch.Tensor, None]:
    """``prepare_batch`` of MONAI's ``SupervisedEvaluator`` over this bundle's loader (one item at a time,
    ``ctfm_common.cases.first_item``): the image with a batch axis, no label; a scan that failed to load raises its
    one-line error (from ``ctfm_common.cases.LoadCase``)."""
    if batchdata.get("error"):
        raise ValueError(batchdata["error"])
    return torch.as_tensor(batchdata["image"])[None].to(device=device, non_blocking=non_blocking), None


def _labels_of(item: Mapping, label_names: Sequence[str]) -> dict | None:
    label = item.get("label")
    if label is None:
        return None
    values = np.asarray(label, dtype=float).reshape(-1)
    return dict(zip(label_names, values.astype(int).tolist())) if values.size == len(label_names) else None


def predict(
    *,
    network: nn.Module,
    dataloader: Any,
    label_names: Sequence[str],
    output_dir: str,
    device: torch.device | str = "cpu",
    amp: bool = False,
    ckpt: str = "",
) -> dict[str, str]:
    """Classify every scan; write per-scan probabilities and decisions (CSV + JSON).

    The decision of each label is ``probability >= threshold`` with the thresholds stored in the
    checkpoint (the network's ``threshold`` buffer): exactly those chosen on validation.

    Args:
        network: the trained :class:`scripts.model.TriageClassifier` (checkpoint loaded).
        dataloader: yields one preprocessed item at a time (``batch_size=1``, ``ctfm_common.cases.first_item``),
            items wrapped by ``ctfm_common.cases.LoadCase``.
        label_names: a name per output.
        output_dir: where ``predictions.csv`` and ``predictions.json`` go.
        device: compute device.
        amp: bf16 autocast on CUDA.
        ckpt: the checkpoint path, recorded in the JSON.

    Returns:
        ``{"csv": path, "json": path}``.

    Raises:
        RuntimeError: every scan failed (naming each scan and its problem; earlier outputs are left as they are).
        UsageError: no scan to triage (an empty ``input``).
    """
    if not len(dataloader):
        raise UsageError("no scan to triage: pass --input (a CT file, a DICOM series folder, a glob or a datalist JSON)")
    device = torch.device(device)
    module = unwrap(network)
    module.eval()
    thresholds = module.threshold.detach().float().cpu().tolist()
    threshold_by_name = dict(zip(label_names, thresholds))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if amp and device.type == "cuda" else nullcontext()

    def record_of(item: Mapping) -> dict[str, Any]:
        source = item[SOURCE_KEY]
        return {"case": case_name(source), "image": source, "labels": _labels_of(item, label_names)}

    def classify(_: int, item: Mapping) -> dict[str, Any]:
        with torch.no_grad(), autocast:
            logits = network(torch.as_tensor(item["image"])[None].to(device))
        probabilities = torch.sigmoid(logits.float())[0].cpu().tolist()
        return {**record_of(item), "probabilities": dict(zip(label_names, probabilities)),
                "decisions": {n: int(p >= t) for n, p, t in zip(label_names, probabilities, thresholds)},
                "thresholds": threshold_by_name, "error": None}

    def skipped(_: int, item: Mapping, message: str) -> dict[str, Any]:  # unreadable, or e.g. out of memory
        logger.error(f"skipped: {message}")
        return {**record_of(item), "error": message}

    paths: dict[str, str] = {}

    def write(cases: list[dict]) -> None:
        paths.update(write_predictions(
            cases, label_names=label_names, output_dir=output_dir,
            extra={"checkpoint": str(ckpt), "thresholds": threshold_by_name,
                   "decision_rule": "probability >= threshold (thresholds stored in the checkpoint)"},
            merge=True))
        failed = sum(bool(c["error"]) for c in cases)
        logger.info(f"triage of {len(cases)} scan(s), {failed} failed: {paths['csv']}, {paths['json']}")

    # every scan failed: nothing to report, earlier predictions are kept as they are
    run_cases(loader=dataloader, process=classify, failed=skipped, summary=write, summary_when_all_failed=False,
              all_failed=f"all {{count}} scan(s) failed, nothing written to {output_dir}", desc="triage", unit="scan",
              log=logger)
    return paths


def evaluate(
    *,
    collector: PredictionCollector,
    network: nn.Module,
    label_names: Sequence[str],
    output_dir: str,
    num_bootstrap: int = 1000,
    seed: int = 0,
    ckpt: str = "",
    failures: Sequence[Mapping] = (),
) -> dict[str, str]:
    """Metrics at the stored thresholds, with bootstrap 95% CIs, from an evaluator's predictions.

    Writes ``metrics.json``, ``metrics.csv`` (one row per label and metric), ``roc_curve.png``
    and per-case ``predictions.csv``/``.json`` into ``output_dir``.

    Args:
        collector: the :class:`scripts.handlers.PredictionCollector` of the evaluator that ran.
        network: the evaluated network (its ``threshold`` buffer holds the operating thresholds).
        label_names: a name per output.
        output_dir: output folder.
        num_bootstrap: bootstrap resamples.
        seed: bootstrap seed.
        ckpt: the evaluated checkpoint, recorded in the JSON.
        failures: the scans that failed to load (``case``, ``source``, ``error``;
            ``ctfm_common.failed_cases.SkipFailedCases`` fills it): written to ``metrics_errors.csv`` and
            listed in ``metrics.json`` (``num_failed``, ``failed``).

    Returns:
        The written paths by kind.

    Raises:
        UsageError: every scan failed (the earlier report is kept; the failures are in ``metrics_errors.csv``).
    """
    failed = named_failures(failures)
    errors_csv = write_failures(failed, output_dir)
    result = collector.result()
    check_evaluated(failed, len(result["images"]), output_dir)
    thresholds = unwrap(network).threshold.detach().float().cpu().tolist()
    report = metrics.evaluate_predictions(result["labels"], result["probabilities"], thresholds,
                                          label_names=label_names, num_bootstrap=num_bootstrap, seed=seed)
    report = {"checkpoint": str(ckpt), "num_bootstrap": num_bootstrap, "confidence": 0.95, **report,
              "num_failed": len(failed), "failed": failed}
    paths = {
        "metrics_json": str(write_json(os.path.join(output_dir, "metrics.json"), report)),
        "metrics_csv": str(atomic_write_csv(os.path.join(output_dir, "metrics.csv"), metrics_rows(report),
                                     ["label", "metric", "value", "ci_low", "ci_high", "threshold", "num_cases",
                                      "num_positive"])),
        "roc_png": str(plot_roc(report, os.path.join(output_dir, "roc_curve.png"), title="triage ROC")),
    }
    if errors_csv is not None:
        paths["errors_csv"] = str(errors_csv)
    cases = []
    for image, y, p in zip(result["images"], result["labels"], result["probabilities"]):
        cases.append({"case": case_name(image) if image else "", "image": image,
                      "labels": dict(zip(label_names, np.asarray(y).astype(int).tolist())),
                      "probabilities": dict(zip(label_names, np.asarray(p).tolist())),
                      "decisions": {n: int(pp >= t) for n, pp, t in zip(label_names, p, thresholds)},
                      "thresholds": dict(zip(label_names, thresholds)), "error": None})
    paths.update({f"predictions_{k}": v for k, v in write_predictions(
        cases, label_names=label_names, output_dir=output_dir, extra={"checkpoint": str(ckpt)}).items()})
    for name, entry in report["labels"].items():
        m = entry["metrics"]
        logger.info(f"{name}: " + ", ".join(f"{k} {v['value']:.3f} [{v['ci_low']:.3f}, {v['ci_high']:.3f}]"
                                             for k, v in m.items()) + f" at threshold {entry['threshold']:.4f}")
    return paths
