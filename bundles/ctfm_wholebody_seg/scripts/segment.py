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
"""Per-case inference loop and its outputs (label map, structure CSV, PNG preview).

MONAI provides the pieces (``preprocessing``, ``inferer``, ``postprocessing`` in
configs/inference.json); this module runs them case by case through the shared per-case runner
(``ctfm_common.cases.run_cases``: the next scan is read while the network works, one unreadable
scan does not stop a batch) and writes every output atomically (temporary file, then
``os.replace``). Each scan's voxels are read once: the structure table and the preview use the
array as loaded.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .ctfm_common.cases import LOAD_SECONDS_KEY, SOURCE_KEY, WAIT_SECONDS_KEY, run_cases
from .ctfm_common.inputs import claim_case_names
from .ctfm_common.runtime import (as_bool, atomic_write, atomic_write_csv, atomic_write_text, cpu_has_native_bf16,
                                   file_lock, merge_case_records, read_case_records)
from .ctfm_common.display import ras_voxel_sizes  # noqa: F401  (the preview's voxel sizes, re-exported)
from .labels import display_colours, read_label_names

logger = logging.getLogger("ctfm_wholebody_seg")

# Soft-tissue window of the PNG preview (HU).
PREVIEW_WINDOW = (-160.0, 240.0)


def merge_summary(path: Path, results: Sequence[Mapping]) -> dict:
    """Merge this run's case records into ``summary.json`` by case (:func:`merge_case_records`): earlier
    runs' cases stay, a rerun of a case replaces its record; counts cover every case in the file."""
    summary: dict = {}

    def write(merged: list[dict]) -> None:
        ok = sum(c.get("status") == "ok" for c in merged)
        summary.update(num_ok=ok, num_failed=len(merged) - ok, cases=merged)
        atomic_write_text(path, json.dumps(summary, indent=2) + "\n")

    merge_case_records(path, results, write)
    return summary


def write_label_map(labels: np.ndarray, affine: np.ndarray, path: str | os.PathLike) -> Path:
    """Write a label map as NIfTI (uint8, or int16 above 255 classes), atomically."""
    import nibabel as nib

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dtype = np.uint8 if labels.max(initial=0) < 256 else np.int16
    img = nib.Nifti1Image(labels.astype(dtype), np.asarray(affine, dtype=np.float64))
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    img.header.set_xyzt_units("mm")
    return atomic_write(path, lambda tmp: nib.save(img, str(tmp)))


def write_bytes_atomic(data: bytes, path: Path) -> Path:
    """Write ``data`` to ``path`` through a temporary file and ``os.replace``."""
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def structure_table(
    labels: np.ndarray, image_hu: np.ndarray, affine: np.ndarray, names: Mapping[int, str]
) -> list[dict]:
    """Volume (ml) and mean HU of every structure present (background excluded).

    Args:
        labels: integer label map.
        image_hu: the CT in HU on the same grid.
        affine: voxel-to-world matrix (mm) of that grid.
        names: index -> structure name.

    Returns:
        One row per present structure: ``index, name, voxels, volume_ml, mean_hu``.
    """
    flat = labels.astype(np.int64).ravel()
    counts = np.bincount(flat)
    sums = np.bincount(flat, weights=image_hu.astype(np.float64).ravel(), minlength=len(counts))
    voxel_ml = abs(float(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3]))) / 1000.0
    return [
        {
            "index": i,
            "name": names.get(i, f"class_{i}"),
            "voxels": int(counts[i]),
            "volume_ml": round(float(counts[i]) * voxel_ml, 3),
            "mean_hu": round(float(sums[i] / counts[i]), 2),
        }
        for i in range(1, len(counts))
        if counts[i] > 0
    ]


def write_colour_table(names: Mapping[int, str], colours: Mapping[int, Sequence[int]], path: str | os.PathLike) -> Path:
    """A colour table beside the label map (3D Slicer's ``.ctbl`` text format: ``index name R G B A``).

    Slicer loads it as a colour node to show the NIfTI label map with names and colours; other
    tools read it as plain text.
    """
    lines = ["# CT-FM whole-body segmentation: label value, structure name, display colour (R G B A, 0-255)",
             "0 background 0 0 0 0"]
    lines += [f"{i} {names[i]} {' '.join(str(int(c)) for c in colours[i])} 255" for i in sorted(colours) if i in names]
    return atomic_write_text(path, "\n".join(lines) + "\n")


