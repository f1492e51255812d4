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
"""Top-k neighbours of scans (embedded on the fly) or stored embeddings, written to CSV and JSON."""

from __future__ import annotations

import glob
import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from .batch import run_each
from .ctfm_common.inputs import resolve_input
from .ctfm_common.runtime import atomic_write_csv, atomic_write_text
from .embedding import ScanEmbedder, read_embedding_file, unique_case_names
from .vector_index import load_index, search, settings_diff

logger = logging.getLogger("ctfm_retrieval.query")

RESULT_COLUMNS = ("query", "query_source", "rank", "case", "source", "label", "score")


def _check_settings(name: str, ours: Mapping[str, str], index_settings: Mapping[str, str]) -> None:
    if diff := settings_diff(ours, index_settings):
        raise ValueError(
            f"{name}: embedding settings differ from the index's (ours, index): {diff}. Queries must be embedded "
            f"like the indexed scans: pass the same overrides as for embed.json."
        )


def query_vectors(
    *,
    input: str,
    index_settings: Mapping[str, str],
    settings: Mapping[str, str] | None = None,
    preprocessing: Callable | None = None,
    embedder: ScanEmbedder | None = None,
    dataset_dir: str | None = None,
    errors_file: str | os.PathLike | None = None,
) -> list[tuple[str, str, np.ndarray]]:
    """The query embeddings: stored ``.safetensors`` files (a path or glob) or scans embedded now.

    Args:
        input: ``.safetensors`` file(s) written by embed.json, or any scan input (file, DICOM folder,
            glob, datalist).
        index_settings: the index's embedding settings; queries must match them.
        settings: the settings of ``embedder`` (for scans).
        preprocessing: MONAI transform to the preprocessed ``image`` (for scans).
        embedder: the :class:`~scripts.embedding.ScanEmbedder` (for scans).
        dataset_dir: base of relative datalist paths.
        errors_file: where scans that cannot be embedded are listed (``source,error``); the others go on.

    Returns:
        ``(query name, source, vector)`` per query that could be embedded.
    """
    text = os.fspath(input)
    if text.endswith(".safetensors"):
        paths = sorted(glob.glob(text)) if glob.has_magic(text) else [text]
        if not paths or not all(Path(p).is_file() for p in paths):
            raise FileNotFoundError(f"query embedding '{text}' not found")
        out = []
        for path in paths:
            tensors, metadata = read_embedding_file(path)
            _check_settings(path, metadata, index_settings)
            out.append((metadata.get("case", Path(path).stem), path, tensors["embedding"].float().numpy()))
        return out
    if embedder is None or preprocessing is None or settings is None:
        raise ValueError("embedding a scan needs preprocessing, embedder and settings")
    _check_settings(text, settings, index_settings)
    items = resolve_input(text, dataset_dir=dataset_dir or None)
    names = unique_case_names(items)
    sources = [str(item["image"]) for item in items]
    embedded = run_each(
        sources,
        lambda i: embedder(preprocessing(dict(items[i]))["image"])["embedding"].numpy(),
        errors_file=errors_file,
        what="embed this query scan",
    )
    return [(names[i], sources[i], vector) for i, vector in embedded]


def query_index(
    *,
    input: str,
    index_dir: str,
    output_dir: str,
    k: int = 10,
    settings: Mapping[str, str] | None = None,
    preprocessing: Callable | None = None,
    embedder: ScanEmbedder | None = None,
    dataset_dir: str | None = None,
    output_name: str = "neighbours",
    nprobe: int | None = None,
    ef_search: int | None = None,
) -> list[dict]:
    """Top-``k`` neighbours of each query, written to ``<output_dir>/<output_name>.csv`` and ``.json``.

    Args:
        input, settings, preprocessing, embedder, dataset_dir: see :func:`query_vectors`.
        index_dir: the persisted index (index.json).
        output_dir: results folder.
        k: neighbours per query.
        output_name: file stem of the results.
        nprobe, ef_search: search-time recall/speed of an IVF / HNSW index (default: as built).

    A query scan that cannot be read or embedded is named in the log and in
    ``<output_dir>/<output_name>_errors.csv``; the other queries go on.

    Returns:
        One row per (query, rank): ``query, query_source, rank, case, source, label, score`` (cosine).
    """
    index, rows, meta = load_index(index_dir, nprobe=nprobe, ef_search=ef_search)
    queries = query_vectors(
        input=input,
        index_settings=meta.get("settings", {}),
        settings=settings,
        preprocessing=preprocessing,
        embedder=embedder,
        dataset_dir=dataset_dir,
        errors_file=Path(output_dir) / f"{output_name}_errors.csv",
    )
    found = search(index, rows, np.stack([q[2] for q in queries]), int(k))
    results = [
        dict(hit, query=name, query_source=source) for (name, source, _), hits in zip(queries, found) for hit in hits
    ]
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_csv(out / f"{output_name}.csv", results, RESULT_COLUMNS, lineterminator="\n")
    grouped = [
        {
            "query": name,
            "source": source,
            "neighbours": [{c: h[c] for c in ("rank", "case", "source", "label", "score")} for h in hits],
        }
        for (name, source, _), hits in zip(queries, found)
    ]
    atomic_write_text(out / f"{output_name}.json", json.dumps(grouped, indent=2) + "\n")
    for entry in grouped:
        top = ", ".join(f"{h['case']} ({h['score']:.3f})" for h in entry["neighbours"][:5])
        logger.info(f"{entry['query']}: {top}")
    plural = "y" if len(queries) == 1 else "ies"
    logger.info(f"top-{k} neighbours of {len(queries)} quer{plural} -> {out / output_name}.csv/.json")
    return results
