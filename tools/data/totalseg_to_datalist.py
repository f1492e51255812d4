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
"""Convert a TotalSegmentator-layout dataset into multilabel label maps and a MONAI datalist.

Input layout (the public TotalSegmentator v2 release)::

    <input_dir>/<case>/ct.nii.gz
    <input_dir>/<case>/segmentations/<structure>.nii.gz   # one binary mask per structure
    <input_dir>/meta.csv                                  # optional: image_id;...;split

Output::

    <output_dir>/labelsTr/<case>.nii.gz   # uint8 label map, TotalSegmentator v2 indices (0 = background)
    <output_dir>/datalist.json            # decathlon-style training / validation / testing lists

Images are not copied: datalist paths point at the original ``ct.nii.gz`` files (relative
to ``output_dir``, the bundle's ``dataset_dir``). The split follows ``meta.csv``'s ``split``
column when present (train / val / test), else a seeded random split. Structure indices
come from the bundle's ``metadata.json`` (``channel_def``), the registry inference uses.
Cases are converted in parallel, written atomically, and skipped when already done; a
shard of the cases can run per machine (``shard_index`` / ``num_shards``, defaulting from
torchrun's RANK / WORLD_SIZE or SLURM array variables).

Usage::

    ctfm-totalseg-datalist --input_dir Totalsegmentator_dataset_v201 --output_dir data/totalseg
"""

from __future__ import annotations

import csv
import json
import sys
import os
import random
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from ctfm_bundles.tools import REPO_ROOT
from ctfm_common.runtime import atomic_write, atomic_write_text, resolve_shard, shard_items
from ctfm_common.validate import check_image_file, describe_failure

DEFAULT_LABELS = REPO_ROOT / "bundles" / "ctfm_wholebody_seg" / "configs" / "metadata.json"
SPLITS = {"train": "training", "val": "validation", "test": "testing"}


def read_label_names(path: str | os.PathLike = DEFAULT_LABELS) -> dict[int, str]:
    """Index -> structure name from a bundle ``metadata.json`` or a ``{index: name}`` / ``{"labels": ...}`` JSON."""
    content = json.loads(Path(path).read_text())
    if "network_data_format" in content:
        content = content["network_data_format"]["outputs"]["pred"]["channel_def"]
    content = content.get("labels", content)
    return {int(k): str(v) for k, v in content.items()}


def convert_case(case_dir: str | os.PathLike, label_path: str | os.PathLike, names: dict[int, str]) -> dict:
    """Merge one case's binary masks into a label map (later indices win on overlaps).

    Args:
        case_dir: folder with ``ct.nii.gz`` and ``segmentations/``.
        label_path: label map to write (skipped when it exists).
        names: index -> structure name (mask file stem).

    Returns:
        ``{"case", "structures", "skipped"}``.

    Raises:
        FileNotFoundError / ValueError: naming the case file that is missing or off-grid.
    """
    import nibabel as nib

    case_dir, label_path = Path(case_dir), Path(label_path)
    if label_path.is_file():
        return {"case": case_dir.name, "structures": None, "skipped": True}
    ct = nib.load(case_dir / "ct.nii.gz")
    labels = np.zeros(ct.shape[:3], dtype=np.uint8)
    found = 0
    for index, name in sorted(names.items()):
        mask_path = case_dir / "segmentations" / f"{name}.nii.gz"
        if index == 0 or not mask_path.is_file():
            continue
        mask = nib.load(mask_path)
        if mask.shape[:3] != ct.shape[:3] or not np.allclose(mask.affine, ct.affine, atol=1e-3):
            raise ValueError(f"{mask_path}: not on the grid of {case_dir / 'ct.nii.gz'}")
        voxels = np.asarray(mask.dataobj) > 0
        found += bool(voxels.any())
        labels[voxels] = index
    out = nib.Nifti1Image(labels, ct.affine)
    out.set_qform(ct.affine, code=1)
    out.set_sform(ct.affine, code=1)
    atomic_write(label_path, lambda tmp: nib.save(out, str(tmp)))
    return {"case": case_dir.name, "structures": found, "skipped": False}


def convert_or_report(case_dir: Path, label_path: Path, names: dict[int, str]) -> dict:
    """:func:`convert_case` after the header checks of its CT; a bad case gives ``{"case", "error"}`` (one line
    naming the file and the problem) instead of stopping the whole dataset."""
    try:
        check_image_file(case_dir / "ct.nii.gz")
        return convert_case(case_dir, label_path, names)
    except Exception as error:  # one bad case must not stop the others
        return {"case": case_dir.name, "error": describe_failure(case_dir / "ct.nii.gz", error), "skipped": False}


