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
"""Occlusion saliency of the embedding: which regions change it most when hidden.

MONAI's ``OcclusionSensitivity`` slides an occluding mask over the volume and records the
model output at each position; the model here is the encoder followed by the cosine similarity
to the unoccluded embedding, so ``saliency = 1 - cosine(embedding(occluded), embedding(image))``
(the reference's definition), inverted onto the input's grid and affine.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .batch import run_each
from .ctfm_common.display import readable
from .ctfm_common.inputs import claim_case_names, resolve_input
from .ctfm_common.runtime import atomic_write_text
from .semantic_search import save_map_on_input_grid, save_overlay_png

logger = logging.getLogger("ctfm_retrieval.saliency")


class CosineToReference(nn.Module):
    """``x -> cosine(network(x), reference)`` as a one-output "classifier" for ``OcclusionSensitivity``."""

    def __init__(self, network: nn.Module, reference: torch.Tensor) -> None:
        super().__init__()
        self.network = network
        self.register_buffer("reference", F.normalize(reference.flatten().float(), dim=0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (F.normalize(self.network(x).float(), dim=1) @ self.reference)[:, None]


def occlusion_saliency(
    *,
    input: str,
    preprocessing: Callable,
    network: nn.Module,
    output_dir: str,
    mask_size: int | Sequence[int] = 10,
    overlap: float = 0.25,
    mode: str = "gaussian",
    n_batch: int = 8,
    device: str | torch.device = "cpu",
    name: str = "",
) -> dict:
    """Occlusion saliency map of one scan's embedding, as NIfTI on the input's grid + PNG.

    Args:
        input: the scan (file or DICOM folder).
        preprocessing: invertible MONAI transform to the preprocessed ``image``.
        network: maps ``(B, 1, D, H, W)`` to embeddings ``(B, dim)``.
        output_dir: results go to ``<output_dir>/saliency``.
        mask_size: occluding cube, voxels of the preprocessed grid (the reference: 10).
        overlap: overlap of neighbouring occlusions (the reference: 0.25).
        mode: what fills the occluded cube (MONAI: ``gaussian``, the default there and in CT-FM,
            ``mean_patch``, ``mean_img`` or a value).
        n_batch: occluded volumes per forward pass.
        device: where the encoder runs.
        name: the case's output name (default: claimed in the output folder, see
            ``ctfm_common.inputs.claim_case_names``: never the name of another scan mapped there).

    Returns:
        The summary (also ``<case>_saliency.json``).
    """
    from monai.visualize import OcclusionSensitivity

    device = torch.device(device)
    out_dir = Path(output_dir) / "saliency"
    out_dir.mkdir(parents=True, exist_ok=True)
    image = preprocessing({"image": input})["image"]
    data = image.as_tensor()[None].float().to(device)
    with torch.no_grad():
        reference = network(data)[0]
        model = CosineToReference(network, reference).eval()
        occlusion = OcclusionSensitivity(
            model,
            mask_size=mask_size,
            n_batch=int(n_batch),
            overlap=float(overlap),
            mode=mode,
            activate=False,
            verbose=True,  # a progress bar: on a full-size scan this runs for minutes
        )
        occ_map, _ = occlusion(data)
    occ_map = occ_map.as_tensor() if hasattr(occ_map, "as_tensor") else occ_map
    # MONAI 1.6 returns (B, outputs, D, H, W); older releases put the outputs last
    occ_map = occ_map[0] if occ_map.shape[2:] == data.shape[2:] else occ_map[0, ..., 0]
    saliency = (1.0 - occ_map.reshape(1, *data.shape[2:])).cpu()
    name = name or claim_case_names(out_dir, [input], logger=logger)[0]
    nifti = out_dir / f"{name}_saliency.nii.gz"
    array, affine, source = save_map_on_input_grid(saliency, image, preprocessing, input, nifti)
    peak = np.unravel_index(int(np.argmax(array)), array.shape)
    save_overlay_png(
        source,
        array,
        peak,
        f"{name}: occlusion saliency (1 - cosine to the unoccluded embedding)",
        out_dir / f"{name}_saliency.png",
        vmin=0.0,
        label="1 - cosine (+: peak)",
        affine=affine,
        cmap="inferno",
    )
    summary = {
        "input": str(input),
        "saliency_map": str(nifti),
        "mask_size": mask_size,
        "overlap": float(overlap),
        "mode": mode,
        "max": float(array.max()),
        "mean": float(array.mean()),
        "peak_world": (affine[:3, :3] @ np.array(peak, dtype=float) + affine[:3, 3]).tolist(),
    }
    atomic_write_text(out_dir / f"{name}_saliency.json", json.dumps(summary, indent=2) + "\n")
    logger.info(
        f"saliency map -> {nifti} (max {readable(summary['max'])} at {np.round(summary['peak_world'], 1).tolist()} mm)"
    )
    return summary


def saliency_maps(*, input: str, dataset_dir: str = "", output_dir: str, **kwargs) -> list[dict]:
    """:func:`occlusion_saliency` of every scan of ``input`` (a file, DICOM folder, glob or datalist).

    A scan that cannot be read or mapped is named in the log and in
    ``<output_dir>/saliency/errors.csv``; the others go on.

    Args:
        input: the scans.
        dataset_dir: base of relative datalist paths.
        output_dir: results go to ``<output_dir>/saliency``.
        kwargs: the other arguments of :func:`occlusion_saliency`.

    Returns:
        The summaries of the scans mapped.
    """
    sources = [str(item["image"]) for item in resolve_input(input, dataset_dir=dataset_dir or None)]
    names = claim_case_names(Path(output_dir) / "saliency", sources, logger=logger)
    done = run_each(
        sources,
        lambda i: occlusion_saliency(input=sources[i], output_dir=output_dir, name=names[i], **kwargs),
        errors_file=Path(output_dir) / "saliency" / "errors.csv",
        what="map the saliency of this scan",
    )
    return [summary for _, summary in done]
