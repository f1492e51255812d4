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
"""The triage classifier: the shared encoder, global average pool and an MLP head, carrying
its operating thresholds (freezing the encoder for a linear probe: ``scripts.encoder.FreezeEncoder``)."""

from __future__ import annotations

import torch

from .ctfm_common.encoder import PooledEncoderHead


class TriageClassifier(PooledEncoderHead):
    """Shared encoder -> global average pool -> 512 -> 256 -> ReLU -> ``num_labels`` logits.

    The operating threshold of each label (chosen on validation at the end of each validation
    round) is a buffer, ``threshold``: it is saved in every checkpoint with the weights it was
    chosen for, and applied by inference exactly as stored.

    Args:
        init_filters: encoder width (32 is the contract).
        in_channels: input channels (one per HU window).
        hidden_features: head hidden width.
        num_labels: outputs (1 for normal/abnormal; N for multi-label).
    """

    def __init__(self, init_filters: int = 32, in_channels: int = 1, hidden_features: int = 256,
                 num_labels: int = 1) -> None:
        super().__init__(init_filters=init_filters, in_channels=in_channels, hidden_features=hidden_features,
                         out_features=num_labels)
        self.register_buffer("threshold", torch.full((num_labels,), 0.5))


def pos_weight_tensor(pos_weight: float | list | str | None, items: list[dict], num_labels: int,
                      device: torch.device | str = "cpu") -> torch.Tensor | None:
    """``pos_weight`` of ``BCEWithLogitsLoss``: ``None``/empty (none), a number or one per label, or
    ``"auto"`` (negatives / positives of each label in the training items)."""
    if pos_weight is None or pos_weight == [] or pos_weight == "":
        return None
    if pos_weight == "auto":
        from .datalist import positive_weight

        pos_weight = positive_weight(items, num_labels)
    values = torch.as_tensor(pos_weight, dtype=torch.float32).reshape(-1)
    if values.numel() == 1:
        values = values.repeat(num_labels)
    if values.numel() != num_labels:
        raise ValueError(f"pos_weight needs 1 or {num_labels} values (one per label), got {pos_weight}")
    return values.to(device)
