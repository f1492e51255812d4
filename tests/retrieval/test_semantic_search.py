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
"""ctfm_retrieval semantic search and saliency on phantoms: maps on the target's grid, a point found in its own scan."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import RETRIEVAL as BUNDLE, read_csv_rows as rows_of, run_bundle, retrieval_scripts

from ctfm_bundles.tools.synthetic import phantom

scripts = retrieval_scripts()


def _liver_centroid(label_path: Path) -> list[float]:
    labels = nib.load(str(label_path))
    voxels = np.argwhere(np.asanyarray(labels.dataobj) == phantom.BODY_LABELS["liver"]).mean(0)
    return nib.affines.apply_affine(labels.affine, voxels).tolist()


def test_semantic_search_map_on_the_target_grid_with_hit_rate(scans):
    root = scans["root"]
    point = _liver_centroid(root / "body0_labels.nii.gz")
    out = root / "semantic"
    run_bundle(
        BUNDLE,
        ["embed.json", "semantic_search.json"],
        input=str(root / "scans" / "body1.nii.gz"),
        query_image=str(root / "scans" / "body0.nii.gz"),
        query_point=point,
        output_dir=str(out),
        target_label=str(root / "body1_labels.nii.gz"),
        label_values=[phantom.BODY_LABELS["liver"]],
        top_n=5,
        init_filters=8,
        encoder_ckpt=scans["ckpt"],
    )
    target = nib.load(str(root / "scans" / "body1.nii.gz"))
    similarity = nib.load(str(out / "semantic_search" / "body1_similarity.nii.gz"))
    assert similarity.shape == target.shape and np.allclose(similarity.affine, target.affine)
    values = similarity.get_fdata()
    assert np.isfinite(values).all() and values.min() >= -1.001 and values.max() <= 1.001
    matches = rows_of(out / "semantic_search" / "body1_matches.csv")
    assert len(matches) == 5 and float(matches[0]["score"]) >= float(matches[-1]["score"])
    summary = json.loads((out / "semantic_search" / "body1_summary.json").read_text())
    assert summary["hit_rate"] == pytest.approx(np.mean([int(m["inside_mask"]) for m in matches]))
    assert (out / "semantic_search" / "body1_similarity.png").stat().st_size > 0


def test_semantic_search_of_a_point_in_its_own_scan_finds_it(scans, local, tmp_path):
    from monai import transforms as mt

    search = importlib.import_module("ctfm_retrieval_scripts.semantic_search")
    preprocessing = mt.Compose([*local["preprocessing"].transforms[:-1], mt.DivisiblePadd("image", 16)])
    scan = str(scans["root"] / "scans" / "body0.nii.gz")
    point = _liver_centroid(scans["root"] / "body0_labels.nii.gz")
    summary = search.semantic_search(
        target=scan,
        query_image=scan,
        query_point=point,
        preprocessing=preprocessing,
        network=local["network"],
        output_dir=str(tmp_path),
        top_n=3,
    )
    best = rows_of(tmp_path / "semantic_search" / "body0_matches.csv")[0]
    assert float(best["score"]) == pytest.approx(1.0, abs=1e-5)
    # the best match is the feature voxel holding the point: within one feature voxel (16 x 3 x 1 x 1 mm)
    distance = np.abs(np.array([float(best[c]) for c in "xyz"]) - np.array(point))
    assert np.all(distance <= np.array([16.0, 16.0, 48.0])), distance
    assert summary["query_point_world"] == pytest.approx(point)


def test_saliency_map_has_the_inputs_grid(scans, tmp_path):
    from monai import transforms as mt

    saliency = importlib.import_module("ctfm_retrieval_scripts.saliency")
    preprocessing = mt.Compose(
        [
            mt.LoadImaged("image", image_only=True),
            mt.EnsureChannelFirstd("image"),
            mt.Orientationd("image", "SPL"),
            mt.Spacingd("image", (6.0, 6.0, 6.0)),
            mt.ScaleIntensityRanged("image", -1024, 2048, 0, 1, clip=True),
            mt.DivisiblePadd("image", 16),
        ]
    )
    net = scripts.encoder.load_encoder(scripts.encoder.PooledEncoderHead(init_filters=8), scans["ckpt"]).eval()
    scan = scans["root"] / "scans" / "head0.nii.gz"
    summary = saliency.occlusion_saliency(
        input=str(scan), preprocessing=preprocessing, network=net, output_dir=str(tmp_path), mask_size=4, overlap=0.0
    )
    result = nib.load(str(tmp_path / "saliency" / "head0_saliency.nii.gz"))
    source = nib.load(str(scan))
    assert result.shape == source.shape and np.allclose(result.affine, source.affine)
    values = result.get_fdata()
    assert np.isfinite(values).all() and values.min() >= -1e-5 and values.max() <= 2 and values.max() > 0
    assert summary["max"] == pytest.approx(values.max(), rel=1e-5)
    assert (tmp_path / "saliency" / "head0_saliency.png").stat().st_size > 0
