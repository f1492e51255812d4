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
"""Triage metrics as pure functions of labels and probabilities (NumPy only, no file I/O).

Definitions follow scikit-learn: AUC is the area under the ROC curve (ties counted half),
average precision is ``sum_n (R_n - R_{n-1}) P_n`` over decreasing thresholds, and a case is
called positive when ``probability >= threshold``. Confidence intervals are percentile
bootstrap intervals over cases.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

THRESHOLD_METHODS = ("youden", "sensitivity")
METRIC_NAMES = ("auc", "average_precision", "f1", "sensitivity", "specificity")


def _arrays(y_true: Sequence, y_prob: Sequence) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true, dtype=float).ravel()
    p = np.asarray(y_prob, dtype=float).ravel()
    if y.shape != p.shape:
        raise ValueError(f"labels ({y.size}) and probabilities ({p.size}) differ in length")
    return y, p


def roc_curve(y_true: Sequence, y_prob: Sequence) -> dict[str, np.ndarray]:
    """ROC curve points at each distinct probability (decreasing), starting at (0, 0).

    Returns:
        ``{"fpr", "tpr", "thresholds"}``; ``thresholds[0]`` is ``inf`` (nothing positive).
    """
    y, p = _arrays(y_true, y_prob)
    order = np.argsort(-p, kind="mergesort")
    y, p = y[order], p[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(p)), y.size - 1]
    tps = np.cumsum(y)[last_of_tie]
    fps = (last_of_tie + 1) - tps
    positives, negatives = y.sum(), y.size - y.sum()
    tpr = np.r_[0.0, tps / positives] if positives else np.full(tps.size + 1, np.nan)
    fpr = np.r_[0.0, fps / negatives] if negatives else np.full(fps.size + 1, np.nan)
    return {"fpr": fpr, "tpr": tpr, "thresholds": np.r_[np.inf, p[last_of_tie]]}


def roc_auc(y_true: Sequence, y_prob: Sequence) -> float:
    """Area under the ROC curve; ``nan`` when only one class is present."""
    y, p = _arrays(y_true, y_prob)
    positives = int(y.sum())
    if positives == 0 or positives == y.size:
        return math.nan
    # Mann-Whitney U with average ranks for ties
    order = np.argsort(p, kind="mergesort")
    ranks = np.empty(y.size)
    sorted_p = p[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_p)) + 1]
    ends = np.r_[starts[1:], y.size]
    for start, end in zip(starts, ends):
        ranks[order[start:end]] = (start + end + 1) / 2.0
    negatives = y.size - positives
    return float((ranks[y == 1].sum() - positives * (positives + 1) / 2.0) / (positives * negatives))


def average_precision(y_true: Sequence, y_prob: Sequence) -> float:
    """Average precision (area under the precision-recall step curve); ``nan`` without positives."""
    y, p = _arrays(y_true, y_prob)
    if y.sum() == 0:
        return math.nan
    order = np.argsort(-p, kind="mergesort")
    y, p = y[order], p[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(p)), y.size - 1]
    tps = np.cumsum(y)[last_of_tie]
    precision = tps / (last_of_tie + 1)
    recall = tps / y.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def confusion(y_true: Sequence, y_prob: Sequence, threshold: float) -> dict[str, int]:
    """True/false positives/negatives when ``probability >= threshold`` means positive."""
    y, p = _arrays(y_true, y_prob)
    called = p >= threshold
    return {"tp": int(np.sum(called & (y == 1))), "fp": int(np.sum(called & (y == 0))),
            "tn": int(np.sum(~called & (y == 0))), "fn": int(np.sum(~called & (y == 1)))}


def threshold_metrics(y_true: Sequence, y_prob: Sequence, threshold: float) -> dict[str, float]:
    """F1, sensitivity and specificity at a threshold (``nan`` where undefined; F1 0 as in sklearn)."""
    c = confusion(y_true, y_prob, threshold)
    sensitivity = c["tp"] / (c["tp"] + c["fn"]) if c["tp"] + c["fn"] else math.nan
    specificity = c["tn"] / (c["tn"] + c["fp"]) if c["tn"] + c["fp"] else math.nan
    f1 = 2 * c["tp"] / (2 * c["tp"] + c["fp"] + c["fn"]) if c["tp"] + c["fp"] + c["fn"] else 0.0
    return {"f1": f1, "sensitivity": sensitivity, "specificity": specificity}


def choose_threshold(
    y_true: Sequence, y_prob: Sequence, *, method: str = "youden", target_sensitivity: float = 0.9
) -> float:
    """The operating threshold, chosen on validation predictions.

    Candidates lie half-way between consecutive distinct probabilities (and below the lowest),
    so the validation cases fall on the same side at inference.

    Args:
        y_true: 0/1 labels.
        y_prob: probabilities.
        method: ``"youden"`` maximises sensitivity + specificity - 1 (the highest threshold on
            ties); ``"sensitivity"`` takes the highest threshold whose sensitivity reaches
            ``target_sensitivity``.
        target_sensitivity: for ``method="sensitivity"``.

    Returns:
        The threshold; 0.5 when the labels hold a single class (nothing to choose from).
    """
    if method not in THRESHOLD_METHODS:
        raise ValueError(f"threshold_method must be one of {THRESHOLD_METHODS}, got '{method}'")
    y, p = _arrays(y_true, y_prob)
    if y.sum() == 0 or y.sum() == y.size:
        return 0.5
    distinct = np.unique(p)[::-1]
    candidates = (distinct + np.r_[distinct[1:], 0.0]) / 2.0  # just below each distinct probability
    curve = roc_curve(y, p)
    tpr, fpr = curve["tpr"][1:], curve["fpr"][1:]  # at threshold distinct[i], the same calls as candidates[i]
    if method == "youden":
        index = int(np.argmax(tpr - fpr))
    else:
        reaching = np.flatnonzero(tpr >= target_sensitivity - 1e-12)
        index = int(reaching[0]) if reaching.size else len(candidates) - 1
    return float(candidates[index])


def label_metrics(y_true: Sequence, y_prob: Sequence, threshold: float) -> dict[str, float]:
    """All :data:`METRIC_NAMES` for one label at a threshold."""
    return {"auc": roc_auc(y_true, y_prob), "average_precision": average_precision(y_true, y_prob),
            **threshold_metrics(y_true, y_prob, threshold)}


def bootstrap_ci(
    y_true: Sequence,
    y_prob: Sequence,
    statistic: Callable[[np.ndarray, np.ndarray], dict[str, float]],
    *,
    num_samples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap confidence intervals of each value ``statistic`` returns.

    Cases are resampled with replacement; resamples where a value is undefined (``nan``, e.g.
    AUC with one class) are left out of that value's interval.

    Returns:
        ``{name: (low, high)}`` (``nan`` when no resample defines the value).
    """
    y, p = _arrays(y_true, y_prob)
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {}
    for _ in range(num_samples):
        index = rng.integers(0, y.size, y.size)
        for name, value in statistic(y[index], p[index]).items():
            samples.setdefault(name, []).append(value)
    tail = (1.0 - confidence) / 2.0 * 100.0
    intervals = {}
    for name, values in samples.items():
        finite = np.asarray(values)[~np.isnan(values)]
        intervals[name] = (float(np.percentile(finite, tail)), float(np.percentile(finite, 100.0 - tail))) \
            if finite.size else (math.nan, math.nan)
    return intervals


