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
"""Benchmark ctfm_wholebody_seg inference on a batch of CTs: files per second and time per stage.

Writes ``--num-cases`` synthetic body CTs (``tools/synthetic/phantom.py``) and one set of randomly
initialised ``SegResNetDS`` weights (seeded), then runs the bundle's ``configs/inference.json``
on the whole batch through ``monai.bundle.ConfigWorkflow`` (what ``python -m monai.bundle run``
does), in a subprocess with ``--threads`` torch threads, with the default outputs (label map,
colour table, structure CSV, PNG preview). The clock covers the ``run`` of the workflow (weights,
checks and the per-case loop); the seconds per stage are summed over the cases from the run's
``summary.json``. The benchmark measures speed, not accuracy.

``--bundle-dir`` points at any checkout's ``bundles/ctfm_wholebody_seg``, so the same batch can
be timed with an earlier version of the bundle (run both on a quiet machine).

CLI::

    ctfm-bench-seg-batch                                   # 8 CTs, init_filters 8
    ctfm-bench-seg-batch --bundle-dir ../other/bundles/ctfm_wholebody_seg --output old.json
    ctfm-bench-seg-batch --num-cases 4 --shape 96,96,64 --preset fast --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ctfm_bundles.tools import REPO_ROOT, use_bundle_scripts
from ctfm_bundles.tools.bench.wholebody_seg import RESULT_TAG, as_list, peak_rss_gb, seg_network
from ctfm_common.runtime import atomic_write_text

DEFAULT_BUNDLE = REPO_ROOT / "bundles" / "ctfm_wholebody_seg"


def write_batch(folder: Path, num_cases: int, shape: list[int], spacing: list[float], seed: int) -> list[Path]:
    """``num_cases`` body phantoms ``case<i>.nii.gz`` (each its own seed) in ``folder``."""
    from ctfm_bundles.tools.synthetic import phantom

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(num_cases):
        ct, labels, affine = phantom.make_body_phantom(shape=tuple(shape), spacing=tuple(spacing), seed=seed + i)
        path = folder / f"case{i:02d}.nii.gz"
        phantom.save_phantom(ct, labels, affine, image_path=str(path), label_path=str(folder / f"labels{i:02d}.nii.gz"))
        paths.append(path)
    return paths


def write_weights(path: Path, init_filters: int, num_classes: int, seed: int) -> Path:
    """Seeded random weights of the bundle's network, as a torch state dict."""
    import torch

    torch.manual_seed(seed)
    torch.save(seg_network(init_filters, num_classes).state_dict(), path)
    return path


def child(bundle_dir: str, overrides: dict, threads: int) -> dict:
    """The subprocess side: one ``ConfigWorkflow`` run of the bundle's inference config, timed."""
    import torch
    from monai.bundle import ConfigWorkflow

    torch.set_num_threads(threads)
    bundle = Path(bundle_dir).resolve()
    use_bundle_scripts(bundle)
    start = time.perf_counter()
    workflow = ConfigWorkflow(config_file=str(bundle / "configs" / "inference.json"),
                              meta_file=str(bundle / "configs" / "metadata.json"), workflow_type="infer", **overrides)
    workflow.initialize()
    setup_s = time.perf_counter() - start
    start = time.perf_counter()
    workflow.run()
    run_s = time.perf_counter() - start
    workflow.finalize()
    summary = json.loads((Path(overrides["output_dir"]) / "summary.json").read_text())
    stages: dict[str, float] = {}
    for case in summary["cases"]:
        for name, value in (case.get("stages") or {}).items():
            stages[name] = round(stages.get(name, 0.0) + float(value), 3)
    return {"setup_s": round(setup_s, 2), "run_s": round(run_s, 2), "num_ok": summary["num_ok"],
            "num_failed": summary["num_failed"], "stages_total_s": stages,
            "case_seconds": [c.get("seconds") for c in summary["cases"]],
            "peak_rss_gb": round(peak_rss_gb(), 2)}


