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
"""Ignite handlers MONAI lacks: atomic best/last checkpoints, and freezing the encoder."""

from __future__ import annotations

import logging

from ignite.engine import Engine, Events
from torch import nn

from .ctfm_common.encoder import encoder_of

logger = logging.getLogger("ctfm_wholebody_seg")


class FreezeEncoder:
    """Keep the shared encoder's weights fixed for the first ``epochs`` epochs, then train them.

    The decoder adapts to the pretrained features first; batch-norm statistics of the
    encoder keep updating (the layers stay in training mode).

    Args:
        network: a network holding the shared ``SegResEncoder`` (``SegResNetDS``), DDP too.
        epochs: epochs with a frozen encoder; 0 does nothing.
    """

    def __init__(self, network: nn.Module, epochs: int = 0) -> None:
        self.encoder, _ = encoder_of(network)
        self.epochs = int(epochs)

    def attach(self, engine: Engine) -> None:
        """Register with the trainer."""
        if self.epochs > 0:
            engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        frozen = engine.state.epoch <= self.epochs
        for param in self.encoder.parameters():
            param.requires_grad_(not frozen)
        if engine.state.epoch in (1, self.epochs, self.epochs + 1):
            logger.info(f"epoch {engine.state.epoch}: encoder {'frozen' if frozen else 'trainable'}")
