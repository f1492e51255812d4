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
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class _GatherWithGradient(torch.autograd.Function):
    """``all_gather`` whose backward hands each rank the summed gradient of its own rows
    (SimCLR's gather layer; only all_gather and all_reduce, which gloo and NCCL both have)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return tuple(parts)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> torch.Tensor:
        summed = torch.stack(grads)
        dist.all_reduce(summed)
        return summed[dist.get_rank()]


def _gather_across_ranks(z: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every rank's embeddings (differentiable) and groups, with this rank's rows marked.

    Ranks may hold different numbers of views (a short last batch): rows are padded to the
    largest count for the collective and the padding is dropped again.

    Returns:
        ``(z_all, groups_all, local_rows)``: ``groups_all`` is ``(N_all, 3)`` ``(rank, scan, crop)``
        and ``local_rows`` the indices of this rank's views in ``z_all``.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    count = torch.tensor([len(z)], device=z.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    counts = [int(c) for c in counts]
    size = max(counts)
    padded = torch.cat([z, z.new_zeros(size - len(z), z.shape[1])])
    tagged = torch.cat([torch.full_like(groups[:, :1], rank), groups], dim=1)
    tagged = torch.cat([tagged, tagged.new_full((size - len(z), 3), -1)])
    z_parts = _GatherWithGradient.apply(padded)  # gradients flow back to the rank that made each row
    group_parts = [torch.empty_like(tagged) for _ in range(world)]
    dist.all_gather(group_parts, tagged)
    z_all = torch.cat([part[:n] for part, n in zip(z_parts, counts)])
    groups_all = torch.cat([part[:n] for part, n in zip(group_parts, counts)])
    start = sum(counts[:rank])
    return z_all, groups_all, torch.arange(start, start + len(z), device=z.device)


class IntraSampleNTXentLoss(nn.Module):
    """NT-Xent over views grouped by scan and crop.

    Every embedding carries a group ``(scan, crop)``. The positive of a view is the other
    view(s) of the same crop of the same scan. Its negatives are

    - ``intra_sample=True`` (CT-FM): the views of the *other crops of the same scan* only, so
      the network learns to tell apart regions of one body rather than one patient from
      another (with 15 crops x 2 views per scan: 1 positive, 28 negatives per view);
    - ``intra_sample=False`` (standard SimCLR): every other view in the batch; under
      ``torch.distributed`` (DDP), the views of every rank's batch (``gather_across_ranks``),
      as SimCLR does across devices, so the negatives do not shrink as GPUs are added.

    Embeddings are L2-normalised; similarities are divided by ``temperature``. The loss is
    the mean over the anchor views of ``-log(exp(s_pos) / sum_{j in candidates} exp(s_j))``,
    where the candidates are the positive and the negatives (never the view itself). The
    anchors are

    - ``symmetric=False`` (CT-FM's ``IntraSampleNTXEntLoss``): the first view of each crop only
      (the first row of its group in the batch; view 0 with the view-major batches of
      :class:`~scripts.views.ContrastiveBatch`), its positive the other view(s);
    - ``symmetric=True``: every view, as in SimCLR. With two views per crop and
      ``intra_sample=False`` this is exactly SimCLR's NT-Xent (MONAI's ``ContrastiveLoss``).

    Args:
        temperature: softmax temperature (0.1 in CT-FM).
        intra_sample: negatives from the same scan only (CT-FM) or from the whole batch.
        symmetric: every view is an anchor (SimCLR) instead of the first view of each crop only (CT-FM).
        gather_across_ranks: with ``intra_sample=False`` in a multi-process run, take negatives
            from every rank (each rank's loss is the mean over its own views; DDP's gradient
            average then equals the loss of the whole global batch). Intra-sample negatives
            never cross scans, so there is nothing to gather for them.
    """

    def __init__(
        self,
        temperature: float = 0.1,
        intra_sample: bool = True,
        gather_across_ranks: bool = True,
        symmetric: bool = False,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.intra_sample = bool(intra_sample)
        self.symmetric = bool(symmetric)
        self.gather_across_ranks = bool(gather_across_ranks)

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
        groups = groups.to(embeddings.device)
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if not self.intra_sample and self.gather_across_ranks and distributed:
            z_all, groups_all, rows = _gather_across_ranks(z, groups)
            groups = groups_all[rows]  # this rank's views, tagged with the rank like the others
        else:  # this rank's batch only
            z_all, groups_all, rows = z, groups, torch.arange(len(z), device=z.device)
        logits = z @ z_all.t() / self.temperature
        same_scan = (groups[:, None, :-1] == groups_all[None, :, :-1]).all(-1)
        same_crop = same_scan & (groups[:, -1, None] == groups_all[None, :, -1])
        not_self = rows[:, None] != torch.arange(len(z_all), device=z.device)[None, :]
        positives = same_crop & not_self
        if not bool(positives.any(dim=1).all()):
            raise ValueError("every crop needs at least two views: some view has no positive")
        candidates = (same_scan if self.intra_sample else torch.ones_like(same_scan)) & not_self
        log_denominator = torch.logsumexp(logits.masked_fill(~candidates, float("-inf")), dim=1)
        # mean over the positives of each view (exactly one with two views per crop)
        log_positive = (logits * positives).sum(1) / positives.sum(1)
        per_view = log_denominator - log_positive
        if self.symmetric:
            return per_view.mean()
        # the anchors: views with no earlier row of their own crop in this rank's batch
        same_crop_local = (groups[:, None, :] == groups[None, :, :]).all(-1)
        earlier = torch.ones_like(same_crop_local).tril(-1)
        anchors = ~(same_crop_local & earlier).any(1)
        return per_view[anchors].mean()
