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
"""The IDC corpus's registries (the CT-FM filters, the manifest's columns, how to cite IDC) and the manifest
files that ``select`` writes and the other steps read."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ctfm_common.runtime import atomic_write


# ---------------------------------------------------------------------------------------
# Registries (data only: the CLI, the documentation and the tests all read these).
# ---------------------------------------------------------------------------------------

#: The CT-FM corpus filters (the reference selected IDC CT series with BigQuery SQL).
CTFM_FILTERS: dict[str, Any] = {
    "modality": "CT",
    # CT Image Storage: one instance per slice. Raw data, secondary captures and RT objects
    # that IDC also files under modality CT are not volumes.
    "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
    "min_instances_exclusive": 50,  # more than 50 instances
    "slice_thickness_mm": (1.0, 5.0),  # inclusive range
    "excluded_image_types": ("LOCALIZER",),
    "one_instance_per_position": True,
}

#: CT-FM filters that need a per-series attribute index fetched by idc-index at run time:
#: filter name -> (index name, column it reads, what it means).
_THICKNESS = "slice thickness {:g}-{:g} mm".format(*CTFM_FILTERS["slice_thickness_mm"])
ATTRIBUTE_FILTERS: dict[str, tuple[str, str, str]] = {
    "slice_thickness": ("ct_index", "SliceThickness", _THICKNESS),
    "no_localizer": ("ct_index", "ImageType", "no LOCALIZER image type"),
    "one_instance_per_position": ("volume_geometry_index", "unique_slice_positions", "one instance per position"),
}

#: Columns of IDC's series index that the manifest keeps (IDC's own names).
MANIFEST_COLUMNS: tuple[str, ...] = (
    "SeriesInstanceUID",
    "StudyInstanceUID",
    "PatientID",
    "collection_id",
    "Modality",
    "BodyPartExamined",
    "instanceCount",
    "series_size_MB",
    "license_short_name",
    "source_DOI",
    "series_aws_url",
)

#: Columns of the shipped index that ``select`` reads (the manifest's plus the filtered ones).
INDEX_COLUMNS: tuple[str, ...] = MANIFEST_COLUMNS + ("SOPClassUID",)

#: How to cite IDC itself (besides each collection's DOI).
IDC_CITATION = (
    "Fedorov A, Longabaugh WJR, Pot D, et al. National Cancer Institute Imaging Data Commons: "
    "Toward Transparency, Reproducibility, and Scalability in Imaging Artificial Intelligence. "
    "RadioGraphics 2023;43(12):e230180. https://doi.org/10.1148/rg.230180"
)

#: Geometry tolerances used by :func:`check_series_geometry`: ``ctfm_common.validate.GEOMETRY_TOLERANCES``.


# ---------------------------------------------------------------------------------------
# Manifest I/O (shards and atomic writes come from ctfm_common.runtime).
# ---------------------------------------------------------------------------------------


def write_table(frame: Any, path: str | os.PathLike) -> None:
    """Write a DataFrame atomically as CSV or Parquet, chosen by the suffix."""
    path = Path(path)
    if path.suffix not in (".csv", ".parquet"):
        raise ValueError(f"{path}: a manifest must end in .csv or .parquet")
    if path.suffix == ".csv":
        atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))
    else:
        atomic_write(path, lambda tmp: frame.to_parquet(tmp, index=False))


def read_manifest(path: str | os.PathLike) -> Any:
    """Read a manifest written by :func:`select` (CSV or Parquet), checking the columns the steps need."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    if path.suffix == ".parquet":
        frame = pd.read_parquet(path)
    else:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        for column in ("instanceCount",):
            if column in frame:
                frame[column] = pd.to_numeric(frame[column], errors="coerce")
        if "series_size_MB" in frame:
            frame["series_size_MB"] = pd.to_numeric(frame["series_size_MB"], errors="coerce")
    missing = [c for c in ("SeriesInstanceUID", "collection_id", "PatientID") if c not in frame]
    if missing:
        raise ValueError(f"{path}: manifest lacks column(s) {missing}")
    return frame


def path_part(text: Any) -> str:
    text = re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("._")
    return text or "unknown"


def series_folder(row: Any) -> str:
    """Relative folder of one manifest row's series: ``<collection_id>/<PatientID>/<SeriesInstanceUID>``."""
    return "/".join(path_part(row[key]) for key in ("collection_id", "PatientID", "SeriesInstanceUID"))


def as_list(value: str | Iterable[str] | None) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [str(v).strip() for v in value]
