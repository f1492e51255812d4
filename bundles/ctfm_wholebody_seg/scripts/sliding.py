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
"""Sliding-window inference that returns the label map, stitched slab by slab (for CPUs).

MONAI's ``SlidingWindowInferer`` accumulates every window's ``num_classes`` logits into a
full-volume buffer, divides it by the blending weights and hands it back for an argmax:
118 channels x the whole CT (2.6 GB in float16 for 223 x 201 x 243 voxels, 5.1 GB in float32),
and several passes over it. On a CPU those passes cost about as much as the network.

:class:`SlabArgmaxInferer` visits the same windows with the same Gaussian weights, but keeps
only a slab of one window's depth (along the first spatial axis) of weighted logit sums, in
float32 and channels-last (the layout of the network's ``channels_last_3d`` output, so one
fused multiply-add per window). Once no later window reaches a slice (windows come in order of
their first-axis start), the argmax of its sums is final: dividing by the summed weights, as
MONAI does, does not change the argmax (one positive number per voxel), nor does a softmax.
With ``argmax`` false it is MONAI's ``SlidingWindowInferer`` unchanged.

With ``stitch_features`` (the default) and a network whose logits come from a 1 x 1 x 1
convolution (``SegResNetDS``'s final head), the slab holds the weighted sums of the network's
full-resolution *features* (32 channels at ``init_filters`` 32) instead of its logits (118), and
the head runs once per voxel, in float32, on their Gaussian-weighted mean when a slice is final.
The head is linear, so the mean of the windows' logits, which MONAI stitches, is the head of the
mean of their features: the same label map, with a quarter of the slab's memory and stitching,
and without the bf16 rounding of the head's weights and of the logits, which decides the argmax
of near-tied logits (:func:`split_head`).

:class:`RoiSubsetCropInferer` runs it on the region of a ``roi_subset`` only, found by a coarse pass.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from monai.data import MetaTensor
from monai.data.utils import compute_importance_map, dense_patch_slices, get_valid_patch_size
from monai.inferers import Inferer, SlidingWindowInferer
from monai.inferers.utils import _get_scan_interval
from monai.utils import convert_to_dst_type, ensure_tuple_rep, fall_back_tuple

from .ctfm_common.runtime import UsageError, as_bool

logger = logging.getLogger("ctfm_wholebody_seg")


def final_head(network: nn.Module) -> nn.Module | None:
    """The 1 x 1 x 1 convolution that turns a ``SegResNetDS``'s full-resolution features into its logits,
    or ``None`` for another network."""
    layers = getattr(network, "up_layers", None)
    if not isinstance(layers, nn.ModuleList) or not layers or "head" not in layers[-1]:
        return None
    head = layers[-1]["head"]
    if not isinstance(head, nn.Conv3d) or tuple(head.kernel_size) != (1, 1, 1) or head.groups != 1:
        return None
    return head


@contextlib.contextmanager
def replaced(replacements: Sequence[tuple[nn.Module, str, nn.Module]]) -> Iterator[None]:
    """Inside: each ``(parent, name, module)``'s submodule ``parent.name`` is ``module`` (the parameters stay
    where they are: a state dict taken inside or after is the network's own)."""
    saved = [(parent, name, getattr(parent, name)) for parent, name, _ in replacements]
    try:
        for parent, name, module in replacements:
            setattr(parent, name, module)
        yield
    finally:
        for parent, name, module in saved:
            setattr(parent, name, module)


def heads_removed(network: nn.Module) -> contextlib.AbstractContextManager:
    """Inside: the ``SegResNetDS`` returns its full-resolution features (its heads, the final one and the
    deep-supervision ones it computes and drops in ``eval`` mode, are ``Identity``)."""
    return replaced([(level, "head", nn.Identity()) for level in network.up_layers])


