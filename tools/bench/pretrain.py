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
"""Benchmark the ctfm_pretrain data path end to end against a plain MONAI pipeline.

Both pipelines feed the same training step (encoder + projection head, intra-sample NT-Xent,
AdamW) built from ``bundles/ctfm_pretrain/configs/train.json``; the number reported is crops
(and views) per second over whole steps, data loading included:

- ``bundle``: the bundle's path: int16 crops read from the memory-mapped cache (built once
  beforehand, timed separately), views made in one batch on the training device;
- ``plain_monai``: a plain MONAI CPU pipeline as users usually write it: every step loads,
  reorients, resamples and crops each scan, then makes every view with MONAI's CPU
  transforms (``RandScaleCrop`` + ``Resized``, ``RandFlipd``, ``RandHistogramShiftd``,
  ``RandGaussianSmoothd``), fp32.

On a CPU use a small encoder (``init_filters`` 8) and small patches; on a GPU the defaults of
the recipe (``init_filters`` 32, 32 x 128 x 128, 15 crops, 4 scans) with ``amp`` and
``channels_last``.

CLI::

    ctfm-bench-pretrain --iterations 3                     # phantoms, CPU-sized
    ctfm-bench-pretrain --datalist data/datalist.json --dataset_dir data \\
        --init_filters 32 --patch_size 32,128,128 --num_crops 15 --batch_size 4 --num_workers 8
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

BUNDLE_ROOT = REPO_ROOT / "bundles" / "ctfm_pretrain"


def _parser(overrides: dict):
    from monai.bundle import ConfigParser

    if str(BUNDLE_ROOT) not in sys.path:
        use_bundle_scripts(BUNDLE_ROOT)
    parser = ConfigParser()
    parser.read_config(str(BUNDLE_ROOT / "configs" / "train.json"))
    parser.update(overrides)
    parser.parse()
    return parser


def _plain_monai_loader(parser, data: list[dict], batch_size: int, num_workers: int):
    """Per scan: load ... scale, ``num_crops`` random crops, two MONAI-augmented views per crop."""
    from monai.data import DataLoader, Dataset
    from monai.transforms import (
        Compose,
        RandFlipd,
        RandGaussianSmoothd,
        RandHistogramShiftd,
        Lambdad,
        RandScaleCrop,
        RandSpatialCropSamplesd,
        Resized,
        ScaleIntensityRanged,
    )

    patch = parser["patch_size"]
    low, high = parser["crop_scale"]
    deterministic = parser.get_parsed_content("train#preprocessing")
    scale = ScaleIntensityRanged("image", parser["hu_min"], parser["hu_max"], 0.0, 1.0, clip=True)
    crops = RandSpatialCropSamplesd("image", roi_size=patch, num_samples=parser["num_crops"], random_size=False)
    view = Compose([
        # CT-FM's RandomResizedCrop: s ~ U(low, high), the same s on every axis
        Lambdad("image", lambda x: RandScaleCrop(float(torch.empty(1).uniform_(low, high)), random_size=False)(x)),
        Resized("image", spatial_size=patch, mode="trilinear"),
        RandFlipd("image", prob=parser["flip_prob"], spatial_axis=0),
        RandHistogramShiftd(
            "image", num_control_points=parser["histogram_shift_points"], prob=parser["histogram_shift_prob"]
        ),
        RandGaussianSmoothd("image", prob=parser["smooth_prob"]),
    ])

    class PlainViews(Dataset):
        def __getitem__(self, index: int) -> dict:
            scan = scale(deterministic(dict(self.data[index])))
            views, groups = [], []
            for c, crop in enumerate(crops(scan)):
                for _ in range(parser["num_views"]):
                    views.append(torch.as_tensor(view(dict(crop))["image"]).float())
                    groups.append(c)
            return {"views": torch.stack(views), "crops": torch.tensor(groups)}

    def collate(items):
        return {
            "views": torch.cat([i["views"] for i in items]),
            "groups": torch.cat(
                [torch.stack([torch.full_like(i["crops"], s), i["crops"]], 1) for s, i in enumerate(items)]
            ),
        }

    loader = DataLoader(
        PlainViews(data), batch_size=batch_size, shuffle=True, num_workers=num_workers, collate_fn=collate
    )
    return loader, lambda batch, device: (batch["views"].to(device), batch["groups"].to(device))


def _time_steps(loader, prepare, network, loss, optimizer, device, iterations: int, amp: bool,
                sync_each_step: bool = False) -> dict:
    """Run ``iterations`` steps after one warm-up step.

    As in the trainer, the host does not wait for the device between steps (so the next batch is
    fetched while the device still computes) unless ``sync_each_step``; the clock stops after
    the device has finished the last step.

    Returns:
        Seconds, crops/s and views/s over whole steps, and the host time spent blocked on getting
        the views (loading + moving + augmenting: ``data_s``, ``data_views_per_s``).
    """
    network.train()
    done, views_total, start, data_seconds = -1, 0, 0.0, 0.0
    began, warmup_seconds = time.perf_counter(), 0.0

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    while done < iterations:
        fetch = time.perf_counter()
        for batch in loader:
            views, groups = prepare(batch, device)
            if sync_each_step:
                sync()
            if done >= 0:
                data_seconds += time.perf_counter() - fetch
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                value = loss(network(views), groups)
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
            if sync_each_step:
                sync()
            done += 1
            if done == 0:  # warm-up step (workers, allocator, cudnn, compilation) not timed
                sync()
                start = time.perf_counter()
                warmup_seconds = start - began
                continue
            views_total += len(views)
            if done >= iterations:
                break
            fetch = time.perf_counter()
    sync()
    seconds = time.perf_counter() - start
    crops_total = views_total // 2  # two views per crop
    return {"seconds": round(seconds, 3), "steps": iterations, "crops_per_s": round(crops_total / seconds, 2),
            "views_per_s": round(views_total / seconds, 2),
            "data_s": round(data_seconds, 3), "data_views_per_s": round(views_total / max(data_seconds, 1e-9), 2),
            "s_per_step": round(seconds / iterations, 4), "warmup_s": round(warmup_seconds, 2),
            "sync_each_step": sync_each_step}


def benchmark_pretrain(
    *,
    datalist: str = "",
    dataset_dir: str = "",
    num_phantoms: int = 2,
    phantom_shape: Sequence[int] = (64, 64, 32),
    phantom_spacing: float = 3.0,
    init_filters: int = 8,
    patch_size: Sequence[int] = (16, 64, 64),
    num_crops: int = 4,
    batch_size: int = 2,
    iterations: int = 3,
    num_workers: int = 0,
    device: str = "",
    amp: bool = True,
    channels_last: bool = True,
    variants: str | Sequence[str] = "",
    sync_each_step: bool = False,
    output: str = "",
    work_dir: str = "",
) -> dict:
    """Measure end-to-end crops/s of the bundle's data path and of a plain MONAI pipeline.

    Args:
        datalist: decathlon datalist of CTs ("training" list); empty: ``num_phantoms`` body phantoms.
        dataset_dir: base folder of the datalist's relative paths.
        num_phantoms: phantoms to write when no datalist is given.
        phantom_shape: their voxel counts (R, A, S); a CT-sized grid on a GPU, e.g. 320,320,200.
        phantom_spacing: their isotropic voxel size (mm).
        init_filters: encoder width (8 on a CPU, 32 for the contract).
        patch_size: crop size (D, H, W).
        num_crops: crops per scan.
        batch_size: scans per step.
        iterations: timed steps per pipeline (after one warm-up step).
        num_workers: data loader workers for both pipelines.
        device: ``cuda`` or ``cpu`` (default: cuda when available).
        amp: bf16 autocast on CUDA (the bundle path; the baseline stays fp32).
        channels_last: ``channels_last_3d`` on CUDA (the bundle path).
        variants: comma-separated bundle-path variants to time against the same cache and the
            same baseline, each a ``+``-joined subset of ``bf16``, ``cl`` (channels_last_3d) and
            ``compile`` (torch.compile), or ``fp32``; e.g. ``fp32,bf16,bf16+cl,bf16+cl+compile``.
            Empty: one variant from ``amp`` and ``channels_last``.
        sync_each_step: wait for the device after getting the views and after each step (shows
            the data time apart from compute; the trainer does not wait, so throughput is lower).
        output: optional JSON file for the results (written atomically).
        work_dir: folder for phantoms and the cache (default: a temporary folder).

    Returns:
        ``{"device", "settings", "cache_build_s", "bundle": {...}, "plain_monai": {...}, "speedup"}``;
        with ``variants``, ``"variants": {name: {...}}`` and the speedup of each.
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = dev.type == "cuda"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(work_dir or tmp)
        if not datalist:
            from ctfm_bundles.tools.synthetic import phantom

            phantom.make_dataset(output_dir=str(work / "phantoms"), num_cases=num_phantoms, kind="body",
                                 shape=tuple(phantom_shape), spacing=float(phantom_spacing))
            items = json.loads((work / "phantoms" / "datalist.json").read_text())
            (work / "phantoms" / "pretrain.json").write_text(
                json.dumps({"training": items["training"] + items["validation"]}))
            datalist, dataset_dir = str(work / "phantoms" / "pretrain.json"), str(work / "phantoms")
        overrides = {
            "datalist": datalist, "dataset_dir": dataset_dir or str(Path(datalist).parent),
            "output_dir": str(work / "out"), "ckpt_dir": str(work / "out" / "models"),
            "init_filters": init_filters, "patch_size": list(patch_size), "num_crops": num_crops,
            "batch_size": batch_size, "num_workers": num_workers, "device": f"$torch.device('{dev}')",
            "amp": amp, "channels_last": channels_last, "resume": False,
        }
        if isinstance(variants, str):
            variants = [v.strip() for v in variants.split(",") if v.strip()]
        if not variants:
            variants = ["+".join(["bf16"] * bool(amp) + ["cl"] * bool(channels_last)) or "fp32"]
        # the baseline first, so that a time limit hit by a slow variant (compilation) still leaves it
        print("timing plain MONAI ...", flush=True)
        torch.manual_seed(0)
        parser = _parser({**overrides, "amp": False, "channels_last": False})
        network, loss = parser.get_parsed_content("network"), parser.get_parsed_content("loss")
        optimizer = parser.get_parsed_content("optimizer")
        plain_loader, plain_prepare = _plain_monai_loader(parser, parser.get_parsed_content("train#dataset").data,
                                                          batch_size, num_workers)
        plain = _time_steps(plain_loader, plain_prepare, network, loss, optimizer, dev, iterations, False,
                            sync_each_step)
        print(json.dumps({"plain_monai": plain}), flush=True)
        del plain_loader
        timed: dict[str, dict] = {}
        cache_seconds = 0.0
        for number, variant in enumerate(variants):
            flags = set(variant.split("+")) - {"fp32"}
            unknown = flags - {"bf16", "cl", "compile"}
            if unknown:
                raise ValueError(f"unknown variant flag(s) {sorted(unknown)} in {variant!r}: use bf16, cl, compile")
            torch.manual_seed(0)
            parser = _parser({**overrides, "amp": "bf16" in flags, "channels_last": "cl" in flags})
            network, loss = parser.get_parsed_content("network"), parser.get_parsed_content("loss")
            optimizer = parser.get_parsed_content("optimizer")
            if number == 0:
                dataset = parser.get_parsed_content("train#dataset")
                start = time.perf_counter()
                import scripts

                scripts.data.build_cache(dataset, shard_index=0, num_shards=1)
                cache_seconds = time.perf_counter() - start
            loader = parser.get_parsed_content("train#dataloader")
            prepare = parser.get_parsed_content("train#prepare_batch")
            model = torch.compile(network) if "compile" in flags else network
            print(f"timing bundle path {variant} ...", flush=True)
            try:
                timed[variant] = _time_steps(loader, lambda b, d, p=prepare: p(b, d, non_blocking=True), model,
                                             loss, optimizer, dev, iterations, "bf16" in flags and cuda,
                                             sync_each_step)
            except Exception as e:  # e.g. torch.compile unavailable: report it, time the others
                timed[variant] = {"error": f"{type(e).__name__}: {e}"[:2000]}
            print(json.dumps({variant: timed[variant]}), flush=True)
            if output:  # partial results survive a time limit
                atomic_write_text(output, json.dumps({"plain_monai": plain, "variants": timed}, indent=2) + "\n")
            del loader, model
    threads = torch.get_num_threads()
    name = torch.cuda.get_device_name(dev) if cuda else f"CPU ({os.cpu_count()} cores visible, {threads} threads)"
    ok = [name for name in variants if "error" not in timed[name]]
    if not ok:
        raise RuntimeError(f"every bundle variant failed: {json.dumps(timed)}")
    ours = timed[ok[-1]]
    result = {
        "device": name,
        "torch": torch.__version__,
        "settings": {"init_filters": init_filters, "patch_size": list(patch_size), "num_crops": num_crops,
                     "batch_size": batch_size, "views_per_step": 2 * num_crops * batch_size,
                     "num_workers": num_workers, "bundle_variant": ok[-1]},
        "cache_build_s": round(cache_seconds, 3),
        "bundle": ours,
        "plain_monai": plain,
        "speedup": round(ours["crops_per_s"] / plain["crops_per_s"], 2),
    }
    if len(variants) > 1:
        result["variants"] = {
            name: {**values, "speedup": round(values["crops_per_s"] / plain["crops_per_s"], 2)} if name in ok else values
            for name, values in timed.items()
        }
    if output:
        atomic_write_text(output, json.dumps(result, indent=2) + "\n")
    return result


def cli() -> None:
    """The console command (``[project.scripts]`` of pyproject.toml)."""
    fire.Fire(benchmark_pretrain)


if __name__ == "__main__":
    cli()
