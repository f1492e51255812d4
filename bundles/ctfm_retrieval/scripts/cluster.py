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
"""2-D t-SNE or UMAP map of stored scan embeddings coloured by class label (PNG + coordinates CSV)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .ctfm_common.runtime import atomic_write, atomic_write_csv
from .embedding import read_embedding_file, read_index_table
from .evaluation import read_labels

logger = logging.getLogger("ctfm_retrieval.cluster")


METHODS = ("tsne", "umap")


def _project(vectors: np.ndarray, method: str, perplexity: float, n_neighbors: int, min_dist: float, seed: int):
    """``[N, 2]`` coordinates and a short description of the projection."""
    if method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = float(min(perplexity, len(vectors) - 1))
        coords = TSNE(
            n_components=2, perplexity=perplexity, metric="cosine", init="random", random_state=int(seed)
        ).fit_transform(vectors)
        return coords, f"t-SNE, perplexity {perplexity:g}"
    try:
        import umap
    except ImportError as e:
        raise ImportError("method 'umap' needs umap-learn: pip install umap-learn==0.5.12") from e
    n_neighbors = int(min(n_neighbors, len(vectors) - 1))
    reducer = umap.UMAP(
        n_components=2,
        n_neighbors=n_neighbors,
        min_dist=float(min_dist),
        metric="cosine",
        # spectral initialisation needs more points than neighbours per point; few scans: random
        init="spectral" if len(vectors) > 2 * n_neighbors else "random",
        random_state=int(seed),
        n_jobs=1,
    )
    return reducer.fit_transform(vectors), f"UMAP, {n_neighbors} neighbours, min_dist {min_dist:g}"


def cluster_map(
    *,
    embeddings_dir: str,
    output_dir: str,
    labels: str = "",
    method: str = "tsne",
    perplexity: float = 100.0,
    n_neighbors: int = 15,
    min_dist: float = 0.1,
    seed: int = 0,
) -> Path:
    """2-D map of the stored scan embeddings (cosine metric), coloured by label.

    Args:
        embeddings_dir: the embed workflow's ``<output_dir>/embeddings``.
        output_dir: where ``<method>.csv`` (case, label, x, y) and ``<method>.png`` go.
        labels: a case,label CSV, a datalist with class labels, or empty for the index's label column.
        method: ``tsne`` (scikit-learn; the reference's perplexity 100, capped below the number of
            scans) or ``umap`` (umap-learn; ``n_neighbors`` capped likewise).
        perplexity: t-SNE perplexity.
        n_neighbors, min_dist: UMAP's neighbourhood size and packing.
        seed: random state (with a seed, UMAP runs single-threaded and is reproducible).

    Returns:
        The CSV path.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got '{method}'")
    rows = read_index_table(embeddings_dir)
    if len(rows) < 3:
        raise ValueError(f"{embeddings_dir}: a 2-D map needs at least 3 embeddings, found {len(rows)}")
    label_of = read_labels(labels, rows)
    vectors = np.stack(
        [read_embedding_file(Path(embeddings_dir) / r["file"])[0]["embedding"].float().numpy() for r in rows]
    )
    coords, described = _project(vectors, method, perplexity, n_neighbors, min_dist, seed)
    classes = [label_of.get(r["case"], "") for r in rows]
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_csv(out / f"{method}.csv", [{"case": r["case"], "label": c, "x": float(x), "y": float(y)}
                                             for r, c, (x, y) in zip(rows, classes, coords)],
                     ("case", "label", "x", "y"), lineterminator="\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 6))
    for name in sorted(set(classes)):
        chosen = np.array([c == name for c in classes])
        ax.scatter(coords[chosen, 0], coords[chosen, 1], s=12, label=name or "(no label)")
    ax.legend(fontsize=8, markerscale=2)
    ax.set_title(f"{len(rows)} scan embeddings ({described})")
    ax.set_xticks([])
    ax.set_yticks([])
    try:
        atomic_write(out / f"{method}.png", lambda tmp: fig.savefig(tmp, dpi=100))
    finally:
        plt.close(fig)
    logger.info(f"{described} of {len(rows)} embeddings -> {out / f'{method}.csv'}, {out / f'{method}.png'}")
    return out / f"{method}.csv"
