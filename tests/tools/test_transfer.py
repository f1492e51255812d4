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
"""tools/bench/transfer.py: the probes' metrics against hand-computed values, the varied
phantoms, and a smoke run of the whole command at its tiny size (the report's structure,
never the gain)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from ctfm_bundles.tools.bench import transfer as bench_transfer
from ctfm_bundles.tools.synthetic import phantom


def test_retrieval_metrics_match_hand_computed_values():
    # 2 queries; index: a, a, b, b, c, c on the unit circle's axes
    index = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9], [-1, 0], [-0.9, -0.1]])
    labels = ["a", "a", "b", "b", "c", "c"]
    query = np.array([[1, 0.05], [0.05, -1]])  # the second is nearest to nothing of its own class "b"
    m = bench_transfer.retrieval_metrics(query, ["a", "b"], index, labels, k=5)
    # query 1 ranks a, a first: P@1 1, P@5 2/5, AP@5 = (1 + 1) / 2 = 1
    # query 2 (0.05, -1): similarities a .05/.14, b -1/-.9, c -.05/.0: order a(1), a(0)?, ...
    sims = query[1] @ (index / np.linalg.norm(index, axis=1, keepdims=True)).T
    order = np.argsort(-sims, kind="stable")[:5]
    rel = [labels[i] == "b" for i in order]
    ap2 = sum(sum(rel[: r + 1]) / (r + 1) for r in range(5) if rel[r]) / 2
    assert m["precision_at_1"] == pytest.approx((1 + rel[0]) / 2)
    assert m["precision_at_5"] == pytest.approx((2 / 5 + sum(rel) / 5) / 2)
    assert m["map_at_5"] == pytest.approx((1 + ap2) / 2)
    assert (m["num_queries"], m["num_index"]) == (2, 6)
    with pytest.raises(ValueError, match="index items"):
        bench_transfer.retrieval_metrics(query, ["a", "b"], index[:3], labels[:3], k=5)


def test_auc_and_bootstrap_interval():
    assert bench_transfer.roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert bench_transfer.roc_auc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)
    assert math.isnan(bench_transfer.roc_auc([1, 1], [0.2, 0.3]))
    result = bench_transfer.bootstrap_auc([0, 0, 0, 1, 1, 1], [0.1, 0.2, 0.6, 0.5, 0.8, 0.9], resamples=200)
    assert result["auc"] == pytest.approx(8 / 9)
    assert 0.0 <= result["ci_low"] <= result["auc"] <= result["ci_high"] <= 1.0
    assert 0 < result["resamples"] <= 200


def test_verdict_says_plainly_when_pretraining_does_not_help():
    metrics = bench_transfer.metrics_for([1])
    flat = {m: {"mean": 0.5, "std": 0.05, "values": [0.45, 0.5, 0.55]} for _, m, _ in metrics}
    worse = {m: {"mean": 0.3, "std": 0.01, "values": [0.29, 0.3, 0.31]} for _, m, _ in metrics}
    text = bench_transfer.verdict({"random": flat, "pretrained": worse}, 3, metrics)["text"]
    assert text.startswith("Pretraining did NOT help") and "worse than random" in text and "Possible reasons" in text
    better = {m: {"mean": 0.9, "std": 0.01, "values": [0.89, 0.9, 0.91]} for _, m, _ in metrics}
    assert bench_transfer.verdict({"random": flat, "pretrained": better}, 3, metrics)["text"].startswith(
        "Pretraining helped on every probe")
    assert "no verdict" in bench_transfer.verdict({"random": flat, "pretrained": better}, 1, metrics)["text"]


def test_varied_phantoms_vary_and_keep_matched_pairs():
    drawn = [phantom.make_varied_phantom(kind="body", shape=(32, 32, 24), seed=s)[3] for s in range(3)]
    assert len({d["spacing"] for d in drawn}) == 3 and len({d["noise_hu"] for d in drawn}) == 3
    image, labels, affine, d = phantom.make_varied_phantom(kind="body", shape=(32, 32, 24), seed=0)
    assert image.shape == labels.shape == (32, 32, 24) and image.dtype == np.int16
    assert np.allclose(np.diag(affine)[:3], d["spacing"])
    assert set(np.unique(labels)) >= {phantom.BODY_LABELS[n] for n in ("liver", "spleen", "heart")}
    with_lesion = phantom.make_varied_phantom(kind="head", shape=(32, 32, 20), seed=4, lesion=True)
    without = phantom.make_varied_phantom(kind="head", shape=(32, 32, 20), seed=4)
    lesion = with_lesion[1] == phantom.HEAD_LABELS["lesion"]
    assert lesion.any() and np.array_equal(with_lesion[0][~lesion], without[0][~lesion])
    # the existing phantom functions are unchanged by the addition
    reference, _, _ = phantom.make_body_phantom(shape=(32, 32, 24), spacing=(12.0, 10.0, 16.0), seed=3)
    again, _, _ = phantom.make_body_phantom(shape=(32, 32, 24), spacing=(12.0, 10.0, 16.0), seed=3)
    assert np.array_equal(reference, again)


def test_bench_transfer_tiny_run_writes_the_report(tmp_path):
    report = bench_transfer.bench_transfer(output_dir=str(tmp_path / "out"), size="tiny")
    written = json.loads((tmp_path / "out" / "transfer.json").read_text())
    assert (tmp_path / "out" / "transfer.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert written["seeds"] == [0] and written["size"] == "tiny"
    assert set(written["summary"]) == {"random", "pretrained"}
    for encoder in ("random", "pretrained"):
        for _, metric, _ in bench_transfer.metrics_for([1]):
            entry = written["summary"][encoder][metric]
            assert set(entry) == {"mean", "std", "min", "max", "values"} and len(entry["values"]) == 1
            assert 0.0 <= entry["mean"] <= 1.0 or math.isnan(entry["mean"])
        probe = written["per_seed"][0]["results"][encoder]["linear_probe"]
        assert {"auc", "ci_low", "ci_high", "num_train", "num_test"} <= set(probe)
    seconds = written["per_seed"][0]["seconds"]
    assert {"data", "pretrain", "random_embed", "pretrained_embed", "random_seg_1_shot"} <= set(seconds)
    assert written["verdict"]["text"] and len(written["machine"]["load_average_start"]) == 3
    assert report["verdict"] == written["verdict"]
    assert not (tmp_path / "out" / "seed0").exists()  # work folders removed


def test_bench_transfer_rejects_unknown_settings(tmp_path):
    with pytest.raises(ValueError, match="unknown settings"):
        bench_transfer.bench_transfer(output_dir=str(tmp_path), size="tiny", pretrain_stepz=3)
    with pytest.raises(ValueError, match="size must be one of"):
        bench_transfer.bench_transfer(output_dir=str(tmp_path), size="huge")
