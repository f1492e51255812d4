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
"""Intra-sample NT-Xent: the CT-FM contrastive loss (and the standard SimCLR variant)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class IntraSampleNTXentLoss(nn.Module):
    """NT-Xent over views grouped by scan and crop.

    Every embedding carries a group ``(scan, crop)``. The positive of a view is the other
    view(s) of the same crop of the same scan. Its negatives are

    - ``intra_sample=True`` (CT-FM): the views of the *other crops of the same scan* only, so
      the network learns to tell apart regions of one body rather than one patient from
      another (with 15 crops x 2 views per scan: 1 positive, 28 negatives per view);
    - ``intra_sample=False`` (standard SimCLR): every other view in the batch.

    Embeddings are L2-normalised; similarities are divided by ``temperature``. The loss is
    the mean over all views of ``-log(exp(s_pos) / sum_{j in candidates} exp(s_j))``, where
    the candidates are the positive and the negatives (never the view itself). With two
    views per crop and ``intra_sample=False`` this is exactly SimCLR's NT-Xent (MONAI's
    ``ContrastiveLoss``).

    Args:
        temperature: softmax temperature (0.1 in CT-FM).
        intra_sample: negatives from the same scan only (CT-FM) or from the whole batch.
    """

    def __init__(self, temperature: float = 0.1, intra_sample: bool = True) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.intra_sample = bool(intra_sample)

    def forward(self, embeddings: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        """Compute the loss.

        Args:
            embeddings: ``(N, D)`` projections, one row per view.
            groups: ``(N, 2)`` integer ``(scan, crop)`` of each view.

        Returns:
            The scalar loss (float32, also under autocast).

        Raises:
            ValueError: on shape mismatches, or a view without a positive (a crop seen once).
        """
        if embeddings.ndim != 2 or groups.shape != (embeddings.shape[0], 2):
            raise ValueError(
                f"expected embeddings (N, D) and groups (N, 2), got {tuple(embeddings.shape)} and {tuple(groups.shape)}"
            )
        z = F.normalize(embeddings.float(), dim=1)
        logits = z @ z.t() / self.temperature
        groups = groups.to(embeddings.device)
        same_scan = groups[:, 0, None] == groups[None, :, 0]
        same_crop = same_scan & (groups[:, 1, None] == groups[None, :, 1])
        not_self = ~torch.eye(len(z), dtype=torch.bool, device=z.device)
        positives = same_crop & not_self
        if not bool(positives.any(dim=1).all()):
            raise ValueError("every crop needs at least two views: some view has no positive")
        candidates = (same_scan if self.intra_sample else torch.ones_like(same_scan)) & not_self
        log_denominator = torch.logsumexp(logits.masked_fill(~candidates, float("-inf")), dim=1)
        # mean over the positives of each view (exactly one with two views per crop)
        log_positive = (logits * positives).sum(1) / positives.sum(1)
        return (log_denominator - log_positive).mean()
