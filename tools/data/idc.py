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
"""Build the CT-FM pretraining corpus from the NCI Imaging Data Commons (IDC), reproducibly.

Three steps, each resumable and shardable, plus ``build`` that runs them in order (one module each:
``idc_select``, ``idc_download``, ``idc_convert``; the filters and the manifest in ``idc_manifest``; this module
is the public API and the command):

1. ``select``: query IDC's series index (shipped inside the ``idc-index-data`` wheel, so it works
   offline) with the CT-FM filters (:data:`CTFM_FILTERS`) and user filters, and write a manifest
   (CSV or Parquet). Filters that need IDC's per-series CT attribute indices (``ct_index``,
   ``volume_geometry_index``: fetched by ``idc-index`` at run time) are applied when those
   indices can be had and reported as skipped otherwise; ``convert`` re-checks them from the
   DICOM headers, so the corpus obeys them either way.
2. ``download``: fetch the manifest's series with ``s5cmd`` exactly as ``idc-index`` does
   (``cp s3://<bucket>/<crdc_series_uuid>/* <folder>``, anonymous, at
   ``idc_index.index.aws_endpoint_url``), several series at a time; each series lands in a
   temporary folder, is checked (instance count, DICOM preamble) and renamed into place, so
   complete series are skipped on a rerun and partial ones redone. Failures are retried and
   recorded, never fatal to the other series.
3. ``convert``: one DICOM series folder -> one NIfTI (ITK), in parallel, after validating the
   geometry (one series per folder, consistent orientation/pixel spacing/size, one instance per
   position, no missing slice, uniform spacing, no gantry tilt) and the CT-FM header filters;
   anything rejected gets a one-line reason. Writes the decathlon datalist that
   ``ctfm_pretrain`` reads (``{"training": [{"image": "images/....nii.gz"}]}``), ``sources.csv``
   (image -> series, collection, licence, DOI), ``rejected.csv`` and ``ATTRIBUTION.md``.

Per-scan steps take a shard (``shard_index`` / ``num_shards``, defaulting from torchrun's
``RANK``/``WORLD_SIZE`` or SLURM array variables) so any scheduler can spread them over machines.

CLI::

    ctfm-idc select --output data/idc/manifest.csv --sample 1000 --seed 0
    ctfm-idc download --manifest data/idc/manifest.csv --output_dir data/idc/dicom
    ctfm-idc convert --input_dir data/idc/dicom --output_dir data/idc/nifti \\
        --manifest data/idc/manifest.csv
    ctfm-idc build --output_dir data/idc --sample 1000      # all three, resumable
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ctfm_bundles.tools.data.idc_convert import (
    attribution_text,
    check_series_geometry,
    convert,
    convert_series,
    find_series_folders,
    read_headers,
    write_corpus_files,
)
from ctfm_bundles.tools.data.idc_download import (
    default_endpoint_url,
    download,
    download_series,
    s5cmd_path,
    verify_series_folder,
)
from ctfm_bundles.tools.data.idc_manifest import (
    ATTRIBUTE_FILTERS,
    CTFM_FILTERS,
    IDC_CITATION,
    INDEX_COLUMNS,
    MANIFEST_COLUMNS,
    read_manifest,
    series_folder,
    write_table,
)
from ctfm_bundles.tools.data.idc_select import (
    apply_filters,
    format_summary,
    index_version,
    load_attribute_index,
    load_series_index,
    sample_series,
    select,
    summarize,
)
from ctfm_common.runtime import atomic_write, atomic_write_text, default_shard, resolve_shard, shard_items

# the public API of every step, one import away (``from ctfm_bundles.tools.data import idc``)
__all__ = [
    "ATTRIBUTE_FILTERS",
    "CTFM_FILTERS",
    "IDC_CITATION",
    "INDEX_COLUMNS",
    "MANIFEST_COLUMNS",
    "apply_filters",
    "atomic_write",
    "atomic_write_text",
    "attribution_text",
    "build",
    "check_series_geometry",
    "cli",
    "convert",
    "convert_series",
    "default_endpoint_url",
    "default_shard",
    "download",
    "download_series",
    "find_series_folders",
    "format_summary",
    "index_version",
    "load_attribute_index",
    "load_series_index",
    "read_headers",
    "read_manifest",
    "resolve_shard",
    "s5cmd_path",
    "sample_series",
    "select",
    "series_folder",
    "shard_items",
    "summarize",
    "verify_series_folder",
    "write_corpus_files",
    "write_table",
]


# ---------------------------------------------------------------------------------------
# All three in one command.
# ---------------------------------------------------------------------------------------


def build(
    *,
    output_dir: str = "data/idc",
    reselect: bool = False,
    collections: str | Sequence[str] | None = None,
    body_parts: str | Sequence[str] | None = None,
    licenses: str | Sequence[str] | None = None,
    max_total_gb: float | None = None,
    sample: int | None = None,
    seed: int = 0,
    attribute_indices: str | None = None,
    endpoint_url: str | None = None,
    download_workers: int = 4,
    convert_workers: int = 2,
    retries: int = 2,
    shard_index: int | None = None,
    num_shards: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Select, download and convert in one resumable command.

    Layout: ``output_dir/manifest.csv`` (reused on a rerun unless ``reselect``), ``output_dir/dicom/``,
    ``output_dir/nifti/`` (the corpus: ``datalist.json``, ``images/``, ``sources.csv``,
    ``rejected.csv``, ``ATTRIBUTION.md``). Arguments are those of :func:`select`, :func:`download`
    and :func:`convert`.

    Returns:
        ``{"select": ..., "download": ..., "convert": ...}`` summaries.
    """
    root = Path(output_dir)
    manifest = root / "manifest.csv"
    if reselect or not manifest.is_file():
        selected = select(
            output=str(manifest),
            collections=collections,
            body_parts=body_parts,
            licenses=licenses,
            max_total_gb=max_total_gb,
            sample=sample,
            seed=seed,
            attribute_indices=attribute_indices,
            quiet=not progress,
        )
    else:
        selected = {**summarize(read_manifest(manifest)), "manifest": str(manifest), "reused": True}
        if progress:
            print(f"reusing {manifest} ({selected['series']} series; pass --reselect to select again)")
    downloaded = download(
        manifest=str(manifest),
        output_dir=str(root / "dicom"),
        num_workers=download_workers,
        retries=retries,
        endpoint_url=endpoint_url,
        shard_index=shard_index,
        num_shards=num_shards,
        progress=progress,
    )
    converted = convert(
        input_dir=str(root / "dicom"),
        output_dir=str(root / "nifti"),
        manifest=str(manifest),
        num_workers=convert_workers,
        shard_index=shard_index,
        num_shards=num_shards,
        progress=progress,
    )
    return {"select": selected, "download": downloaded, "convert": converted}


def _exit_status(result: Any) -> int:
    """1 when a CLI run left failed series behind (so a scheduler can retry it), else 0."""
    if not isinstance(result, dict):
        return 0
    if "download" in result:  # build
        return max(_exit_status(result["download"]), _exit_status(result["convert"]))
    return int(bool(result.get("failed")))


def cli() -> None:
    """The console command (``[project.scripts]`` of pyproject.toml)."""
    import fire

    commands = {
        "select": select,
        "download": download,
        "convert": convert,
        "corpus_files": write_corpus_files,
        "build": build,
    }
    # the commands print their own summaries; fire would print the returned dict again
    outcome = fire.Fire(commands, serialize=lambda r: None if isinstance(r, dict) and r is not commands else r)
    sys.exit(_exit_status(outcome if outcome is not commands else None))


if __name__ == "__main__":
    cli()
