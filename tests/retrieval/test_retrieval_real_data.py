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
"""ctfm_retrieval on real data (../shared/data ct_small and its TotalSegmentator labels): organ crops end to end,
semantic search from a point in the liver, saliency and robustness; skipped with the reason when the data is absent.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import (
    RETRIEVAL as BUNDLE,
    RETRIEVAL_FAST as FAST,
    read_csv_rows as rows_of,
    read_safetensors as read,
    run_bundle,
    retrieval_scripts,
)

scripts = retrieval_scripts()


# ----- real data: ../shared/data ct_small and its TotalSegmentator labels -----

ORGANS = {"liver": 5, "spleen": 1, "kidney_right": 2, "kidney_left": 3}
SHIFTS = ((0, 0), (3, 0), (0, -3))  # voxel shifts of the crop box (x, y): three crops per organ
COARSE = {"spacing": [6.0, 6.0, 6.0], **FAST}


def _write_crop(image: nib.Nifti1Image, lower, upper, path: Path) -> None:
    """``image[lower:upper]`` as NIfTI with the affine of the crop (its world position kept)."""
    box = tuple(slice(a, b) for a, b in zip(lower, upper))
    affine = image.affine.copy()
    affine[:3, 3] = nib.affines.apply_affine(image.affine, lower)
    nib.save(nib.Nifti1Image(np.asanyarray(image.dataobj)[box], affine, image.header), str(path))


@pytest.fixture(scope="module")
def organ_crops(shared_data, tmp_path_factory) -> dict:
    """Crops of four organs' bounding boxes (margin 4 voxels) from ct_small, each at three small shifts."""
    root = tmp_path_factory.mktemp("organ_crops")
    (root / "crops").mkdir()
    image = nib.load(str(shared_data / "totalseg_example" / "ct_small.nii.gz"))
    labels = np.asanyarray(nib.load(str(shared_data / "totalseg_example" / "ct_small_labels.nii.gz")).dataobj)
    label_of = {}
    for organ, value in ORGANS.items():
        voxels = np.argwhere(labels == value)
        low, high = voxels.min(0) - 4, voxels.max(0) + 5
        for n, (dx, dy) in enumerate(SHIFTS):
            shift = np.array([dx, dy, 0])
            lower = np.clip(low + shift, 0, image.shape)
            upper = np.clip(high + shift, 0, image.shape)
            _write_crop(image, lower, upper, root / "crops" / f"{organ}_{n}.nii.gz")
            label_of[f"{organ}_{n}"] = organ
    (root / "labels.csv").write_text("case,label\n" + "".join(f"{c},{o}\n" for c, o in label_of.items()))
    return {"root": root, "label_of": label_of}


def test_real_organ_crops_embed_index_and_evaluate_end_to_end(scans, organ_crops):
    root, label_of = organ_crops["root"], organ_crops["label_of"]
    out = root / "out"
    run_bundle(
        BUNDLE,
        "embed.json",
        input=str(root / "crops" / "*.nii.gz"),
        output_dir=str(out),
        encoder_ckpt=scans["ckpt"],
        **COARSE,
    )
    assert sorted(r["case"] for r in rows_of(out / "embeddings" / "index.csv")) == sorted(label_of)
    # index.json is a thin call of build_index (run as a workflow in the incremental-add test): run it here
    scripts.vector_index.build_index(embeddings_dir=out / "embeddings", index_dir=out / "index")
    meta = json.loads((out / "index" / "index.json").read_text())
    assert meta["kind"] == "flat" and meta["count"] == len(label_of) and meta["dim"] == 128
    run_bundle(BUNDLE, "evaluate.json", output_dir=str(out), labels=str(root / "labels.csv"), ks=[1, 2])
    summary = json.loads((out / "retrieval_metrics.json").read_text())
    assert summary["num_queries"] == len(label_of)  # every organ has two other crops
    for key in ("mAP", "precision@1", "precision@2", "AP@2", "hit_rate@1", "hit_rate@2"):
        assert 0.0 <= summary[key] <= 1.0, (key, summary[key])
    assert summary["hit_rate@2"] >= summary["hit_rate@1"]
    per_query = rows_of(out / "retrieval_per_query.csv")
    assert {r["case"]: r["label"] for r in per_query} == label_of
    assert all(int(r["num_relevant"]) == len(SHIFTS) - 1 for r in per_query)
    # each crop's own stored embedding queried against the persisted index: itself first, cosine 1
    index, ids, _ = scripts.vector_index.load_index(out / "index")
    vectors = np.stack([read(out / "embeddings" / r["file"])[0]["embedding"].numpy() for r in ids])
    for row, hits in zip(ids, scripts.vector_index.search(index, ids, vectors, k=3)):
        assert hits[0]["case"] == row["case"] and hits[0]["score"] == pytest.approx(1.0, abs=1e-5)


def _coarse_preprocessing(spacing):
    from monai import transforms as mt

    return mt.Compose(
        [
            mt.LoadImaged("image", image_only=True),
            mt.EnsureChannelFirstd("image"),
            mt.Orientationd("image", "SPL"),
            mt.Spacingd("image", spacing),
            mt.ScaleIntensityRanged("image", -1024, 2048, 0, 1, clip=True),
            mt.DivisiblePadd("image", 16),
        ]
    )


