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
"""Test-retest robustness of embeddings: pairs of scans of one subject, or a scan and its perturbed copy.

Per pair: cosine similarity of the two embeddings and the retrieval rank of the partner (1 =
the retest is the test scan's nearest neighbour among all retest scans). Per embedding
dimension: ICC(2,1) (two-way random effects, absolute agreement, single measurement; Shrout &
Fleiss) over the pairs.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from .batch import run_each
from .ctfm_common.runtime import atomic_write_csv, atomic_write_text
from .embedding import ScanEmbedder, unique_case_names

logger = logging.getLogger("ctfm_retrieval.robustness")


def icc_2_1(measurements: np.ndarray) -> np.ndarray:
    """ICC(2,1) per column block: ``measurements`` [n subjects, k sessions, D] -> [D].

    ICC(2,1) = (MSR - MSE) / (MSR + (k - 1) MSE + k (MSC - MSE) / n), with the subject (rows),
    session (columns) and residual mean squares of a two-way ANOVA. Constant dimensions give NaN.
    """
    x = np.asarray(measurements, dtype=np.float64)
    if x.ndim == 2:
        x = x[..., None]
    n, k = x.shape[:2]
    if n < 2 or k < 2:
        raise ValueError(f"ICC needs at least 2 subjects and 2 sessions, got {n} x {k}")
    grand = x.mean(axis=(0, 1))
    ss_rows = k * ((x.mean(axis=1) - grand) ** 2).sum(0)
    ss_cols = n * ((x.mean(axis=0) - grand) ** 2).sum(0)
    ss_total = ((x - grand) ** 2).sum(axis=(0, 1))
    ss_error = ss_total - ss_rows - ss_cols
    msr, msc, mse = ss_rows / (n - 1), ss_cols / (k - 1), ss_error / ((n - 1) * (k - 1))
    denominator = msr + (k - 1) * mse + k * (msc - mse) / n
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (msr - mse) / denominator, np.nan)


def partner_ranks(test: np.ndarray, retest: np.ndarray) -> np.ndarray:
    """Rank (1 = best) of each test embedding's own retest among all retest embeddings, by cosine."""
    a = test / np.linalg.norm(test, axis=1, keepdims=True)
    b = retest / np.linalg.norm(retest, axis=1, keepdims=True)
    similarity = a @ b.T
    own = np.diag(similarity)
    return (similarity > own[:, None]).sum(1) + 1


def read_pairs(pairs: str) -> list[tuple[str, str]]:
    """``test,retest`` rows of a CSV (paths relative to the CSV's folder allowed)."""
    path = Path(pairs)
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if not {"test", "retest"} <= set(reader.fieldnames or ()):
            raise ValueError(f"{path}: a pairs CSV needs 'test' and 'retest' columns, found {reader.fieldnames}")
        rows = list(reader)
    resolve = lambda p: p if Path(p).is_absolute() else str(path.parent / p)  # noqa: E731
    return [(resolve(r["test"]), resolve(r["retest"])) for r in rows]


def analyse_test_retest(
    *,
    output_dir: str,
    preprocessing: Callable,
    embedder: ScanEmbedder,
    pairs: str = "",
    items: Sequence[dict] = (),
    perturbation: Callable | None = None,
) -> dict:
    """Embed each pair and write ``robustness_pairs.csv``, ``robustness_icc.csv`` and ``robustness_summary.json``.

    Args:
        output_dir: results folder.
        preprocessing: MONAI transform to the preprocessed ``image``.
        embedder: the :class:`~scripts.embedding.ScanEmbedder`.
        pairs: CSV of ``test,retest`` scan paths; empty: each of ``items`` against its perturbed copy.
        items: data dicts (``scripts.inputs.resolve_input``) when ``pairs`` is empty.
        perturbation: MONAI transform applied to the preprocessed dict to make the retest copy.

    A pair that cannot be read or embedded is named in the log and in ``robustness_errors.csv``;
    the other pairs go on.

    Returns:
        The summary.
    """
    if pairs:
        couples = read_pairs(pairs)
        names = unique_case_names([{"image": a} for a, _ in couples])
    else:
        if perturbation is None:
            raise ValueError("without a pairs CSV, a perturbation transform makes the retest scans")
        couples = [(str(i["image"]), str(i["image"])) for i in items]
        names = unique_case_names(items)
    if len(couples) < 2:
        raise ValueError(f"test-retest analysis needs at least 2 pairs, got {len(couples)}")

    def embed_pair(i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = couples[i]
        first = preprocessing({"image": a})
        second = perturbation(dict(first)) if not pairs else preprocessing({"image": b})
        return embedder(first["image"])["embedding"].numpy(), embedder(second["image"])["embedding"].numpy()

    out = Path(output_dir)
    done = run_each(
        [a for a, _ in couples], embed_pair, errors_file=out / "robustness_errors.csv", what="embed this pair"
    )
    if len(done) < 2:
        raise ValueError(f"test-retest analysis needs at least 2 pairs, only {len(done)} could be embedded")
    couples, names = [couples[i] for i, _ in done], [names[i] for i, _ in done]
    test, retest = np.stack([t for _, (t, _) in done]), np.stack([r for _, (_, r) in done])
    cosine = (test * retest).sum(1) / (np.linalg.norm(test, axis=1) * np.linalg.norm(retest, axis=1))
    ranks = partner_ranks(test, retest)
    icc = icc_2_1(np.stack([test, retest], axis=1))
    out.mkdir(parents=True, exist_ok=True)
    columns = ("case", "test", "retest", "cosine", "partner_rank")
    atomic_write_csv(out / "robustness_pairs.csv", [
        dict(zip(columns, (n, a, b if pairs else f"{a} (perturbed)", float(c), int(r))))
        for n, (a, b), c, r in zip(names, couples, cosine, ranks)
    ], columns, lineterminator="\n")
    atomic_write_text(out / "robustness_icc.csv", "dimension,icc\n" + "".join(f"{d},{v}\n" for d, v in enumerate(icc)))
    valid = icc[np.isfinite(icc)]
    summary = {
        "num_pairs": len(couples),
        "mean_cosine": float(cosine.mean()),
        "min_cosine": float(cosine.min()),
        "partner_top1_rate": float((ranks == 1).mean()),
        "mean_partner_rank": float(ranks.mean()),
        "median_icc": float(np.median(valid)) if valid.size else None,
        "share_icc_above_0.75": float((valid > 0.75).mean()) if valid.size else None,
        "pairs": "csv" if pairs else "perturbed copies",
    }
    atomic_write_text(out / "robustness_summary.json", json.dumps(summary, indent=2) + "\n")
    logger.info("test-retest: " + ", ".join(f"{k} {v:.3f}" for k, v in summary.items() if isinstance(v, float)))
    return summary
