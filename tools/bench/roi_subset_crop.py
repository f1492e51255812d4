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
"""Benchmark ctfm_wholebody_seg's ``roi_subset_crop``: ``--roi_subset liver`` with and without the crop.

Both runs use the bundle's ``configs/inference.json`` (``run``, full preset) in this process on a body
phantom (``tools/synthetic/phantom.py``, no noise) and the same network: a randomly initialised ``SegResNetDS``
(what the full pass costs) whose liver logit is replaced by a per-voxel test of the phantom liver's HU
(so the coarse pass finds the liver where it is; random weights alone localise nothing). Reported: the
CPU time (all threads, ``time.process_time``) and wall time of each run, their ratio, the shape the
full-resolution pass ran on, and the share of voxels where both label maps agree.

CLI::

    ctfm-bench-roi-crop bench --shape 160,128,200 --output roi_crop.json
    ctfm-bench-roi-crop bench --shape 96,80,120 --init_filters 8   # quick
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import fire
import numpy as np
import torch
from torch import nn

from ctfm_bundles.tools import REPO_ROOT, use_bundle_scripts
from ctfm_common.runtime import atomic_write_text

BUNDLE_ROOT = REPO_ROOT / "bundles" / "ctfm_wholebody_seg"

LIVER = 5  # TotalSegmentator index


class LiverByIntensity(nn.Module):
    """``network``'s output with the liver channel replaced by ``sharpness * (half_width - |x - centre|)``
    of the scaled intensity ``x`` (positive inside the liver's HU band); the network still runs in full."""

    def __init__(self, network: nn.Module, liver_hu: float, half_width_hu: float = 3.0, sharpness: float = 1e5) -> None:
        super().__init__()
        self.network = network
        self.centre = (liver_hu + 1024.0) / 3072.0  # the bundle's ScaleIntensityRanged (-1024, 2048) -> (0, 1)
        self.half_width = half_width_hu / 3072.0
        self.sharpness = sharpness

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.network(x)
        out = out[0] if isinstance(out, (list, tuple)) else out
        band = self.sharpness * (self.half_width - (x.float() - self.centre).abs())
        return torch.cat([out[:, :LIVER], band.to(out.dtype), out[:, LIVER + 1 :]], dim=1)


def _run(network: nn.Module, image: str, out: Path, crop: bool, overrides: dict) -> tuple[dict, float, float]:
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(BUNDLE_ROOT / "configs" / "inference.json"))
    parser.update({"input": image, "output_dir": str(out), "network": network, "ckpt": "", "device": "cpu",
                   "roi_subset": "liver", "roi_subset_crop": crop, "save_preview": False, "save_csv": False,
                   "progress": False, **overrides})
    cpu, wall = time.process_time(), time.perf_counter()
    parser.get_parsed_content("run")
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return json.loads((out / "summary.json").read_text())["cases"][0], cpu, wall


def bench(
    *,
    shape: str | Sequence[int] = (160, 128, 200),
    init_filters: int = 32,
    amp: bool = True,
    seed: int = 0,
    output: str = "",
) -> dict:
    """Time ``--roi_subset liver`` with and without ``roi_subset_crop`` on a 1.5 mm body phantom.

    Args:
        shape: phantom voxels (1.5 mm).
        init_filters: network width (32: the bundle's).
        amp: the bundle's ``amp`` (bf16 where the CPU computes it natively).
        seed: phantom and weights seed.
        output: JSON file for the result (optional).

    Returns:
        ``{"crop": {...}, "whole": {...}, "cpu_ratio", "wall_ratio", "agreement", ...}``.
    """
    import nibabel as nib
    from ctfm_bundles.tools.synthetic import phantom
    from monai.networks.nets import SegResNetDS

    shape = [int(s) for s in (shape.split(",") if isinstance(shape, str) else shape)]
    image, labels, affine = phantom.make_body_phantom(shape=shape, spacing=1.5, seed=seed, noise_hu=0.0)
    liver_hu = float(np.median(image[labels == phantom.BODY_LABELS["liver"]]))
    torch.manual_seed(seed)
    network = LiverByIntensity(
        SegResNetDS(spatial_dims=3, in_channels=1, init_filters=init_filters, blocks_down=[1, 2, 2, 4, 4],
                    out_channels=118, dsdepth=4), liver_hu).eval()
    use_bundle_scripts(BUNDLE_ROOT)  # the config's `import scripts`, as monai.bundle run puts it
    result: dict = {"shape": shape, "spacing_mm": 1.5, "init_filters": init_filters, "amp": amp,
                    "torch_threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "ct.nii.gz")
        nib.save(nib.Nifti1Image(image, affine), path)
        maps = {}
        for name, crop in (("crop", True), ("whole", False)):
            record, cpu, wall = _run(network, path, Path(tmp) / name, crop, {"amp": amp})
            maps[name] = np.asarray(nib.load(record["outputs"]["label_map"]).dataobj)
            result[name] = {"cpu_s": round(cpu, 1), "wall_s": round(wall, 1), "stages": record.get("stages", {}),
                            "roi_subset_crop": record.get("roi_subset_crop", {})}
    result["cpu_ratio"] = round(result["crop"]["cpu_s"] / result["whole"]["cpu_s"], 3)
    result["wall_ratio"] = round(result["crop"]["wall_s"] / result["whole"]["wall_s"], 3)
    result["agreement"] = round(float((maps["crop"] == maps["whole"]).mean()), 5)
    result["liver_voxels"] = {name: int((m == LIVER).sum()) for name, m in maps.items()}
    if output:
        atomic_write_text(output, json.dumps(result, indent=2) + "\n")
    return result


def cli() -> None:
    """The console command (``[project.scripts]`` of pyproject.toml)."""
    fire.Fire({"bench": bench})


if __name__ == "__main__":
    cli()