def test_real_semantic_search_from_a_point_in_the_liver(shared_data, local, tmp_path):
    search = importlib.import_module("ctfm_retrieval_scripts.semantic_search")
    scan = shared_data / "totalseg_example" / "ct_small.nii.gz"
    label_path = shared_data / "totalseg_example" / "ct_small_labels.nii.gz"
    labels = nib.load(str(label_path))
    liver = np.argwhere(np.asanyarray(labels.dataobj) == ORGANS["liver"])
    point = nib.affines.apply_affine(labels.affine, liver[np.argmin(((liver - liver.mean(0)) ** 2).sum(1))]).tolist()
    # the target: another field of view of the scan (cropped in x, y and z), with its labels cropped alike
    image = nib.load(str(scan))
    lower, upper = (8, 6, 2), (114, 97, 28)
    _write_crop(image, lower, upper, tmp_path / "target.nii.gz")
    _write_crop(labels, lower, upper, tmp_path / "target_labels.nii.gz")
    summary = search.semantic_search(
        target=str(tmp_path / "target.nii.gz"),
        query_image=str(scan),
        query_point=point,
        preprocessing=_coarse_preprocessing((3.0, 3.0, 3.0)),
        network=local["network"],
        output_dir=str(tmp_path),
        top_n=10,
        target_label=str(tmp_path / "target_labels.nii.gz"),
        label_values=[ORGANS["liver"]],
    )
    target = nib.load(str(tmp_path / "target.nii.gz"))
    similarity = nib.load(str(tmp_path / "semantic_search" / "target_similarity.nii.gz"))
    assert similarity.shape == target.shape and np.allclose(similarity.affine, target.affine)
    values = similarity.get_fdata()
    assert np.isfinite(values).all() and -1.001 <= values.min() < values.max() <= 1.001
    matches = rows_of(tmp_path / "semantic_search" / "target_matches.csv")
    assert len(matches) == 10 and 0.0 <= summary["hit_rate"] <= 1.0
    assert summary["hit_rate"] == pytest.approx(np.mean([int(m["inside_mask"]) for m in matches]))
    assert (tmp_path / "semantic_search" / "target_similarity.png").stat().st_size > 0


def test_real_saliency_map_has_the_inputs_grid(shared_data, local, tmp_path):
    saliency = importlib.import_module("ctfm_retrieval_scripts.saliency")
    scan = shared_data / "totalseg_example" / "ct_small.nii.gz"
    summary = saliency.occlusion_saliency(
        input=str(scan),
        preprocessing=_coarse_preprocessing((12.0, 12.0, 12.0)),
        network=local["network"],
        output_dir=str(tmp_path),
        mask_size=4,
        overlap=0.0,
    )
    result = nib.load(str(tmp_path / "saliency" / "ct_small_saliency.nii.gz"))
    source = nib.load(str(scan))
    assert result.shape == source.shape and np.allclose(result.affine, source.affine)
    values = result.get_fdata()
    assert np.isfinite(values).all() and values.min() >= -1e-5 and 0 < values.max() <= 2
    assert summary["max"] == pytest.approx(values.max(), rel=1e-5)


def test_real_robustness_of_a_scan_and_its_perturbed_copy(shared_data, local, tmp_path):
    from monai import transforms as mt

    robustness = importlib.import_module("ctfm_retrieval_scripts.robustness")
    scan = shared_data / "totalseg_example" / "ct_small.nii.gz"
    _write_crop(nib.load(str(scan)), (0, 0, 0), (122, 101, 15), tmp_path / "ct_small_lower.nii.gz")  # 2 pairs at least
    preprocessing = _coarse_preprocessing(tuple(COARSE["spacing"]))
    embedder = scripts.embedding.ScanEmbedder(
        local["network"], patch_size=FAST["patch_size"], overlap=0.0, batch_size=8
    )
    # robustness.json's perturbation: a little noise and a small random rotation / shift
    perturbation = mt.Compose(
        [
            mt.RandGaussianNoised("image", prob=1.0, std=0.01),
            mt.RandAffined(
                "image", prob=1.0, rotate_range=(0.05,) * 3, translate_range=(1, 4, 4), padding_mode="border"
            ),
        ]
    )
    perturbation.set_random_state(0)
    summary = robustness.analyse_test_retest(
        output_dir=str(tmp_path / "out"),
        preprocessing=preprocessing,
        embedder=embedder,
        items=[{"image": str(scan)}, {"image": str(tmp_path / "ct_small_lower.nii.gz")}],
        perturbation=perturbation,
    )
    rows = rows_of(tmp_path / "out" / "robustness_pairs.csv")
    assert [r["case"] for r in rows] == ["ct_small", "ct_small_lower"]
    assert all(r["retest"].endswith("(perturbed)") and -1 <= float(r["cosine"]) < 1 for r in rows)
    assert all(1 <= int(r["partner_rank"]) <= 2 for r in rows)
    assert summary["num_pairs"] == 2 and summary["pairs"] == "perturbed copies"
    assert summary["mean_cosine"] == pytest.approx(np.mean([float(r["cosine"]) for r in rows]), abs=1e-6)
    assert json.loads((tmp_path / "out" / "robustness_summary.json").read_text())["num_pairs"] == 2
    icc = [float(r["icc"]) for r in rows_of(tmp_path / "out" / "robustness_icc.csv")]
    assert len(icc) == 128
