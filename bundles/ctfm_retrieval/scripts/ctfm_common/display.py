# GENERATED from ctfm_common/display.py by ctfm-sync-bundles: edit the source, not this copy.
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
"""One display convention for every PNG the bundles write (seg preview, similarity, saliency).

Whatever the stored orientation (LPS DICOM, RAS NIfTI, SPL network grid), a volume is
reoriented to RAS for display and shown as a radiologist reads it:

- axial: anterior up, the patient's right on the viewer's left (radiological convention);
- coronal: head up, the patient's right on the viewer's left;
- sagittal: head up, anterior on the viewer's left;
- pixels keep their physical aspect ratio; axes are labelled in anatomical terms; a point of
  interest (query point, best match, peak) can be marked in every panel.

So an LPS and an RAS copy of the same scan give the same panels. :func:`orthogonal_views`
cuts the slices, :func:`draw_view` puts one on a matplotlib axis, :func:`value_range` fits a
colour scale to the data and :func:`readable` formats a number for a log line.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

# (row direction top -> bottom, column direction left -> right) of each panel, as RAS letters
PANELS = {
    "axial": (("A", "P"), ("R", "L")),
    "coronal": (("S", "I"), ("R", "L")),
    "sagittal": (("S", "I"), ("A", "P")),
}
WORDS = {"R": "right", "L": "left", "A": "anterior", "P": "posterior", "S": "superior", "I": "inferior"}


@dataclass
class View:
    """One displayed panel: slices of each volume (rows x columns, ready for ``imshow``)."""

    name: str
    slices: list[np.ndarray]
    aspect: float  # row pixel size / column pixel size (mm)
    rows: tuple[str, str]  # anatomical direction at the top and bottom
    columns: tuple[str, str]  # anatomical direction at the left and right
    point: tuple[float, float] | None = None  # (column, row) of the marked point in this panel
    index: int = 0  # the slice index along the through-plane RAS axis
    extra: dict = field(default_factory=dict)


def to_ras(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reorient a 3D array to RAS+ (nibabel's closest canonical axes).

    Returns:
        ``(ras array, voxel sizes in RAS order (mm), orientation used)``.
    """
    import nibabel as nib

    ornt = nib.orientations.io_orientation(np.asarray(affine, dtype=np.float64))
    ras = nib.orientations.apply_orientation(np.asarray(array), ornt)
    return ras, ras_voxel_sizes(affine), ornt


def ras_voxel_sizes(affine: np.ndarray) -> np.ndarray:
    """Voxel sizes (mm) along R, A, S of the grid reoriented to RAS+ (``io_orientation``): RAS axis
    ``ornt[i, 0]`` is stored axis ``i``, so the sizes go through the INVERSE of that permutation
    (it differs from the permutation itself for 3-cycle orientations such as ASR)."""
    import nibabel as nib

    affine = np.asarray(affine, dtype=np.float64)
    ornt = nib.orientations.io_orientation(affine)
    sizes = np.empty(3)
    sizes[ornt[:, 0].astype(int)] = nib.affines.voxel_sizes(affine)[:3]
    return sizes


def voxel_to_ras_index(voxel: Sequence[float], shape: Sequence[int], ornt: np.ndarray) -> np.ndarray:
    """Where voxel ``voxel`` of the stored array sits in the RAS-reoriented array."""
    out = np.zeros(3)
    for axis, (target, flip) in enumerate(ornt):
        value = float(voxel[axis])
        out[int(target)] = shape[axis] - 1 - value if flip < 0 else value
    return out


