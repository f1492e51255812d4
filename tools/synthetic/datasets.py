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
"""Datasets of phantoms with their datalists: body or head cases for the bundles, and the triage dataset
(head phantoms with and without a lesion, balanced, with lesion masks)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ctfm_bundles.tools.synthetic.anatomy import BODY_LABELS, HEAD_LABELS, MIN_SIZE, PHANTOM_KINDS
from ctfm_bundles.tools.synthetic.files import save_phantom
from ctfm_bundles.tools.synthetic.geometry import validate_grid, validate_seed
from ctfm_bundles.tools.synthetic.head import make_head_phantom
from ctfm_bundles.tools.synthetic.volumes import make_phantom
from ctfm_common.runtime import atomic_write_text

def _case_seed(seed: int, index: int) -> int:
    """An independent, reproducible seed for case ``index`` of a dataset."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def make_dataset(
    *,
    output_dir: str,
    num_cases: int,
    kind: str = "body",
    seed: int = 0,
    shape: Sequence[int] | None = None,
    spacing: float | Sequence[float] | None = None,
    lesion_fraction: float = 0.5,
    validation_fraction: float = 0.2,
    noise_hu: float | None = None,
    datalist_name: str = "datalist.json",
) -> str:
    """Write ``num_cases`` phantoms and a MONAI decathlon-style datalist.

    Layout: ``imagesTr/<kind>_NNN.nii.gz`` and ``labelsTr/<kind>_NNN.nii.gz`` under
    ``output_dir``, and ``<output_dir>/<datalist_name>`` with ``training`` and
    ``validation`` lists whose paths are relative to ``output_dir``. Body items are
    ``{"image", "label"}`` (label map path). Head items are ``{"image", "label": 0|1,
    "lesion_mask"}``: ``label`` is the lesion flag, ``lesion_mask`` a binary uint8 mask.
    Lesion cases are stratified over the two lists.

    Args:
        output_dir: dataset folder (created).
        num_cases: number of cases, at least 1.
        kind: ``"body"`` or ``"head"``.
        seed: dataset seed; each case gets its own seed derived from it.
        shape: voxel counts; default that of the phantom function.
        spacing: voxel sizes in mm; default that of the phantom function.
        lesion_fraction: head only: fraction of cases with a lesion.
        validation_fraction: fraction of cases in ``validation`` (at least one when
            ``num_cases >= 2``).
        noise_hu: Gaussian noise sigma in HU; default that of the phantom function.
        datalist_name: datalist file name.

    Returns:
        The datalist path.
    """
    if kind not in PHANTOM_KINDS:
        raise ValueError(f"kind must be one of {PHANTOM_KINDS}, got {kind!r}")
    if isinstance(num_cases, bool) or not isinstance(num_cases, (int, np.integer)) or num_cases < 1:
        raise ValueError(f"num_cases must be an integer >= 1, got {num_cases!r}")
    for name, fraction in (("lesion_fraction", lesion_fraction), ("validation_fraction", validation_fraction)):
        if not 0.0 <= float(fraction) <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {fraction!r}")
    seed = validate_seed(seed)
    if shape is not None or spacing is not None:  # fail before writing anything
        validate_grid(shape if shape is not None else (MIN_SIZE,) * 3, spacing if spacing is not None else 1.0)

    num_validation = min(max(round(validation_fraction * num_cases), 1), num_cases - 1) if num_cases >= 2 else 0
    is_validation = np.zeros(num_cases, dtype=bool)
    is_validation[num_cases - num_validation:] = True
    has_lesion = np.zeros(num_cases, dtype=bool)
    if kind == "head":
        rng = np.random.default_rng(seed)
        num_lesion = round(lesion_fraction * num_cases)
        val_lesion = round(num_lesion * num_validation / num_cases)
        for part, count in ((is_validation, val_lesion), (~is_validation, num_lesion - val_lesion)):
            members = np.flatnonzero(part)
            has_lesion[rng.permutation(members)[:count]] = True

    root = Path(output_dir)
    datalist: dict[str, Any] = {
        "name": f"CT-FM {kind} phantoms",
        "description": f"synthetic {kind} CT phantoms from tools/synthetic/phantom.py (seed {seed})",
        "labels": ({"0": "background", **{str(v): k for k, v in BODY_LABELS.items()}} if kind == "body"
                   else {"0": "no_lesion", "1": "hyperdense_lesion"}),
        "numTraining": int(num_cases - num_validation),
        "training": [],
        "validation": [],
    }
    for index in range(num_cases):
        case = f"{kind}_{index:03d}"
        image_rel, label_rel = f"imagesTr/{case}.nii.gz", f"labelsTr/{case}.nii.gz"
        options = {"shape": shape, "spacing": spacing, "seed": _case_seed(seed, index), "noise_hu": noise_hu}
        if kind == "head":
            options["lesion"] = bool(has_lesion[index])
        image, labels, affine = make_phantom(kind=kind, **options)
        if kind == "head":
            mask = (labels == HEAD_LABELS["lesion"]).astype(np.uint8)
            save_phantom(image, mask, affine, image_path=root / image_rel, label_path=root / label_rel)
            item: dict[str, Any] = {"image": image_rel, "label": int(has_lesion[index]), "lesion_mask": label_rel}
        else:
            save_phantom(image, labels, affine, image_path=root / image_rel, label_path=root / label_rel)
            item = {"image": image_rel, "label": label_rel}
        datalist["validation" if is_validation[index] else "training"].append(item)
    path = root / datalist_name
    atomic_write_text(path, json.dumps(datalist, indent=2) + "\n")
    return str(path)


