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
"""Small Ignite handlers MONAI lacks for pretraining: atomic checkpoints, encoder export, monitoring."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch
from ignite.engine import Engine, Events

from .ctfm_common.encoder import embedding_dim, encoder_of, save_encoder_weights

logger = logging.getLogger("ctfm_pretrain")

class EncoderExporter:
    """Write the encoder (contract keys, ``.safetensors``) every ``interval`` iterations and at the end.

    Args:
        network: the pretraining network (``PooledEncoderHead``, possibly DDP-wrapped).
        path: output file, e.g. ``models/encoder.safetensors``.
        interval: iterations between exports (the checkpoint interval); 0 exports at the end only.
    """

    def __init__(self, network: torch.nn.Module, path: str | os.PathLike, interval: int = 0) -> None:
        self.network = network
        self.path = Path(path)
        self.interval = int(interval)

    def attach(self, engine: Engine) -> None:
        if self.interval > 0:
            engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.interval), self)
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        encoder, _ = encoder_of(self.network)
        init_filters = encoder.conv_init.out_channels
        metadata = {
            "format": "ctfm-encoder",
            "init_filters": init_filters,
            "embedding_dim": embedding_dim(init_filters),
            "iteration": engine.state.iteration,
            "epoch": engine.state.epoch,
        }
        save_encoder_weights(self.network, self.path, metadata=metadata)
        logger.info(f"iteration {engine.state.iteration}: encoder exported to {self.path}")


class PretrainMonitor:
    """End-to-end views per second, learning rate and skipped scans, to the log and TensorBoard.

    Reads ``engine.state.batch["skipped"]`` (see ``collate_scans``) and the number of views of
    the step (``engine.state.output["image"]``); at the end of every epoch logs the epoch's
    count of skipped (unreadable or degenerate) scans and puts ``skipped_scans`` and
    ``views_per_second`` into ``engine.state.metrics``.

    Args:
        optimizer: optimizer whose first group's lr is logged.
        summary_writer: TensorBoard writer (e.g. the one of ``TensorBoardStatsHandler``); None: log only.
        log_interval: iterations between log lines.
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer | None = None, summary_writer=None, log_interval: int = 10
    ) -> None:
        self.optimizer = optimizer
        self.writer = summary_writer
        self.log_interval = max(1, int(log_interval))
        self._start = 0.0
        self._views = 0
        self._seconds = 0.0
        self._skipped = 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self.epoch_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    def epoch_started(self, engine: Engine) -> None:
        self._views, self._seconds, self._skipped = 0, 0.0, 0
        self._start = time.perf_counter()

    def iteration_completed(self, engine: Engine) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now = time.perf_counter()
        seconds, self._start = now - self._start, now  # end to end: data loading included
        views = len(engine.state.output["image"]) if isinstance(engine.state.output, dict) else 0
        self._views += views
        self._seconds += seconds
        batch = engine.state.batch if isinstance(engine.state.batch, dict) else {}
        crops = len(batch["crops"]) if "crops" in batch else 0
        self._skipped += int(batch.get("skipped", 0))
        step = engine.state.iteration
        lr = self.optimizer.param_groups[0]["lr"] if self.optimizer is not None else None
        if self.writer is not None:
            self.writer.add_scalar("views_per_second", views / max(seconds, 1e-9), step)
            self.writer.add_scalar("crops_per_second", crops / max(seconds, 1e-9), step)
            if lr is not None:
                self.writer.add_scalar("lr", lr, step)
        if step % self.log_interval == 0:
            logger.info(f"iteration {step}: {views / max(seconds, 1e-9):.1f} views/s (end to end), lr {lr}")

    def epoch_completed(self, engine: Engine) -> None:
        rate = self._views / max(self._seconds, 1e-9)
        engine.state.metrics["skipped_scans"] = self._skipped
        engine.state.metrics["views_per_second"] = rate
        message = f"epoch {engine.state.epoch}: {self._skipped} scan(s) skipped (unreadable or degenerate)"
        (logger.warning if self._skipped else logger.info)(message + f"; {rate:.1f} views/s")
        if self.writer is not None:
            self.writer.add_scalar("skipped_scans", self._skipped, engine.state.epoch)
            self.writer.flush()
