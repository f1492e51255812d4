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
"""Benchmark ctfm_wholebody_seg inference end to end against a plain MONAI pipeline.

Seconds per volume from reading the file to writing the label map (read -> preprocess ->
sliding-window inference -> invert -> write) and the peak resident memory (RSS) of each
pipeline, measured in one run, each pipeline in its own subprocess (so one's peak does not
hide the other's):

- ``plain``: plain MONAI as the CT-FM reference writes it: ``LoadImaged``,
  ``EnsureChannelFirstd``, ``Orientationd`` SPL, ``Spacingd``, ``ScaleIntensityRanged``,
  ``SlidingWindowInferer`` (Gaussian, float32 stitching), softmax, argmax, ``Invertd``,
  ``SaveImaged``, under ``torch.no_grad``;
- ``bundle``: the bundle's ``configs/inference.json`` (``run``) with the same network
  settings (CSV and PNG outputs off, so both write only the label map);
- ``fast``: the bundle with ``--preset fast``.

The same randomly initialised ``SegResNetDS`` weights (seeded) are loaded by every pipeline:
the benchmark measures speed and memory, not accuracy. The input is a synthetic body CT
(``tools/synthetic/phantom.py``) of the given shape and spacing, unless ``image`` names a CT.

For the fast preset the benchmark also reports ``resolution_ceiling_dice``: per structure,
the Dice of the phantom's labels against the same labels resampled to the preset's spacing
and back as the bundle does (``Spacing`` nearest and its inverse). It bounds what resolution
alone costs; it says nothing about how well a network does at that spacing. ``ceiling`` does
the same for any label map (e.g. a real reference segmentation) and several spacings.

CLI::

    ctfm-bench-seg bench --output bench.json                     # issue's CPU size
    ctfm-bench-seg bench --shape 96,96,96 --init_filters 8        # quick
    ctfm-bench-seg bench --pipelines plain,bundle --overlap 0.625 # reference overlap
    ctfm-bench-seg ceiling --labels labels.nii.gz               # Dice bound of 1.5 / 3 mm
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import fire

from ctfm_bundles.tools import REPO_ROOT, use_bundle_scripts
from ctfm_common.runtime import atomic_write_text

BUNDLE_ROOT = REPO_ROOT / "bundles" / "ctfm_wholebody_seg"
RESULT_TAG = "BENCH_RESULT "


def as_list(value: str | Sequence, cast: type = str) -> list:
    """``"1,2,3"``, ``"[1,2,3]"`` or a sequence (as a command line gives it) as a list of ``cast``."""
    if isinstance(value, str):
        value = [v for v in value.replace("[", "").replace("]", "").split(",") if v.strip()]
    return [cast(v.strip() if isinstance(v, str) else v) for v in value]


def peak_rss_gb() -> float:
    """This process's peak resident memory, GB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: KiB


def seg_network(init_filters: int, num_classes: int):
    """The bundle's ``SegResNetDS`` (randomly initialised)."""
    from monai.networks.nets import SegResNetDS

    return SegResNetDS(spatial_dims=3, in_channels=1, out_channels=num_classes, init_filters=init_filters,
                       blocks_down=[1, 2, 2, 4, 4], dsdepth=4)


