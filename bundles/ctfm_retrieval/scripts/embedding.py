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
"""Scan embeddings with the shared encoder: patch grid, aggregation, storage, resume and shards.

Storage (one file per scan, see docs/README.md)::

    <output_dir>/embeddings/<case>.safetensors   tensors: embedding [D], optionally
                                                 patch_embeddings [N, D], patch_centers_world [N, 3]
                                                 metadata: source, aggregation, patch size, ...
    <output_dir>/embeddings/index.csv            case, source, file, dim, label

Preprocessing (load, SPL, spacing, HU window, pad) is a MONAI ``Compose`` declared in the
config; this module only does what MONAI lacks: the patch grid with world coordinates,
aggregation of patch embeddings, and the resumable, shardable writer.
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from monai.data.utils import dense_patch_slices
from monai.inferers import Inferer
from torch import nn

from .ctfm_common.cases import run_cases
from .ctfm_common.encoder import weights_digest
from .ctfm_common.inputs import IMAGE_SUFFIXES, case_names, claim_case_names
from .ctfm_common.runtime import as_bool, atomic_write, atomic_write_csv, shard_items

logger = logging.getLogger("ctfm_retrieval.embed")

AGGREGATIONS = ("mean", "max", "min", "global")
INDEX_COLUMNS = ("case", "source", "file", "dim", "label")
EMBEDDINGS_SUBDIR = "embeddings"


def default_device() -> torch.device:
    """``cuda:LOCAL_RANK`` when CUDA is available (one GPU per torchrun process), else the CPU."""
    if torch.cuda.is_available():
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) % torch.cuda.device_count()}")
    return torch.device("cpu")


def save_model(network: nn.Module, encoder_ckpt: str, path: str) -> Path:
    """Write ``models/model.pt`` (the Model Zoo's weights file) from any ``encoder_ckpt`` source.

    ``ckpt_export`` and the zoo's CI read ``models/model.pt`` with ``torch.load``; the encoder is
    usually a ``.safetensors`` file or a hub repo. This loads it strictly (any prefix) and saves the
    network's state dict atomically.

    Args:
        network: the inference config's ``network_def``.
        encoder_ckpt: weights (file, hub folder or repo id).
        path: where to write the state dict.

    Returns:
        The written path.
    """
    from .ctfm_common.encoder import load_encoder_weights

    if not encoder_ckpt:
        raise ValueError("save_model needs --encoder_ckpt (a .safetensors/torch file, a hub folder or a repo id)")
    load_encoder_weights(network, encoder_ckpt, strict=True)
    state = {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
    written = atomic_write(path, lambda tmp: torch.save(state, tmp))
    logger.info(f"saved {encoder_ckpt} as {written}")
    return written


def patch_grid(spatial_shape: Sequence[int], patch_size: Sequence[int], overlap: float) -> list[tuple[slice, ...]]:
    """Sliding-window patch slices covering a volume (the last patch of each axis touches its end).

    Args:
        spatial_shape: volume shape (at least ``patch_size`` along every axis: pad first).
        patch_size: patch shape.
        overlap: fraction of a patch shared by neighbours, in [0, 1).

    Returns:
        The patch slices, in C order of their start positions.
    """
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if any(s < p for s, p in zip(spatial_shape, patch_size)):
        raise ValueError(f"volume {tuple(spatial_shape)} is smaller than the patch {tuple(patch_size)}: pad it first")
    interval = [max(1, int(p * (1 - overlap))) for p in patch_size]
    return dense_patch_slices(spatial_shape, patch_size, interval)


def voxel_to_world(affine: torch.Tensor | np.ndarray, voxels: np.ndarray) -> np.ndarray:
    """Map voxel coordinates ``[N, 3]`` to world millimetres with a 4 x 4 affine."""
    affine = np.asarray(affine.detach().cpu() if isinstance(affine, torch.Tensor) else affine, dtype=np.float64)
    return voxels @ affine[:3, :3].T + affine[:3, 3]


def aggregate(patch_embeddings: torch.Tensor, aggregation: str) -> torch.Tensor:
    """Element-wise ``mean``, ``max`` or ``min`` over patch embeddings ``[N, D]`` -> ``[D]``."""
    if aggregation == "mean":
        return patch_embeddings.mean(0)
    if aggregation == "max":
        return patch_embeddings.amax(0)
    if aggregation == "min":
        return patch_embeddings.amin(0)
    raise ValueError(f"aggregation must be one of mean, max, min (or global), got '{aggregation}'")


class ScanEmbedder:
    """Embed one preprocessed scan: patch embeddings on a sliding grid, aggregated to one vector.

    Args:
        network: maps ``(B, 1, D, H, W)`` to ``(B, dim)`` embeddings (``PooledEncoderHead``).
        patch_size: patch shape in voxels (S, P, L after preprocessing).
        overlap: patch overlap fraction.
        aggregation: ``mean``, ``max``, ``min`` over patches, or ``global`` (one pass over the whole volume).
        batch_size: patches per forward pass.
        amp: bf16 autocast on CUDA (ignored on the CPU).
        device: where the network runs.
    """

    def __init__(
        self,
        network: nn.Module,
        patch_size: Sequence[int] = (24, 128, 128),
        overlap: float = 0.625,
        aggregation: str = "min",
        batch_size: int = 4,
        amp: bool = True,
        device: str | torch.device = "cpu",
    ) -> None:
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {', '.join(AGGREGATIONS)}, got '{aggregation}'")
        self.network = network
        self.patch_size = tuple(int(p) for p in patch_size)
        self.overlap = float(overlap)
        self.aggregation = aggregation
        self.batch_size = int(batch_size)
        self.device = torch.device(device)
        self.amp = as_bool(amp) and self.device.type == "cuda"

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        context = torch.autocast("cuda", dtype=torch.bfloat16) if self.amp else nullcontext()
        with context:
            return self.network(batch.to(self.device)).float()

    @torch.no_grad()
    def __call__(self, image: torch.Tensor, *, with_patches: bool = False) -> dict[str, torch.Tensor]:
        """Embed a preprocessed image ``(1, D, H, W)`` (a MetaTensor: its affine gives world coordinates).

        Args:
            image: channel-first volume, at least one patch large.
            with_patches: also return every patch's embedding and world centre.

        Returns:
            ``embedding`` [D]; with patches (or for patch aggregations internally) ``patch_embeddings`` [N, D]
            and ``patch_centers_world`` [N, 3] (the patch centre in the input's world space, mm).
        """
        out: dict[str, torch.Tensor] = {}
        data = (image.as_tensor() if hasattr(image, "as_tensor") else torch.as_tensor(image)).float()
        data = data.to(self.device)  # one copy of the volume; patches are cut where the network runs
        if self.aggregation == "global":
            out["embedding"] = self._forward(data[None])[0].cpu()
        if self.aggregation != "global" or with_patches:
            slices = patch_grid(data.shape[1:], self.patch_size, self.overlap)
            embeddings = []
            for begin in range(0, len(slices), self.batch_size):
                chunk = slices[begin : begin + self.batch_size]
                embeddings.append(self._forward(torch.stack([data[(slice(None), *s)] for s in chunk])))
            patches = torch.cat(embeddings).cpu()
            if self.aggregation != "global":
                out["embedding"] = aggregate(patches, self.aggregation)
            if with_patches:
                starts = np.array([[s.start for s in sl] for sl in slices], dtype=np.float64)
                centers = starts + (np.array(self.patch_size, dtype=np.float64) - 1) / 2
                affine = getattr(image, "affine", None)
                if affine is None:
                    raise ValueError("patch world coordinates need the image affine (a MetaTensor)")
                out["patch_embeddings"] = patches
                out["patch_centers_world"] = torch.as_tensor(voxel_to_world(affine, centers), dtype=torch.float64)
        return out


class EmbeddingInferer(Inferer):
    """:class:`ScanEmbedder` as a MONAI ``Inferer``, for ``SupervisedEvaluator`` and apps that use the
    bundle's ``inferer`` property: each image of a batch ``(B, 1, D, H, W)`` -> its embedding, ``(B, dim)``,
    with the embedder's patch grid and aggregation and the ``network`` it is called with.

    Args:
        embedder: the bundle's ``embedder``.
    """

    def __init__(self, embedder: ScanEmbedder) -> None:
        super().__init__()
        self.embedder = embedder

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args, **kwargs) -> torch.Tensor:
        embedder = copy.copy(self.embedder)
        embedder.network = network
        return torch.stack([embedder(image)["embedding"] for image in inputs]).to(inputs.device)


def write_embedding_file(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """Write one scan's tensors and string metadata as ``.safetensors``, atomically."""
    from safetensors.torch import save_file

    contiguous = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(contiguous, str(tmp), metadata=dict(metadata)))


def read_embedding_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a stored scan embedding: ``(tensors, metadata)``."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """Only the metadata of a stored scan embedding (``{}`` when the file is unreadable)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception:  # truncated or foreign file: treat as not done
        return {}


def embedding_settings(
    *,
    aggregation: str,
    patch_size: Sequence[int],
    overlap: float,
    spacing: Sequence[float],
    init_filters: int,
    encoder_ckpt: str,
    orientation: str = "SPL",
    hu_range: Sequence[float] = (-1024, 2048),
    foreground_hu: float = 0.0,
) -> dict[str, str]:
    """The settings that define an embedding, as the string metadata stored with it.

    Two embeddings are comparable only when these agree; resume, index and query check them.
    """
    return {
        "aggregation": str(aggregation),
        "patch_size": json.dumps([int(p) for p in patch_size]),
        "overlap": json.dumps(float(overlap)),
        "spacing": json.dumps([float(s) for s in spacing]),
        "orientation": str(orientation),
        "hu_range": json.dumps([float(h) for h in hu_range]),
        "foreground_hu": json.dumps(float(foreground_hu)),
        "init_filters": str(int(init_filters)),
        "encoder_ckpt": str(encoder_ckpt),
        # the weights' content: the same path overwritten with other weights makes earlier embeddings stale
        "encoder_sha256": weights_digest(encoder_ckpt),
    }


def unique_case_names(items: Sequence[Mapping], key: str = "image", taken: Mapping[str, str] | None = None) -> list[str]:
    """Case names after the inputs (:func:`ctfm_common.inputs.case_names`): a name two scans
    share (here, or in ``taken``, ``name -> source`` of earlier runs) becomes one derived from
    each scan's full path, the same in every run, and the log says so."""
    return case_names([str(item[key]) for item in items], taken, logger)


def _read_index(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _write_index(path: Path, rows: Sequence[Mapping]) -> None:
    atomic_write_csv(path, sorted(rows, key=lambda r: r["case"]), INDEX_COLUMNS, lineterminator="\n")


def merge_index_parts(embeddings_dir: Path, num_shards: int) -> bool:
    """Merge every shard's index part into ``index.csv`` once all ``num_shards`` parts exist.

    Rows of earlier runs whose files still exist are kept unless a part lists the same case.

    Returns:
        True when the merge happened (all parts were there).
    """
    parts = [embeddings_dir / f"index.shard{i}of{num_shards}.csv" for i in range(num_shards)]
    if not all(p.is_file() for p in parts):
        return False
    rows = {r["case"]: r for r in _read_index(embeddings_dir / "index.csv") if (embeddings_dir / r["file"]).is_file()}
    for part in parts:
        rows.update({r["case"]: r for r in _read_index(part)})
    _write_index(embeddings_dir / "index.csv", list(rows.values()))
    for part in parts:
        part.unlink(missing_ok=True)
    return True


def embed_dataset(
    *,
    items: Sequence[dict],
    preprocessing: Callable,
    embedder: ScanEmbedder,
    output_dir: str | os.PathLike,
    settings: Mapping[str, str],
    save_patches: bool = False,
    shard_index: int = 0,
    num_shards: int = 1,
    num_workers: int = 0,
    key: str = "image",
) -> dict:
    """Embed every scan of this shard and write one ``.safetensors`` per scan plus the index table.

    Cases whose file exists with the same settings and source are skipped (resume). A scan that
    cannot be read or preprocessed is logged with its path and the problem, listed in
    ``errors[.shardIofN].csv``, and the others go on.

    Args:
        items: data dicts (``scripts.inputs.resolve_input``); other entries (e.g. ``label``) are indexed.
        preprocessing: MONAI transform from a data dict to the preprocessed ``key`` image.
        embedder: the :class:`ScanEmbedder`.
        output_dir: results folder (files go to ``<output_dir>/embeddings``).
        settings: :func:`embedding_settings`, stored with every file.
        save_patches: also store patch embeddings and world centres.
        shard_index: this process's shard in ``[0, num_shards)``; it takes items ``shard_index::num_shards``.
        num_shards: number of shards.
        num_workers: data loader workers.
        key: the image key of ``items``.

    Returns:
        ``{"done": [...], "skipped": [...], "failed": [...]}`` case names of this shard.

    Raises:
        RuntimeError: every scan of the shard failed (so the command exits non-zero), naming each.
    """
    num_shards, shard_index, save_patches = int(num_shards), int(shard_index), as_bool(save_patches)
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"shard_index must be in [0, {num_shards}), got {shard_index}")
    out_dir = Path(output_dir) / EMBEDDINGS_SUBDIR
    out_dir.mkdir(parents=True, exist_ok=True)
    index_file = out_dir / "index.csv"  # names of earlier runs' scans are taken
    taken = {r["case"]: r["source"] for r in _read_index(index_file)} if index_file.is_file() else {}
    names = claim_case_names(out_dir, [str(item[key]) for item in items], taken, logger)
    mine = shard_items(list(range(len(items))), shard_index, num_shards)
    settings = dict(settings, save_patches=str(save_patches))
    if not settings.get("encoder_ckpt"):
        logger.warning("embedding with a RANDOMLY INITIALISED encoder (encoder_ckpt is empty)")

    rows, todo, result = [], [], {"done": [], "skipped": [], "failed": []}
    for i in mine:
        source = str(items[i][key])
        file = out_dir / f"{names[i]}.safetensors"
        expected = dict(settings, case=names[i], source=source)
        if file.is_file() and all(read_metadata(file).get(k) == v for k, v in expected.items()):
            result["skipped"].append(names[i])
            rows.append(_index_row(names[i], items[i], key, file))
        else:
            todo.append(i)
    if result["skipped"]:
        logger.info(f"shard {shard_index}/{num_shards}: {len(result['skipped'])} case(s) already embedded, skipped")

    todo_items = [items[i] for i in todo]

    def embed(n: int, data: Mapping) -> dict:
        i = todo[n]
        out = embedder(data[key], with_patches=save_patches)
        metadata = dict(settings, case=names[i], source=str(items[i][key]), dim=str(out["embedding"].numel()),
                        num_patches=str(len(out.get("patch_embeddings", ()))))
        file = out_dir / f"{names[i]}.safetensors"
        write_embedding_file(file, out, metadata)
        row = _index_row(names[i], items[i], key, file)
        result["done"].append(names[i])
        return row

    def failed(n: int, _: Mapping, message: str) -> dict:
        name, source = names[todo[n]], str(items[todo[n]][key])
        problem = message[len(source) + 2 :] if message.startswith(f"{source}: ") else message  # the scan is named here
        logger.error(f"{source}: cannot embed this scan ({problem}); going on with the others")
        result["failed"].append(name)
        return {"case": name, "source": source, "error": problem}

    def write_index(records: list[dict]) -> None:
        _write_index(out_dir / f"index.shard{shard_index}of{num_shards}.csv",
                     rows + [r for r in records if "error" not in r])
        merged = merge_index_parts(out_dir, num_shards)
        state = f"merged into {out_dir / 'index.csv'}" if merged else "part written (waiting for other shards)"
        logger.info(
            f"shard {shard_index}/{num_shards}: {len(result['done'])} embedded, {len(result['skipped'])} skipped, "
            f"{len(result['failed'])} failed; index {state}"
        )

    suffix = "" if num_shards == 1 else f".shard{shard_index}of{num_shards}"
    run_cases(items=todo_items, load=preprocessing, process=embed, failed=failed, summary=write_index,
              error_list=out_dir / f"errors{suffix}.csv", lineterminator="\n", ok_before=len(result["skipped"]),
              all_failed=f"every scan of shard {shard_index}/{num_shards} failed ({{count}})", key=key,
              desc=f"embed shard {shard_index}/{num_shards}", unit="scan", num_workers=num_workers, log=logger)
    return result


def _index_row(name: str, item: Mapping, key: str, file: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        dim = f.get_slice("embedding").get_shape()[0]
    return {"case": name, "source": str(item[key]), "file": file.name, "dim": dim, "label": class_label(item)}


def class_label(item: Mapping) -> str:
    """The item's class label (e.g. a datalist's ``"label": 1``) as text; ``""`` when it has none or
    its ``label`` is a segmentation file path rather than a class."""
    label = item.get("label", "")
    if isinstance(label, bool):
        return str(int(label))
    if isinstance(label, (int, float)):
        return str(label)
    if isinstance(label, str) and not label.lower().endswith(IMAGE_SUFFIXES):
        return label
    return ""


def read_index_table(embeddings_dir: str | os.PathLike) -> list[dict]:
    """Rows of ``<embeddings_dir>/index.csv`` (raises with a hint when it is missing)."""
    path = Path(embeddings_dir) / "index.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no embedding index table; run embed.json first (or wait for all shards).")
    return _read_index(path)