class Float32(nn.Module):
    """``module`` run in float32 under an autocast (its input cast to float32)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return self.module(x.float())


def float32_stem(network: nn.Module) -> contextlib.AbstractContextManager:
    """Inside: a ``SegResNetDS``'s first convolution (``encoder.conv_init``, 1 -> ``init_filters`` channels)
    runs in float32 under autocast. Its input, HU scaled to [0, 1], would lose all but 8 bits in bf16
    (steps of 12 HU over the -1024..2048 window); the convolution is a few percent of the network's work.
    Another network: unchanged."""
    encoder = getattr(network, "encoder", None)
    if not isinstance(getattr(encoder, "conv_init", None), nn.Conv3d):
        return contextlib.nullcontext()
    return replaced([(encoder, "conv_init", Float32(encoder.conv_init))])


def linear_head(head: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The 1 x 1 x 1 convolution ``head`` as a float32 map of channels-last features ``(..., C)`` to
    logits ``(..., K)``."""
    weight = head.weight.detach().float().reshape(head.out_channels, head.in_channels)
    bias = None if head.bias is None else head.bias.detach().float()

    def logits(features: torch.Tensor) -> torch.Tensor:
        with torch.autocast(features.device.type, enabled=False):
            return F.linear(features.float(), weight.to(features.device), None if bias is None else bias.to(features.device))

    return logits


