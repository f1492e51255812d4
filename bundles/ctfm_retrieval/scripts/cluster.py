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
"""2-D t-SNE map of stored scan embeddings coloured by class label (PNG + coordinates CSV)."""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path

import numpy as np

from .ctfm_common.runtime import atomic_write, atomic_write_text
from .embedding import read_embedding_file, read_index_table
from .evaluation import read_labels

logger = logging.getLogger("ctfm_retrieval.cluster")


def tsne_map(
    *, embeddings_dir: str, output_dir: str, labels: str = "", perplexity: float = 100.0, seed: int = 0
) -> Path:
    """t-SNE (cosine metric, the reference's perplexity 100, capped below the number of scans).

    Args:
        embeddings_dir: the embed workflow's ``<output_dir>/embeddings``.
        output_dir: where ``tsne.csv`` (case, label, x, y) and ``tsne.png`` go.
        labels: a case,label CSV, a datalist with class labels, or empty for the index's label column.
        perplexity: t-SNE perplexity.
        seed: random state.

    Returns:
        The CSV path.
    """
    from sklearn.manifold import TSNE

    rows = read_index_table(embeddings_dir)
    if len(rows) < 3:
        raise ValueError(f"{embeddings_dir}: t-SNE needs at least 3 embeddings, found {len(rows)}")
    label_of = read_labels(labels, rows)
    vectors = np.stack(
        [read_embedding_file(Path(embeddings_dir) / r["file"])[0]["embedding"].float().numpy() for r in rows]
    )
    perplexity = float(min(perplexity, len(rows) - 1))
    coords = TSNE(
        n_components=2, perplexity=perplexity, metric="cosine", init="random", random_state=int(seed)
    ).fit_transform(vectors)
    classes = [label_of.get(r["case"], "") for r in rows]
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["case", "label", "x", "y"])
    writer.writerows([r["case"], c, float(x), float(y)] for r, c, (x, y) in zip(rows, classes, coords))
    atomic_write_text(out / "tsne.csv", buffer.getvalue())

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 6))
    for name in sorted(set(classes)):
        chosen = np.array([c == name for c in classes])
        ax.scatter(coords[chosen, 0], coords[chosen, 1], s=12, label=name or "(no label)")
    ax.legend(fontsize=8, markerscale=2)
    ax.set_title(f"t-SNE of {len(rows)} scan embeddings (perplexity {perplexity:g})")
    ax.set_xticks([])
    ax.set_yticks([])
    try:
        atomic_write(out / "tsne.png", lambda tmp: fig.savefig(tmp, dpi=100))
    finally:
        plt.close(fig)
    logger.info(f"t-SNE of {len(rows)} embeddings -> {out / 'tsne.csv'}, {out / 'tsne.png'}")
    return out / "tsne.csv"