def _plain(*, image: str, weights: str, output_dir: str, init_filters: int, num_classes: int, spacing: list,
           roi_size: list, sw_batch_size: int, overlap: float, device: str, network=None) -> tuple[float, object, dict]:
    """Plain MONAI pipeline; returns the seconds from read to write, the network and the seconds per stage."""
    import numpy as np
    import torch
    from monai.inferers import SlidingWindowInferer
    from monai.transforms import (Activationsd, AsDiscreted, Compose, EnsureChannelFirstd, Invertd, LoadImaged,
                                  Orientationd, SaveImaged, ScaleIntensityRanged, Spacingd)

    if network is None:
        network = seg_network(init_filters, num_classes)
        network.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        network.to(device).eval()
    pre = Compose([
        LoadImaged(keys="image", image_only=True),
        EnsureChannelFirstd(keys="image"),
        Orientationd(keys="image", axcodes="SPL"),
        Spacingd(keys="image", pixdim=spacing, mode="bilinear"),
        ScaleIntensityRanged(keys="image", a_min=-1024, a_max=2048, b_min=0.0, b_max=1.0, clip=True),
    ])
    post = Compose([
        Activationsd(keys="pred", softmax=True),
        AsDiscreted(keys="pred", argmax=True),
        Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=True, to_tensor=True),
        SaveImaged(keys="pred", output_dir=output_dir, output_postfix="seg", output_dtype=np.uint8, resample=False,
                   separate_folder=False, print_log=False),
    ])
    inferer = SlidingWindowInferer(roi_size=roi_size, sw_batch_size=sw_batch_size, overlap=overlap, mode="gaussian")
    network_s = [0.0]

    def timed_network(x):  # the network alone, to split the sliding window's time from its stitching
        begin = time.perf_counter()
        out = network(x)
        network_s[0] += time.perf_counter() - begin
        return out

    start = time.perf_counter()
    stages = {}
    with torch.no_grad():
        data = pre({"image": image})
        stages["read_preprocess_s"] = round(time.perf_counter() - start, 3)
        data["pred"] = inferer(data["image"].unsqueeze(0).to(device), timed_network)[0]
        stages["infer_s"] = round(time.perf_counter() - start - sum(stages.values()), 3)
        for name, transform in zip(("softmax_s", "argmax_s", "invert_s", "write_s"), post.transforms):
            data = transform(data)
            stages[name] = round(time.perf_counter() - start - sum(stages.values()), 3)
    stages["infer_network_s"] = round(network_s[0], 3)  # part of infer_s
    return time.perf_counter() - start, network, stages


def _bundle(*, image: str, weights: str, output_dir: str, init_filters: int, num_classes: int, preset: str,
            overrides: dict, repeats: int) -> list[dict]:
    """The bundle's inference.json ``run``, ``repeats`` times; returns each run's seconds and stages."""
    from monai.bundle import ConfigParser

    use_bundle_scripts(BUNDLE_ROOT)
    parser = ConfigParser()
    parser.read_config(str(BUNDLE_ROOT / "configs" / "inference.json"))
    parser.update({"input": image, "output_dir": output_dir, "ckpt": weights, "init_filters": init_filters,
                   "num_classes": num_classes, "preset": preset, "save_csv": False, "save_preview": False,
                   **overrides})
    runs = []
    for repeat in range(repeats):
        out = Path(output_dir) / f"repeat{repeat}"
        parser["output_dir"] = str(out)
        parser.parse(reset=True)
        parser.get_parsed_content("network")  # built (and its weights allocated) before the clock starts
        start = time.perf_counter()
        parser.get_parsed_content("run")
        seconds = time.perf_counter() - start
        summary = json.loads((out / "summary.json").read_text())
        runs.append({"seconds": round(seconds, 3), "stages": summary["cases"][0].get("stages", {})})
    return runs