def evaluate_predictions(
    y_true: np.ndarray,
    y_prob: np.ndarray,
    thresholds: Sequence[float],
    *,
    label_names: Sequence[str],
    num_bootstrap: int = 1000,
    seed: int = 0,
) -> dict:
    """Per-label metrics at the stored thresholds, with bootstrap 95% CIs.

    Args:
        y_true: (cases, labels) 0/1 array.
        y_prob: (cases, labels) probabilities.
        thresholds: the operating threshold of each label.
        label_names: a name per label.
        num_bootstrap: bootstrap resamples (0: no intervals).
        seed: bootstrap seed.

    Returns:
        ``{"num_cases", "labels": {name: {"threshold", "num_positive", "metrics": {metric: {"value",
        "ci_low", "ci_high"}}, "confusion": {...}, "roc": {"fpr": [...], "tpr": [...]}}}}``.
    """
    y_true = np.asarray(y_true, dtype=float).reshape(len(y_true), -1)
    y_prob = np.asarray(y_prob, dtype=float).reshape(len(y_prob), -1)
    if y_true.shape != y_prob.shape or y_true.shape[1] != len(label_names) or len(thresholds) != len(label_names):
        raise ValueError(f"shapes disagree: labels {y_true.shape}, probabilities {y_prob.shape}, "
                         f"{len(thresholds)} thresholds, {len(label_names)} label names")
    report: dict = {"num_cases": int(y_true.shape[0]), "labels": {}}
    for k, name in enumerate(label_names):
        y, p, t = y_true[:, k], y_prob[:, k], float(thresholds[k])
        values = label_metrics(y, p, t)
        intervals = bootstrap_ci(y, p, lambda yy, pp: label_metrics(yy, pp, t), num_samples=num_bootstrap,
                                 seed=seed) if num_bootstrap > 0 else {}
        curve = roc_curve(y, p)
        report["labels"][name] = {
            "threshold": t,
            "num_positive": int(y.sum()),
            "metrics": {m: {"value": values[m], "ci_low": intervals.get(m, (math.nan,) * 2)[0],
                            "ci_high": intervals.get(m, (math.nan,) * 2)[1]} for m in METRIC_NAMES},
            "confusion": confusion(y, p, t),
            "roc": {"fpr": curve["fpr"].tolist(), "tpr": curve["tpr"].tolist()},
        }
    return report