def split_head(network: Callable) -> tuple[Callable, Callable] | None:
    """``(features, head)`` with ``head(features(x)) == network(x)`` (channels-last ``head`` input and
    output), or ``None`` when the network has no linear final head.

    A network may give its own split (``network.split_head()``, e.g. ``scripts.segment.CastOutput``,
    which runs the features under its autocast and maps the head's channels to a ``roi_subset``);
    otherwise a ``SegResNetDS`` is split at :func:`final_head`.
    """
    if hasattr(network, "split_head"):
        return network.split_head()
    head = final_head(network)
    if head is None:
        return None

    def features(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        with heads_removed(network):
            out = network(x, *args, **kwargs)
        return out[0] if isinstance(out, (list, tuple)) else out

    return features, linear_head(head)


class SlabArgmaxInferer(SlidingWindowInferer):
    """``SlidingWindowInferer`` whose output is the argmax label map, computed slab by slab.

    Args:
        roi_size, sw_batch_size, overlap, mode, sigma_scale, padding_mode, cval, sw_device,
            device, progress: as ``SlidingWindowInferer`` (the windows, their order, padding
            and Gaussian weights are MONAI's).
        argmax: return the label map ``(B, 1, *spatial)`` (float32, the input's metadata)
            stitched slab by slab; false: MONAI's ``SlidingWindowInferer`` unchanged (logits).
        stitch_features: with ``argmax``, stitch the features before the network's linear head and run
            the head in float32 on their mean (:func:`split_head`); networks without one, or false:
            stitch the logits.
        **kwargs: other ``SlidingWindowInferer`` arguments (used only with ``argmax`` false).

    After a call, ``timings`` holds the seconds spent in the network (``network_s``) and in
    stitching and argmax (``stitch_s``).
    """

    def __init__(self, roi_size: Sequence[int] | int, sw_batch_size: int = 1, overlap: float = 0.25,
                 mode: str = "constant", sigma_scale: float = 0.125, padding_mode: str = "constant",
                 cval: float = 0.0, sw_device: torch.device | str | None = None,
                 device: torch.device | str | None = None, progress: bool = False, argmax: bool = True,
                 stitch_features: bool = True, **kwargs) -> None:
        super().__init__(roi_size=roi_size, sw_batch_size=sw_batch_size, overlap=overlap, mode=mode,
                         sigma_scale=sigma_scale, padding_mode=padding_mode, cval=cval, sw_device=sw_device,
                         device=device, progress=progress, **kwargs)
        self.argmax = as_bool(argmax)  # a word from the command line too: --slab_argmax false
        self.stitch_features = as_bool(stitch_features)
        self.chunk = 8  # slices per multiply-add
        self.timings: dict[str, float] = {}

    def __call__(self, inputs: torch.Tensor, network: Callable, *args, **kwargs) -> torch.Tensor:
        if not self.argmax:
            return super().__call__(inputs, network, *args, **kwargs)
        overlap = tuple(float(o) for o in ensure_tuple_rep(self.overlap, inputs.ndim - 2))
        raw = inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs
        self.timings = {"network_s": 0.0, "stitch_s": 0.0}
        labels = torch.cat([self._one(raw[b : b + 1], network, overlap, *args, **kwargs) for b in range(raw.shape[0])])
        return convert_to_dst_type(labels, inputs, dtype=torch.float32)[0] if isinstance(inputs, MetaTensor) else labels

    def _one(self, image: torch.Tensor, network: Callable, overlap, *args, **kwargs) -> torch.Tensor:
        """Label map ``(1, 1, *spatial)`` of one image ``(1, C, *spatial)``."""
        dims = image.ndim - 2
        size = list(image.shape[2:])
        roi = fall_back_tuple(self.roi_size, size)
        sw_device = torch.device(self.sw_device) if self.sw_device is not None else image.device
        pad = []  # as MONAI: images smaller than the window are padded, the result cropped
        for k in range(image.ndim - 1, 1, -1):
            diff = max(roi[k - 2] - image.shape[k], 0)
            pad.extend([diff // 2, diff - diff // 2])
        if any(pad):
            image = F.pad(image, pad=pad, mode=str(self.padding_mode), value=self.cval)
        padded = tuple(image.shape[2:])
        slices = dense_patch_slices(padded, roi, _get_scan_interval(padded, roi, dims, overlap))
        slices = sorted(slices, key=lambda s: s[0].start)  # MONAI's order already; slabs rely on it
        weight = compute_importance_map(get_valid_patch_size(padded, roi), mode=self.mode,
                                        sigma_scale=self.sigma_scale, device="cpu", dtype=torch.float32)
        weight = weight.to(sw_device).unsqueeze(-1)  # (d, h, w, 1): broadcast over channels-last logits
        depth = roi[0]
        labels = torch.zeros((1, 1, *padded), dtype=torch.float32, device=sw_device)
        split = split_head(network) if self.stitch_features else None
        head = None
        if split is not None:
            network, head = split
        slab: torch.Tensor | None = None  # weighted logit (or feature) sums of slices [low, low + depth), (d, h, w, K)
        weight_sum = torch.zeros((depth, *padded[1:], 1), dtype=torch.float32, device=sw_device) if head else None
        low = 0

        def finish(upto: int) -> None:  # slices below `upto` get no more windows: argmax them
            nonlocal low
            if slab is None or upto <= low:
                return
            n = min(upto - low, depth)
            if head is None:  # the weighted sum of the logits has the argmax of their mean
                labels[0, 0, low : low + n] = slab[:n].argmax(-1).to(labels.dtype)
            else:  # the head of the features' mean (the bias counts once), a few slices at a time
                for z in range(0, n, self.chunk):
                    rows = slice(z, min(n, z + self.chunk))
                    logits = head(slab[rows] / weight_sum[rows].clamp_min(torch.finfo(torch.float32).tiny))
                    labels[0, 0, low + rows.start : low + rows.stop] = logits.argmax(-1).to(labels.dtype)
            for buffer in filter(lambda b: b is not None, (slab, weight_sum)):
                buffer[: depth - n] = buffer[n:].clone()
                buffer[depth - n :] = 0
            low += n

        batch = max(1, int(self.sw_batch_size))
        for first in range(0, len(slices), batch):
            group = slices[first : first + batch]
            start = time.perf_counter()
            windows = torch.cat([image[(slice(None), slice(None), *s)] for s in group]).to(sw_device)
            out = network(windows, *args, **kwargs)
            if isinstance(out, (list, tuple)):  # deep supervision: the full-resolution output
                out = out[0]
            if isinstance(out, dict):
                raise ValueError("SlabArgmaxInferer needs a network that returns one tensor of logits (or features)")
            out = out.as_tensor() if isinstance(out, MetaTensor) else out
            if tuple(out.shape[2:]) != tuple(roi):
                raise ValueError(f"network output {tuple(out.shape[2:])} is not the window size {tuple(roi)}")
            self.timings["network_s"] += time.perf_counter() - start
            start = time.perf_counter()
            for logits, s in zip(out, group):
                if slab is None:
                    slab = torch.zeros((depth, *padded[1:], logits.shape[0]), dtype=torch.float32, device=sw_device)
                finish(s[0].start)
                logits = logits.permute(*range(1, dims + 1), 0)  # (d, h, w, K): no copy for channels-last
                for z in range(0, depth, self.chunk):  # in chunks: the float32 cast of a bf16 chunk stays small
                    rows = (slice(s[0].start - low + z, min(s[0].stop, s[0].start + z + self.chunk) - low), *s[1:])
                    slab[rows].addcmul_(logits[z : z + self.chunk], weight[z : z + self.chunk])
                    if weight_sum is not None:
                        weight_sum[rows] += weight[z : z + self.chunk]
            self.timings["stitch_s"] += time.perf_counter() - start
        start = time.perf_counter()
        finish(padded[0])
        self.timings["stitch_s"] += time.perf_counter() - start
        self.timings = {k: round(v, 3) for k, v in self.timings.items()}
        if any(pad):
            crop = [slice(None), slice(None)]
            for d in range(dims):
                before = pad[2 * (dims - 1 - d)]
                crop.append(slice(before, before + size[d]))
            labels = labels[tuple(crop)]
        return labels


class RoiSubsetCropInferer(Inferer):
    """The full-resolution sliding window on the chosen structures' region only (TotalSegmentator's
    ``roi_subset`` speed-up, with this bundle's own network).

    With ``channels`` (the output channels of the chosen structures) and ``enabled``, on an image finer
    than ``coarse_spacing``: the image is resampled to ``coarse_spacing`` (trilinear), ``coarse_inferer``
    runs the same network on it, the bounding box of the voxels whose argmax is one of ``channels`` plus
    ``margin_mm`` on each side is mapped back to the image's grid, ``inferer`` runs on that crop only, and
    its output is pasted into a full-size one that is background elsewhere (label 0, or logits whose
    argmax is channel 0). When the coarse pass finds none of the chosen structures, ``inferer`` runs on the
    whole image (one log line). Otherwise (no ``channels``, not ``enabled``, or an image not finer than
    ``coarse_spacing``) it is ``inferer`` unchanged.

    Args:
        inferer: the full-resolution inferer (``SlabArgmaxInferer``).
        coarse_inferer: the localising pass's inferer (the ``fast`` preset's window and overlap).
        channels: output channels of the chosen structures in the network's output (``1..n`` after the
            ``roi_subset`` channel cut, :class:`scripts.segment.CastOutput`); empty: no crop.
        spacing: voxel size (mm) of the images this inferer gets (the preprocessing's ``spacing``).
        coarse_spacing: voxel size (mm) of the localising pass (the ``fast`` preset's).
        margin_mm: added around the structures' box on each side, in mm.
        enabled: crop at all (``roi_subset_crop``).

    After a call, ``last_crop`` holds ``{"image_shape", "crop_shape", "box"}`` (preprocessed grid, voxels;
    ``box`` is ``[[start, stop], ...]``; ``crop_shape`` equals ``image_shape`` after the fallback), or is
    empty when no crop was attempted; ``timings`` adds ``coarse_s`` to the full-resolution inferer's.
    """

    def __init__(self, inferer: Callable, coarse_inferer: Callable, channels: Sequence[int] = (),
                 spacing: Sequence[float] = (1.5, 1.5, 1.5), coarse_spacing: Sequence[float] = (3.0, 3.0, 3.0),
                 margin_mm: float = 20.0, enabled: bool = True) -> None:
        super().__init__()
        self.inferer = inferer
        self.coarse_inferer = coarse_inferer
        self.channels = sorted({int(c) for c in channels})
        self.spacing = [float(s) for s in spacing]
        self.coarse_spacing = [float(s) for s in coarse_spacing]
        self.margin_mm = float(margin_mm)
        try:
            self.enabled = as_bool(enabled)
        except ValueError as e:  # e.g. --roi_subset_crop maybe
            raise UsageError(f"roi_subset_crop: {e}") from e
        self.last_crop: dict = {}
        self.coarse_s = 0.0

    # what segment_cases reads and sets on a SlabArgmaxInferer
    @property
    def argmax(self) -> bool:
        return bool(getattr(self.inferer, "argmax", False))

    @property
    def sw_batch_size(self) -> int:
        return int(self.inferer.sw_batch_size)

    @sw_batch_size.setter
    def sw_batch_size(self, value: int) -> None:
        self.inferer.sw_batch_size = value
        self.coarse_inferer.sw_batch_size = value

    @property
    def timings(self) -> dict[str, float]:
        extra = {"coarse_s": round(self.coarse_s, 3)} if self.last_crop else {}
        return {**getattr(self.inferer, "timings", {}), **extra}

    def _box(self, image: torch.Tensor, network: Callable, *args, **kwargs) -> list[slice] | None:
        """The chosen structures' box (plus the margin) on ``image``'s grid, or ``None`` when the coarse
        pass finds none of them."""
        size = image.shape[2:]
        coarse_size = [max(1, round(n * s / c)) for n, s, c in zip(size, self.spacing, self.coarse_spacing)]
        coarse = F.interpolate(image.float(), size=coarse_size, mode="trilinear", align_corners=False)
        window = getattr(self.coarse_inferer, "roi_size", None)
        if window is not None:  # a scan smaller than the window: one window of its size (multiple of 16), not padded
            self.coarse_inferer.roi_size = [min(int(r), 16 * math.ceil(n / 16)) for r, n in
                                            zip(ensure_tuple_rep(window, len(coarse_size)), coarse_size)]
        try:
            out = self.coarse_inferer(coarse.to(image.dtype), network, *args, **kwargs)
        finally:
            if window is not None:
                self.coarse_inferer.roi_size = window
        out = out.as_tensor() if isinstance(out, MetaTensor) else out
        labels = out[:, 0] if out.shape[1] == 1 and getattr(self.coarse_inferer, "argmax", False) else out.argmax(1)
        found = torch.isin(labels.round().long(), torch.tensor(self.channels, device=labels.device)).any(0)
        if not bool(found.any()):
            return None
        box = []
        for axis, (n, m) in enumerate(zip(size, coarse_size)):
            hits = found.to(torch.uint8).amax(dim=tuple(d for d in range(found.ndim) if d != axis)).nonzero()[:, 0]
            margin = math.ceil(self.margin_mm / self.spacing[axis])
            start = math.floor(int(hits[0]) * n / m) - margin
            stop = math.ceil((int(hits[-1]) + 1) * n / m) + margin
            box.append(slice(max(0, start), min(n, stop)))
        return box

    def __call__(self, inputs: torch.Tensor, network: Callable, *args, **kwargs) -> torch.Tensor:
        self.last_crop = {}
        finer = any(s < c for s, c in zip(self.spacing, self.coarse_spacing))
        if not (self.channels and self.enabled and finer):
            return self.inferer(inputs, network, *args, **kwargs)
        raw = inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs
        size = list(raw.shape[2:])
        start = time.perf_counter()
        box = self._box(raw, network, *args, **kwargs)
        self.coarse_s = time.perf_counter() - start
        if box is None:
            logger.info(f"roi_subset: the coarse pass ({self.coarse_spacing} mm) found none of the chosen "
                        "structures: segmenting the whole scan")
            self.last_crop = {"image_shape": size, "crop_shape": size, "box": [[0, n] for n in size]}
            return self.inferer(inputs, network, *args, **kwargs)
        crop = [b.stop - b.start for b in box]
        self.last_crop = {"image_shape": size, "crop_shape": crop, "box": [[b.start, b.stop] for b in box]}
        logger.info(f"roi_subset: full-resolution pass on {' x '.join(map(str, crop))} of "
                    f"{' x '.join(map(str, size))} voxels (the chosen structures at {self.coarse_spacing} mm, "
                    f"+ {self.margin_mm:g} mm)")
        index = (slice(None), slice(None), *box)
        out = self.inferer(raw[index], network, *args, **kwargs)
        out = out.as_tensor() if isinstance(out, MetaTensor) else out
        full = torch.zeros((out.shape[0], out.shape[1], *size), dtype=out.dtype, device=out.device)
        if not (self.argmax and out.shape[1] == 1):  # logits: channel 0 (background) wins outside the box
            full[:, 0] = 1
        full[index] = out
        return convert_to_dst_type(full, inputs, dtype=full.dtype)[0] if isinstance(inputs, MetaTensor) else full
