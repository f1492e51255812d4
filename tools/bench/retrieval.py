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
"""Benchmark the ctfm_retrieval vector index against brute-force NumPy search.

For each database size and each data set, in one run:

- ``clustered``: a Gaussian mixture on the unit sphere (``num_clusters`` unit centres plus
  isotropic noise of norm about ``spread``), closer to real embeddings;
- ``uniform``: uniform random vectors in ``[-1, 1]^D`` (nearly uniform on the sphere after
  normalisation), the worst case for approximate search;

the index is built with the bundle's own builder (``scripts.vector_index.make_index`` of
``bundles/ctfm_retrieval``, the code ``configs/index.json`` runs, with its defaults unless
overridden), so what is measured is what users get. Reported: build time (train + add), top-``k``
latency of single queries (p50 / p99, one query at a time, FAISS on ``search_threads`` threads),
recall@k against exact search, for each search setting in ``nprobes`` (IVF) or ``ef_searches``
(HNSW); and the brute-force NumPy baseline (``database @ query`` + partial sort) on the same
queries. Queries are fresh draws from the same distribution, not database members.

CLI::

    ctfm-bench-retrieval --sizes 100000 --output bench_1e5.json
    ctfm-bench-retrieval --sizes 1000000 --nprobes 8,16,32 --output bench_1e6.json
    ctfm-bench-retrieval --sizes 100000 --large_index hnsw --ef_searches 32,64,128
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import sys
import time
from collections.abc import Sequence

import fire
import numpy as np

from ctfm_bundles.tools import REPO_ROOT
from ctfm_common.runtime import atomic_write_text

BUNDLE_ROOT = REPO_ROOT / "bundles" / "ctfm_retrieval"

logger = logging.getLogger("bench_retrieval")


def _vector_index():
    """The bundle's ``scripts.vector_index`` (the index builder users run), imported under a unique
    package name so that it cannot clash with another bundle's ``scripts`` in the same process."""
    name = "ctfm_retrieval_scripts"
    if name not in sys.modules:
        root = BUNDLE_ROOT / "scripts"
        spec = importlib.util.spec_from_file_location(
            name, root / "__init__.py", submodule_search_locations=[str(root)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return importlib.import_module(f"{name}.vector_index")


def _normalize_rows(x: np.ndarray) -> np.ndarray:
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x


def make_vectors(
    kind: str, count: int, dim: int, rng: np.random.Generator, centers: np.ndarray | None = None, spread: float = 1.0
) -> np.ndarray:
    """``count`` L2-normalised float32 vectors of ``dim`` dimensions, made in chunks (no float64 copy).

    Args:
        kind: ``clustered`` (Gaussian mixture around ``centers``) or ``uniform``.
        count: how many vectors.
        dim: dimensions.
        rng: random generator.
        centers: ``[C, dim]`` unit mixture centres (``clustered``).
        spread: noise norm relative to the unit centre norm (per-dimension std ``spread / sqrt(dim)``).

    Returns:
        ``[count, dim]`` float32, unit rows.
    """
    out = np.empty((count, dim), dtype=np.float32)
    chunk = 50_000
    for start in range(0, count, chunk):
        n = min(chunk, count - start)
        if kind == "clustered":
            block = rng.standard_normal((n, dim), dtype=np.float32)
            block *= np.float32(spread / np.sqrt(dim))
            block += centers[rng.integers(len(centers), size=n)]
        elif kind == "uniform":
            block = rng.random((n, dim), dtype=np.float32)
            block *= 2
            block -= 1
        else:
            raise ValueError(f"data set must be 'clustered' or 'uniform', got '{kind}'")
        out[start : start + n] = _normalize_rows(block)
    return out


def exact_top_k(database: np.ndarray, queries: np.ndarray, k: int, chunk: int = 100_000) -> np.ndarray:
    """Exact top-``k`` row ids by inner product, ``[Q, k]``, computed over database chunks."""
    best_scores = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_ids = np.zeros((len(queries), 0), dtype=np.int64)
    for start in range(0, len(database), chunk):
        scores = queries @ database[start : start + chunk].T
        ids = np.broadcast_to(np.arange(start, start + scores.shape[1]), scores.shape)
        scores = np.concatenate([best_scores, scores], axis=1)
        ids = np.concatenate([best_ids, ids], axis=1)
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        best_scores = np.take_along_axis(scores, top, axis=1)
        best_ids = np.take_along_axis(ids, top, axis=1)
    order = np.argsort(-best_scores, axis=1)
    return np.take_along_axis(best_ids, order, axis=1)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of the true top-k ids found among the returned k."""
    hits = [len(set(f[f >= 0].tolist()) & set(t.tolist())) for f, t in zip(found, truth)]
    return float(np.sum(hits) / truth.size)


def _percentiles(seconds: Sequence[float]) -> dict:
    ms = np.asarray(seconds) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3)}


def brute_force(database: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, list[float]]:
    """NumPy brute force, one query at a time: ``database @ q``, partial sort of the top ``k``."""
    found, seconds = [], []
    for q in queries:
        t0 = time.perf_counter()
        scores = database @ q
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.argsort(-scores[top])]
        seconds.append(time.perf_counter() - t0)
        found.append(top)
    return np.stack(found), seconds


def _index_search(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, list[float]]:
    found, seconds = [], []
    for q in queries:
        q = q[None]
        t0 = time.perf_counter()
        _, ids = index.search(q, k)
        seconds.append(time.perf_counter() - t0)
        found.append(ids[0])
    return np.stack(found), seconds


def benchmark_retrieval(
    *,
    sizes: Sequence[int] = (100_000, 1_000_000),
    datasets: Sequence[str] = ("clustered", "uniform"),
    dim: int = 512,
    k: int = 10,
    num_queries: int = 300,
    brute_force_queries: int = 30,
    num_clusters: int = 2000,
    spread: float = 1.0,
    large_index: str | None = None,
    nlist: int | None = None,
    train_size: int | None = None,
    nprobes: Sequence[int] | None = None,
    hnsw_m: int | None = None,
    ef_construction: int | None = None,
    ef_searches: Sequence[int] | None = None,
    build_threads: int = 0,
    search_threads: int = 1,
    seed: int = 0,
    output: str = "",
) -> dict:
    """Build the bundle's index over synthetic embeddings and time it against brute force.

    Args:
        sizes: database sizes (each above the bundle's ``exact_max``, so the approximate index is used).
        datasets: ``clustered`` and/or ``uniform``.
        dim: embedding dimensions (the encoder's 512).
        k: neighbours per query.
        num_queries: queries timed on the index and used for recall.
        brute_force_queries: of those, how many are timed with NumPy brute force (about 0.1 s each at 10^6).
        num_clusters: Gaussian mixture components of ``clustered``.
        spread: noise norm relative to the centre norm in ``clustered``.
        large_index, nlist, train_size, hnsw_m, ef_construction: index settings; ``None`` takes
            the bundle's defaults (``configs/index.json``).
        nprobes: IVF lists searched, each measured (``None``: the bundle's ``nprobe``).
        ef_searches: HNSW search depths, each measured (``None``: the bundle's ``ef_search``).
        build_threads: FAISS threads to build (0: all).
        search_threads: FAISS threads per single query (latency).
        seed: random seed.
        output: JSON file for the results (written atomically), or empty.

    Returns:
        The results: settings, machine and one entry per size and data set.
    """
    import faiss

    def as_list(value) -> list:
        return list(value) if isinstance(value, (list, tuple)) else [value]  # fire gives one value as a scalar

    sizes, datasets = as_list(sizes), as_list(datasets)
    nprobes = as_list(nprobes) if nprobes is not None else None
    ef_searches = as_list(ef_searches) if ef_searches is not None else None
    vi = _vector_index()
    defaults = json.loads((BUNDLE_ROOT / "configs" / "index.json").read_text())
    large_index = large_index or defaults["large_index"]
    build = {
        "exact_max": int(defaults["exact_max"]),
        "large_index": large_index,
        "nlist": int(defaults["nlist"] if nlist is None else nlist),
        "train_size": int(defaults["train_size"] if train_size is None else train_size),
        "hnsw_m": int(defaults["hnsw_m"] if hnsw_m is None else hnsw_m),
        "ef_construction": int(defaults["ef_construction"] if ef_construction is None else ef_construction),
    }
    if large_index == "ivf":
        sweep = [int(p) for p in (nprobes or [defaults["nprobe"]])]
    else:
        sweep = [int(e) for e in (ef_searches or [defaults["ef_search"]])]
    all_threads = faiss.omp_get_max_threads()
    rng = np.random.default_rng(seed)
    centers = _normalize_rows(rng.standard_normal((int(num_clusters), int(dim)), dtype=np.float32))
    results = []
    for size in [int(s) for s in sizes]:
        for data in datasets:
            t0 = time.perf_counter()
            database = make_vectors(data, size, int(dim), rng, centers, spread)
            queries = make_vectors(data, int(num_queries), int(dim), rng, centers, spread)
            make_s = time.perf_counter() - t0
            truth = exact_top_k(database, queries, int(k))
            bf_found, bf_seconds = brute_force(database, queries[: int(brute_force_queries)], int(k))
            entry = {
                "size": size,
                "data": data,
                "make_data_s": round(make_s, 1),
                "brute_force": dict(
                    _percentiles(bf_seconds),
                    recall=recall_at_k(bf_found, truth[: len(bf_found)]),
                    queries=len(bf_seconds),
                ),
            }
            faiss.omp_set_num_threads(int(build_threads) or all_threads)
            t0 = time.perf_counter()
            index, params = vi.make_index(database, **build, nprobe=sweep[0], ef_search=sweep[0])
            entry["build_s"] = round(time.perf_counter() - t0, 1)
            entry["index"] = params
            faiss.omp_set_num_threads(int(search_threads))
            entry["search"] = []
            for value in sweep:
                if params["kind"] == "ivf":
                    index.nprobe = value
                elif params["kind"] == "hnsw":
                    index.hnsw.efSearch = value
                _index_search(index, queries[:10], int(k))  # warm up
                found, seconds = _index_search(index, queries, int(k))
                name = "nprobe" if params["kind"] == "ivf" else "ef_search"
                row = dict({name: value}, **_percentiles(seconds), recall=round(recall_at_k(found, truth), 4))
                row["speedup_p50"] = round(entry["brute_force"]["p50_ms"] / max(row["p50_ms"], 1e-6), 1)
                entry["search"].append(row)
                logger.info(f"{size} {data} {params} {row}")
            logger.info(f"{size} {data}: build {entry['build_s']} s, brute force {entry['brute_force']}")
            results.append(entry)
            del index, database
            faiss.omp_set_num_threads(all_threads)
    result = {
        "settings": dict(
            build,
            dim=int(dim),
            k=int(k),
            num_queries=int(num_queries),
            num_clusters=int(num_clusters),
            spread=float(spread),
            seed=int(seed),
            build_threads=int(build_threads) or all_threads,
            search_threads=int(search_threads),
        ),
        "machine": {"cpu_count": os.cpu_count(), "faiss": faiss.__version__, "numpy": np.__version__},
        "results": results,
    }
    if output:
        atomic_write_text(output, json.dumps(result, indent=2) + "\n")
    return result


def main(**kwargs) -> None:
    """CLI: run :func:`benchmark_retrieval` and print its JSON."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    print(json.dumps(benchmark_retrieval(**kwargs), indent=2))


def cli() -> None:
    """The console command (``[project.scripts]`` of pyproject.toml)."""
    fire.Fire(main)


if __name__ == "__main__":
    cli()