def run_pipeline(*, pipeline: str, image: str, weights: str, output_dir: str, init_filters: int = 32,
                 num_classes: int = 118, spacing: str | Sequence[float] = "1.5,1.5,1.5",
                 roi_size: str | Sequence[int] = "96,160,160", sw_batch_size: int = 2, overlap: float = 0.625,
                 threads: int = 2, device: str = "", amp: bool = True, repeats: int = 1,
                 overrides: str = "") -> dict:
    """Run one pipeline on one image in this process and print its result (the subprocess side).

    Args:
        pipeline: ``plain``, ``bundle`` or ``fast``.
        image: the CT to segment.
        weights: state dict of the ``SegResNetDS`` (torch file).
        output_dir: where the label map goes.
        init_filters: network width.
        num_classes: output channels.
        spacing: resampling spacing (mm) of ``plain`` and ``bundle``; ``fast`` uses its preset's.
        roi_size: sliding-window size of ``plain`` and ``bundle``; ``fast`` uses its preset's.
        sw_batch_size: windows per network call.
        overlap: sliding-window overlap of ``plain`` and ``bundle``; ``fast`` uses its preset's.
        threads: torch intra-op threads.
        device: ``cuda`` or ``cpu`` (default: cuda when available).
        amp: bf16 autocast of the bundle on CUDA (the plain pipeline stays float32).
        repeats: runs in this process (on a GPU the first one pays for CUDA and cuDNN warm-up);
            ``seconds`` is the last one's.
        overrides: JSON object of further ``inference.json`` ids for ``bundle`` / ``fast``
            (e.g. ``{"slab_argmax": false}``).

    Returns:
        ``{"pipeline", "seconds", "peak_rss_gb", "output", "runs"}`` (also printed after ``BENCH_RESULT``).
    """
    import torch

    torch.set_num_threads(int(threads))
    spacing, roi_size = as_list(spacing, float), as_list(roi_size, int)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    repeats = max(1, int(repeats))
    if pipeline == "plain":
        runs, network = [], None
        for repeat in range(repeats):
            seconds, network, stages = _plain(image=image, weights=weights, output_dir=str(Path(output_dir) / f"repeat{repeat}"),
                                      init_filters=init_filters, num_classes=num_classes, spacing=spacing,
                                      roi_size=roi_size, sw_batch_size=sw_batch_size, overlap=overlap, device=dev,
                                      network=network)
            runs.append({"seconds": round(seconds, 3), "stages": stages})
    elif pipeline in ("bundle", "fast"):
        preset_overrides = {"spacing": spacing, "patch_size": roi_size, "overlap": overlap} if pipeline == "bundle" else {}
        extra = json.loads(overrides) if isinstance(overrides, str) and overrides else dict(overrides or {})
        runs = _bundle(image=image, weights=weights, output_dir=output_dir, init_filters=init_filters,
                       num_classes=num_classes, preset="full" if pipeline == "bundle" else "fast",
                       overrides={**preset_overrides, "sw_batch_size": sw_batch_size,
                                  "device": f"$torch.device('{dev}')", "amp": amp, **extra},
                       repeats=repeats)
    else:
        raise ValueError(f"unknown pipeline {pipeline!r}: use plain, bundle or fast")
    seconds = runs[-1]["seconds"]
    outputs = sorted(str(p) for p in Path(output_dir).rglob("*_seg.nii.gz"))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result = {"pipeline": pipeline, "seconds": round(seconds, 2), "peak_rss_gb": round(peak_rss_gb(), 2),
              "output": outputs[0] if outputs else None, "runs": runs, "device": str(dev),
              "process_cpu_s": round(usage.ru_utime + usage.ru_stime, 1)}
    if dev.type == "cuda":
        result["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated(dev) / 1024**3, 2)
    print(RESULT_TAG + json.dumps(result), flush=True)
    return result


def _load_labels(path: str):
    """A label map as MONAI loads it, channel first (``MetaTensor``)."""
    from monai.transforms import EnsureChannelFirst, LoadImage

    return EnsureChannelFirst()(LoadImage(image_only=True)(path))


def resolution_ceiling_dice(labels, coarse_spacing: Sequence[float]) -> dict:
    """Dice per structure of a label map against itself resampled to ``coarse_spacing`` and back.

    The resampling is the bundle's: MONAI ``Orientation`` SPL and ``Spacing`` (nearest) to the
    coarse grid, then the inverse of ``Spacing`` back onto the label map's own (SPL) grid, as
    ``Invertd`` (nearest) puts a label map predicted at ``coarse_spacing`` back onto the input.

    Args:
        labels: label map (NIfTI path, or as loaded by :func:`_load_labels`).
        coarse_spacing: the coarser spacing (mm).

    Returns:
        ``{"per_label": {index: dice}, "mean": mean over structures}``.
    """
    import numpy as np
    from monai.transforms import Orientation, Spacing

    name = labels if isinstance(labels, str) else labels.meta.get("filename_or_obj", "labels")
    labels = Orientation(axcodes="SPL")(_load_labels(labels) if isinstance(labels, str) else labels)
    resample = Spacing(pixdim=[float(c) for c in coarse_spacing], mode="nearest")
    back = resample.inverse(resample(labels))
    if tuple(back.shape) != tuple(labels.shape):
        raise RuntimeError(f"{name}: resampled back to {tuple(back.shape)}, not {tuple(labels.shape)}")
    original = labels[0].numpy().astype(np.int64)
    back = back[0].numpy().astype(np.int64)
    per_label = {}
    for index in np.unique(original):
        if index == 0:
            continue
        a, b = original == index, back == index
        per_label[int(index)] = round(float(2 * (a & b).sum() / (a.sum() + b.sum())), 4)
    return {"per_label": per_label, "mean": round(float(np.mean(list(per_label.values()))), 4)}


def resolution_ceiling(*, labels: str, spacings: str | Sequence[float] = "1.5,3.0", output: str = "") -> dict:
    """The Dice a preset cannot exceed because of its spacing alone, on a reference label map.

    The label map is resampled (nearest) to each spacing and back to its own grid and scored
    per structure against itself: a perfect model at that spacing would score this. The
    default spacings are the bundle's standard (1.5 mm) and fast (3 mm) presets.

    Args:
        labels: a label map (NIfTI) at finer resolution than the spacings, e.g. a
            TotalSegmentator reference at its native CT resolution.
        spacings: isotropic spacings (mm) to check.
        output: JSON file (written atomically), or empty.

    Returns:
        Per spacing: mean Dice, mean over the larger and the smaller half of the structures (by
        volume), and Dice per structure name.
    """
    import numpy as np

    names = json.loads((BUNDLE_ROOT / "configs" / "metadata.json").read_text())["network_data_format"]["outputs"]
    names = names["pred"]["channel_def"]
    loaded = _load_labels(labels)  # read once, resampled for every spacing
    volume = loaded[0].numpy().astype(np.int64)
    present = [int(i) for i in np.unique(volume) if i > 0]
    if not present:
        raise ValueError(f"{labels}: no structure (only background) in the label map")
    counts = {i: int((volume == i).sum()) for i in present}
    median = float(np.median(list(counts.values())))
    report = {
        "labels": Path(labels).name,
        "shape": list(volume.shape),
        "spacing_mm": [float(z) for z in loaded.pixdim],
        "structures": len(present),
    }
    for spacing in as_list(spacings, float):
        dice = resolution_ceiling_dice(loaded, [spacing] * 3)["per_label"]
        larger = [dice[i] for i in present if counts[i] >= median]
        smaller = [dice[i] for i in present if counts[i] < median]
        worst = min(dice, key=dice.get)
        report[f"{spacing:g}mm"] = {
            "mean": round(float(np.mean(list(dice.values()))), 4),
            "larger_half": round(float(np.mean(larger)), 4),
            "smaller_half": round(float(np.mean(smaller)), 4) if smaller else None,
            "worst": {names.get(str(worst), str(worst)): dice[worst]},
            "per_structure": {names.get(str(i), str(i)): dice[i] for i in present},
        }
    if output:
        atomic_write_text(output, json.dumps(report, indent=2) + "\n")
    return report


def bench_wholebody_seg(
    *,
    shape: str | Sequence[int] = "223,201,243",
    spacing: float = 1.5,
    ct_spacing: str | Sequence[float] = "",
    image: str = "",
    init_filters: int = 32,
    num_classes: int = 118,
    roi_size: str | Sequence[int] = "96,160,160",
    sw_batch_size: int = 2,
    overlap: float = 0.25,
    pipelines: str | Sequence[str] = "bundle,fast,plain",
    variants: str | dict = "",
    threads: int = 2,
    device: str = "",
    amp: bool = True,
    repeats: int = 1,
    seed: int = 0,
    workdir: str = "",
    output: str = "",
    timeout_s: int = 3600,
) -> dict:
    """Time the plain MONAI and the bundle's inference on the same CT with the same weights.

    Args:
        shape: voxel counts of the synthetic body CT (R, A, S), used when ``image`` is empty.
        spacing: isotropic resampling spacing (mm) of ``plain`` and ``bundle`` (the fast preset
            uses its own), and the synthetic CT's voxel size unless ``ct_spacing`` is given.
        ct_spacing: voxel sizes of the synthetic CT (mm, R, A, S), e.g. ``0.8,0.8,1.5`` for a
            typical 512 x 512 x 300 body CT.
        image: a CT to use instead of the synthetic one.
        init_filters: network width (32 = the released model).
        num_classes: output channels (118 = TotalSegmentator v2 + background).
        roi_size: sliding-window size.
        sw_batch_size: windows per network call.
        overlap: sliding-window overlap of ``plain`` and ``bundle`` (the issue's CPU figure: 0.25;
            the reference inference setting: 0.625).
        pipelines: comma-separated subset of ``bundle,fast,plain`` and the ``variants``' names, run
            in that order.
        variants: JSON object ``{name: {inference.json id: value}}``: more runs of the bundle's full
            preset with those ids overridden, e.g. ``{"bundle_monai_stitch": {"slab_argmax": false}}``.
        threads: torch intra-op threads of each pipeline.
        device: ``cuda`` or ``cpu`` for every pipeline (default: cuda when available).
        amp: bf16 autocast of the bundle on CUDA (``plain`` is always float32, as the reference).
        repeats: runs per pipeline in its process; the last one is reported (on a GPU the first
            pays for CUDA and cuDNN warm-up).
        seed: seeds the phantom and the random network weights.
        workdir: folder for the CT, weights and outputs (default: a temporary folder).
        output: JSON file for the results (optional).
        timeout_s: per-pipeline time limit.

    Returns:
        ``{"settings", "results": [{"pipeline", "seconds", "peak_rss_gb", ...}], ...}``.
    """
    import torch

    from ctfm_bundles.tools.synthetic import phantom

    work = Path(workdir or tempfile.mkdtemp(prefix="bench_wholebody_seg_"))
    work.mkdir(parents=True, exist_ok=True)
    labels_path = ""
    if not image:
        shape = tuple(as_list(shape, int))
        grid_spacing = tuple(as_list(ct_spacing, float)) if ct_spacing else float(spacing)
        ct, labels, affine = phantom.make_body_phantom(shape=shape, spacing=grid_spacing, seed=seed)
        image, labels_path = str(work / "ct.nii.gz"), str(work / "ct_labels.nii.gz")
        phantom.save_phantom(ct, labels, affine, image_path=image, label_path=labels_path)
    torch.manual_seed(seed)
    weights = str(work / "random_init_weights.pt")
    torch.save(seg_network(int(init_filters), int(num_classes)).state_dict(), weights)
    settings = {"image": image, "shape": list(shape) if labels_path else "from the image", "spacing_mm": spacing,
                "ct_spacing_mm": as_list(ct_spacing, float) if ct_spacing else spacing, "device": device or "auto",
                "amp": amp, "repeats": repeats,
                "init_filters": init_filters, "num_classes": num_classes, "roi_size": as_list(roi_size, int),
                "sw_batch_size": sw_batch_size, "overlap": overlap, "threads": threads,
                "weights": "random init (speed and memory only)"}
    variants = json.loads(variants) if isinstance(variants, str) and variants else dict(variants or {})
    settings["variants"] = variants
    settings["command"] = " ".join(sys.argv)
    settings["cpu"] = _cpu_name()
    settings["cpu_count"] = os.cpu_count()
    settings["torch"] = torch.__version__
    results = []
    for pipeline in as_list(pipelines):
        out_dir = work / f"out_{pipeline}"
        kind = "bundle" if pipeline in variants else pipeline
        cmd = [sys.executable, "-m", "ctfm_bundles.tools.bench.wholebody_seg", "pipeline", f"--pipeline={kind}",
               f"--image={image}", f"--weights={weights}", f"--output_dir={out_dir}", f"--init_filters={init_filters}",
               f"--num_classes={num_classes}", f"--spacing={','.join(str(float(spacing)) for _ in range(3))}",
               f"--roi_size={','.join(str(v) for v in as_list(roi_size, int))}", f"--sw_batch_size={sw_batch_size}",
               f"--overlap={overlap}", f"--threads={threads}", f"--device={device}", f"--amp={amp}",
               f"--repeats={repeats}", f"--overrides={variants.get(pipeline, {})!r}"]  # a Python literal: fire keeps its booleans
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": os.pathsep.join(
            [str(BUNDLE_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
        print(f"running {pipeline} ...", flush=True)
        wall = time.perf_counter()
        load_before = os.getloadavg()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
        lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_TAG)]
        if proc.returncode or not lines:
            result = {"pipeline": pipeline, "error": (proc.stderr or proc.stdout)[-2000:]}
        else:
            result = json.loads(lines[-1][len(RESULT_TAG):])
            result["pipeline"] = pipeline
            result["process_wall_s"] = round(time.perf_counter() - wall, 2)
        result["load_average_1_5_15"] = {"before": [round(v, 2) for v in load_before],
                                         "after": [round(v, 2) for v in os.getloadavg()]}
        print(json.dumps(result), flush=True)
        results.append(result)
        if output:  # after every pipeline, so a run stopped by a time limit still leaves its figures
            atomic_write_text(output, json.dumps({"settings": settings, "results": results}, indent=2) + "\n")
    report: dict = {"settings": settings, "results": results}
    if labels_path and "fast" in as_list(pipelines):
        fast_spacing = FAST_PRESET_SPACING
        report["fast_resolution_ceiling_dice"] = {
            "spacing_mm": list(fast_spacing),
            **resolution_ceiling_dice(labels_path, fast_spacing),
        }
    by_name = {r["pipeline"]: r for r in results if "seconds" in r}
    if "plain" in by_name and "bundle" in by_name:
        report["bundle_speedup"] = round(by_name["plain"]["seconds"] / by_name["bundle"]["seconds"], 2)
        report["bundle_memory_ratio"] = round(by_name["bundle"]["peak_rss_gb"] / by_name["plain"]["peak_rss_gb"], 2)
    if "plain" in by_name:
        plain = by_name["plain"]
        report["vs_plain"] = {
            name: {"time_ratio": round(r["seconds"] / plain["seconds"], 3),
                   "cpu_time_ratio": round(r["process_cpu_s"] / plain["process_cpu_s"], 3)
                   if r.get("process_cpu_s") and plain.get("process_cpu_s") else None,
                   "peak_rss_gb": r["peak_rss_gb"],
                   "same_label_fraction": label_agreement(r["output"], plain["output"])
                   if name != "fast" and r.get("output") and plain.get("output") else None}
            for name, r in by_name.items() if name != "plain"
        }
    if output:
        atomic_write_text(output, json.dumps(report, indent=2) + "\n")
    return report


def label_agreement(path_a: str, path_b: str) -> float:
    """Fraction of voxels where two label maps on the same grid hold the same label."""
    import nibabel as nib
    import numpy as np

    a, b = (np.asarray(nib.load(p).dataobj) for p in (path_a, path_b))
    if a.shape != b.shape:
        raise ValueError(f"{path_a} {a.shape} and {path_b} {b.shape}: not the same grid")
    return round(float((a == b).mean()), 5)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


FAST_PRESET_SPACING = (3.0, 3.0, 3.0)  # keep in step with "presets" in configs/inference.json


def cli() -> None:
    """The console command (``[project.scripts]`` of pyproject.toml)."""
    fire.Fire({"bench": bench_wholebody_seg, "pipeline": run_pipeline, "ceiling": resolution_ceiling})


if __name__ == "__main__":
    cli()
