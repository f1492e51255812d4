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
"""ctfm_retrieval robustness (ICC of test-retest pairs and perturbed copies) and the cluster map (t-SNE, UMAP)."""

from __future__ import annotations

import importlib
import shutil

import numpy as np
import pytest
from conftest import read_csv_rows as rows_of, retrieval_case_names as expected_cases, retrieval_scripts

scripts = retrieval_scripts()


def test_icc_matches_shrout_and_fleiss():
    robustness = importlib.import_module("ctfm_retrieval_scripts.robustness")
    # Shrout & Fleiss (1979), 6 targets x 4 judges: ICC(2,1) = 0.29
    ratings = np.array([[9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8], [7, 1, 2, 6], [10, 5, 6, 9], [6, 2, 4, 7]], float)
    assert robustness.icc_2_1(ratings)[0] == pytest.approx(0.2898, abs=1e-3)
    assert robustness.partner_ranks(np.eye(3), np.eye(3)[[0, 2, 1]] + 0.1).tolist() == [1, 2, 2]


def test_robustness_of_identical_pairs_and_perturbed_copies(scans, local, tmp_path):
    from monai import transforms as mt

    robustness = importlib.import_module("ctfm_retrieval_scripts.robustness")
    embedder = scripts.embedding.ScanEmbedder(local["network"], patch_size=(8, 32, 32), overlap=0.0, batch_size=8)
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(
        "test,retest\n" + "".join(f"scans/{n}.nii.gz,scans/{n}.nii.gz\n" for n in ("body0", "head0", "head1"))
    )
    shutil.copytree(scans["root"] / "scans", tmp_path / "scans", ignore=shutil.ignore_patterns("ct_small*", "broken*"))
    summary = robustness.analyse_test_retest(
        output_dir=str(tmp_path), preprocessing=local["preprocessing"], embedder=embedder, pairs=str(pairs)
    )
    assert summary["mean_cosine"] == pytest.approx(1.0, abs=1e-5) and summary["partner_top1_rate"] == 1.0
    icc = [float(r["icc"]) for r in rows_of(tmp_path / "robustness_icc.csv")]
    assert len(icc) == 128 and np.nanmin(icc) == pytest.approx(1.0, abs=1e-4)
    noisy = mt.RandGaussianNoised("image", prob=1.0, std=0.05)
    items = [{"image": str(tmp_path / "scans" / f"{n}.nii.gz")} for n in ("body0", "head0")]
    summary = robustness.analyse_test_retest(
        output_dir=str(tmp_path / "noisy"),
        preprocessing=local["preprocessing"],
        embedder=embedder,
        items=items,
        perturbation=noisy,
    )
    rows = rows_of(tmp_path / "noisy" / "robustness_pairs.csv")
    assert [r["case"] for r in rows] == ["body0", "head0"] and all(-1 <= float(r["cosine"]) < 1 for r in rows)


@pytest.mark.parametrize("method", ["tsne", "umap"])
def test_cluster_map(scans, embedded, tmp_path, method):
    cluster = importlib.import_module("ctfm_retrieval_scripts.cluster")
    labels = tmp_path / "labels.csv"
    labels.write_text(
        "case,label\n" + "".join(f"{c},{'head' if c.startswith('head') else 'body'}\n" for c in expected_cases(scans))
    )
    run = dict(embeddings_dir=str(embedded["emb"]), labels=str(labels), method=method)
    path = cluster.cluster_map(output_dir=str(tmp_path / "a"), **run)
    assert path.name == f"{method}.csv"
    rows = rows_of(path)
    assert {r["case"] for r in rows} >= set(expected_cases(scans))
    assert all(r["label"] in ("body", "head", "") for r in rows) and all(np.isfinite(float(r["x"])) for r in rows)
    assert (tmp_path / "a" / f"{method}.png").stat().st_size > 0
    # same seed, same map: a figure in a paper can be regenerated
    assert rows_of(cluster.cluster_map(output_dir=str(tmp_path / "b"), **run)) == rows


def test_cluster_map_rejects_unknown_method(embedded, tmp_path):
    cluster = importlib.import_module("ctfm_retrieval_scripts.cluster")
    with pytest.raises(ValueError, match="method must be one of.*'pca'"):
        cluster.cluster_map(embeddings_dir=str(embedded["emb"]), output_dir=str(tmp_path), method="pca")
    assert not list(tmp_path.iterdir())