def make_triage_dataset(
    *,
    output_dir: str,
    pairs: int = 16,
    validation: int = 10,
    testing: int = 24,
    seed: int = 0,
    shape: Sequence[int] = (64, 64, 32),
    spacing: float | Sequence[float] = (3.0, 3.0, 5.0),
    noise_hu: float = 2.0,
) -> str:
    """Head phantoms for triage (bleed vs none) and a datalist with held-out heads.

    ``training`` holds matched pairs: each head once with and once without a lesion (the
    same head otherwise), so the lesion is the only thing telling the classes apart.
    ``validation`` (model selection) and ``testing`` (held out from training and
    selection) hold distinct heads, alternately without and with a lesion. Item labels
    are ``0``/``1``; paths are relative to ``output_dir``
    (``<section>/head_NNN_<label>.nii.gz``).

    Args:
        output_dir: folder of the images and of ``datalist.json``.
        pairs: matched training pairs (``2 * pairs`` training scans).
        validation: validation heads.
        testing: held-out test heads.
        seed: offsets every head's seed (heads are seeded ``seed + 1``, ``seed + 2``, ...).
        shape: voxel counts of each head.
        spacing: voxel sizes in mm.
        noise_hu: Gaussian noise sigma in HU.

    Returns:
        The datalist path.
    """
    root = Path(output_dir)
    items: dict[str, list[dict[str, Any]]] = {"training": [], "validation": [], "testing": []}
    head_seed = validate_seed(seed)
    for section, count in (("training", pairs), ("validation", validation), ("testing", testing)):
        for i in range(count):
            head_seed += 1
            for lesion in (False, True) if section == "training" else (bool(i % 2),):
                name = f"{section}/head_{head_seed:03d}_{int(lesion)}.nii.gz"
                image, _, affine = make_head_phantom(shape=shape, spacing=spacing, seed=head_seed, lesion=lesion,
                                                     noise_hu=noise_hu)
                save_phantom(image, None, affine, image_path=root / name)
                items[section].append({"image": name, "label": int(lesion)})
    path = root / "datalist.json"
    atomic_write_text(path, json.dumps(items, indent=1) + "\n")
    return str(path)