def orthogonal_views(
    volumes: Sequence[np.ndarray], affine: np.ndarray, point: Sequence[float] | None = None
) -> list[View]:
    """Axial, coronal and sagittal slices of ``volumes`` (same grid) through voxel ``point``.

    Args:
        volumes: 3D arrays on one grid (e.g. the CT and an overlay).
        affine: that grid's voxel-to-world matrix (any orientation).
        point: voxel index (stored order) the slices pass through and that is marked; ``None``:
            the centre of the volume, not marked.

    Returns:
        Three :class:`View` in the display convention of this module.
    """
    shape = np.asarray(volumes[0]).shape
    ras = []
    for volume in volumes:
        array, sizes, ornt = to_ras(volume, affine)
        ras.append(array)
    centre = voxel_to_ras_index(point, shape, ornt) if point is not None else (np.array(ras[0].shape) - 1) / 2.0
    i, j, k = (int(round(c)) for c in centre)
    nx, ny, nz = ras[0].shape
    views = []
    # RAS+ indices grow toward the patient's right, anterior and superior: flipping an axis puts
    # R / A / S first, i.e. on the left or at the top of the panel.
    cut = {
        "axial": (lambda a: a[::-1, ::-1, k].T, (sizes[1], sizes[0]), (nx - 1 - centre[0], ny - 1 - centre[1]), k),
        "coronal": (lambda a: a[::-1, j, ::-1].T, (sizes[2], sizes[0]), (nx - 1 - centre[0], nz - 1 - centre[2]), j),
        "sagittal": (lambda a: a[i, ::-1, ::-1].T, (sizes[2], sizes[1]), (ny - 1 - centre[1], nz - 1 - centre[2]), i),
    }
    for name, (slicer, (row_mm, col_mm), xy, index) in cut.items():
        rows, columns = PANELS[name]
        views.append(
            View(
                name=name,
                slices=[slicer(a) for a in ras],
                aspect=float(row_mm) / float(col_mm),
                rows=rows,
                columns=columns,
                point=None if point is None else (float(xy[0]), float(xy[1])),
                index=index,
            )
        )
    return views


def axis_labels(view: View) -> tuple[str, str]:
    """Anatomical axis labels of a panel: ``("right <-> left", "anterior <-> posterior")`` style."""
    (top, bottom), (left, right) = view.rows, view.columns
    return f"{WORDS[left]} \u2190 \u2192 {WORDS[right]}", f"{WORDS[bottom]} \u2190 \u2192 {WORDS[top]}"


def draw_view(ax, view: View, *, images: Sequence[dict], title: str | None = None, mark: bool = True):
    """Draw ``view`` on a matplotlib axis: each slice with its ``imshow`` keywords, labels, marker.

    Args:
        ax: matplotlib axis.
        view: from :func:`orthogonal_views`.
        images: ``imshow`` keywords per slice of the view (e.g. ``cmap``, ``vmin``, ``alpha``); a dict
            may carry ``"rgba": True`` to show a slice already converted to colours.
        title: panel title (default: the view name).
        mark: draw a cross at ``view.point``.

    Returns:
        The last image artist (for a colour bar).
    """
    shown = None
    for array, kwargs in zip(view.slices, images):
        kwargs = dict(kwargs)
        if kwargs.pop("rgba", False):
            array = kwargs.pop("colours")
        shown = ax.imshow(array, aspect=view.aspect, interpolation="nearest", **kwargs)
    if mark and view.point is not None:
        ax.plot(*view.point, marker="+", color="cyan", markersize=14, markeredgewidth=1.5)
    xlabel, ylabel = axis_labels(view)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    # orientation letters at the panel edges, as a viewer shows them
    (top, bottom), (left, right) = view.rows, view.columns
    style = {"color": "yellow", "fontsize": 9, "fontweight": "bold", "transform": ax.transAxes}
    ax.text(0.02, 0.5, left, ha="left", va="center", **style)
    ax.text(0.98, 0.5, right, ha="right", va="center", **style)
    ax.text(0.5, 0.98, top, ha="center", va="top", **style)
    ax.text(0.5, 0.02, bottom, ha="center", va="bottom", **style)
    ax.set_title(title or f"{view.name} (slice {view.index})", fontsize=9)
    return shown


def value_range(values: np.ndarray, *, low: float | None = None, high: float | None = None) -> tuple[float, float]:
    """A colour scale that fits the data: the 0.5th..99.5th percentile, inside ``[low, high]``.

    A constant map gets a small range around its value, so a colour bar is still drawn.
    """
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return (0.0, 1.0)
    vmin, vmax = (float(v) for v in np.percentile(finite, [0.5, 99.5]))
    vmax = max(vmax, float(finite.max()) if vmax <= vmin else vmax)
    if low is not None:
        vmin = max(vmin, low)
    if high is not None:
        vmax = min(vmax, high)
    if vmax <= vmin:
        pad = max(abs(vmin) * 1e-3, 1e-6)
        vmin, vmax = vmin - pad, vmax + pad
    return vmin, vmax


def readable(value: float) -> str:
    """A number for a log line: 3 significant digits, scientific only when tiny or huge."""
    value = float(value)
    if value == 0 or not np.isfinite(value):
        return f"{value:g}"
    if 1e-3 <= abs(value) < 1e5:
        return f"{value:.4g}"
    return f"{value:.3e}"
