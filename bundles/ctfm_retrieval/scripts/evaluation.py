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
"""Retrieval evaluation of an index given class labels: leave-one-out over the index, or a
separate query set (e.g. the test split against an index of the training split)."""

from __future__ import annotations

import csv
import json
import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .ctfm_common.inputs import DATALIST_SECTIONS, case_source
from .ctfm_common.runtime import atomic_write_csv, atomic_write_text
from .embedding import class_label, read_embedding_file
from .metrics import average_precision, average_precision_at_k, hit_rate_at_k, precision_at_k, retrieval_metrics
from .vector_index import load_embeddings, load_index, normalize, settings_diff

logger = logging.getLogger("ctfm_retrieval.evaluate")


def read_labels(labels: str, rows: Sequence[dict]) -> dict[str, str]:
    """Class label per case from a CSV (``case,label``), a datalist JSON (items with ``image`` and
    ``label``, all sections; matched to the rows by the scan's resolved path, relative paths from
    the datalist's folder) or, when ``labels`` is empty, the ``label`` column of the index."""
    if not labels:
        return {r["case"]: r["label"] for r in rows if r.get("label", "") != ""}
    path = Path(labels)
    if not path.is_file():
        raise FileNotFoundError(f"labels file '{labels}' not found (a case,label CSV or a datalist JSON)")
    if path.suffix.lower() == ".json":
        content = json.loads(path.read_text())
        items = [i for s in DATALIST_SECTIONS for i in content.get(s, []) if isinstance(i, dict) and class_label(i)]
        by_source = {case_source(path.parent / str(i["image"])): class_label(i) for i in items if "image" in i}
        return {r["case"]: by_source[case_source(r["source"])] for r in rows
                if r.get("source") and case_source(r["source"]) in by_source}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if not {"case", "label"} <= set(reader.fieldnames or ()):
            raise ValueError(f"{path}: a labels CSV needs 'case' and 'label' columns, found {reader.fieldnames}")
        return {r["case"]: r["label"] for r in reader}


def evaluate_retrieval(
    *,
    index_dir: str,
    output_dir: str,
    labels: str = "",
    queries: str = "",
    ks: Sequence[int] = (1, 3, 5, 10),
    max_rank: int = 1000,
    nprobe: int | None = None,
    ef_search: int | None = None,
) -> dict:
    """Retrieval metrics by class agreement between each query and what the index returns.

    Without ``queries``, each labelled indexed scan queries the index with itself excluded
    (leave-one-out). With ``queries``, the scans of that embeddings folder query the index and
    nothing is excluded: the usual protocol with a test split against an index of the training
    split (the reference's OrganMNIST3D evaluation).

    Args:
        index_dir: the persisted index.
        output_dir: where ``retrieval_metrics.json`` and ``retrieval_per_query.csv`` go.
        labels: class labels of indexed (and query) cases, see :func:`read_labels`; empty: the
            ``label`` columns of the index and of ``queries``.
        queries: an embed output's ``embeddings`` folder (same embedding settings as the index),
            or empty for leave-one-out.
        ks: cut-offs for precision@k, AP@k, hit rate@k.
        max_rank: ranking depth used for AP/mAP (exact when the index holds fewer items).
        nprobe, ef_search: search-time recall/speed of an IVF / HNSW index (default: as built).

    Returns:
        The summary (also written as JSON).
    """
    index, rows, meta = load_index(index_dir, nprobe=nprobe, ef_search=ef_search)
    label_of = read_labels(labels, rows)
    labelled = [i for i, r in enumerate(rows) if r["case"] in label_of]
    if len(labelled) < (1 if queries else 2):
        raise ValueError(f"{index_dir}: too few indexed cases have a label ({len(labelled)}); check 'labels'")
    skipped = len(rows) - len(labelled)
    if skipped:
        logger.warning(f"{skipped} indexed case(s) have no label and are left out of the evaluation")
    database_counts = Counter(label_of[rows[i]["case"]] for i in labelled)
    if queries:
        query_rows, vectors, settings = load_embeddings(queries)
        if diff := settings_diff(meta.get("settings", {}), settings):
            raise ValueError(f"{queries}: query embeddings were made with other settings than the index {diff}")
        query_label_of = read_labels(labels, query_rows)
        chosen = [q for q, r in enumerate(query_rows) if r["case"] in query_label_of]
        if not chosen:
            raise ValueError(f"{queries}: no query case has a label; check 'labels'")
        if len(chosen) < len(query_rows):
            logger.warning(f"{len(query_rows) - len(chosen)} query case(s) have no label and are left out")
        # (case, class, row of the query in the index to exclude, or -1)
        query_items = [(query_rows[q]["case"], query_label_of[query_rows[q]["case"]], -1) for q in chosen]
        vectors = vectors[chosen]
    else:
        base = (Path(index_dir) / meta["embeddings_dir"]).resolve()
        vectors = np.stack(
            [read_embedding_file(base / rows[i]["file"])[0]["embedding"].float().numpy() for i in labelled]
        )
        query_items = [(rows[i]["case"], label_of[rows[i]["case"]], i) for i in labelled]
    depth = min(int(max_rank), index.ntotal)
    scores, ids = index.search(normalize(vectors), depth)
    per_query, relevances, totals = [], [], []
    ks = [int(k) for k in ks]
    for q, (case, label, exclude) in enumerate(query_items):
        ranked = [j for j in ids[q] if j >= 0 and j != exclude and rows[j]["case"] in label_of]
        relevance = [int(label_of[rows[j]["case"]] == label) for j in ranked]
        total = database_counts[label] - (1 if exclude >= 0 else 0)
        if total == 0:
            logger.warning(f"{case}: no other indexed case has its class '{label}', not evaluated")
            continue
        relevances.append(relevance)
        totals.append(total)
        entry = {"case": case, "label": label, "num_relevant": total, "AP": average_precision(relevance, total)}
        for k in ks:
            entry[f"precision@{k}"] = precision_at_k(relevance, k)
            entry[f"AP@{k}"] = average_precision_at_k(relevance, k, total)
            entry[f"hit_rate@{k}"] = hit_rate_at_k(relevance, k)
        per_query.append(entry)
    summary = retrieval_metrics(relevances, ks, totals)
    summary.update(
        num_indexed=int(index.ntotal),
        protocol="queries" if queries else "leave-one-out",
        ranking_depth=depth,
        metric="cosine",
        index_kind=meta["kind"],
        settings=meta.get("settings", {}),
    )
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "retrieval_metrics.json", json.dumps(summary, indent=2) + "\n")
    if per_query:
        atomic_write_csv(out / "retrieval_per_query.csv", per_query, list(per_query[0]), lineterminator="\n")
    logger.info("retrieval: " + ", ".join(f"{k} {v:.3f}" for k, v in summary.items() if isinstance(v, float)))
    logger.info(f"-> {out / 'retrieval_metrics.json'}, {out / 'retrieval_per_query.csv'}")
    return summary
