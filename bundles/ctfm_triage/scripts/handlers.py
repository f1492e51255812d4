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
"""Ignite handlers MONAI lacks: prediction collection and operating threshold selection on
validation (freezing the encoder is ``scripts.encoder.FreezeEncoder``)."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.utils import evenly_divisible_all_gather
from torch import nn

from . import metrics
from .ctfm_common.encoder import unwrap
from .report import write_json

logger = logging.getLogger(__name__)


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class PredictionCollector:
    """Collect per-case probabilities, labels and image paths over an evaluator epoch.

    Reads the decollated ``engine.state.output`` (``pred`` after the sigmoid, ``label``, and the
    image's ``filename_or_obj``); gathers across ranks under torch.distributed.
    """

    def __init__(self, pred_key: str = "pred", label_key: str = "label", image_key: str = "image") -> None:
        self.pred_key, self.label_key, self.image_key = pred_key, label_key, image_key
        self.reset()

    def reset(self, engine: Engine | None = None) -> None:
        self._probabilities: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []
        self._images: list[str] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)

    def collect(self, engine: Engine) -> None:
        output = engine.state.output
        for item in output if isinstance(output, list) else [output]:
            self._probabilities.append(torch.as_tensor(item[self.pred_key]).detach().float().cpu().reshape(-1))
            self._labels.append(torch.as_tensor(item[self.label_key]).detach().float().cpu().reshape(-1))
            meta = getattr(item.get(self.image_key), "meta", {}) or {}
            self._images.append(str(meta.get("filename_or_obj", "")))

    def result(self) -> dict:
        """``{"images": [...], "probabilities": (N, L) array, "labels": (N, L) array}`` over all ranks."""
        if not self._probabilities:
            return {"images": [], "probabilities": np.zeros((0, 0)), "labels": np.zeros((0, 0))}
        probabilities, labels = torch.stack(self._probabilities), torch.stack(self._labels)
        images = list(self._images)
        if _distributed():
            probabilities = evenly_divisible_all_gather(probabilities, concat=True)
            labels = evenly_divisible_all_gather(labels, concat=True)
            gathered: list = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, images)
            images = [name for part in gathered for name in part]
        return {"images": images, "probabilities": probabilities.numpy(), "labels": labels.numpy()}


class OperatingThresholdHandler:
    """Choose each label's operating threshold on the validation predictions and store it in the model.

    At the end of every validation round the thresholds are chosen on that round's predictions
    and written into the network's ``threshold`` buffer, so every checkpoint saved afterwards
    (attach this handler before the checkpoint saver) carries the thresholds of its own weights.
    When the round is the best so far, they are also written to ``json_path`` beside the best
    checkpoint, for people to read.

    Args:
        collector: the :class:`PredictionCollector` attached to the same evaluator.
        network: the :class:`scripts.model.TriageClassifier`.
        label_names: a name per output.
        method: ``"youden"`` or ``"sensitivity"`` (see :func:`scripts.metrics.choose_threshold`).
        target_sensitivity: for ``method="sensitivity"``.
        json_path: where the best round's thresholds go (``""``: nowhere).
    """

    def __init__(self, collector: PredictionCollector, network: nn.Module, label_names: Sequence[str],
                 method: str = "youden", target_sensitivity: float = 0.9, json_path: str = "") -> None:
        if method not in metrics.THRESHOLD_METHODS:
            raise ValueError(f"threshold_method must be one of {metrics.THRESHOLD_METHODS}, got '{method}'")
        self.collector, self.network, self.label_names = collector, network, list(label_names)
        self.method, self.target_sensitivity, self.json_path = method, float(target_sensitivity), json_path

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _stored_metric(self) -> float | None:
        """The key metric of the round whose thresholds ``json_path`` holds (an earlier run's too)."""
        import json
        import os

        if not self.json_path or not os.path.isfile(self.json_path):
            return None
        try:
            value = json.loads(open(self.json_path).read()).get("key_metric")
        except (OSError, ValueError):
            return None
        return float(value) if isinstance(value, (int, float)) else None

    def __call__(self, engine: Engine) -> None:
        result = self.collector.result()
        y, p = result["labels"], result["probabilities"]
        if y.size == 0:
            return
        thresholds = [metrics.choose_threshold(y[:, k], p[:, k], method=self.method,
                                               target_sensitivity=self.target_sensitivity)
                      for k in range(len(self.label_names))]
        buffer = unwrap(self.network).threshold
        buffer.copy_(torch.as_tensor(thresholds, dtype=buffer.dtype, device=buffer.device))
        best = getattr(engine.state, "best_metric_epoch", -1) == engine.state.epoch
        current = engine.state.metrics.get(getattr(engine.state, "key_metric_name", None) or "")
        stored = self._stored_metric()
        if best and stored is not None and current is not None and float(current) < stored:
            best = False  # resumed: the evaluator forgot earlier rounds; the file keeps the best of them
        logger.info(f"operating thresholds ({self.method}) on {len(y)} validation cases: "
                    + ", ".join(f"{n}={t:.4f}" for n, t in zip(self.label_names, thresholds)))
        if best and self.json_path and (not _distributed() or torch.distributed.get_rank() == 0):
            metric = getattr(engine.state, "best_metric", math.nan)
            write_json(self.json_path, {
                "thresholds": dict(zip(self.label_names, thresholds)),
                "threshold_method": self.method,
                "target_sensitivity": self.target_sensitivity if self.method == "sensitivity" else None,
                "chosen_on": f"{len(y)} validation cases",
                "epoch": engine.state.epoch,
                "key_metric": float(metric) if metric is not None else None,
                "note": "the same values are stored in the checkpoint (buffer 'threshold'); inference reads them there",
            })
