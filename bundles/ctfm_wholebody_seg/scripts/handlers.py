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
"""Ignite helpers MONAI lacks: freezing the encoder, and the inputs of the training Dice."""

from __future__ import annotations

import logging

import torch
from ignite.engine import Engine, Events
from monai.networks.utils import one_hot
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


def train_dice_inputs(output: dict, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(prediction, label)`` one-hot batches for MONAI's ``MeanDice`` on the trainer's output.

    The trainer's ``pred`` is the list of deep-supervision outputs (full resolution first); the
    training Dice scores its argmax against the (augmented) label of the same patches.

    Args:
        output: the trainer's ``engine.state.output`` (``pred``, ``label``).
        num_classes: output channels.

    Returns:
        One-hot prediction and label, both ``(B, num_classes, ...)``.
    """
    pred = output["pred"]
    if isinstance(pred, (list, tuple)):
        pred = pred[0]
    with torch.no_grad():
        y_pred = one_hot(pred.detach().argmax(1, keepdim=True), num_classes)
        y = one_hot(output["label"].detach().long(), num_classes)
    return y_pred, y
