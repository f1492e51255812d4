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
"""Does the encoder that ctfm_pretrain produces transfer better than a random one? In miniature.

For each seed: write a corpus of varied body and head phantoms (``phantom.make_varied_phantom``:
anatomy, habitus, noise, blur, spacing), plus any real CTs given with ``--datalist``; pretrain
with ``bundles/ctfm_pretrain`` (``monai.bundle run training``: the recipe's views and loss) from
a seeded random encoder for a fixed number of steps; then score every encoder, frozen, with the
same fixed probes on held-out phantoms never seen in pretraining:

* ``random``: the seeded random initialisation the pretraining started from;
* ``pretrained``: the encoder that pretraining exported;
* ``checkpoint`` (optional, ``--encoder_ckpt``): e.g. the public CT-FM feature extractor.

Probes (fixed before any result was looked at; nothing is tuned on the held-out cases):

* ``retrieval``: OrganMNIST3D in miniature. Cubes centred on labelled structures of held-out body
  phantoms, embedded with ``bundles/ctfm_retrieval`` ``embed.json``; the queries come from one half
  of the phantoms and the index from the other; precision@1, precision@5 and mAP@5 of
  same-structure retrieval (cosine similarity).
* ``linear_probe``: logistic regression (standardised features, C = 1) on the frozen embeddings of
  head phantoms, lesion vs no lesion, matched pairs (the same head with and without the lesion);
  AUC on held-out pairs with a bootstrap 95 % interval.
* ``segmentation``: ``bundles/ctfm_wholebody_seg`` ``train.json`` with the encoder frozen for every
  epoch (only the decoder learns) on 1 and on 4 labelled body phantoms (the same number of
  steps: the single case is repeated), mean Dice of 9 structures on held-out phantoms, scored
  once, after the last epoch.

Sizes come from ``SIZES`` (``--size tiny|cpu|gpu``); any setting can be overridden.

Usage::

    ctfm-bench-transfer --output_dir outputs/bench_transfer                 # CPU default
    ctfm-bench-transfer --size gpu --output_dir outputs/bench_transfer_gpu  # device run
    ctfm-bench-transfer --datalist data/idc/nifti/datalist.json             # + real CTs
    ctfm-bench-transfer --size gpu --encoder_ckpt project-lighter/ct_fm_feature_extractor

Writes ``<output_dir>/transfer.json`` (every figure, per seed and summarised, with timings and
the machine's load) and ``<output_dir>/transfer.png`` (bars per probe and encoder).
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ctfm_bundles.tools import REPO_ROOT
from ctfm_bundles.tools.demo import bundle_command
from ctfm_bundles.tools.synthetic import phantom
from ctfm_common.runtime import atomic_write, atomic_write_text

#: Sizes of a run (data only). ``cpu`` is the documented default (about 12 minutes a seed, 36 for
#: the default 3 seeds, on 2 CPU cores); ``small`` about a third of it (for a loaded machine);
#: ``tiny`` is the CI smoke test of the command; ``gpu`` is the device run: the contract's encoder
#: width (init_filters 32), the recipe's crops, spacing and learning rates. Pretraining keeps the
#: recipe's learning rate (1e-4, no warm-up at these step counts: 1e-3 collapsed the embeddings to
#: one point within a few steps, the loss stuck at log(candidates)); the decoder of the few-shot
#: probe uses 1e-3 at the miniature sizes (tens of steps instead of the recipe's 300 epochs).
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {
        "seeds": [0], "init_filters": 8, "spacing": [8.0, 8.0, 8.0],
        "body_shape": [40, 40, 24], "head_shape": [32, 32, 20],
        "pretrain_body": 2, "pretrain_head": 2, "pretrain_steps": 2, "pretrain_patch": [16, 16, 16],
        "num_crops": 2, "pretrain_batch": 2, "crop_scale": [0.33, 1.0], "pretrain_lr": 1e-4, "seg_lr": 1e-3,
        "retrieval_cases": 2, "crop_mm": 96.0, "embed_patch": [16, 16, 16],
        "probe_train_pairs": 3, "probe_test_pairs": 2,
        "seg_shots": [1], "seg_test_cases": 1, "seg_epochs": 1, "seg_patch": [16, 16, 16], "seg_batch": 2,
        "bootstrap": 50,
    },
    "cpu": {
        "seeds": [0, 1, 2], "init_filters": 8, "spacing": [5.0, 5.0, 5.0],
        "body_shape": [64, 64, 48], "head_shape": [48, 48, 32],
        "pretrain_body": 12, "pretrain_head": 12, "pretrain_steps": 60, "pretrain_patch": [32, 32, 32],
        "num_crops": 4, "pretrain_batch": 2, "crop_scale": [0.33, 1.0], "pretrain_lr": 1e-4, "seg_lr": 1e-3,
        "retrieval_cases": 8, "crop_mm": 100.0, "embed_patch": [32, 32, 32],
        "probe_train_pairs": 12, "probe_test_pairs": 8,
        "seg_shots": [1, 4], "seg_test_cases": 3, "seg_epochs": 8, "seg_patch": [32, 32, 32], "seg_batch": 2,
        "bootstrap": 1000,
    },
    "small": {
        "seeds": [0, 1, 2], "init_filters": 8, "spacing": [6.0, 6.0, 6.0],
        "body_shape": [56, 56, 40], "head_shape": [40, 40, 28],
        "pretrain_body": 8, "pretrain_head": 8, "pretrain_steps": 30, "pretrain_patch": [24, 24, 24],
        "num_crops": 4, "pretrain_batch": 1, "crop_scale": [0.33, 1.0], "pretrain_lr": 1e-4, "seg_lr": 1e-3,
        "retrieval_cases": 6, "crop_mm": 100.0, "embed_patch": [24, 24, 24],
        "probe_train_pairs": 8, "probe_test_pairs": 6,
        "seg_shots": [1, 4], "seg_test_cases": 2, "seg_epochs": 5, "seg_patch": [32, 32, 32], "seg_batch": 2,
        "bootstrap": 1000,
    },
    "gpu": {
        "seeds": [0, 1, 2], "init_filters": 32, "spacing": [3.0, 1.0, 1.0],
        "body_shape": [256, 256, 120], "head_shape": [192, 192, 48],
        "pretrain_body": 48, "pretrain_head": 48, "pretrain_steps": 1000, "pretrain_patch": [32, 128, 128],
        "num_crops": 15, "pretrain_batch": 4, "crop_scale": [0.33, 1.0], "pretrain_lr": 1e-4, "seg_lr": 2e-4,
        "retrieval_cases": 16, "crop_mm": 100.0, "embed_patch": [24, 128, 128],
        "probe_train_pairs": 32, "probe_test_pairs": 16,
        "seg_shots": [1, 4], "seg_test_cases": 6, "seg_epochs": 40, "seg_patch": [32, 128, 128], "seg_batch": 2,
        "bootstrap": 1000,
    },
}

ENCODERS = ("random", "pretrained", "checkpoint")

#: Structures of the retrieval and segmentation probes (body phantom names) and, for
#: segmentation, the class index each becomes (soft tissue, fat and ribs are background).
STRUCTURES: tuple[str, ...] = ("lung_left", "lung_right", "heart", "liver", "spleen", "kidney_left",
                               "kidney_right", "vertebrae", "aorta")

#: Roles of the per-seed phantom streams (so that no held-out case is ever a pretraining case).
_ROLES = {"pretrain_body": 0, "pretrain_head": 1, "retrieval": 2, "probe": 3, "seg_train": 4, "seg_test": 5}

#: The embedding probes' metrics, in report and chart order: (probe, metric, label); the
#: segmentation metrics follow, one per number of labelled cases (``metrics_for``).
EMBEDDING_METRICS: tuple[tuple[str, str, str], ...] = (
    ("retrieval", "precision_at_1", "retrieval P@1"),
    ("retrieval", "precision_at_5", "retrieval P@5"),
    ("retrieval", "map_at_5", "retrieval mAP@5"),
    ("linear_probe", "auc", "lesion probe AUC"),
)


def metrics_for(seg_shots: Sequence[int]) -> tuple[tuple[str, str, str], ...]:
    """Every metric of a run with these few-shot segmentation sizes: (probe, metric, label)."""
    return EMBEDDING_METRICS + tuple(("segmentation", f"dice_{n}_shot", f"seg Dice, {n} case{'s' * (n > 1)}")
                                     for n in seg_shots)


# ---------------------------------------------------------------------------------------
# Metrics (pure functions).
# ---------------------------------------------------------------------------------------


def retrieval_metrics(query: np.ndarray, query_labels: Sequence[str], index: np.ndarray,
                      index_labels: Sequence[str], k: int = 5) -> dict[str, float]:
    """Same-label retrieval by cosine similarity: precision@1, precision@k and mAP@k.

    AP@k of a query is ``sum_{r<=k} P@r * rel_r / min(k, relevant)``, with ``relevant`` the
    index items of its label; the means are over queries.

    Args:
        query: ``(Q, D)`` query embeddings.
        query_labels: their labels.
        index: ``(N, D)`` index embeddings.
        index_labels: their labels.
        k: cut-off (at most ``N``).

    Returns:
        ``{"precision_at_1", "precision_at_<k>", "map_at_<k>", "num_queries", "num_index"}``.
    """
    query, index = np.asarray(query, np.float64), np.asarray(index, np.float64)
    if len(query) == 0 or len(index) < k:
        raise ValueError(f"retrieval needs at least one query and {k} index items, got {len(query)} and {len(index)}")
    query = query / np.maximum(np.linalg.norm(query, axis=1, keepdims=True), 1e-12)
    index = index / np.maximum(np.linalg.norm(index, axis=1, keepdims=True), 1e-12)
    order = np.argsort(-(query @ index.T), axis=1, kind="stable")[:, :k]
    index_labels = np.asarray(index_labels)
    relevant = index_labels[order] == np.asarray(query_labels)[:, None]
    totals = np.array([(index_labels == q).sum() for q in query_labels])
    precision_at = np.cumsum(relevant, axis=1) / np.arange(1, k + 1)
    ap = (precision_at * relevant).sum(axis=1) / np.maximum(np.minimum(totals, k), 1)
    return {"precision_at_1": float(relevant[:, 0].mean()), f"precision_at_{k}": float(relevant.mean()),
            f"map_at_{k}": float(ap.mean()), "num_queries": int(len(query)), "num_index": int(len(index))}


def roc_auc(labels: Sequence[int], scores: Sequence[float]) -> float:
    """Area under the ROC curve (Mann-Whitney, ties count half); NaN when one class is absent."""
    labels, scores = np.asarray(labels, bool), np.asarray(scores, np.float64)
    positive, negative = scores[labels], scores[~labels]
    if len(positive) == 0 or len(negative) == 0:
        return math.nan
    greater = (positive[:, None] > negative[None, :]).sum() + 0.5 * (positive[:, None] == negative[None, :]).sum()
    return float(greater / (len(positive) * len(negative)))


def bootstrap_auc(labels: Sequence[int], scores: Sequence[float], *, resamples: int = 1000,
                  seed: int = 0) -> dict[str, float]:
    """AUC with a percentile bootstrap 95 % interval (resampling cases; one-class resamples skipped)."""
    labels, scores = np.asarray(labels, int), np.asarray(scores, np.float64)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        pick = rng.integers(0, len(labels), len(labels))
        value = roc_auc(labels[pick], scores[pick])
        if not math.isnan(value):
            values.append(value)
    low, high = (np.percentile(values, [2.5, 97.5]) if values else (math.nan, math.nan))
    return {"auc": roc_auc(labels, scores), "ci_low": float(low), "ci_high": float(high),
            "resamples": len(values)}


def linear_probe(train: np.ndarray, train_labels: Sequence[int], test: np.ndarray,
                 test_labels: Sequence[int], *, resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Logistic regression on frozen embeddings (standardised on the training set, C = 1, fixed).

    Returns:
        ``bootstrap_auc`` of the test scores, plus the train and test sizes.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=5000))
    model.fit(np.asarray(train, np.float64), np.asarray(train_labels, int))
    scores = model.predict_proba(np.asarray(test, np.float64))[:, 1]
    return {**bootstrap_auc(test_labels, scores, resamples=resamples, seed=seed),
            "num_train": int(len(train)), "num_test": int(len(test))}


def summarise(per_seed: Sequence[Mapping[str, Any]], encoders: Sequence[str],
              metrics: Sequence[tuple[str, str, str]]) -> dict[str, Any]:
    """Mean, standard deviation (ddof 1 when more than one seed), min and max over seeds per metric."""
    summary: dict[str, Any] = {}
    for encoder in encoders:
        summary[encoder] = {}
        for probe, metric, _ in metrics:
            values = [run["results"][encoder][probe][metric] for run in per_seed]
            finite = [v for v in values if v is not None and math.isfinite(v)]
            summary[encoder][metric] = {
                "mean": float(np.mean(finite)) if finite else math.nan,
                "std": float(np.std(finite, ddof=1)) if len(finite) > 1 else 0.0,
                "min": float(min(finite)) if finite else math.nan,
                "max": float(max(finite)) if finite else math.nan,
                "values": values,
            }
    return summary


def verdict(summary: Mapping[str, Any], num_seeds: int, metrics: Sequence[tuple[str, str, str]]) -> dict[str, Any]:
    """Plain statement of whether pretraining helped: per metric, pretrained minus random, and
    whether the gain exceeds the seed spread (the larger of the two standard deviations)."""
    gains = {}
    for _, metric, label in metrics:
        p, r = summary["pretrained"][metric], summary["random"][metric]
        diff = p["mean"] - r["mean"]
        spread = max(p["std"], r["std"])
        beats = bool(math.isfinite(diff) and diff > 0 and (num_seeds > 1 and diff > spread))
        gains[metric] = {"label": label, "difference": diff, "spread": spread, "pretrained_better_beyond_spread": beats,
                         "pretrained_better_every_seed": bool(all(
                             a is not None and b is not None and a > b for a, b in zip(p["values"], r["values"])))}
    helped = [g["label"] for g in gains.values() if g["pretrained_better_beyond_spread"]]
    hurt = [g["label"] for g in gains.values() if num_seeds > 1
            and math.isfinite(g["difference"]) and g["difference"] < 0 and -g["difference"] > g["spread"]]
    if num_seeds < 2:
        text = "One seed only: no spread to judge a difference against, so no verdict (run three seeds)."
    elif len(helped) == len(gains):
        text = "Pretraining helped on every probe, by more than the seed spread."
    elif helped:
        text = (f"Pretraining helped on {len(helped)} of {len(gains)} metrics by more than the seed spread "
                f"({', '.join(helped)}); on the others it did not.")
    else:
        text = "Pretraining did NOT help: on no metric does the pretrained encoder beat random initialisation by more than the seed spread."
    if hurt:
        text += f" It was worse than random, beyond the spread, on: {', '.join(hurt)}."
    if num_seeds > 1 and len(helped) < len(gains):
        text += (" Possible reasons: a pretraining budget of minutes instead of GPU-days on a handful of phantoms "
                 "instead of 148k CTs; phantoms are piecewise-constant ellipsoids whose crops a random convolutional "
                 "encoder already tells apart by intensity alone; a tiny encoder (init_filters 8) on coarse grids; "
                 "and probes this small have wide confidence intervals.")
    return {"text": text, "metrics": gains}


# ---------------------------------------------------------------------------------------
# Data.
# ---------------------------------------------------------------------------------------


def _case_seed(seed: int, role: str, index: int) -> int:
    return int(np.random.SeedSequence([seed, _ROLES[role], index]).generate_state(1)[0] % (2**31 - 1))


def _write_varied(path: Path, kind: str, shape: Sequence[int], seed: int, lesion: bool = False) -> tuple[np.ndarray, np.ndarray]:
    image, labels, affine, _ = phantom.make_varied_phantom(kind=kind, shape=shape, seed=seed, lesion=lesion)
    phantom.save_phantom(image, labels, affine, image_path=path, label_path=phantom.default_label_path(path))
    return labels, affine


def structure_crops(labels: np.ndarray, affine: np.ndarray, crop_mm: float) -> dict[str, tuple[slice, slice, slice]]:
    """Voxel boxes of about ``crop_mm`` per side centred on each present structure's centroid
    (shifted to stay inside the volume)."""
    boxes = {}
    spacing = np.abs(np.diag(affine)[:3])
    for name in STRUCTURES:
        voxels = np.argwhere(labels == phantom.BODY_LABELS[name])
        if len(voxels) == 0:
            continue
        centre = voxels.mean(axis=0)
        box = []
        for axis, n in enumerate(labels.shape):
            size = min(n, max(phantom.MIN_SIZE, int(round(crop_mm / spacing[axis]))))
            start = int(round(centre[axis] - size / 2))
            start = min(max(start, 0), n - size)
            box.append(slice(start, start + size))
        boxes[name] = tuple(box)
    return boxes


def prepare_seed_data(root: Path, seed: int, size: Mapping[str, Any], datalist: str | None) -> dict[str, Any]:
    """Write one seed's phantoms: pretraining corpus, retrieval crops, probe heads, seg cases."""
    import nibabel as nib

    body_shape, head_shape = size["body_shape"], size["head_shape"]
    corpus = []
    for kind in ("body", "head"):
        for i in range(size[f"pretrain_{kind}"]):
            path = root / "pretrain" / f"{kind}_{i:03d}.nii.gz"
            _write_varied(path, kind, body_shape if kind == "body" else head_shape, _case_seed(seed, f"pretrain_{kind}", i),
                          lesion=kind == "head" and i % 2 == 1)
            corpus.append({"image": str(path)})
    if datalist:
        from monai.data import load_decathlon_datalist

        corpus += [{"image": item["image"]} for item in load_decathlon_datalist(datalist, data_list_key="training")]
    (root / "pretrain.json").write_text(json.dumps({"training": corpus}, indent=2))

    # Retrieval: structure cubes of held-out body phantoms; first half of the phantoms = queries.
    crops = []
    for i in range(size["retrieval_cases"]):
        path = root / "retrieval" / f"body_{i:03d}.nii.gz"
        image, labels, affine, _ = phantom.make_varied_phantom(kind="body", shape=body_shape,
                                                               seed=_case_seed(seed, "retrieval", i))
        for name, box in structure_crops(labels, affine, size["crop_mm"]).items():
            crop_affine = affine.copy()
            crop_affine[:3, 3] = affine[:3, :3] @ np.array([b.start for b in box]) + affine[:3, 3]
            crop_path = path.parent / f"body_{i:03d}_{name}.nii.gz"
            crop_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(crop_path, lambda tmp, im=image[box], af=crop_affine: nib.save(nib.Nifti1Image(im, af), tmp))
            split = "query" if i < size["retrieval_cases"] // 2 else "index"
            crops.append({"image": str(crop_path), "label": name, "split": split, "probe": "retrieval"})

    # Linear probe: matched head pairs (the same head with and without a lesion).
    heads = []
    for i in range(size["probe_train_pairs"] + size["probe_test_pairs"]):
        split = "train" if i < size["probe_train_pairs"] else "test"
        for lesion in (False, True):
            path = root / "probe" / f"head_{i:03d}_{'lesion' if lesion else 'clean'}.nii.gz"
            _write_varied(path, "head", head_shape, _case_seed(seed, "probe", i), lesion=lesion)
            heads.append({"image": str(path), "label": int(lesion), "split": split, "probe": "linear_probe"})
    embed_items = crops + heads
    (root / "embed.json").write_text(json.dumps({"testing": embed_items}, indent=2))

    # Few-shot segmentation: 4 labelled training phantoms, held-out test phantoms.
    seg_train, seg_test = [], []
    num_train = max(int(n) for n in size["seg_shots"])
    for role, count, items in (("seg_train", num_train, seg_train), ("seg_test", size["seg_test_cases"], seg_test)):
        for i in range(count):
            path = root / role / f"body_{i:03d}.nii.gz"
            _write_varied(path, "body", body_shape, _case_seed(seed, role, i))
            items.append({"image": str(path), "label": phantom.default_label_path(path)})
    seg_datalists = {}
    for shots in size["seg_shots"]:
        if not 1 <= int(shots) <= 4:
            raise ValueError(f"seg_shots must be between 1 and 4 labelled cases, got {shots}")
        shots = int(shots)
        # The same number of steps for both: one case repeated four times, or four cases.
        training = [seg_train[i % shots] for i in range(4)]
        path = root / f"seg_{shots}_shot.json"
        path.write_text(json.dumps({"training": training, "validation": seg_test}, indent=2))
        seg_datalists[shots] = path
    return {"corpus": root / "pretrain.json", "embed": root / "embed.json", "embed_items": embed_items,
            "seg": seg_datalists, "num_corpus": len(corpus)}


