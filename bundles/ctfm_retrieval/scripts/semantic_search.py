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
"""Semantic search: a point in one scan -> cosine-similarity map over another scan.

The encoder's feature map (level ``feature_level``, stride 16 at the last level) of both scans
is computed in one pass each; the query vector is the feature at the query point, the map is
its cosine similarity with every feature voxel of the target, upsampled to the preprocessed
grid and inverted (MONAI inverse transforms) onto the target's original grid and affine.
Top matches are the best feature voxels (distinct positions); the hit rate is the share of them
that fall inside a target label mask (the reference's "matches inside the heart").
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .ctfm_common.inputs import case_name, claim_case_names
from .ctfm_common.runtime import as_bool, atomic_write, atomic_write_csv, atomic_write_text
from .embedding import voxel_to_world

logger = logging.getLogger("ctfm_retrieval.semantic_search")


class _Steps:
    """Numbered log lines for the long steps of one search (each takes minutes on a full-size CT):
    ``semantic search 2/6: encoding ... (3.1 s so far)``, then ``semantic search done in ... s``."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.count = 0
        self.start = time.perf_counter()

    def __call__(self, what: str) -> None:
        self.count += 1
        elapsed = time.perf_counter() - self.start
        logger.info(f"semantic search {self.count}/{self.total}: {what} ({elapsed:.1f} s so far)")

    def done(self) -> None:
        logger.info(f"semantic search done in {time.perf_counter() - self.start:.1f} s")


def _voxels(image: torch.Tensor) -> str:
    return " x ".join(str(int(n)) for n in image.shape[1:])


def world_point(point: Sequence[float], point_space: str, image_path: str) -> np.ndarray:
    """The query point in world mm (RAS); ``voxel`` points are indices into the file's own grid."""
    point = np.asarray(point, dtype=np.float64)
    if point.shape != (3,):
        raise ValueError(f"query_point must be 3 numbers, got {point.tolist()}")
    if point_space == "world":
        return point
    if point_space == "voxel":
        from monai.transforms import LoadImage

        affine = LoadImage(image_only=True)(image_path).affine
        return voxel_to_world(affine, point[None])[0]
    raise ValueError(f"point_space must be 'world' or 'voxel', got '{point_space}'")


def _features(
    network: nn.Module, image: torch.Tensor, level: int, device: torch.device, amp: bool, ras_voxel_order: bool = False
) -> torch.Tensor:
    """Feature map ``(C, d, h, w)`` of ``image`` (SPL voxel order) at encoder ``level``, on the image's axes.

    ``ras_voxel_order``: feed the encoder the array in RAS voxel order, as CT-FM's
    ``semantic_search_quantitative.py`` does (``x.permute(0, 1, 4, 3, 2).flip(2).flip(3)``), and
    bring the features back to SPL order (exact on a grid divisible by the level's stride).
    """
    encoder = getattr(network, "encoder", network)
    context = torch.autocast("cuda", dtype=torch.bfloat16) if amp and device.type == "cuda" else nullcontext()
    with torch.no_grad(), context:
        data = image.as_tensor() if hasattr(image, "as_tensor") else image
        x = data[None].float().to(device)
        if ras_voxel_order:
            x = x.permute(0, 1, 4, 3, 2).flip(2).flip(3)
        features = encoder(x)[level]
        if ras_voxel_order:
            features = features.flip(2).flip(3).permute(0, 1, 4, 3, 2)
        return features[0].float().cpu()


def _feature_centres(shape: Sequence[int], stride: Sequence[float]) -> np.ndarray:
    """Preprocessed-grid voxel coordinates of every feature voxel's centre, C order."""
    grids = np.meshgrid(*[(np.arange(n) + 0.5) * s - 0.5 for n, s in zip(shape, stride)], indexing="ij")
    return np.stack([g.ravel() for g in grids], axis=1)


def hit_rate_inside_mask(
    points_world: np.ndarray, label_path: str, label_values: Sequence[int]
) -> tuple[float, list[bool]]:
    """Share of world points whose nearest voxel of the label map holds one of ``label_values``."""
    import nibabel as nib

    labels = nib.load(label_path)
    data = np.asanyarray(labels.dataobj)
    voxels = np.rint(nib.affines.apply_affine(np.linalg.inv(labels.affine), points_world)).astype(int)
    inside = []
    for v in voxels:
        ok = all(0 <= c < n for c, n in zip(v, data.shape)) and int(data[tuple(v)]) in set(int(x) for x in label_values)
        inside.append(bool(ok))
    return (float(np.mean(inside)) if inside else 0.0), inside


