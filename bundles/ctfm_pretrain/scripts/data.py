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
"""The preprocessed crop cache: each scan decoded and resampled once, then read by slices.

Loading and resampling a CT costs seconds; pretraining wants 15 crops of every scan in every
step. :class:`CachedCropDataset` therefore runs the deterministic MONAI preprocessing
(load -> SPL -> 3 x 1 x 1 mm -> crop foreground -> pad) once per scan and stores the result as
an uncompressed int16 ``.npy`` file (HU clipped to the contract's window). Training opens that
file memory-mapped and copies out only the voxels of the random crops, so no step ever
decompresses a whole volume.

- Written atomically (temporary file, then ``os.replace``), skipped when present: any number
  of processes or machines may fill one cache (``cache`` run id, sharded by
  ``shard_index``/``num_shards``), and a killed job leaves no half-written entry.
- A scan that cannot be read, or is degenerate (empty foreground, constant, non-finite), is
  logged with its file name and the problem, remembered in a ``.bad.txt`` marker, skipped and
  counted (``skipped`` in every batch; the trainer logs the count per epoch). It never stops
  a run.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.transforms import Randomizable

from .ctfm_common.runtime import atomic_write, atomic_write_text, resolve_shard
from .ctfm_common.validate import describe_failure

logger = logging.getLogger("ctfm_pretrain")

HU_MIN, HU_MAX = -1024, 2048


def cache_name(path: str | os.PathLike) -> str:
    """Cache file stem of a scan: readable name + a hash of its absolute path (names may repeat)."""
    from .ctfm_common.inputs import case_name

    text = os.path.abspath(os.fspath(path))
    return f"{case_name(text)}_{hashlib.sha1(text.encode()).hexdigest()[:12]}"


class ScanSkipped(RuntimeError):
    """A scan that cannot be used (unreadable or degenerate); the message names file and problem."""


class CachedCropDataset(torch.utils.data.Dataset, Randomizable):
    """Random crops of preprocessed scans, read from a memory-mapped int16 cache.

    Item ``i`` is scan ``i``: ``{"crops": int16 (num_crops, 1, *patch_size) HU, "scan": i,
    "skipped": k}`` where ``k`` counts the unusable scans that were replaced by a random other
    scan to keep the batch full.

    Args:
        data: MONAI data dicts (``{image_key: path, ...}``).
        transform: the deterministic preprocessing (load ... pad), returning the image in HU
            as channel-first ``(1, D, H, W)``; applied once per scan.
        cache_dir: folder of the ``.npy`` cache (created).
        patch_size: crop size (D, H, W) in voxels after resampling.
        num_crops: crops per scan.
        image_key: key of the image path in ``data``.
        min_foreground_voxels: a scan whose preprocessed volume holds fewer voxels above
            ``foreground_hu`` is degenerate.
        foreground_hu: HU threshold of the degenerate-scan check.
        max_replacements: unusable scans tolerated in a row before giving up with an error.
    """

    def __init__(
        self,
        data: Sequence[dict],
        transform: Callable,
        cache_dir: str | os.PathLike,
        patch_size: Sequence[int],
        num_crops: int,
        image_key: str = "image",
        min_foreground_voxels: int = 1000,
        foreground_hu: float = 0.0,
        max_replacements: int = 20,
    ) -> None:
        if not data:
            raise ValueError("the pretraining datalist is empty")
        self.data = list(data)
        self.transform = transform
        self.cache_dir = Path(cache_dir)
        self.patch_size = tuple(int(p) for p in patch_size)
        self.num_crops = int(num_crops)
        self.image_key = image_key
        self.min_foreground_voxels = int(min_foreground_voxels)
        self.foreground_hu = float(foreground_hu)
        self.max_replacements = int(max_replacements)

    def __len__(self) -> int:
        return len(self.data)

    def paths(self, index: int) -> tuple[str, Path, Path]:
        """Source path, cache file and bad-scan marker of scan ``index``."""
        source = str(self.data[index][self.image_key])
        stem = self.cache_dir / cache_name(source)
        return source, stem.with_suffix(".npy"), stem.with_suffix(".bad.txt")

    def _preprocess(self, index: int) -> np.ndarray:
        source = str(self.data[index][self.image_key])
        try:
            out = self.transform(dict(self.data[index]))  # a copy: transforms never change the datalist
        except Exception as e:  # readers raise many types for corrupt files
            raise ScanSkipped(describe_failure(source, e)) from e
        image = out[self.image_key] if isinstance(out, dict) else out
        array = np.asarray(torch.as_tensor(image).detach().cpu().numpy())
        if array.ndim == 4:
            if array.shape[0] != 1:
                raise ScanSkipped(f"{source}: expected one channel after preprocessing, got shape {array.shape}")
            array = array[0]
        if array.ndim != 3:
            raise ScanSkipped(f"{source}: expected a 3D volume, got shape {array.shape}")
        if not np.isfinite(array).all():
            raise ScanSkipped(f"{source}: holds NaN or infinite values")
        if any(s < p for s, p in zip(array.shape, self.patch_size)):
            raise ScanSkipped(f"{source}: preprocessed shape {array.shape} is smaller than the patch {self.patch_size}")
        foreground = int((array > self.foreground_hu).sum())
        if foreground < self.min_foreground_voxels:
            raise ScanSkipped(
                f"{source}: degenerate scan, only {foreground} voxels above {self.foreground_hu:g} HU after "
                f"preprocessing (fewer than {self.min_foreground_voxels})"
            )
        return np.clip(np.rint(array), HU_MIN, HU_MAX).astype(np.int16)

    def ensure_cached(self, index: int) -> Path:
        """Preprocess scan ``index`` into the cache unless it is there already.

        Returns:
            The ``.npy`` path.

        Raises:
            ScanSkipped: the scan is unusable (now or in an earlier attempt: see its marker).
        """
        _, npy, bad = self.paths(index)
        if npy.is_file():
            return npy
        if bad.is_file():
            raise ScanSkipped(bad.read_text().strip())
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        try:
            array = self._preprocess(index)
        except ScanSkipped as e:
            atomic_write_text(bad, f"{e}\n")
            raise
        atomic_write(npy, lambda tmp: np.save(tmp, array, allow_pickle=False))
        return npy

    def read_crops(self, npy: Path) -> np.ndarray:
        """``num_crops`` random crops of the cached volume: int16 ``(num_crops, 1, *patch_size)``."""
        volume = np.load(npy, mmap_mode="r")  # only the crops' pages are read from disk
        crops = np.empty((self.num_crops, 1, *self.patch_size), dtype=np.int16)
        for c in range(self.num_crops):
            start = [int(self.R.randint(0, s - p + 1)) for s, p in zip(volume.shape, self.patch_size)]
            crops[c, 0] = volume[tuple(slice(a, a + p) for a, p in zip(start, self.patch_size))]
        return crops

    def __getitem__(self, index: int) -> dict:
        skipped = 0
        for _ in range(self.max_replacements + 1):
            try:
                crops = self.read_crops(self.ensure_cached(index))
                return {"crops": torch.from_numpy(crops), "scan": index, "skipped": skipped}
            except (ScanSkipped, ValueError, OSError) as e:
                logger.warning(f"skipping scan: {e}")
                skipped += 1
                index = int(self.R.randint(len(self.data)))
        raise RuntimeError(
            f"{skipped} unusable scans in a row (the last: {self.paths(index)[0]}); check the datalist and the "
            f"'.bad.txt' markers in {self.cache_dir}"
        )


def collate_scans(items: Sequence[dict]) -> dict:
    """Stack the crops of a batch of scans (``DataLoader`` ``collate_fn``).

    Returns:
        ``{"crops": int16 (S * num_crops, 1, D, H, W), "groups": long (S * num_crops, 2)`` of
        ``(position of the scan in the batch, crop)``, ``"scans"``: dataset indices, ``"skipped"``: int}``.
    """
    crops = torch.cat([item["crops"] for item in items])
    groups = torch.cat(
        [
            torch.stack([torch.full((len(item["crops"]),), s), torch.arange(len(item["crops"]))], 1)
            for s, item in enumerate(items)
        ]
    )
    return {
        "crops": crops,
        "groups": groups.long(),
        "scans": torch.tensor([item["scan"] for item in items]),
        "skipped": int(sum(item["skipped"] for item in items)),
    }


def build_cache(dataset: CachedCropDataset, shard_index: int | None = None, num_shards: int | None = None) -> dict:
    """Fill the cache for one shard of the datalist (scans ``shard_index::num_shards``).

    Args:
        dataset: the training dataset (its transform and cache folder are used).
        shard_index: this worker's shard; default from torchrun / SLURM (``ctfm_common.runtime.resolve_shard``).
        num_shards: number of shards; same default.

    Returns:
        Counts ``{"cached", "already_cached", "skipped", "total"}`` for this shard.
    """
    from tqdm import tqdm

    shard_index, num_shards = resolve_shard(shard_index, num_shards)
    indices = range(shard_index, len(dataset), num_shards)
    counts = {"cached": 0, "already_cached": 0, "skipped": 0, "total": len(indices)}
    for index in tqdm(indices, desc=f"cache shard {shard_index}/{num_shards}"):
        if dataset.paths(index)[1].is_file():
            counts["already_cached"] += 1
            continue
        try:
            dataset.ensure_cached(index)
            counts["cached"] += 1
        except ScanSkipped as e:
            logger.warning(f"skipping scan: {e}")
            counts["skipped"] += 1
    logger.info(f"cache {dataset.cache_dir} shard {shard_index}/{num_shards}: {counts}")
    return counts