# ---------------------------------------------------------------------------------------
# Bundle runs.
# ---------------------------------------------------------------------------------------


def run_bundle(command: list[str], log: Path) -> float:
    """Run one ``monai.bundle`` command, output to ``log``; raise with the log's tail on failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        f.write(" ".join(command) + "\n\n")
        f.flush()
        proc = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                              env=dict(os.environ, PYTHONUNBUFFERED="1"))
    if proc.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise RuntimeError(f"{command[3:6]} failed (exit {proc.returncode}); log {log}\n{tail}")
    return time.perf_counter() - start


def random_encoder(path: Path, seed: int, init_filters: int) -> Path:
    """The seeded random initialisation (the pretraining network's layout), saved as an encoder file."""
    import torch

    from ctfm_common.encoder import PooledEncoderHead, save_encoder_weights

    torch.manual_seed(seed)
    network = PooledEncoderHead(init_filters=init_filters, in_channels=1, hidden_features=256, out_features=128)
    return save_encoder_weights(network, path, metadata={"init_filters": str(init_filters), "source": f"random seed {seed}"})


def pretrain(out: Path, corpus: Path, init: Path, seed: int, size: Mapping[str, Any]) -> tuple[Path, float]:
    """Pretrain with ``bundles/ctfm_pretrain`` from ``init``; returns the exported encoder and seconds."""
    steps = int(size["pretrain_steps"])
    command = bundle_command(
        "ctfm_pretrain", "train.json", "training", dataset_dir=str(corpus.parent), datalist=str(corpus),
        output_dir=str(out), ckpt_dir=str(out / "models"), encoder_ckpt=str(init), seed=seed,
        init_filters=size["init_filters"], spacing=size["spacing"], patch_size=size["pretrain_patch"],
        num_crops=size["num_crops"], crop_scale=size["crop_scale"], batch_size=size["pretrain_batch"], max_epochs=1,
        epoch_length=steps, warmup_epochs=0, learning_rate=size["pretrain_lr"], checkpoint_interval=steps, log_interval=max(1, steps // 10),
        num_workers=0, resume=False)
    seconds = run_bundle(command, out / "pretrain.log")
    encoder = out / "models" / "encoder.safetensors"
    if not encoder.is_file():
        raise RuntimeError(f"pretraining finished without writing {encoder}; log {out / 'pretrain.log'}")
    return encoder, seconds


def embed(out: Path, items_json: Path, items: Sequence[Mapping], encoder: str, size: Mapping[str, Any]) -> tuple[dict, float]:
    """Embed every probe item with ``bundles/ctfm_retrieval`` ``embed.json``; ``{source: vector}``."""
    import csv

    from safetensors import safe_open

    command = bundle_command(
        "ctfm_retrieval", "embed.json", "run", input=str(items_json), encoder_ckpt=encoder, output_dir=str(out),
        init_filters=size["init_filters"], spacing=size["spacing"], patch_size=size["embed_patch"], overlap=0,
        num_workers=0)
    seconds = run_bundle(command, out / "embed.log")
    vectors = {}
    with open(out / "embeddings" / "index.csv", newline="") as f:
        for row in csv.DictReader(f):
            with safe_open(str(out / "embeddings" / row["file"]), framework="np") as g:
                vectors[row["source"]] = g.get_tensor("embedding").astype(np.float64)
    missing = [item["image"] for item in items if item["image"] not in vectors]
    if missing:
        raise RuntimeError(f"embedding wrote no vector for {len(missing)} items, e.g. {missing[0]}; log {out / 'embed.log'}")
    return vectors, seconds


def seg_label_map() -> dict[str, int]:
    """Body phantom label -> class index of the segmentation probe (1..9, in ``STRUCTURES`` order)."""
    return {str(phantom.BODY_LABELS[name]): i + 1 for i, name in enumerate(STRUCTURES)}


def read_scalar(event_dir: Path, tag: str) -> float:
    """The last value of a TensorBoard scalar (the seg bundle logs ``val_mean_dice`` there)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = []
    for events in sorted(event_dir.rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        if tag in accumulator.Tags().get("scalars", []):
            values += [(e.wall_time, e.step, e.value) for e in accumulator.Scalars(tag)]
    if not values:
        raise RuntimeError(f"no '{tag}' scalar under {event_dir}")
    return float(max(values)[2])


def few_shot_seg(out: Path, datalist: Path, encoder: str, seed: int, size: Mapping[str, Any]) -> tuple[float, float]:
    """Train the seg bundle's decoder on a frozen encoder; Dice on the held-out cases after the last epoch."""
    epochs = int(size["seg_epochs"])
    command = bundle_command(
        "ctfm_wholebody_seg", "train.json", "training", dataset_dir=str(datalist.parent), datalist=str(datalist),
        encoder_ckpt=encoder, output_dir=str(out), ckpt_dir=str(out / "models"), tensorboard_dir=str(out / "tensorboard"),
        label_map=seg_label_map(), init_filters=size["init_filters"], spacing=size["spacing"],
        patch_size=size["seg_patch"], learning_rate=size["seg_lr"], max_epochs=epochs, val_interval=epochs, freeze_encoder_epochs=epochs,
        batch_size=size["seg_batch"], num_samples=1, num_workers=0, cache_rate=1.0, sw_batch_size=2, train_dice=False,
        seed=seed, resume=False)
    seconds = run_bundle(command, out / "train.log")
    return read_scalar(out / "tensorboard", "val_mean_dice"), seconds


# ---------------------------------------------------------------------------------------
# The benchmark.
# ---------------------------------------------------------------------------------------


def probe_results(vectors: Mapping[str, np.ndarray], items: Sequence[Mapping], size: Mapping[str, Any], seed: int) -> dict:
    """Retrieval and linear-probe figures of one encoder's embeddings."""
    def pick(probe: str, split: str) -> tuple[np.ndarray, list]:
        chosen = [i for i in items if i["probe"] == probe and i["split"] == split]
        return np.stack([vectors[i["image"]] for i in chosen]), [i["label"] for i in chosen]

    query, query_labels = pick("retrieval", "query")
    index, index_labels = pick("retrieval", "index")
    train, train_labels = pick("linear_probe", "train")
    test, test_labels = pick("linear_probe", "test")
    return {"retrieval": retrieval_metrics(query, query_labels, index, index_labels, k=5),
            "linear_probe": linear_probe(train, train_labels, test, test_labels, resamples=size["bootstrap"], seed=seed)}


def run_seed(out: Path, seed: int, size: Mapping[str, Any], datalist: str | None, encoder_ckpt: str | None) -> dict:
    """One seed: data, pretraining, then every probe for every encoder."""
    timings: dict[str, float] = {}
    start = time.perf_counter()
    data = prepare_seed_data(out / "data", seed, size, datalist)
    timings["data"] = time.perf_counter() - start
    encoders = {"random": str(random_encoder(out / "random" / "encoder.safetensors", seed, size["init_filters"]))}
    pretrained, timings["pretrain"] = pretrain(out / "pretrain", data["corpus"], Path(encoders["random"]), seed, size)
    encoders["pretrained"] = str(pretrained)
    if encoder_ckpt:
        encoders["checkpoint"] = encoder_ckpt
    results = {}
    for name, source in encoders.items():
        print(f"[transfer] seed {seed}: probing the {name} encoder", flush=True)
        vectors, timings[f"{name}_embed"] = embed(out / name / "embed", data["embed"], data["embed_items"], source, size)
        start = time.perf_counter()
        results[name] = probe_results(vectors, data["embed_items"], size, seed)
        timings[f"{name}_probes"] = time.perf_counter() - start
        seg = {}
        for shots in size["seg_shots"]:
            seg_datalist = data["seg"][int(shots)]
            seg[f"dice_{shots}_shot"], timings[f"{name}_seg_{shots}_shot"] = few_shot_seg(
                out / name / f"seg_{shots}_shot", seg_datalist, source, seed, size)
        results[name]["segmentation"] = seg
    return {"seed": seed, "encoders": encoders, "num_pretrain_scans": data["num_corpus"], "results": results,
            "seconds": {k: round(v, 2) for k, v in timings.items()}}


def plot(report: Mapping[str, Any], path: Path) -> None:
    """Bars per probe metric and encoder: mean over seeds, error bar = standard deviation, dots = seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    encoders = list(report["summary"])
    metrics = metrics_for(report["settings"]["seg_shots"])
    fig, axes = plt.subplots(1, len(metrics), figsize=(2.3 * len(metrics), 3.4), sharey=True, squeeze=False)
    axes = axes[0]
    colours = {"random": "tab:gray", "pretrained": "tab:blue", "checkpoint": "tab:green"}
    for ax, (_, metric, label) in zip(axes, metrics):
        for x, encoder in enumerate(encoders):
            entry = report["summary"][encoder][metric]
            ax.bar(x, entry["mean"], yerr=entry["std"], color=colours.get(encoder, "tab:orange"), capsize=3)
            values = [v for v in entry["values"] if v is not None]
            ax.plot([x] * len(values), values, "k.", markersize=4)
        ax.set_xticks(range(len(encoders)), encoders, rotation=30, fontsize=8)
        ax.set_title(label, fontsize=9)
        ax.set_ylim(0, 1)
    axes[0].set_ylabel(f"mean +- sd over {len(report['seeds'])} seed(s)")
    fig.suptitle(f"Frozen encoders, random vs pretrained ({report['size']} size)", fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def bench_transfer(
    *,
    output_dir: str = "outputs/bench_transfer",
    size: str = "cpu",
    seeds: Sequence[int] | None = None,
    datalist: str | None = None,
    encoder_ckpt: str | None = None,
    keep_data: bool = False,
    **overrides: Any,
) -> dict[str, Any]:
    """Run the transfer benchmark and write ``transfer.json`` and ``transfer.png``.

    Args:
        output_dir: where everything goes (created; the per-seed work folders are removed at the
            end unless ``keep_data``).
        size: ``"tiny"``, ``"cpu"`` (default) or ``"gpu"``: a row of ``SIZES``.
        seeds: seeds to repeat over (default: the size's, three).
        datalist: decathlon datalist of real CTs (``training`` list) added to the pretraining corpus.
        encoder_ckpt: a third encoder to score (file, hub folder or hub repo id); its width must be
            the size's ``init_filters`` (32 for the public CT-FM weights: use ``--size gpu`` or
            ``--init_filters 32``).
        keep_data: keep the phantoms, checkpoints and logs.
        **overrides: any ``SIZES`` setting, e.g. ``pretrain_steps=200``.

    Returns:
        The report (also in ``transfer.json``).
    """
    if size not in SIZES:
        raise ValueError(f"size must be one of {tuple(SIZES)}, got {size!r}")
    unknown = sorted(set(overrides) - set(SIZES[size]))
    if unknown:
        raise ValueError(f"unknown settings {unknown}; known: {sorted(SIZES[size])}")
    settings = {**SIZES[size], **overrides}
    if seeds is not None:
        settings["seeds"] = [int(s) for s in ([seeds] if isinstance(seeds, int) else seeds)]
    if datalist and not Path(datalist).is_file():
        raise FileNotFoundError(f"datalist not found: {datalist}")
    out = Path(output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()
    start = time.perf_counter()
    per_seed = []
    for seed in settings["seeds"]:
        print(f"[transfer] seed {seed} ({size} size)", flush=True)
        per_seed.append(run_seed(out / f"seed{seed}", seed, settings, datalist, encoder_ckpt))
        # the report so far after every seed: a long run that is stopped keeps its finished seeds
        report = make_report(per_seed, settings, size, datalist, encoder_ckpt, load_start, time.perf_counter() - start)
        atomic_write_text(out / "transfer.json", json.dumps(report, indent=2) + "\n")
        plot(report, out / "transfer.png")
    if not keep_data:
        for seed in settings["seeds"]:
            shutil.rmtree(out / f"seed{seed}", ignore_errors=True)
    summary, metrics = report["summary"], metrics_for(settings["seg_shots"])
    print(f"[transfer] {report['verdict']['text']}")
    for encoder in summary:
        figures = ", ".join(f"{label} {summary[encoder][m]['mean']:.3f}+-{summary[encoder][m]['std']:.3f}"
                            for _, m, label in metrics)
        print(f"[transfer] {encoder}: {figures}")
    print(f"[transfer] {report['seconds']['total']:.0f} s; report {out / 'transfer.json'}, chart {out / 'transfer.png'}")
    return report


def make_report(per_seed: Sequence[Mapping[str, Any]], settings: Mapping[str, Any], size: str, datalist: str | None,
                encoder_ckpt: str | None, load_start: Sequence[float], seconds: float) -> dict[str, Any]:
    """The report of the seeds run so far: settings, summary, verdict, per-seed figures, timings, machine."""
    import torch

    encoders = [e for e in ENCODERS if e in per_seed[0]["results"]]
    metrics = metrics_for(settings["seg_shots"])
    summary = summarise(per_seed, encoders, metrics)
    return {
        "size": size,
        "settings": dict(settings),
        "seeds": [run["seed"] for run in per_seed],
        "seeds_planned": list(settings["seeds"]),
        "datalist": datalist,
        "encoder_ckpt": encoder_ckpt,
        "protocol": {
            "retrieval": "structure cubes of held-out body phantoms, query half vs index half, cosine, P@1/P@5/mAP@5",
            "linear_probe": "logistic regression C=1 on standardised frozen embeddings, lesion vs none, matched head pairs, AUC + bootstrap 95% CI",
            "segmentation": "seg bundle decoder trained on a frozen encoder, on each of seg_shots labelled phantoms (same steps), mean Dice of 9 structures on held-out phantoms after the last epoch",
        },
        "summary": summary,
        "verdict": verdict(summary, len(per_seed), metrics),
        "per_seed": per_seed,
        "seconds": {
            "total": round(seconds, 1),
            "by_part": {part: round(sum(run["seconds"][part] for run in per_seed), 1) for part in per_seed[0]["seconds"]},
        },
        "machine": {
            "platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "load_average_start": [round(v, 2) for v in load_start],
            "load_average_end": [round(v, 2) for v in os.getloadavg()],
        },
    }


def cli() -> None:
    """The console command (``[project.scripts]`` of pyproject.toml)."""
    import fire

    fire.Fire(bench_transfer, serialize=lambda _: None)


if __name__ == "__main__":
    cli()
