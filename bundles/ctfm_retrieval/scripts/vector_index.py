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
"""A FAISS vector index over stored scan embeddings, persisted with ids and metadata.

Cosine similarity is the inner product of L2-normalised vectors. Up to ``exact_max`` vectors
the index is exact (``IndexFlatIP``); above it, ``IndexIVFFlat`` (inverted lists, ``nprobe``
searched) or ``IndexHNSWFlat`` (graph). Persisted as::

    <index_dir>/index.faiss   the FAISS index (row i = the i-th vector)
    <index_dir>/ids.csv       row, case, source, file, label (file relative to embeddings_dir)
    <index_dir>/index.json    kind, metric, dim, count, search parameters, embedding settings
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from .ctfm_common.runtime import atomic_write, atomic_write_csv, atomic_write_text
from .embedding import read_embedding_file, read_index_table

logger = logging.getLogger("ctfm_retrieval.index")

ID_COLUMNS = ("row", "case", "source", "file", "label")
# settings that must agree between embeddings in one index (see embedding.embedding_settings)
SETTING_KEYS = (
    "aggregation",
    "patch_size",
    "overlap",
    "spacing",
    "orientation",
    "hu_range",
    "foreground_hu",
    "init_filters",
    "encoder_ckpt",
    "encoder_sha256",
)


def _faiss():
    try:
        import faiss
    except ImportError as e:
        raise ImportError("the vector index needs FAISS: pip install faiss-cpu==1.15.1") from e
    return faiss


def normalize(vectors: np.ndarray) -> np.ndarray:
    """Float32 copy of ``vectors`` ``[N, D]`` with unit L2 norm per row (zero rows stay zero)."""
    out = np.array(vectors, dtype=np.float32, copy=True, ndmin=2)
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return np.divide(out, norms, out=out, where=norms > 0)


def default_nlist(count: int) -> int:
    """IVF list count: about 4 sqrt(N) (the low end of FAISS' usual 4 to 16 sqrt(N)), with at
    least 39 training vectors per list (FAISS warns below).

    With ~sqrt(N) lists, the components of a fine-grained mixture (10,000 of them in 10^6
    vectors) shared lists with many others and were split between them: recall@10 stayed at
    0.80-0.89 whatever ``nprobe``. With ~4 sqrt(N) lists it is 0.997-0.998 from ``nprobe`` 4.
    docs/BENCHMARKS.md has the measurements.
    """
    return int(max(1, min(round(4 * math.sqrt(count)), count // 39)))


def default_train_size(count: int, nlist: int) -> int:
    """IVF k-means training vectors: 64 per list, at most all of them.

    k-means costs lists x training vectors. 40 per list trained 4000 lists on 10^6 vectors
    25 s faster, but left about 4% of the fine-grained mixture's components scattered over
    many lists (recall@10 0.980 at ``nprobe`` 16 instead of 0.998).
    """
    return int(min(count, 64 * nlist))


def make_index(
    vectors: np.ndarray,
    *,
    exact_max: int = 10000,
    large_index: str = "ivf",
    nlist: int = 0,
    train_size: int = 0,
    nprobe: int = 16,
    hnsw_m: int = 32,
    ef_construction: int = 40,
    ef_search: int = 128,
):
    """Build a FAISS inner-product index over normalised ``vectors``.

    Args:
        vectors: ``[N, D]`` float32, already L2-normalised.
        exact_max: up to this many vectors the index is exact (``IndexFlatIP``).
        large_index: ``ivf`` or ``hnsw`` above ``exact_max``.
        nlist: IVF lists (0: :func:`default_nlist`).
        train_size: IVF k-means training vectors, a random subsample (0: :func:`default_train_size`).
        nprobe: IVF lists searched per query.
        hnsw_m: HNSW neighbours per node.
        ef_construction: HNSW build depth.
        ef_search: HNSW search depth.

    Returns:
        ``(index, params)``: the filled index and a dict describing it.
    """
    faiss = _faiss()
    count, dim = vectors.shape
    if count <= exact_max:
        index = faiss.IndexFlatIP(dim)
        params = {"kind": "flat"}
    elif large_index == "ivf":
        nlist = int(nlist) or default_nlist(count)
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        train_size = min(count, int(train_size) or default_train_size(count, nlist))
        train = vectors
        if count > train_size:
            rows = np.sort(np.random.default_rng(0).choice(count, train_size, replace=False))
            train = vectors[rows]
        index.train(train)
        index.nprobe = int(nprobe)
        params = {"kind": "ivf", "nlist": nlist, "train_size": int(len(train)), "nprobe": int(nprobe)}
    elif large_index == "hnsw":
        index = faiss.IndexHNSWFlat(dim, int(hnsw_m), faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = int(ef_construction)
        index.hnsw.efSearch = int(ef_search)
        params = {
            "kind": "hnsw",
            "hnsw_m": int(hnsw_m),
            "ef_construction": int(ef_construction),
            "ef_search": int(ef_search),
        }
    else:
        raise ValueError(f"large_index must be 'ivf' or 'hnsw', got '{large_index}'")
    index.add(vectors)
    return index, params


def _settings_of(metadata: Mapping[str, str]) -> dict[str, str]:
    return {k: metadata.get(k, "") for k in SETTING_KEYS}


def settings_diff(first: Mapping[str, object], second: Mapping[str, object]) -> dict[str, tuple]:
    """The embedding settings (:data:`SETTING_KEYS`) on which two sets of embeddings differ,
    ``{key: (first, second)}``, compared as text (stored settings are strings); empty if none."""
    return {k: (first.get(k), second.get(k)) for k in SETTING_KEYS if str(first.get(k)) != str(second.get(k))}


def load_embeddings(
    embeddings_dir: str | os.PathLike, skip_cases: set[str] = frozenset()
) -> tuple[list[dict], np.ndarray, dict]:
    """Read the scan embeddings listed in ``<embeddings_dir>/index.csv``.

    Args:
        embeddings_dir: the embed workflow's ``<output_dir>/embeddings``.
        skip_cases: cases not to read (already indexed).

    Returns:
        ``(rows, vectors [N, D] float32, settings)``.

    Raises:
        ValueError: embeddings made with different settings (aggregation, patch size, encoder...).
    """
    base = Path(embeddings_dir)
    rows, vectors, settings = [], [], None
    for row in read_index_table(base):
        if row["case"] in skip_cases:
            continue
        tensors, metadata = read_embedding_file(base / row["file"])
        these = _settings_of(metadata)
        if settings is None:
            settings = these
        elif diff := settings_diff(settings, these):
            raise ValueError(f"{base / row['file']}: made with other settings than the rest {diff}; re-embed it.")
        rows.append({k: row.get(k, "") for k in ID_COLUMNS if k != "row"})
        vectors.append(tensors["embedding"].float().numpy())
    return rows, (np.stack(vectors) if vectors else np.zeros((0, 0), np.float32)), settings or {}


def _write_ids(path: Path, rows: Sequence[Mapping]) -> None:
    atomic_write_csv(path, rows, ID_COLUMNS, lineterminator="\n")


def save_index(index, rows: Sequence[Mapping], meta: Mapping, index_dir: str | os.PathLike) -> Path:
    """Persist the index, its id table and metadata into ``index_dir`` (each file atomically)."""
    faiss = _faiss()
    out = Path(index_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "index.faiss", lambda tmp: faiss.write_index(index, str(tmp)))
    _write_ids(out / "ids.csv", [dict(r, row=i) for i, r in enumerate(rows)])
    atomic_write_text(out / "index.json", json.dumps(dict(meta), indent=2) + "\n")
    return out


def load_index(
    index_dir: str | os.PathLike, *, nprobe: int | None = None, ef_search: int | None = None
) -> tuple[object, list[dict], dict]:
    """Read a persisted index: ``(faiss index, id rows, metadata)``.

    ``nprobe`` (IVF) and ``ef_search`` (HNSW) trade speed for recall at search time; empty or
    0: the values stored at build time. They do not change the files.
    """
    faiss = _faiss()
    base = Path(index_dir)
    if not (base / "index.faiss").is_file():
        raise FileNotFoundError(f"{base}: no index.faiss; build it with index.json first.")
    index = faiss.read_index(str(base / "index.faiss"))
    meta = json.loads((base / "index.json").read_text())
    with open(base / "ids.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    if len(rows) != index.ntotal:
        raise ValueError(f"{base}: ids.csv lists {len(rows)} items but index.faiss holds {index.ntotal}")
    if meta.get("kind") == "ivf":
        index.nprobe = int(nprobe or meta["nprobe"])
        meta = {**meta, "nprobe": int(index.nprobe)}
    elif meta.get("kind") == "hnsw":
        index.hnsw.efSearch = int(ef_search or meta["ef_search"])
        meta = {**meta, "ef_search": int(index.hnsw.efSearch)}
    return index, rows, meta


def build_index(
    *,
    embeddings_dir: str | os.PathLike,
    index_dir: str | os.PathLike,
    add: bool = False,
    exact_max: int = 10000,
    large_index: str = "ivf",
    nlist: int = 0,
    train_size: int = 0,
    nprobe: int = 16,
    hnsw_m: int = 32,
    ef_construction: int = 40,
    ef_search: int = 128,
) -> dict:
    """Build (or with ``add`` extend) the persisted index over the stored embeddings.

    Args:
        embeddings_dir: the embed workflow's ``<output_dir>/embeddings`` (its ``index.csv`` lists the scans).
        index_dir: where ``index.faiss``, ``ids.csv`` and ``index.json`` go.
        add: add only the cases not yet indexed to the existing index (incremental); without an
            index yet, build one.
        exact_max, large_index, nlist, train_size, nprobe, hnsw_m, ef_construction, ef_search:
            see :func:`make_index`.

    Returns:
        The index metadata (as written to ``index.json``).
    """
    from .ctfm_common.runtime import as_bool

    if as_bool(add) and (Path(index_dir) / "index.faiss").is_file():
        index, rows, meta = load_index(index_dir)
        new_rows, vectors, settings = load_embeddings(embeddings_dir, skip_cases={r["case"] for r in rows})
        if not new_rows:
            logger.info(f"{index_dir}: nothing to add, all {len(rows)} cases of {embeddings_dir} are indexed")
            return meta
        if diff := settings_diff(meta["settings"], settings):
            raise ValueError(f"{embeddings_dir}: new embeddings were made with other settings than the index {diff}")
        if vectors.shape[1] != meta["dim"]:
            raise ValueError(
                f"{embeddings_dir}: embeddings have {vectors.shape[1]} dimensions, the index {meta['dim']}"
            )
        index.add(normalize(vectors))
        rows = [{k: r[k] for k in ID_COLUMNS if k != "row"} for r in rows] + new_rows
        meta = dict(meta, count=int(index.ntotal))
        if meta["kind"] == "flat" and index.ntotal > int(exact_max):
            logger.warning(
                f"exact index now holds {index.ntotal} > exact_max={exact_max} vectors: rebuild it "
                f"(add=false) to switch to {large_index} for faster queries"
            )
        logger.info(f"added {len(new_rows)} case(s): the index now holds {index.ntotal}")
    else:
        rows, vectors, settings = load_embeddings(embeddings_dir)
        if not rows:
            raise ValueError(f"{embeddings_dir}: index.csv lists no embeddings to index")
        index, params = make_index(
            normalize(vectors),
            exact_max=int(exact_max),
            large_index=large_index,
            nlist=int(nlist),
            train_size=int(train_size),
            nprobe=int(nprobe),
            hnsw_m=int(hnsw_m),
            ef_construction=int(ef_construction),
            ef_search=int(ef_search),
        )
        meta = dict(
            params,
            metric="cosine",
            normalized=True,
            dim=int(vectors.shape[1]),
            count=int(index.ntotal),
            exact_max=int(exact_max),
            settings=settings,
        )
        logger.info(f"built a {params['kind']} index over {index.ntotal} embeddings ({vectors.shape[1]}-d)")
    meta["embeddings_dir"] = os.path.relpath(Path(embeddings_dir).resolve(), Path(index_dir).resolve())
    save_index(index, rows, meta, index_dir)
    return meta


def search(index, rows: Sequence[Mapping], queries: np.ndarray, k: int) -> list[list[dict]]:
    """Top-``k`` neighbours (cosine) of each query vector.

    Returns:
        Per query, ranked ``{"rank", "case", "source", "file", "label", "score"}`` dicts.
    """
    k = min(int(k), index.ntotal)
    scores, ids = index.search(normalize(queries), k)
    results = []
    for q_scores, q_ids in zip(scores, ids):
        results.append(
            [
                dict({c: rows[i][c] for c in ("case", "source", "file", "label")}, rank=r + 1, score=float(s))
                for r, (s, i) in enumerate(zip(q_scores, q_ids))
                if i >= 0
            ]
        )
    return results
