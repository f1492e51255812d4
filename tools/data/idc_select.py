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
"""Step 1, ``select``: IDC's shipped series index, the CT-FM and user filters, sampling, and the manifest."""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ctfm_bundles.tools.data.idc_manifest import (
    ATTRIBUTE_FILTERS,
    CTFM_FILTERS,
    INDEX_COLUMNS,
    MANIFEST_COLUMNS,
    as_list,
    write_table,
)
from ctfm_common.runtime import atomic_write_text


# ---------------------------------------------------------------------------------------
# 1. select
# ---------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def load_series_index(columns: tuple[str, ...] = INDEX_COLUMNS) -> Any:
    """IDC's series index shipped in the ``idc-index-data`` wheel (one row per series), CT rows only.

    Cached: treat the frame as read-only (filter it, never modify it in place).
    """
    import idc_index_data
    import pandas as pd

    return pd.read_parquet(
        idc_index_data.IDC_INDEX_PARQUET_FILEPATH,
        columns=list(columns),
        filters=[("Modality", "==", CTFM_FILTERS["modality"])],
    )


def index_version() -> str:
    """The IDC data release of the shipped index, e.g. ``v25 (idc-index-data 25.0.5)``."""
    import idc_index_data

    version = idc_index_data.__version__
    return f"v{version.split('.')[0]} (idc-index-data {version})"


def load_attribute_index(name: str, *, source: str | None = None, client: Any = None) -> tuple[Any, str]:
    """One of IDC's per-series attribute indices (``ct_index``, ``volume_geometry_index``), if it can be had.

    Args:
        name: the index name in idc-index.
        source: ``None`` to fetch it with idc-index (cached in idc-index's data folder after the
            first fetch); a folder holding ``<name>.parquet`` (an offline mirror); ``""`` to not use it.
        client: an ``idc_index.IDCClient`` to fetch with (default: idc-index's shared client).

    Returns:
        ``(frame, "")`` when available, else ``(None, reason)``.
    """
    import pandas as pd

    if source == "":
        return None, "attribute indices disabled (attribute_indices='')"
    if source is not None:
        path = Path(source) / f"{name}.parquet"
        if not path.is_file():
            return None, f"{path} not found"
        return pd.read_parquet(path), ""
    try:
        if client is None:
            from idc_index import IDCClient

            client = IDCClient.client()
        client.fetch_index(name)
        frame = getattr(client, name, None)
    except Exception as error:  # no network, proxy, HTTP error: the filter is skipped, not fatal
        return None, f"{name} could not be fetched by idc-index ({type(error).__name__}: {str(error)[:100]})"
    if frame is None:
        return None, f"{name} could not be fetched by idc-index (see its log above)"
    return frame, ""


def _series_attribute(frame: Any, index: Any, column: str) -> Any:
    """``index[column]`` for each series of ``frame`` (NaN where the index has no row)."""
    values = index.drop_duplicates("SeriesInstanceUID").set_index("SeriesInstanceUID")[column]
    return frame["SeriesInstanceUID"].map(values)


def _has_image_type(value: Any, excluded: Sequence[str]) -> bool:
    if value is None or isinstance(value, float):  # missing
        return False
    values = [value] if isinstance(value, str) else list(value)
    return any(str(v).upper() in excluded for v in values)


def apply_filters(
    frame: Any,
    *,
    collections: Sequence[str] = (),
    body_parts: Sequence[str] = (),
    licenses: Sequence[str] = (),
    ct_index: Any = None,
    geometry_index: Any = None,
) -> tuple[Any, dict[str, int]]:
    """Apply the CT-FM filters (and the user's) to IDC's series index.

    Args:
        frame: rows of IDC's series index (at least :data:`INDEX_COLUMNS`).
        collections: keep these ``collection_id`` values only (empty: all).
        body_parts: keep these ``BodyPartExamined`` values only, case-insensitive (empty: all).
        licenses: keep these ``license_short_name`` values only, case-insensitive (empty: all).
        ct_index: IDC's ``ct_index`` (slice thickness, image type filters) or None to skip them.
        geometry_index: IDC's ``volume_geometry_index`` (one instance per position) or None to skip.

    Returns:
        The kept rows and, per filter applied, how many series it removed (in order).
    """
    removed: dict[str, int] = {}

    def keep(mask: Any, name: str) -> None:
        nonlocal frame
        mask = np.asarray(mask, bool)
        removed[name] = int((~mask).sum())
        frame = frame[mask]

    filters = CTFM_FILTERS
    keep(frame["Modality"] == filters["modality"], f"modality {filters['modality']}")
    count = filters["min_instances_exclusive"]
    keep(frame["instanceCount"].astype(float) > count, f"more than {count} instances")
    keep(frame["SOPClassUID"] == filters["sop_class_uid"], "SOP class CT Image Storage")
    if ct_index is not None:
        low, high = filters["slice_thickness_mm"]
        thickness = _series_attribute(frame, ct_index, "SliceThickness").astype(float)
        keep(thickness.between(low, high).fillna(False), ATTRIBUTE_FILTERS["slice_thickness"][2])
        image_type = _series_attribute(frame, ct_index, "ImageType")
        excluded = filters["excluded_image_types"]
        keep(~image_type.map(lambda v: _has_image_type(v, excluded)).astype(bool), ATTRIBUTE_FILTERS["no_localizer"][2])
    if geometry_index is not None:
        unique = _series_attribute(frame, geometry_index, "unique_slice_positions")
        keep(unique.fillna(False).astype(bool), ATTRIBUTE_FILTERS["one_instance_per_position"][2])
    if collections:
        keep(frame["collection_id"].isin(list(collections)), f"collections {list(collections)}")
    if body_parts:
        wanted = {b.upper() for b in body_parts}
        keep(frame["BodyPartExamined"].fillna("").str.upper().isin(wanted), f"body parts {sorted(wanted)}")
    if licenses:
        wanted = {lic.lower() for lic in licenses}
        keep(frame["license_short_name"].fillna("").str.lower().isin(wanted), f"licences {sorted(wanted)}")
    return frame, removed


