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
"""Whole-body segmentation in one call or one command (``ctfm-segment input output``).

Runs ``ctfm_wholebody_seg/configs/inference.json`` through ``monai.bundle.run`` with a few named
overrides; every other config id can be overridden too (``--id value``, as with
``python -m monai.bundle run``)::

    ctfm-segment ct.nii.gz out/                                   # all 117 structures
    ctfm-segment dicom_series/ out/ --roi_subset liver,spleen --masks --dicom_seg
    ctfm-segment ct.nii.gz out/ --fast --ckpt project-lighter/whole_body_segmentation
    python -m ctfm_bundles.wholebody ct.nii.gz out/ --device cpu    # the same without installing
"""

from __future__ import annotations

import argparse
import ast
import json
import os
from collections.abc import Sequence
from pathlib import Path

BUNDLE = "ctfm_wholebody_seg"


def segment(
    input: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    roi_subset: str | Sequence[str | int] | None = None,
    fast: bool = False,
    ckpt: str | None = None,
    device: str | None = None,
    save_masks: bool = False,
    save_seg_nrrd: bool = True,
    save_dicom_seg: bool = False,
    **overrides,
) -> dict:
    """Segment a CT (NIfTI/NRRD file, DICOM series folder, glob or datalist) with the whole-body bundle.

    Args:
        input: what the bundle's ``input`` takes.
        output_dir: where ``<case>/<case>_seg.nii.gz`` (+ colour table, ``.seg.nrrd``, CSV, preview,
            masks, DICOM-SEG) and ``summary.json`` go.
        roi_subset: structures to segment, by name or index (``["liver", "spleen"]`` or ``"liver,spleen"``);
            ``None``: all. Outputs and statistics hold only these.
        fast: the ``fast`` preset (3 mm) instead of ``full`` (1.5 mm).
        ckpt: model weights (file, hub folder or hub repo id); ``None``: the bundle's default
            (``models/``, filled by ``python -m monai.bundle download_large_files``).
        device: ``cpu``, ``cuda``, ``cuda:1``...; ``None``: CUDA when available.
        save_masks: one mask file per structure under ``<case>/masks/``.
        save_seg_nrrd: a 3D Slicer ``.seg.nrrd`` with the structure names and colours.
        save_dicom_seg: a DICOM-SEG for DICOM series inputs (needs highdicom).
        overrides: any other id of ``configs/inference.json`` (``init_filters``, ``spacing``...).

    Returns:
        The run's ``summary.json`` (cases, their outputs, failures).

    Raises:
        WeightsNotFoundError: (a ``SystemExit``) no weights where ``ckpt`` points, with the commands
            that get them.
        RuntimeError: every case failed.
    """
    from monai.bundle import run

    from . import bundle_dir

    bundle = bundle_dir(BUNDLE)
    settings = {
        "input": os.fspath(input),
        "output_dir": os.path.abspath(os.fspath(output_dir)),
        "save_masks": bool(save_masks),
        "save_seg_nrrd": bool(save_seg_nrrd),
        "save_dicom_seg": bool(save_dicom_seg),
    }
    if roi_subset:
        settings["roi_subset"] = list(roi_subset) if not isinstance(roi_subset, str) else roi_subset
    if fast:
        settings["preset"] = "fast"
    if ckpt:
        settings["ckpt"] = os.fspath(ckpt)
    if device:
        settings["device"] = str(device)
    settings.update(overrides)
    run(
        "run",
        config_file=str(bundle / "configs" / "inference.json"),
        meta_file=str(bundle / "configs" / "metadata.json"),
        logging_file=str(bundle / "configs" / "logging.conf"),
        **settings,
    )
    return json.loads((Path(settings["output_dir"]) / "summary.json").read_text())


def _value(text: str):
    """A command-line value as ``monai.bundle run`` would read it: a Python literal when it is one."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, dict]:
    """The command line: named options plus any ``--<config id> value`` pairs for the bundle config."""
    parser = argparse.ArgumentParser(
        prog="ctfm-segment",
        description="CT-FM whole-body segmentation (117 TotalSegmentator structures) of a CT: "
        "runs the ctfm_wholebody_seg bundle's configs/inference.json. Other config ids: --<id> VALUE.",
    )
    parser.add_argument("input", help="CT file (NIfTI/NRRD/MHA), DICOM series folder, glob or datalist JSON")
    parser.add_argument("output", help="output folder")
    parser.add_argument("--roi_subset", "--structures", dest="roi_subset", default=None,
                        help="structures to segment, comma-separated names or indices (default: all)")
    parser.add_argument("--fast", action="store_true", help="3 mm preset (faster, coarser)")
    parser.add_argument("--ckpt", default=None, help="weights file, hub folder or hub repo id")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: CUDA when available)")
    parser.add_argument("--masks", action="store_true", help="one mask file per structure")
    parser.add_argument("--no_seg_nrrd", action="store_true", help="no 3D Slicer .seg.nrrd")
    parser.add_argument("--dicom_seg", action="store_true", help="DICOM-SEG for DICOM series inputs")
    args, rest = parser.parse_known_args(argv)
    overrides = {}
    while rest:
        key = rest.pop(0)
        if not key.startswith("--") or not rest:
            parser.error(f"expected '--<config id> VALUE' pairs after the options, got {key!r}")
        overrides[key[2:]] = _value(rest.pop(0))
    return args, overrides


def main(argv: Sequence[str] | None = None) -> int:
    """``ctfm-segment``: exit status 0 when every case was segmented, 1 otherwise."""
    args, overrides = parse_args(argv)
    summary = segment(args.input, args.output, roi_subset=args.roi_subset, fast=args.fast, ckpt=args.ckpt,
                      device=args.device, save_masks=args.masks, save_seg_nrrd=not args.no_seg_nrrd,
                      save_dicom_seg=args.dicom_seg, **overrides)
    print(f"segmented {summary['num_ok']} of {summary['num_ok'] + summary['num_failed']} case(s) into {args.output}")
    return 0 if not summary["num_failed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
