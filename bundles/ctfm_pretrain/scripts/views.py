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
"""Two augmented views per crop, made in one batch on the training device.

The CT-FM view recipe (random resized crop, flip on the first spatial axis, histogram
shift, Gaussian smoothing) applied view by view with MONAI's CPU transforms costs about
3 s of CPU per scan; here every view of a step is made at once with a handful of batched
tensor operations on whatever device the crops are on (the GPU in training), from the
int16 crops that the data loader reads out of the preprocessed cache. Each operation
follows the semantics of the MONAI transform named in its docstring.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F


HU_MIN, HU_MAX = -1024.0, 2048.0


def scale_hu(crops: torch.Tensor, a_min: float = HU_MIN, a_max: float = HU_MAX) -> torch.Tensor:
    """HU -> [0, 1], clipped (MONAI ``ScaleIntensityRange(a_min, a_max, 0, 1, clip=True)``)."""
    return ((crops.float() - a_min) / (a_max - a_min)).clamp_(0.0, 1.0)


class ViewAugmenter:
    """Make ``num_views`` independently augmented views of every crop, batched.

    Per view, in this order:

    1. random resized crop: ``s`` uniform in ``crop_scale``, a box of ``s`` times the crop's size
       on *each* spatial axis (CT-FM's ``RandomResizedCrop``: MONAI ``RandScaleCrop(s)``; at
       s = 0.33 a 32 x 128 x 128 crop keeps an ~11 x 43 x 43 box, ~3.6 % of its volume) at a
       random position, resampled back to the crop's size with trilinear interpolation
       (``Resize(mode="trilinear")``);
    2. flip on the first spatial axis with probability ``flip_prob`` (``RandFlip(spatial_axis=0)``),
       folded into the same resampling grid;
    3. histogram shift with ``num_control_points`` points, probability ``histogram_shift_prob``
       (``RandHistogramShift``: inner control points moved at random, intensities mapped
       piecewise linearly between the image's min and max);
    4. Gaussian smoothing with probability ``smooth_prob`` and per-axis sigma uniform in
       ``smooth_sigma`` voxels (``RandGaussianSmooth``; replicate padding at the borders).

    Args:
        num_views: views per crop (2 for SimCLR).
        crop_scale: range of the resized crop's side fraction, the same on every axis (0.33-1.0 in CT-FM).
        flip_prob: probability of a flip on the first spatial axis.
        num_control_points: histogram-shift control points (including both ends).
        histogram_shift_prob: probability of a histogram shift.
        smooth_prob: probability of Gaussian smoothing.
        smooth_sigma: range of the smoothing sigma in voxels (MONAI's default 0.25-1.5).
        generator: random generator (on the crops' device); the default uses the global one.
    """

    def __init__(
        self,
        num_views: int = 2,
        crop_scale: Sequence[float] = (0.33, 1.0),
        flip_prob: float = 0.5,
        num_control_points: int = 5,
        histogram_shift_prob: float = 0.5,
        smooth_prob: float = 0.5,
        smooth_sigma: Sequence[float] = (0.25, 1.5),
        generator: torch.Generator | None = None,
    ) -> None:
        if not 0 < crop_scale[0] <= crop_scale[1] <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {crop_scale}")
        if num_control_points < 3:
            raise ValueError(f"num_control_points must be >= 3, got {num_control_points}")
        self.num_views = int(num_views)
        self.crop_scale = (float(crop_scale[0]), float(crop_scale[1]))
        self.flip_prob = float(flip_prob)
        self.num_control_points = int(num_control_points)
        self.histogram_shift_prob = float(histogram_shift_prob)
        self.smooth_prob = float(smooth_prob)
        self.smooth_sigma = (float(smooth_sigma[0]), float(smooth_sigma[1]))
        self.generator = generator

    def _rand(self, *shape: int, device: torch.device) -> torch.Tensor:
        return torch.rand(*shape, device=device, generator=self.generator)

    def resized_crop_and_flip(self, x: torch.Tensor) -> torch.Tensor:
        """Random resized crop + flip on spatial axis 0 of each volume of ``x`` (N, C, D, H, W)."""
        n, dev = x.shape[0], x.device
        low, high = self.crop_scale
        side = low + (high - low) * self._rand(n, device=dev)  # the same fraction on each axis, as in CT-FM
        # box centre in normalised coordinates, kept inside the crop
        centre = (2 * self._rand(n, 3, device=dev) - 1) * (1 - side)[:, None]
        flip = torch.where(self._rand(n, device=dev) < self.flip_prob, -1.0, 1.0)
        theta = torch.zeros(n, 3, 4, device=dev)
        # affine_grid orders coordinates (W, H, D): spatial axis 0 (D) is the last row
        theta[:, 0, 0] = side
        theta[:, 1, 1] = side
        theta[:, 2, 2] = side * flip
        theta[:, :, 3] = centre
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def histogram_shift(self, x: torch.Tensor) -> torch.Tensor:
        """``RandHistogramShift`` on each volume of ``x`` (N, 1, D, H, W) with probability ``histogram_shift_prob``."""
        n, dev, k = x.shape[0], x.device, self.num_control_points
        reference = torch.linspace(0, 1, k, device=dev).expand(n, k)
        floating = reference.clone()
        for i in range(1, k - 1):  # MONAI: each inner point uniform between its (already moved) neighbours
            lo, hi = floating[:, i - 1], floating[:, i + 1]
            floating[:, i] = lo + (hi - lo) * self._rand(n, device=dev)
        apply = self._rand(n, device=dev) < self.histogram_shift_prob
        floating = torch.where(apply[:, None], floating, reference)
        flat = x.reshape(n, -1)
        lo, hi = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
        t = (flat - lo) / (hi - lo).clamp_min(1e-6)
        segment = (t * (k - 1)).floor().clamp_(0, k - 2).long()
        start_ref = torch.gather(reference, 1, segment)
        start, end = torch.gather(floating, 1, segment), torch.gather(floating, 1, segment + 1)
        mapped = start + (t - start_ref) * (k - 1) * (end - start)
        return (lo + mapped * (hi - lo)).reshape(x.shape)

    def gaussian_smooth(self, x: torch.Tensor) -> torch.Tensor:
        """``RandGaussianSmooth`` on each volume of ``x`` (N, 1, D, H, W) with probability ``smooth_prob``."""
        n, dev = x.shape[0], x.device
        low, high = self.smooth_sigma
        sigma = low + (high - low) * self._rand(n, 3, device=dev)
        apply = self._rand(n, device=dev) < self.smooth_prob
        radius = int(math.ceil(3.0 * high))
        taps = torch.arange(-radius, radius + 1, device=dev, dtype=x.dtype)
        kernels = torch.exp(-0.5 * (taps[None, None, :] / sigma[:, :, None]) ** 2)
        kernels = kernels / kernels.sum(-1, keepdim=True)
        identity = (taps == 0).to(x.dtype).expand_as(kernels)
        kernels = torch.where(apply[:, None, None], kernels, identity)  # (N, 3, taps)
        out = x.reshape(1, n, *x.shape[2:])  # views as channels: one grouped convolution per axis
        for axis in range(3):
            shape = [n, 1, 1, 1, 1]
            shape[2 + axis] = 2 * radius + 1
            pad = [0] * 6
            pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
            out = F.conv3d(F.pad(out, pad, mode="replicate"), kernels[:, axis].reshape(shape), groups=n)
        return out.reshape(x.shape)

    def __call__(self, crops: torch.Tensor) -> torch.Tensor:
        """Views of ``crops`` (N, 1, D, H, W) in [0, 1]: ``(num_views * N, 1, D, H, W)``, view-major.

        Row ``v * N + i`` is view ``v`` of crop ``i``.
        """
        if crops.ndim != 5 or crops.shape[1] != 1:
            raise ValueError(f"expected crops of shape (N, 1, D, H, W), got {tuple(crops.shape)}")
        x = crops.float().repeat(self.num_views, 1, 1, 1, 1)
        x = self.resized_crop_and_flip(x)
        x = self.histogram_shift(x)
        x = self.gaussian_smooth(x)
        return x.clamp_(0.0, 1.0)


class ContrastiveBatch:
    """``prepare_batch`` for MONAI's ``SupervisedTrainer``: cached crops -> (views, groups).

    Moves the int16 HU crops of a batch to the device, scales them to [0, 1], makes the views
    there with a :class:`ViewAugmenter`, and returns them with their ``(scan, crop)`` groups,
    the "labels" of :class:`~scripts.losses.IntraSampleNTXentLoss`.

    Args:
        augmenter: the view maker.
        channels_last: return views in ``channels_last_3d`` memory format (faster convolutions on
            recent GPUs; use with a network converted to the same format).
        a_min: HU mapped to 0.
        a_max: HU mapped to 1.
    """

    def __init__(
        self, augmenter: ViewAugmenter, channels_last: bool = False, a_min: float = HU_MIN, a_max: float = HU_MAX
    ) -> None:
        self.augmenter = augmenter
        self.channels_last = bool(channels_last)
        self.a_min, self.a_max = float(a_min), float(a_max)

    def __call__(
        self, batchdata: dict, device: str | torch.device | None = None, non_blocking: bool = False, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        crops = torch.as_tensor(batchdata["crops"]).to(device=device, non_blocking=non_blocking)
        groups = torch.as_tensor(batchdata["groups"]).to(device=device, non_blocking=non_blocking)
        with torch.no_grad():
            views = self.augmenter(scale_hu(crops, self.a_min, self.a_max))
        if self.channels_last:
            views = views.contiguous(memory_format=torch.channels_last_3d)
        return views, groups.repeat(self.augmenter.num_views, 1)