def bench(args: argparse.Namespace) -> dict:
    """Write the batch and the weights, run the bundle ``repeats`` times (each in a fresh subprocess)."""
    bundle = Path(args.bundle_dir).resolve()
    if not (bundle / "configs" / "inference.json").is_file():
        raise SystemExit(f"error: {bundle}: no configs/inference.json (pass --bundle-dir <checkout>/bundles/ctfm_wholebody_seg)")
    shape, spacing = as_list(args.shape, int), as_list(args.spacing, float)
    with tempfile.TemporaryDirectory(prefix="bench_seg_batch_") as tmp:
        tmp = Path(tmp)
        write_batch(tmp / "ct", args.num_cases, shape, spacing, args.seed)
        weights = write_weights(tmp / "weights.pt", args.init_filters, args.num_classes, args.seed)
        runs = []
        for repeat in range(args.repeats):
            overrides = {"input": str(tmp / "ct" / "case*.nii.gz"), "output_dir": str(tmp / f"out{repeat}"),
                         "ckpt": str(weights), "init_filters": args.init_filters, "num_classes": args.num_classes,
                         "preset": args.preset, "device": args.device, "progress": False}
            command = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(overrides),
                       "--bundle-dir", str(bundle), "--threads", str(args.threads)]
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONUNBUFFERED="1")
            proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp)
            lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_TAG)]
            if proc.returncode != 0 or not lines:
                raise SystemExit(f"error: the bundle run failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
            run = json.loads(lines[-1][len(RESULT_TAG):])
            run["files_per_s"] = round(run["num_ok"] / run["run_s"], 4) if run["run_s"] else None
            runs.append(run)
            print(f"run {repeat}: {run['num_ok']}/{args.num_cases} files in {run['run_s']} s "
                  f"({run['files_per_s']} files/s), peak RSS {run['peak_rss_gb']} GB; stages (s, summed over cases): "
                  + ", ".join(f"{k} {v}" for k, v in run["stages_total_s"].items()), flush=True)
    best = min(runs, key=lambda r: r["run_s"])
    result = {"bundle_dir": str(bundle),
              "settings": {"num_cases": args.num_cases, "shape": shape, "spacing": spacing,
                           "init_filters": args.init_filters, "num_classes": args.num_classes, "preset": args.preset,
                           "threads": args.threads, "device": args.device, "seed": args.seed},
              "files_per_s": best["files_per_s"], "run_s": best["run_s"], "runs": runs}
    print(RESULT_TAG + json.dumps(result))
    if args.output:
        atomic_write_text(args.output, json.dumps(result, indent=2) + "\n")
    return result


def cli(argv: list[str] | None = None) -> None:
    """The console command ``ctfm-bench-seg-batch`` (``[project.scripts]`` of pyproject.toml)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle-dir", "--bundle_dir", dest="bundle_dir", default=str(DEFAULT_BUNDLE),
                        help="the ctfm_wholebody_seg bundle folder to run (default: this checkout's)")
    parser.add_argument("--num-cases", "--num_cases", dest="num_cases", type=int, default=8)
    parser.add_argument("--shape", default="256,224,96", help="voxels of each synthetic CT (x,y,z)")
    parser.add_argument("--spacing", default="1.5,1.5,3.0", help="mm per voxel of each synthetic CT")
    parser.add_argument("--init-filters", "--init_filters", dest="init_filters", type=int, default=8)
    parser.add_argument("--num-classes", "--num_classes", dest="num_classes", type=int, default=118)
    parser.add_argument("--preset", default="fast", choices=("full", "fast"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the bundle run")
    parser.add_argument("--repeats", type=int, default=1, help="runs (each in a fresh process); the fastest is reported")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="", help="also write the result JSON here")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(RESULT_TAG + json.dumps(child(args.bundle_dir, json.loads(args.child), args.threads)), flush=True)
        return
    bench(args)


if __name__ == "__main__":
    cli()