def write_seg_nrrd(
    labels: np.ndarray,
    affine: np.ndarray,
    names: Mapping[int, str],
    colours: Mapping[int, Sequence[int]],
    path: str | os.PathLike,
) -> Path:
    """The label map as a 3D Slicer segmentation (``.seg.nrrd``): one segment per structure present,
    with its name, label value and colour, on the same grid (written atomically, gzip).

    Args:
        labels: integer label map.
        affine: its voxel-to-world matrix (RAS, mm).
        names: index -> structure name.
        colours: index -> (r, g, b) 0-255.
        path: ``.seg.nrrd`` file to write.

    Returns:
        The path written.
    """
    import nrrd
    from scipy import ndimage

    affine = np.asarray(affine, dtype=np.float64)
    ras_to_lps = np.diag([-1.0, -1.0, 1.0])
    values = labels.astype(np.uint8 if labels.max(initial=0) < 256 else np.uint16)
    header: dict = {
        "space": "left-posterior-superior",
        "space directions": (ras_to_lps @ affine[:3, :3]).T,
        "space origin": ras_to_lps @ affine[:3, 3],
        "kinds": ["domain", "domain", "domain"],
        "encoding": "gzip",
        "Segmentation_MasterRepresentation": "Binary labelmap",
        "Segmentation_ContainedRepresentationNames": "Binary labelmap|",
        "Segmentation_ReferenceImageExtentOffset": "0 0 0",
    }
    boxes = ndimage.find_objects(values)
    present = [i + 1 for i, box in enumerate(boxes) if box is not None]
    for n, value in enumerate(present):
        box = boxes[value - 1]
        rgb = colours.get(value, (128, 128, 128))
        segment = {
            "ID": f"Segment_{value}",
            "Name": names.get(value, f"class_{value}"),
            "NameAutoGenerated": "0",
            "LabelValue": str(value),
            "Layer": "0",
            "Color": " ".join(f"{c / 255:.6g}" for c in rgb),
            "ColorAutoGenerated": "0",
            "Extent": " ".join(f"{b.start} {b.stop - 1}" for b in box),
            "Tags": "|",
        }
        header.update({f"Segment{n}_{key}": value for key, value in segment.items()})
    return atomic_write(path, lambda tmp: nrrd.write(str(tmp), values, header))


def write_structure_masks(
    labels: np.ndarray, affine: np.ndarray, names: Mapping[int, str], indices: Sequence[int], folder: str | os.PathLike
) -> list[str]:
    """One binary mask file per structure, ``<folder>/<name>.nii.gz`` (as TotalSegmentator writes them),
    for every index in ``indices`` (present or not: an absent structure gets an empty mask)."""
    folder = Path(folder)
    written = []
    for i in indices:
        name = names.get(i, f"class_{i}")
        written.append(str(write_label_map((labels == i).astype(np.uint8), affine, folder / f"{name}.nii.gz")))
    return written


def legend_entries(labels: np.ndarray, names: Mapping[int, str], colours: Mapping[int, Sequence[int]]) -> list[tuple]:
    """``(index, name, (r, g, b) 0-1)`` of every structure present in ``labels``, in index order: the
    preview's legend."""
    present = [int(v) for v in np.unique(labels) if v > 0]
    return [(i, names.get(i, f"class_{i}"), tuple(c / 255 for c in colours.get(i, (128, 128, 128)))) for i in present]