def _read_splits(input_dir: Path) -> dict[str, str]:
    meta = input_dir / "meta.csv"
    if not meta.is_file():
        return {}
    text = meta.read_text()
    rows = csv.DictReader(text.splitlines(), delimiter=";" if ";" in text.splitlines()[0] else ",")
    return {r["image_id"]: SPLITS.get(r.get("split", ""), "training") for r in rows if r.get("image_id")}


def totalseg_to_datalist(
    *,
    input_dir: str,
    output_dir: str,
    labels: str | None = None,
    validation_fraction: float = 0.1,
    seed: int = 0,
    num_workers: int | None = None,
    shard_index: int | None = None,
    num_shards: int | None = None,
    datalist_name: str = "datalist.json",
) -> str:
    """Convert a TotalSegmentator-layout dataset (see the module docstring).

    Args:
        input_dir: folder of ``<case>/ct.nii.gz`` + ``<case>/segmentations/``.
        output_dir: where ``labelsTr/`` and the datalist go (use it as ``dataset_dir``).
        labels: label-name JSON (default: the bundle's ``metadata.json`` channel_def, 117 classes).
        validation_fraction: validation share when there is no ``meta.csv`` split.
        seed: seed of that random split.
        num_workers: parallel processes (default: CPU count).
        shard_index: this worker's shard (default from RANK or SLURM_ARRAY_TASK_ID, else 0).
        num_shards: number of shards (default from WORLD_SIZE or SLURM_ARRAY_TASK_COUNT, else 1).
        datalist_name: datalist file name.

    Returns:
        The datalist path.
    """
    source, target = Path(input_dir), Path(output_dir)
    names = read_label_names(labels or DEFAULT_LABELS)
    cases = sorted(p.parent for p in source.glob("*/ct.nii.gz"))
    if not cases:
        raise FileNotFoundError(f"{source}: no <case>/ct.nii.gz found (expected the TotalSegmentator layout)")
    shard_index, num_shards = resolve_shard(shard_index, num_shards)
    mine = shard_items(cases, shard_index, num_shards)
    with ProcessPoolExecutor(max_workers=num_workers or os.cpu_count()) as pool:
        futures = [pool.submit(convert_or_report, c, target / "labelsTr" / f"{c.name}.nii.gz", names) for c in mine]
        try:
            from tqdm import tqdm

            results = [f.result() for f in tqdm(futures, desc=f"shard {shard_index}/{num_shards}", unit="case")]
        except ImportError:
            results = [f.result() for f in futures]
    failed = {r["case"]: r["error"] for r in results if "error" in r}
    done = sum(not r["skipped"] for r in results) - len(failed)
    print(f"converted {done} cases, skipped {len(results) - done - len(failed)} already converted, {len(failed)} "
          f"failed (shard {shard_index}/{num_shards})")
    for error in failed.values():
        print(f"failed: {error}", file=sys.stderr)
    if failed and len(failed) == len(results):
        first = next(iter(failed.values()))
        raise SystemExit(f"every case of shard {shard_index}/{num_shards} failed; the first: {first}")
    splits = _read_splits(source)
    order = list(cases)
    random.Random(seed).shuffle(order)
    num_val = max(1, round(validation_fraction * len(cases))) if len(cases) > 1 else 0
    random_val = {c.name for c in order[:num_val]}
    datalist: dict = {"name": "TotalSegmentator", "labels": {str(k): v for k, v in names.items()},
                      "training": [], "validation": [], "testing": []}
    for case in cases:
        if case.name in failed:  # reported above; the split of the others stays as without it
            continue
        section = splits.get(case.name) or ("validation" if case.name in random_val else "training")
        datalist[section].append({"image": os.path.relpath(case / "ct.nii.gz", target),
                                  "label": f"labelsTr/{case.name}.nii.gz"})
    path = atomic_write_text(target / datalist_name, json.dumps(datalist, indent=2) + "\n")
    return str(path)


def cli() -> None:
    """The console command (``[project.scripts]`` of pyproject.toml)."""
    import fire

    fire.Fire(totalseg_to_datalist)


if __name__ == "__main__":
    cli()
