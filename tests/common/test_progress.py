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
"""Long steps show progress: occlusion saliency (minutes on a full-size scan), semantic search's
read / encode / invert steps, and seg sliding windows.

(The learning rate in TensorBoard is checked where training already runs: ``test_wholebody_seg.py``
and ``test_triage.py``.)
"""

from __future__ import annotations

import importlib
import logging
import re

import nibabel as nib
import numpy as np
import pytest
from conftest import BUNDLES_DIR
from monai.bundle import ConfigParser
from ctfm_bundles.tools import bundle_scripts_switch
from ctfm_bundles.tools.synthetic.phantom import make_body_phantom


@pytest.fixture
def retrieval_scripts():
    with bundle_scripts_switch() as use:
        use(BUNDLES_DIR / "ctfm_retrieval")
        yield importlib.import_module("scripts")


def test_saliency_shows_progress_and_logs_a_readable_maximum(retrieval_scripts, tmp_path, capfd, caplog):
    from monai import transforms as mt

    saliency = importlib.import_module("scripts.saliency")
    encoder = retrieval_scripts.encoder
    image, _, affine = make_body_phantom(shape=(24, 24, 16), spacing=(8.0, 8.0, 8.0), noise_hu=0.0)
    scan = tmp_path / "body.nii.gz"
    nib.save(nib.Nifti1Image(image.astype(np.float32), affine), str(scan))
    preprocessing = mt.Compose([
        mt.LoadImaged("image", image_only=True), mt.EnsureChannelFirstd("image"), mt.Orientationd("image", "SPL"),
        mt.ScaleIntensityRanged("image", -1024, 2048, 0, 1, clip=True), mt.DivisiblePadd("image", 16),
    ])
    net = encoder.PooledEncoderHead(init_filters=8).eval()
    with caplog.at_level(logging.INFO):
        summary = saliency.occlusion_saliency(input=str(scan), preprocessing=preprocessing, network=net,
                                              output_dir=str(tmp_path), mask_size=8, overlap=0.0)
    err = capfd.readouterr().err
    assert re.search(r"\d+%\|", err), f"no progress bar on stderr: {err[-500:]!r}"
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("saliency map ->"))
    shown = re.search(r"max (\S+) at", line).group(1)
    assert float(shown) == pytest.approx(summary["max"], rel=1e-3) and shown not in ("0.0000", "0")


def test_seg_sliding_window_progress_is_on_by_default():
    parser = ConfigParser()
    parser.read_config(str(BUNDLES_DIR / "ctfm_wholebody_seg" / "configs" / "inference.json"))
    assert parser.get_parsed_content("progress") is True
    assert parser["window_inferer"]["progress"] == "@progress"
    assert parser["coarse_inferer"]["progress"] == "@progress"  # the roi_subset crop's localising pass


def test_semantic_search_logs_each_long_step(retrieval_scripts, tmp_path, caplog):
    """Semantic search reads, encodes and inverts two scans (minutes on full-size CTs): each step is
    announced as it starts, numbered, and the run ends with its total time."""
    from monai import transforms as mt

    search = importlib.import_module("scripts.semantic_search")
    scans = []
    for seed in (0, 1):
        image, _, affine = make_body_phantom(shape=(24, 24, 16), spacing=(8.0, 8.0, 8.0), noise_hu=0.0, seed=seed)
        scans.append(tmp_path / f"body{seed}.nii.gz")
        nib.save(nib.Nifti1Image(image.astype(np.float32), affine), str(scans[-1]))
    preprocessing = mt.Compose([
        mt.LoadImaged("image", image_only=True), mt.EnsureChannelFirstd("image"), mt.Orientationd("image", "SPL"),
        mt.ScaleIntensityRanged("image", -1024, 2048, 0, 1, clip=True), mt.DivisiblePadd("image", 16),
    ])
    net = retrieval_scripts.encoder.PooledEncoderHead(init_filters=8).eval()
    with caplog.at_level(logging.INFO):
        search.semantic_search(target=str(scans[1]), query_image=str(scans[0]), query_point=[0.0, 0.0, 0.0],
                               preprocessing=preprocessing, network=net, output_dir=str(tmp_path), amp=False)
    lines = [r.getMessage() for r in caplog.records if r.name == "ctfm_retrieval.semantic_search"]
    steps = [m for m in (re.match(r"semantic search (\d+)/(\d+): (.+)", line) for line in lines) if m]
    assert steps, f"no step lines in {lines}"
    total = int(steps[0].group(2))
    assert [int(m.group(1)) for m in steps] == list(range(1, total + 1))
    said = " | ".join(m.group(3) for m in steps)
    for words in (f"preprocessing {scans[0]}", "encoding the query", f"preprocessing {scans[1]}",
                  "encoding the target", "inverting", "writing"):
        assert words in said, f"no step '{words}' in: {said}"
    assert re.search(r"semantic search done in \d+(\.\d+)? s", lines[-1]), lines[-1]
