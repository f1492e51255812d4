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
"""Retrieval metrics as pure functions of a ranked relevance list.

``relevance`` is the ranked result list of one query as 0/1 (1: same class as the query),
best first, the query itself excluded. ``num_relevant`` is how many relevant items the
database holds in all (default: those in ``relevance``, right when it ranks the whole database).

- precision@k = relevant items in the top k / k
- hit rate@k = 1 if any of the top k is relevant
- AP@k = sum over relevant ranks i <= k of precision@i, divided by min(k, num_relevant)
  (the usual ``apk``; 1 when the top k are all relevant or hold all relevant items)
- AP = AP@len(ranking) with ``num_relevant`` relevant items; over a complete ranking without
  score ties it equals scikit-learn's ``average_precision_score(y_true, scores)``
- mAP = mean AP over queries
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _as_array(relevance: Sequence[int] | np.ndarray) -> np.ndarray:
    return np.asarray(relevance, dtype=np.float64).ravel()


def precision_at_k(relevance: Sequence[int] | np.ndarray, k: int) -> float:
    """Share of relevant items among the top ``k`` (missing ranks count as not relevant)."""
    rel = _as_array(relevance)
    return float(rel[:k].sum() / k)


def hit_rate_at_k(relevance: Sequence[int] | np.ndarray, k: int) -> float:
    """1.0 when at least one of the top ``k`` is relevant, else 0.0."""
    return float(_as_array(relevance)[:k].any())


def average_precision_at_k(relevance: Sequence[int] | np.ndarray, k: int, num_relevant: int | None = None) -> float:
    """AP@k: mean of precision@i over relevant ranks i <= k, normalised by min(k, num_relevant).

    Returns 0.0 when there is no relevant item at all.
    """
    rel = _as_array(relevance)[:k]
    total = int(_as_array(relevance).sum()) if num_relevant is None else int(num_relevant)
    if total == 0:
        return 0.0
    hits = np.cumsum(rel)
    ranks = np.arange(1, len(rel) + 1)
    return float((rel * hits / ranks).sum() / min(k, total))


def average_precision(relevance: Sequence[int] | np.ndarray, num_relevant: int | None = None) -> float:
    """AP over the whole ranking (equals scikit-learn's ``average_precision_score`` on a full ranking)."""
    rel = _as_array(relevance)
    total = int(rel.sum()) if num_relevant is None else int(num_relevant)
    if total == 0:
        return 0.0
    hits = np.cumsum(rel)
    return float((rel * hits / np.arange(1, len(rel) + 1)).sum() / total)


def retrieval_metrics(
    relevances: Sequence[Sequence[int]], ks: Sequence[int] = (1, 3, 5, 10), num_relevant: Sequence[int] | None = None
) -> dict:
    """Mean precision@k, AP@k, hit rate@k per k and mAP over queries.

    Args:
        relevances: per query, its ranked 0/1 relevance list.
        ks: cut-offs.
        num_relevant: per query, the relevant items in the database (default: the sum of its list).

    Returns:
        ``{"num_queries", "mAP", "precision@k", "AP@k", "hit_rate@k" ...}``.
    """
    totals = [None] * len(relevances) if num_relevant is None else list(num_relevant)
    out: dict = {"num_queries": len(relevances)}
    if not relevances:
        return out
    out["mAP"] = float(np.mean([average_precision(r, n) for r, n in zip(relevances, totals)]))
    for k in ks:
        out[f"precision@{k}"] = float(np.mean([precision_at_k(r, k) for r in relevances]))
        out[f"AP@{k}"] = float(np.mean([average_precision_at_k(r, k, n) for r, n in zip(relevances, totals)]))
        out[f"hit_rate@{k}"] = float(np.mean([hit_rate_at_k(r, k) for r in relevances]))
    return out
