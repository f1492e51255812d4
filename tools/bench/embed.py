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
"""Benchmark ctfm_retrieval embedding throughput against a plain MONAI loop, in one run.

Both embed the same synthetic body CTs with the same (random, seeded) encoder weights into one
vector per scan (element-wise ``min`` over sliding-window patches of 24 x 128 x 128 at
3 x 1 x 1 mm, SPL):

- ``bundle``: ``configs/embed.json`` (``embed``): the volume is moved to the device once and
  cut into patches there, bf16 autocast on CUDA, one ``.safetensors`` per scan + index table;
- ``plain_monai``: the same MONAI preprocessing in a ``DataLoader``, MONAI's
  ``SlidingWindowSplitter`` cutting patches on the CPU, the encoder in float32 per batch.

Reported: scans/s and patches/s over all scans, data loader start-up included, for each
pipeline, after a one-scan warm-up of the process (CUDA context, cuDNN).

CLI::

    ctfm-bench-embed --num_scans 4 --init_filters 8 --shape 96,96,64    # CPU-sized
    ctfm-bench-embed --num_scans 16 --batch_size 16 --num_workers 8      # a GPU
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import fire
import torch

from ctfm_bundles.tools import REPO_ROOT, use_bundle_scripts
from ctfm_common.runtime import atomic_write_text

BUNDLE_ROOT = REPO_ROOT / "bundles" / "ctfm_retrieval"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _parser(overrides: dict):
    from monai.bundle import ConfigParser

    if str(BUNDLE_ROOT) not in sys.path:
        use_bundle_scripts(BUNDLE_ROOT)
    parser = ConfigParser()
    parser.read_config(str(BUNDLE_ROOT / "configs" / "embed.json"))
    parser.update(overrides)
    parser.parse()
    return parser


def _plain_monai(parser, items: list[dict], device: torch.device, num_workers: int) -> tuple[float, int]:
    """Embed ``items`` the plain way; returns (seconds, patches), loader start-up included."""
    from monai.data import DataLoader, Dataset
    from monai.inferers import SlidingWindowSplitter

    network = parser.get_parsed_content("network").eval()
    splitter = SlidingWindowSplitter(patch_size=parser["patch_size"], overlap=parser["overlap"])
    loader = DataLoader(Dataset(items, transform=parser.get_parsed_content("preprocessing")), batch_size=1,
                        num_workers=num_workers)
    batch_size, patches = parser["batch_size"], 0
    _sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        for data in loader:
            windows = torch.cat([patch for patch, _ in splitter(data["image"].as_tensor().float())])
            outputs = [network(windows[b : b + batch_size].to(device)).float().cpu()
                       for b in range(0, len(windows), batch_size)]
            torch.cat(outputs).min(dim=0).values
            patches += len(windows)
    _sync(device)
    return time.perf_counter() - start, patches


def benchmark_embedding(
    *,
    num_scans: int = 4,
    shape: Sequence[int] = (160, 160, 100),
    spacing: Sequence[float] = (1.0, 1.0, 3.0),
    init_filters: int = 32,
    batch_size: int = 4,
    num_workers: int = 2,
    device: str = "",
    amp: bool = True,
    output: str = "",
    work_dir: str = "",
) -> dict:
    """Time the bundle's ``embed`` and a plain MONAI loop on the same scans and weights.

    Args:
        num_scans: synthetic body CTs to embed.
        shape: their voxel counts (R, A, S).
        spacing: their voxel sizes (mm).
        init_filters: encoder width (32 = the contract).
        batch_size: patches per network call, both pipelines.
        num_workers: data loader workers, both pipelines.
        device: ``cuda`` or ``cpu`` (default: cuda when available).
        amp: bf16 autocast of the bundle on CUDA (the plain loop stays float32).
        output: optional JSON file for the results (written atomically).
        work_dir: folder for the scans and embeddings (default: a temporary folder).

    Returns:
        ``{"device", "settings", "bundle": {...}, "plain_monai": {...}, "speedup"}``.
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if int(num_scans) < 1:
        raise ValueError(f"num_scans must be at least 1, got {num_scans}")
    from ctfm_bundles.tools.synthetic import phantom

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(work_dir or tmp)
        items = []
        for i in range(int(num_scans)):
            path = work / "scans" / f"scan{i:03d}.nii.gz"
            phantom.write_body_phantom(output=str(path), shape=tuple(shape), spacing=tuple(spacing), seed=i)
            items.append({"image": str(path)})
        (work / "datalist.json").write_text(json.dumps({"testing": items}))
        overrides = {"input": str(work / "datalist.json"), "output_dir": str(work / "embeddings"),
                     "init_filters": int(init_filters), "batch_size": int(batch_size),
                     "num_workers": int(num_workers), "device": f"$torch.device('{dev}')", "amp": bool(amp),
                     "shard_index": 0, "num_shards": 1}
        torch.manual_seed(0)
        parser = _parser({**overrides, "input": str(items[0]["image"]), "output_dir": str(work / "warmup")})
        parser.get_parsed_content("embed")  # warm-up: CUDA context, cuDNN, workers
        torch.manual_seed(0)
        parser = _parser(overrides)
        parser.get_parsed_content("network")
        _sync(dev)
        start = time.perf_counter()
        result = parser.get_parsed_content("embed")
        _sync(dev)
        bundle_seconds = time.perf_counter() - start
        embedder = parser.get_parsed_content("embedder")
        preprocessing = parser.get_parsed_content("preprocessing")
        from scripts.embedding import patch_grid

        patch_counts = [len(patch_grid(preprocessing(dict(item))["image"].shape[1:], embedder.patch_size,
                                       embedder.overlap)) for item in items]
        torch.manual_seed(0)
        plain_seconds, plain_patches = _plain_monai(_parser(overrides), items, dev, int(num_workers))
    bundle = {"scans": len(result["done"]), "seconds": round(bundle_seconds, 3),
              "scans_per_s": round(len(result["done"]) / bundle_seconds, 3),
              "patches_per_s": round(sum(patch_counts) / bundle_seconds, 1)}
    plain = {"scans": len(items), "seconds": round(plain_seconds, 3),
             "scans_per_s": round(len(items) / plain_seconds, 3),
             "patches_per_s": round(plain_patches / plain_seconds, 1)}
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else (
        f"CPU ({os.cpu_count()} cores visible, {torch.get_num_threads()} threads)")
    report = {
        "device": name, "torch": torch.__version__,
        "settings": {"num_scans": int(num_scans), "shape": list(shape), "spacing": list(spacing),
                     "init_filters": int(init_filters), "batch_size": int(batch_size),
                     "num_workers": int(num_workers), "amp": bool(amp) and dev.type == "cuda",
                     "patches_per_scan": patch_counts[0]},
        "bundle": bundle, "plain_monai": plain,
        "speedup": round(bundle["patches_per_s"] / plain["patches_per_s"], 2),
    }
    if output:
        atomic_write_text(output, json.dumps(report, indent=2) + "\n")
    return report


def cli() -> None:
    """The console command (``[project.scripts]`` of pyproject.toml)."""
    fire.Fire(benchmark_embedding)


if __name__ == "__main__":
    cli()
