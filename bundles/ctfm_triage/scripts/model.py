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
its operating thresholds, with a frozen-encoder mode for linear probing."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .ctfm_common.encoder import PooledEncoderHead, looks_like_repo_id, missing_weights, read_state_dict


class TriageClassifier(PooledEncoderHead):
    """Shared encoder -> global average pool -> 512 -> 256 -> ReLU -> ``num_labels`` logits.

    The operating threshold of each label (chosen on validation at the end of each validation
    round) is a buffer, ``threshold``: it is saved in every checkpoint with the weights it was
    chosen for, and applied by inference exactly as stored.

    With the encoder frozen (:meth:`set_encoder_frozen`), its parameters get no gradient and its
    batch norm layers stay in eval mode (running statistics fixed) even when the engine calls
    ``train()``: a true linear probe of the pretrained features.

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
        self.encoder_frozen = False

    def set_encoder_frozen(self, frozen: bool) -> None:
        """Freeze (no gradients, batch norm in eval mode) or unfreeze the encoder."""
        self.encoder_frozen = bool(frozen)
        for parameter in self.encoder.parameters():
            parameter.requires_grad_(not frozen)
        self.train(self.training)

    def train(self, mode: bool = True) -> TriageClassifier:
        super().train(mode)
        if self.encoder_frozen:
            self.encoder.eval()
        return self


def unwrap(network: nn.Module) -> nn.Module:
    """The module inside a DDP / DataParallel wrapper (or the network itself)."""
    return network.module if isinstance(network, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else network


def load_checkpoint(network: nn.Module, ckpt: str | os.PathLike) -> nn.Module:
    """Load a trained triage checkpoint (weights and thresholds) strictly.

    Accepts the best-model file written by training (a plain state dict), the resumable
    ``model_last.pt`` (``{"model": ..., "optimizer": ..., ...}``), both read with
    ``weights_only=True``, and the hub format of ``tools/hub.py export`` (a ``.safetensors`` file,
    a folder with ``model.safetensors``, or its hub repo id ``owner/name``).

    Args:
        network: the :class:`TriageClassifier` built with the training settings.
        ckpt: checkpoint path, hub folder or hub repo id.

    Returns:
        The network, in eval mode.

    Raises:
        WeightsNotFoundError: no checkpoint at ``ckpt`` (one line, no traceback under ``monai.bundle run``).
        RuntimeError: the checkpoint does not fit the network, naming the settings to check.
    """
    path = Path(ckpt)
    if not path.exists() and not looks_like_repo_id(os.fspath(ckpt)):
        raise missing_weights(path, "triage checkpoint", train="train one with configs/train.json, or pass --ckpt PATH")
    if path.is_file() and path.suffix != ".safetensors":
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
            state = state["model"]
    else:  # .safetensors, hub folder or repo id: the shared reader
        state = read_state_dict(os.fspath(ckpt))
    module = unwrap(network)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise RuntimeError(f"{path}: does not fit the network; pass the training settings (init_filters, windows, "
                           f"label_names): {e}") from e
    return network.eval()


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