def save_map_on_input_grid(
    values: torch.Tensor, image: torch.Tensor, preprocessing: Callable, source: str, path: Path
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Invert a map made on the preprocessed grid back onto ``source``'s grid and write it as NIfTI.

    Args:
        values: the map, shaped like the preprocessed ``image`` (channel first).
        image: the preprocessed image (a MetaTensor that records its transforms).
        preprocessing: the invertible transforms that made ``image`` from ``source``.
        source: the input file or DICOM folder.
        path: the NIfTI to write (atomically), with the source's affine.

    Returns:
        ``(map array, affine, source image array)`` for plotting.
    """
    import nibabel as nib

    map_pre = image.clone()
    map_pre.set_array(values)
    restored = preprocessing.inverse({"image": map_pre})["image"]

    original = nib.load(source) if Path(source).is_file() and str(source).endswith((".nii", ".nii.gz")) else None
    affine = original.affine if original is not None else np.asarray(restored.affine, dtype=np.float64)
    array = (
        restored.as_tensor()[0].numpy().astype(np.float32)
        if hasattr(restored, "as_tensor")
        else np.asarray(restored[0])
    )
    if original is not None and array.shape != original.shape:
        raise RuntimeError(f"inverted map {array.shape} does not match {source} {original.shape}")
    atomic_write(path, lambda tmp: nib.save(nib.Nifti1Image(array, affine), str(tmp)))
    if original is not None:
        return array, affine, original.get_fdata()
    from monai.transforms import LoadImage

    return array, affine, np.asarray(LoadImage(image_only=True)(source))


def save_overlay_png(
    image: np.ndarray,
    overlay: np.ndarray,
    centre: Sequence[float],
    title: str,
    path: Path,
    vmin: float | None = None,
    vmax: float | None = None,
    label: str = "cosine similarity",
    affine: np.ndarray | None = None,
    cmap: str = "viridis",
) -> None:
    """Axial, coronal and sagittal slices through voxel ``centre`` (marked), overlay in colour, atomically.

    The display convention of ``ctfm_common.display`` (the same as the segmentation preview): RAS for
    display, anterior / head up, the patient's right on the viewer's left, physical aspect ratio,
    anatomical axis labels. The colour scale fits the overlay's values unless ``vmin`` / ``vmax`` are
    given.

    Args:
        image: the CT (HU) on the input's grid.
        overlay: the map on the same grid.
        centre: voxel index (stored order) the slices pass through and that is marked.
        title: figure title.
        path: the PNG to write.
        vmin: lower end of the colour scale (default: fitted to the data).
        vmax: upper end of the colour scale (default: fitted to the data).
        label: colour bar label.
        affine: the grid's voxel-to-world matrix (default: identity, i.e. RAS voxels).
        cmap: colour map of the overlay.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .ctfm_common.display import draw_view, orthogonal_views, value_range

    affine = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    low, high = value_range(overlay)
    vmin = low if vmin is None else vmin
    vmax = high if vmax is None else vmax
    grey = value_range(image)
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4))
    for ax, view in zip(axes, orthogonal_views([image, overlay], affine, centre)):
        shown = draw_view(
            ax,
            view,
            images=[
                {"cmap": "gray", "vmin": grey[0], "vmax": grey[1]},
                {"cmap": cmap, "alpha": 0.45, "vmin": vmin, "vmax": vmax},
            ],
        )
    fig.colorbar(shown, ax=axes, fraction=0.02, label=label)
    fig.suptitle(title)
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=80))
    finally:
        plt.close(fig)


