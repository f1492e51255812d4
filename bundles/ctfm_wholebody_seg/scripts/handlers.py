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
"""Ignite helpers MONAI lacks: the inputs of the training Dice (freezing the encoder is
``scripts.encoder.FreezeEncoder``, shared with the other bundles)."""

from __future__ import annotations

import torch
from monai.networks.utils import one_hot


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
