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
"""Multi-window CT input: named HU windows stacked as channels.

Each window ``[low, high]`` HU is clipped and scaled to [0, 1] with MONAI's
``ScaleIntensityRange`` and becomes one input channel. The default single window ``ctfm``
([-1024, 2048]) is exactly the shared preprocessing contract.

The pretrained encoder's first convolution ``conv_init`` has one input channel. For ``C``
windows the shared loader (``scripts.encoder.load_encoder``) replicates its kernel over the
``C`` channels, divided by ``C``: the layer then computes the mean over channels of the pretrained response to each window, so with ``C``
identical channels it gives exactly the 1-channel output, and every other pretrained weight
still sees the feature statistics it was trained on. (The public reference concatenated its
windows along the cranio-caudal axis instead; that changes the anatomy the encoder sees.)
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, ScaleIntensityRange

#: Named HU windows ``(low, high)``; ``ctfm`` is the shared preprocessing contract.
# [low, high] HU; blood, subdural, stroke and bone are CT-FM's (evaluation/sinoct.yaml: ScaleIntensityRanged
# a_min / a_max)
HU_WINDOWS: dict[str, tuple[float, float]] = {
    "ctfm": (-1024.0, 2048.0),
    "blood": (0.0, 80.0),  # W 80 / L 40
    "brain": (0.0, 80.0),  # the same range under its usual radiology name
    "subdural": (-125.0, 175.0),  # W 300 / L 25
    "stroke": (28.0, 36.0),  # W 8 / L 32
    "bone": (-900.0, 2100.0),  # W 3000 / L 600
}
REFERENCE_WINDOWS = ("blood", "subdural", "stroke", "bone")


def resolve_windows(windows: Sequence[str | Sequence[float]] | str) -> list[tuple[float, float]]:
    """Turn window names and/or ``[low, high]`` pairs into HU ranges.

    Args:
        windows: e.g. ``["brain", "subdural", "bone"]``, ``[[0, 80], [-800, 2000]]``, or one name.

    Returns:
        One ``(low, high)`` per channel.

    Raises:
        ValueError: an unknown name or a malformed range.
    """
    if isinstance(windows, str):
        windows = [windows]
    if not windows:
        raise ValueError("windows must name at least one HU window, e.g. [\"ctfm\"]")
    ranges = []
    for window in windows:
        if isinstance(window, str):
            if window not in HU_WINDOWS:
                raise ValueError(f"unknown HU window '{window}'; known: {', '.join(HU_WINDOWS)} "
                                 "(or give [low, high])")
            ranges.append(HU_WINDOWS[window])
            continue
        pair = tuple(float(v) for v in window)
        if len(pair) != 2 or not pair[0] < pair[1]:
            raise ValueError(f"an HU window must be [low, high] with low < high, got {window!r}")
        ranges.append(pair)
    return ranges


class HUWindowsd(MapTransform):
    """Stack HU windows: each clipped to ``[low, high]`` and scaled to [0, 1].

    Args:
        keys: image keys (1-channel HU images, channel first).
        windows: window names or ``[low, high]`` pairs (see :data:`HU_WINDOWS`).
        dim: where the windows are stacked: 0, as channels (ours); 1, along the first spatial axis
            (S in SPL), as CT-FM's ``ConcatItemsd(dim=1)`` did, one channel of ``len(windows)`` x D slices.
        allow_missing_keys: as for MONAI map transforms.
    """

    def __init__(self, keys: KeysCollection, windows: Sequence[str | Sequence[float]] | str = ("ctfm",),
                 dim: int = 0, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if int(dim) not in (0, 1):
            raise ValueError(f"HU windows stack along dim 0 (channels) or 1 (the first spatial axis), got {dim}")
        self.dim = int(dim)
        self.scalers = [ScaleIntensityRange(a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True)
                        for low, high in resolve_windows(windows)]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            if image.shape[0] != 1:
                raise ValueError(f"HUWindowsd expects a 1-channel HU image for '{key}', got shape {tuple(image.shape)}")
            channels = [scale(image) for scale in self.scalers]
            d[key] = channels[0] if len(channels) == 1 else torch.cat(channels, dim=self.dim)  # keeps the affine
        return d