def semantic_search(
    *,
    target: str,
    query_image: str,
    query_point: Sequence[float],
    preprocessing: Callable,
    network: nn.Module,
    output_dir: str,
    point_space: str = "world",
    feature_level: int = -1,
    top_n: int = 10,
    target_label: str = "",
    label_values: Sequence[int] = (),
    device: str | torch.device = "cpu",
    amp: bool = True,
    ras_voxel_order: bool = False,
) -> dict:
    """Similarity map of the query point's feature over the target scan, with top matches and hit rate.

    Args:
        target: scan to search (file or DICOM folder).
        query_image: scan holding the query point (may be the target).
        query_point: the point, world mm (RAS) or voxel indices of ``query_image`` (``point_space``).
        preprocessing: invertible MONAI transform to the preprocessed ``image`` (embed recipe, divisible pad).
        network: a network holding the shared encoder.
        output_dir: results go to ``<output_dir>/semantic_search``.
        point_space: ``world`` or ``voxel``.
        feature_level: encoder level whose features are compared (-1: last, stride 16).
        top_n: number of top matches reported.
        target_label: optional label map on the target's grid for the hit rate.
        label_values: label values that count as inside.
        device: where the encoder runs.
        amp: bf16 autocast on CUDA.
        ras_voxel_order: the encoder sees the arrays in RAS voxel order (CT-FM's semantic-search
            script does this; its 97.7 % heart hit rate was measured that way), see :func:`_features`.

    Returns:
        The summary (also ``<target>_summary.json``).
    """
    import nibabel as nib

    device = torch.device(device)
    amp = as_bool(amp)
    out_dir = Path(output_dir) / "semantic_search"
    out_dir.mkdir(parents=True, exist_ok=True)
    point = world_point(query_point, point_space, query_image)
    same = target == query_image
    step = _Steps(4 if same else 6)

    step(f"reading and preprocessing {query_image}")
    query = preprocessing({"image": query_image})["image"]
    ras_voxel_order = as_bool(ras_voxel_order)
    step(f"encoding the query scan ({_voxels(query)} voxels) on {device}")
    query_features = _features(network, query, feature_level, device, amp, ras_voxel_order)
    q_stride = np.array(query.shape[1:]) / np.array(query_features.shape[1:])
    q_voxel = voxel_to_world(np.linalg.inv(np.asarray(query.affine, dtype=np.float64)), point[None])[0]
    if np.any(q_voxel < -0.5) or np.any(q_voxel > np.array(query.shape[1:]) - 0.5):
        raise ValueError(f"query point {point.tolist()} (world mm) lies outside {query_image}")
    q_index = tuple(
        int(np.clip(v // s, 0, n - 1)) for v, s, n in zip(q_voxel + 0.5, q_stride, query_features.shape[1:])
    )
    vector = F.normalize(query_features[(slice(None), *q_index)], dim=0)

    if same:
        image, features = query, query_features
    else:
        step(f"reading and preprocessing {target}")
        image = preprocessing({"image": target})["image"]
        step(f"encoding the target scan ({_voxels(image)} voxels) on {device}")
        features = _features(network, image, feature_level, device, amp, ras_voxel_order)
    similarity = torch.einsum("c,cdhw->dhw", vector, F.normalize(features, dim=0))
    stride = np.array(image.shape[1:]) / np.array(features.shape[1:])

    # top matches: best feature voxels, their centres in world mm
    n = min(int(top_n), similarity.numel())
    scores, flat = torch.topk(similarity.flatten(), n)
    centres = _feature_centres(features.shape[1:], stride)[flat.numpy()]
    matches_world = voxel_to_world(image.affine, centres)

    # the map on the preprocessed grid, then back onto the target's grid (MONAI inverse transforms)
    step(f"inverting the similarity map onto the grid of {target}")
    upsampled = F.interpolate(
        similarity[None, None], size=tuple(image.shape[1:]), mode="trilinear", align_corners=False
    )[0]
    name = claim_case_names(out_dir, [target], logger=logger)[0]  # never another scan's name in out_dir
    nifti_path = out_dir / f"{name}_similarity.nii.gz"
    map_array, affine, target_image = save_map_on_input_grid(upsampled, image, preprocessing, target, nifti_path)

    summary = {
        "target": str(target),
        "query_image": str(query_image),
        "query_point_world": point.tolist(),
        "feature_level": int(feature_level),
        "ras_voxel_order": ras_voxel_order,
        "similarity_map": str(nifti_path),
        "top_n": n,
    }
    step("writing the matches, the summary and the PNG")
    inside: list = [None] * n
    if target_label:
        summary["hit_rate"], inside = hit_rate_inside_mask(matches_world, target_label, label_values)
        summary["label_values"] = [int(v) for v in label_values]
    voxels = nib.affines.apply_affine(np.linalg.inv(affine), matches_world)
    rows = [
        {
            "rank": r + 1,
            "score": float(s),
            "x": w[0],
            "y": w[1],
            "z": w[2],
            "i": v[0],
            "j": v[1],
            "k": v[2],
            "inside_mask": "" if inside[r] is None else int(inside[r]),
        }
        for r, (s, w, v) in enumerate(zip(scores.tolist(), matches_world, voxels))
    ]
    atomic_write_csv(out_dir / f"{name}_matches.csv", rows, list(rows[0]), lineterminator="\n")
    # through the query point when the target is the query image, else through the best match (marked)
    shown_world = point if same else matches_world[0]
    shown = nib.affines.apply_affine(np.linalg.inv(affine), np.asarray(shown_world, dtype=np.float64))
    shown = np.clip(np.rint(shown).astype(int), 0, np.array(map_array.shape) - 1)
    marked = "query point" if same else "best match"
    save_overlay_png(
        target_image,
        map_array,
        shown,
        f"{name}: cosine similarity to {point.round(1).tolist()} mm in {case_name(query_image)} (+: {marked})",
        out_dir / f"{name}_similarity.png",
        affine=affine,
    )
    atomic_write_text(out_dir / f"{name}_summary.json", json.dumps(summary, indent=2) + "\n")
    logger.info(
        f"similarity map -> {nifti_path}; best match {matches_world[0].round(1).tolist()} mm "
        f"(score {rows[0]['score']:.3f})" + (f"; hit rate {summary['hit_rate']:.3f}" if target_label else "")
    )
    step.done()
    return summary