def sample_series(frame: Any, *, sample: int | None = None, max_total_gb: float | None = None, seed: int = 0) -> Any:
    """Draw a reproducible subset: shuffle with ``seed``, keep a size budget, then the first ``sample`` series.

    Args:
        frame: the filtered series.
        sample: number of series to keep (None: all that fit the budget).
        max_total_gb: keep the corpus under this size (GB, 10^9 bytes) (None: no budget).
        seed: the shuffle's seed; the same index, filters and seed always give the same series.

    Returns:
        The kept rows, sorted by collection, patient and series.
    """
    frame = frame.sort_values("SeriesInstanceUID", kind="stable")
    if sample is not None or max_total_gb is not None:
        order = np.random.default_rng(seed).permutation(len(frame))
        frame = frame.iloc[order]
        if max_total_gb is not None:
            frame = frame[frame["series_size_MB"].cumsum().to_numpy() <= float(max_total_gb) * 1e3]
        if sample is not None:
            frame = frame.iloc[: int(sample)]
    return frame.sort_values(["collection_id", "PatientID", "SeriesInstanceUID"], kind="stable")


def summarize(frame: Any) -> dict[str, Any]:
    """Series, patients, collections and size (TB, 10^12 bytes) of a manifest."""
    return {
        "series": int(len(frame)),
        "patients": int(frame[["collection_id", "PatientID"]].drop_duplicates().shape[0]),
        "collections": int(frame["collection_id"].nunique()),
        "instances": int(frame["instanceCount"].sum()) if "instanceCount" in frame else None,
        "size_gb": round(float(frame["series_size_MB"].sum()) / 1e3, 3),
        "size_tb": round(float(frame["series_size_MB"].sum()) / 1e6, 3),
    }


def select(
    *,
    output: str = "manifest.csv",
    collections: str | Sequence[str] | None = None,
    body_parts: str | Sequence[str] | None = None,
    licenses: str | Sequence[str] | None = None,
    max_total_gb: float | None = None,
    sample: int | None = None,
    seed: int = 0,
    attribute_indices: str | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Select IDC CT series with the CT-FM filters plus the user's, and write a manifest.

    Args:
        output: manifest path, ``.csv`` or ``.parquet`` (written atomically).
        collections: IDC ``collection_id`` values to keep (comma-separated or a list; default all).
        body_parts: ``BodyPartExamined`` values to keep, e.g. ``CHEST,ABDOMEN`` (default all).
        licenses: ``license_short_name`` values to keep, e.g. ``"CC BY 4.0,CC BY 3.0"`` (default all).
        max_total_gb: size budget of the corpus in GB (series drawn in seeded random order).
        sample: keep this many series (drawn in seeded random order).
        seed: seed of the random order (same index + filters + seed = same manifest).
        attribute_indices: where the per-series CT attribute indices come from: None fetches them
            with idc-index, a folder reads ``ct_index.parquet`` / ``volume_geometry_index.parquet``
            from it, ``""`` skips them. Filters whose index is unavailable are reported as skipped.
        quiet: do not print the summary.

    Returns:
        The summary: series, patients, collections, instances, size_tb, index version, the
        filters applied (with how many series each removed) and those skipped (with why).
    """
    collections, body_parts, licenses = as_list(collections), as_list(body_parts), as_list(licenses)
    frame = load_series_index()
    ct_index, ct_reason = load_attribute_index("ct_index", source=attribute_indices)
    geometry_index, geometry_reason = load_attribute_index("volume_geometry_index", source=attribute_indices)
    frame, removed = apply_filters(
        frame,
        collections=collections,
        body_parts=body_parts,
        licenses=licenses,
        ct_index=ct_index,
        geometry_index=geometry_index,
    )
    skipped = {}
    for index_name, reason in (("ct_index", ct_reason), ("volume_geometry_index", geometry_reason)):
        if reason:
            for _, (needed, _, label) in ATTRIBUTE_FILTERS.items():
                if needed == index_name:
                    skipped[label] = reason
    frame = sample_series(frame, sample=sample, max_total_gb=max_total_gb, seed=seed)
    manifest = frame[list(MANIFEST_COLUMNS)].copy()
    if ct_index is not None:
        manifest["SliceThickness"] = _series_attribute(manifest, ct_index, "SliceThickness")
    write_table(manifest, output)
    summary = {
        **summarize(manifest),
        "index": index_version(),
        "filters_applied": removed,
        "filters_skipped": skipped,
        "sample": sample,
        "max_total_gb": max_total_gb,
        "seed": seed,
        "manifest": str(output),
    }
    atomic_write_text(Path(output).with_suffix(".summary.json"), json.dumps(summary, indent=2) + "\n")
    if not quiet:
        print(format_summary(summary))
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """A few human lines for a :func:`select` summary."""
    lines = [
        f"IDC {summary['index']}: {summary['series']:,} series, {summary['patients']:,} patients, "
        f"{summary['collections']} collections, {summary['size_tb']:.2f} TB ({summary['size_gb']:,.1f} GB) "
        f"-> {summary['manifest']}",
        "filters applied (series removed): "
        + ", ".join(f"{name} ({count:,})" for name, count in summary["filters_applied"].items()),
    ]
    for name, reason in summary["filters_skipped"].items():
        lines.append(f"filter skipped: {name}: {reason} (convert re-checks it from the DICOM headers)")
    return "\n".join(lines)