def write_preview(
    image_hu: np.ndarray,
    labels: np.ndarray,
    affine: np.ndarray,
    path: str | os.PathLike,
    title: str = "",
    names: Mapping[int, str] | None = None,
    colours: Mapping[int, Sequence[int]] | None = None,
) -> Path:
    """PNG with axial, coronal and sagittal slices through the segmented structures' centre, with
    the labels overlaid (radiological convention: the patient's right on the left).

    Args:
        image_hu: CT in HU.
        labels: label map on the same grid.
        affine: voxel-to-world matrix of that grid (any orientation).
        path: PNG to write.
        title: figure title.
        names: index -> structure name, for the legend.
        colours: index -> (r, g, b) 0-255 (default: :func:`scripts.labels.display_colours` of ``names``).

    Returns:
        The path written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .ctfm_common.display import draw_view, orthogonal_views

    lab = np.asarray(labels).astype(np.int32)
    inside = np.argwhere(lab > 0)
    centre = inside.mean(0) if len(inside) else (np.array(lab.shape) - 1) / 2.0  # stored voxel order
    views = orthogonal_views([np.asarray(image_hu).astype(np.float32), lab], affine, centre)
    names = dict(names or {})
    names.update({int(v): names.get(int(v), f"class_{int(v)}") for v in np.unique(lab) if v > 0})
    colours = colours if colours is not None else display_colours(names)
    entries = legend_entries(lab, names, colours)
    lut = np.zeros((max([int(lab.max(initial=0))] + list(colours)) + 1, 4), dtype=np.float32)
    for index, _, rgb in entries:  # each structure in its own colour, half transparent over the CT
        lut[index] = (*rgb, 0.45)
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.6))
    for ax, view in zip(axes, views):
        draw_view(
            ax,
            view,
            images=[
                {"cmap": "gray", "vmin": PREVIEW_WINDOW[0], "vmax": PREVIEW_WINDOW[1]},
                {"rgba": True, "colours": lut[view.slices[1]]},
            ],
            mark=False,
        )
    fig.suptitle(f"{title} ({len(entries)} structures)")
    if entries:  # legend of the structures present, beside the views
        from matplotlib.patches import Patch

        handles = [Patch(facecolor=rgb, edgecolor="none", label=f"{index} {label}") for index, label, rgb in entries]
        columns = 1 + (len(handles) - 1) // 30
        fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, frameon=False,
                   ncol=columns, handlelength=1.0, title="structures")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return write_bytes_atomic(buffer.getvalue(), Path(path))


def _as_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if not str(dtype) or str(dtype).lower() in ("none", "false"):
        return None
    value = getattr(torch, str(dtype).replace("torch.", ""), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"stitch_dtype must be a floating dtype such as 'float16' or 'float32', got {dtype!r}")
    return value


def subset_label_values(subset: Sequence[int]) -> tuple[list[int], list[int]]:
    """``(orig_labels, target_labels)`` for MONAI's ``MapLabelValued`` after the argmax of a
    :class:`CastOutput` with ``keep_channels=subset``: channel ``k`` -> the ``k``-th structure of
    the subset, background and "any other structure" -> 0."""
    kept = sorted({int(c) for c in subset} - {0})
    return list(range(len(kept) + 2)), [0, *kept, 0]


class CastOutput(nn.Module):
    """Runs ``network`` on float32 patches, ``batch_size`` at a time, and returns its output in ``dtype``.

    ``SlidingWindowInferer`` accumulates windows in its input's dtype; feeding it a float16
    image through this wrapper stitches the logits in float16 (half the memory of the
    ``num_classes``-channel volume) while every convolution still runs in float32 (or bf16
    under ``autocast``).

    Args:
        network: the segmentation network.
        dtype: dtype of the returned logits (``None``: the network's, in its memory format).
        batch_size: windows per network call (0: all the inferer gives at once).
        channels_last: feed the patches in ``torch.channels_last_3d`` memory format (the network
            must have been converted too); faster 3D convolutions on CPUs (oneDNN) and GPUs.
        autocast: context factory the network call runs in (e.g. bf16 autocast).
        keep_channels: output channels to keep (a structure subset, without the background). The
            output is then ``[background, kept..., max of the others]``: its argmax, mapped back with
            :func:`subset_label_values`, equals the full argmax restricted to the subset, while the
            sliding window stitches ``len(keep_channels) + 2`` channels instead of all of them.
        float32_stem: under ``autocast``, run the network's first convolution in float32
            (:func:`scripts.sliding.float32_stem`).
    """

    def __init__(self, network: nn.Module, dtype: torch.dtype | None, batch_size: int = 0, channels_last: bool = False,
                 autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
                 keep_channels: Sequence[int] | None = None, float32_stem: bool = True) -> None:
        super().__init__()
        self.network = network
        self.dtype = dtype
        self.batch_size = batch_size
        self.channels_last = channels_last
        self.autocast = autocast or contextlib.nullcontext
        self.keep_channels = sorted({int(c) for c in keep_channels or []} - {0})
        self.float32_stem = as_bool(float32_stem)

    def _run(self, x: torch.Tensor, keep: bool = True) -> torch.Tensor:
        x = x.float()
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        from .sliding import float32_stem

        stem = float32_stem(self.network) if self.float32_stem else contextlib.nullcontext()
        with self.autocast(), stem:  # around the network only: the float16 stitching stays outside
            out = self.network(x)
        if isinstance(out, (list, tuple)):  # deep supervision: the full-resolution output
            out = out[0]
        if keep and self.keep_channels:
            out = self._keep(out, 1)
        return out if self.dtype is None else out.to(self.dtype).contiguous()

    def _keep(self, out: torch.Tensor, dim: int) -> torch.Tensor:
        """``out``'s channels (along ``dim``) reduced to ``keep_channels``: background, kept, max of the others."""
        others = [c for c in range(1, out.shape[dim]) if c not in self.keep_channels]
        parts = [out.index_select(dim, torch.tensor([0, *self.keep_channels], device=out.device))]
        if others:
            parts.append(out.index_select(dim, torch.tensor(others, device=out.device)).amax(dim=dim, keepdim=True))
        return torch.cat(parts, dim=dim)

    def split_head(self) -> tuple[Callable, Callable] | None:
        """``(features, head)`` for :class:`scripts.sliding.SlabArgmaxInferer`'s feature stitching:
        ``features`` runs the network without its final 1 x 1 x 1 head (float32 patches in, in this
        wrapper's memory format and autocast, ``batch_size`` at a time); ``head`` is that head in float32
        on channels-last features, followed by the ``keep_channels`` reduction. ``None`` when the network
        has no such head."""
        from .sliding import final_head, heads_removed, linear_head

        head = final_head(self.network)
        if head is None:
            return None
        linear = linear_head(head)

        def features(x: torch.Tensor) -> torch.Tensor:
            with heads_removed(self.network):
                return self.forward(x, keep=False)

        def logits(f: torch.Tensor) -> torch.Tensor:
            out = linear(f)
            return self._keep(out, out.ndim - 1) if self.keep_channels else out

        return features, logits

    def forward(self, x: torch.Tensor, keep: bool = True) -> torch.Tensor:
        """Float32 in, ``dtype`` out (``keep`` false: all channels, whatever ``keep_channels``)."""
        if not 0 < self.batch_size < x.shape[0]:
            return self._run(x, keep)
        step = self.batch_size
        return torch.cat([self._run(x[i : i + step], keep) for i in range(0, x.shape[0], step)])


def _read_hu(path: str, reader: Callable | None = None) -> np.ndarray:
    from monai.transforms import LoadImage

    image = (reader or LoadImage(image_only=True))(path)
    return np.asarray(image)


#: The scan as read (HU, stored voxel order), kept by the loader for the structure table and the preview.
ORIGINAL_KEY = "original_hu"  # not "image_*": MONAI's Spacingd treats those entries as meta dicts


class _KeepOriginal:
    """Keep the image just read under :data:`ORIGINAL_KEY` (the same tensor, no copy: the transforms after
    it make new tensors), so the table and the preview need no second read of the file."""

    def __init__(self, key: str) -> None:
        self.key = key

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        image = d[self.key]
        d[ORIGINAL_KEY] = image.as_tensor() if hasattr(image, "as_tensor") else image
        return d


def _in_inference_mode(transform: Callable) -> Callable:
    def run(data: Mapping) -> Mapping:
        with torch.inference_mode():
            return transform(data)

    return run


def _keeping_original(preprocessing: Callable, key: str) -> Callable | None:
    """``preprocessing`` that also keeps the scan as read (:class:`_KeepOriginal` right after its ``LoadImaged``),
    run in inference mode; ``None`` when it is no ``Compose`` with a ``LoadImaged`` of ``key`` (the scan is then
    read again for the table and preview). The same transform objects run, so ``Invertd`` of ``preprocessing``
    inverts the result as before."""
    from monai.transforms import Compose, LoadImaged

    if not isinstance(preprocessing, Compose):
        return None
    transforms = list(preprocessing.transforms)
    at = next((i for i, t in enumerate(transforms) if isinstance(t, LoadImaged) and key in t.keys), None)
    if at is None:
        return None
    keeping = Compose(transforms[: at + 1] + [_KeepOriginal(key)] + transforms[at + 1 :],
                      map_items=preprocessing.map_items, unpack_items=preprocessing.unpack_items,
                      log_stats=preprocessing.log_stats, lazy=preprocessing.lazy, overrides=preprocessing.overrides)
    return _in_inference_mode(keeping)


def default_stitch_device(device: str | torch.device, min_gpu_gib: float = 24.0) -> torch.device:
    """Where the sliding window accumulates its ``num_classes``-channel output.

    On a CUDA device with at least ``min_gpu_gib`` of memory: that device (a 512 x 512 x 300 CT
    at 1.5 mm needs about 6 GiB for 118 channels in float16, and stitching on the GPU avoids
    copying every window's logits to the host); otherwise the CPU, which bounds GPU memory.
    """
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        if torch.cuda.get_device_properties(index).total_memory >= min_gpu_gib * 1024**3:
            return device
    return torch.device("cpu")


def stitch_in_input_dtype(inferer: Callable, inputs: torch.Tensor, model: Callable) -> torch.Tensor:
    """``inferer(inputs, model)`` whose output keeps the input's dtype and metadata.

    MONAI's sliding window accumulates in its input's dtype (float16 here), but for a
    ``MetaTensor`` input it hands back the result converted to an empty float32 ``MetaTensor``'s
    dtype: a float32 copy of the ``num_classes``-channel volume (5.1 GB at 118 classes for a
    223 x 201 x 243 grid, on top of the 2.6 GB float16 one). A plain tensor goes in instead and
    the input's metadata is put back on the float16 result.
    """
    from monai.data import MetaTensor
    from monai.utils import convert_to_dst_type

    if not isinstance(inputs, MetaTensor):
        return inferer(inputs, model)
    return convert_to_dst_type(inferer(inputs.as_tensor(), model), inputs)[0]


def _lap(start: float, device: torch.device, previous: Mapping[str, float] | None = None) -> float:
    """Seconds since ``start`` minus the stages already counted (device work finished first)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return round(time.perf_counter() - start - sum((previous or {}).values()), 3)


def segment_cases(
    *,
    items: Sequence[Mapping],
    preprocessing: Callable,
    postprocessing: Callable,
    network: nn.Module,
    inferer: Callable,
    output_dir: str | os.PathLike,
    device: str | torch.device = "cpu",
    amp: bool = True,
    label_names: Mapping[int, str] | str | None = None,
    save_csv: bool = True,
    save_preview: bool = True,
    save_dicom_seg: bool = False,
    save_seg_nrrd: bool = False,
    save_masks: bool = False,
    roi_subset: Sequence[int] | None = None,
    version: str = "",
    stitch_dtype: str | torch.dtype | None = None,
    network_batch_size: int | None = None,
    channels_last: bool = False,
    float32_stem: bool = True,
    key: str = "image",
    pred_key: str = "pred",
) -> dict:
    """Segment every item, writing ``<output_dir>/<case>/<case>_seg.nii.gz`` (+ optional outputs).

    A case that fails (unreadable file, wrong dimensions...) is logged with the file and the
    error, recorded in ``<output_dir>/summary.json``, and the batch goes on. The next case is read
    and preprocessed in the background meanwhile (``ctfm_common.cases.run_cases``).

    Args:
        items: data dicts ``{key: path, ...}`` (``scripts.inputs.resolve_input``).
        preprocessing: dict transform from the path to the network input (invertible).
        postprocessing: dict transform from ``pred`` logits to a label map on the input grid.
        network: the segmentation network (put in eval mode here).
        inferer: e.g. ``SlidingWindowInferer``; called as ``inferer(inputs, network)``.
        output_dir: output folder.
        device: where the network runs.
        amp: bf16 autocast on CUDA, and on CPUs that compute bf16 natively (AVX512-BF16 / AMX;
            about 2x faster 3D convolutions there); float32 elsewhere, or with ``amp`` false.
        label_names: index -> structure name for the CSV (or a JSON file of them).
        save_csv: write ``<case>_structures.csv`` (volume in ml and mean HU per structure).
        save_preview: write ``<case>_preview.png``.
        save_dicom_seg: write ``<case>_seg.dcm`` (DICOM-SEG, highdicom) for DICOM series inputs.
        save_seg_nrrd: write ``<case>.seg.nrrd`` (3D Slicer segmentation with names and colours).
        save_masks: write one mask per structure, ``<case>/masks/<name>.nii.gz`` (the ``roi_subset``,
            else all of them).
        roi_subset: structure indices to segment (``scripts.labels.select_labels`` of names); empty:
            all. Outputs and statistics hold only these; the postprocessing must map the network's
            reduced channels back (``MapLabelValued`` with :func:`subset_label_values`).
        version: the bundle's version, recorded as the DICOM-SEG's SoftwareVersions.
        stitch_dtype: dtype of the stitched logits (``"float16"`` halves the memory of the
            ``num_classes``-channel output the sliding window accumulates; the network itself
            still runs in float32, or bf16 autocast on CUDA). Empty/``None``: float32.
        network_batch_size: at most this many of the ``sw_batch_size`` windows go through the
            network at once (the network's activations dominate the CPU memory; on a CPU one
            window at a time is as fast as two). ``None``: all of them.
        channels_last: run the network in ``torch.channels_last_3d`` memory format (about 1.3x
            faster float32 3D convolutions on a CPU with oneDNN).
        float32_stem: under bf16 autocast, run the network's first convolution in float32 (its [0, 1]
            input keeps its precision; :func:`scripts.sliding.float32_stem`).
        key: image key of the items.
        pred_key: key of the network output.

    Returns:
        The summary: ``{"num_ok", "num_failed", "cases": [{"input", "case", "status", "outputs" | "error"}]}``.

    Raises:
        RuntimeError: when every case failed (so the command exits non-zero).
    """
    output_dir = Path(output_dir)
    device = torch.device(device)
    amp, save_csv, save_preview, save_dicom_seg, save_seg_nrrd, save_masks = map(
        as_bool, (amp, save_csv, save_preview, save_dicom_seg, save_seg_nrrd, save_masks)
    )
    names = read_label_names(label_names)
    subset = sorted({int(i) for i in roi_subset or []} - {0})
    colours = display_colours(names)
    if subset:
        logger.info(f"roi_subset: {len(subset)} structure(s) {[names.get(i, i) for i in subset]}")
    network.eval()
    stitch = _as_dtype(stitch_dtype)
    channels_last = as_bool(channels_last)
    if channels_last:
        network.to(memory_format=torch.channels_last_3d)
    bf16 = amp and (device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16()))
    autocast = (lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)) if bf16 else None
    slab_argmax = bool(getattr(inferer, "argmax", False))  # scripts.sliding: sums the raw logits in float32
    if slab_argmax:
        stitch = None
        if network_batch_size:  # windows go through the network that many at a time anyway: no joined copy of their logits
            inferer.sw_batch_size = min(int(inferer.sw_batch_size), int(network_batch_size))
    model = CastOutput(network, None if slab_argmax else stitch or torch.float32, int(network_batch_size or 0),
                       channels_last, autocast, keep_channels=subset, float32_stem=float32_stem)
    logger.info(f"network precision: {'bfloat16 autocast' if bf16 else 'float32'} on {device}")
    paths = [str(item[key]) for item in items]
    with file_lock(output_dir / "summary.json"):  # names of earlier runs' cases are taken
        taken = {c.get("case"): c.get("input", "") for c in read_case_records(output_dir / "summary.json")}
    cases = claim_case_names(output_dir, paths, taken, logger)  # also against runs writing here now
    keep_hu = (save_csv or save_preview) and _keeping_original(preprocessing, key)
    load = keep_hu or _in_inference_mode(preprocessing)

    def segment(index: int, data: dict) -> dict:
        source, case = data[SOURCE_KEY], cases[index]
        start = time.perf_counter()
        laps = {}  # seconds of this case's stages in the main loop
        with torch.inference_mode():
            original = data.pop(ORIGINAL_KEY, None)  # the scan as read, in HU (kept by the loader's single read)
            inputs = data[key].unsqueeze(0).to(device)
            if stitch is not None:  # the sliding window stitches in its input's dtype
                inputs = inputs.to(stitch)
            laps["to_device_s"] = _lap(start, device)
            logits = stitch_in_input_dtype(inferer, inputs, model)
            data[pred_key] = logits[0]  # argmax next: no float32 copy of every channel
            del inputs, logits
            laps["infer_s"] = _lap(start, device, laps)
            detail = {f"infer_{k}": v for k, v in getattr(inferer, "timings", {}).items()}  # part of infer_s
            data = postprocessing(data)
        pred = data[pred_key]
        labels = np.asarray(pred.detach().cpu())[0].round().astype(np.int32)
        if subset:  # outputs and statistics hold the chosen structures only
            labels[~np.isin(labels, subset)] = 0
        affine = np.asarray(pred.affine.detach().cpu(), dtype=np.float64)
        laps["postprocess_invert_s"] = _lap(start, device, laps)
        folder = output_dir / case
        outputs = {"label_map": str(write_label_map(labels, affine, folder / f"{case}_seg.nii.gz"))}
        chosen = {i: n for i, n in names.items() if i > 0 and (not subset or i in subset)}
        outputs["colour_table"] = str(write_colour_table(
            chosen, {i: colours[i] for i in chosen if i in colours}, folder / f"{case}_seg.ctbl"))
        if save_seg_nrrd:
            outputs["seg_nrrd"] = str(write_seg_nrrd(labels, affine, names, colours, folder / f"{case}.seg.nrrd"))
        if save_masks:
            outputs["masks"] = str(folder / "masks")
            write_structure_masks(labels, affine, names, sorted(chosen), folder / "masks")
        laps["write_s"] = _lap(start, device, laps)
        if save_csv or save_preview:
            image_hu = _read_hu(source) if original is None else np.asarray(original, dtype=np.float32)
            del original
            if image_hu.shape != labels.shape:
                raise RuntimeError(f"inverted prediction {labels.shape} is not on the input grid {image_hu.shape}")
            if save_csv:
                rows = structure_table(labels, image_hu, affine, names)
                fields = ("index", "name", "voxels", "volume_ml", "mean_hu")
                outputs["structures_csv"] = str(atomic_write_csv(folder / f"{case}_structures.csv", rows, fields))
            if save_preview:
                png = folder / f"{case}_preview.png"
                outputs["preview_png"] = str(write_preview(image_hu, labels, affine, png, case, names, colours))
            laps["csv_preview_s"] = _lap(start, device, laps)
        if save_dicom_seg and os.path.isdir(source):
            from .dicom_seg import write_dicom_seg

            outputs["dicom_seg"] = str(
                write_dicom_seg(labels, affine, source, folder / f"{case}_seg.dcm", names, version=version)
            )
        # read and preprocessed by the loader (in the background while the previous case ran), then to the device
        stages = {"read_preprocess_s": round(data.get(LOAD_SECONDS_KEY, 0.0) + laps.pop("to_device_s"), 3), **laps}
        record = {"input": source, "case": case, "status": "ok", "outputs": outputs,
                  "seconds": round(data.get(WAIT_SECONDS_KEY, 0.0) + time.perf_counter() - start, 2),
                  "structures": int((np.unique(labels) > 0).sum()), "stages": {**stages, **detail}}
        if getattr(inferer, "last_crop", None):  # scripts.sliding.RoiSubsetCropInferer: the region it segmented
            record["roi_subset_crop"] = dict(inferer.last_crop)
        logger.info(f"{case}: wrote {outputs['label_map']} ({record['structures']} structures, {record['seconds']} s)")
        return record

    def failed(index: int, data: Mapping, message: str) -> dict:
        logger.error(f"{cases[index]}: FAILED: {message}")
        return {"input": data[SOURCE_KEY], "case": cases[index], "status": "failed", "error": message}

    summary: dict = {}

    def write_summary(results: list[dict]) -> None:
        ok = sum(r["status"] == "ok" for r in results)
        summary.update(num_ok=ok, num_failed=len(results) - ok, cases=results)
        merged = merge_summary(output_dir / "summary.json", results)
        logger.info(f"segmented {ok} of {len(results)} cases; summary: {output_dir / 'summary.json'} "
                    f"({len(merged['cases'])} cases with earlier runs')")

    run_cases(items=items, load=load, process=segment, failed=failed, summary=write_summary, key=key,
              desc="segmenting", unit="case", log=logger)
    return summary
