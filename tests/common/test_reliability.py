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
"""Bad input through every bundle's real entry points, and the rule that weights never unpickle code.

The corpus (``tests/bad_inputs.py``, generated here) holds truncated and empty NIfTI files, 2-D
and 4-D images, NaNs, MR-like intensities, a volume smaller than every patch, a header claiming
100000^3 voxels, DICOM folders with two series, a missing slice, uneven spacing, an SR and a SEG
object, and a datalist entry whose file does not exist. Batch runs must go on past each bad
scan, naming it and its problem in the summary; a run that cannot go on exits non-zero with
that one line in its log, and leaves earlier outputs byte-identical.
"""

from __future__ import annotations

import ast
import csv
import inspect
import json
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from bad_inputs import (
    EVALUATE_CASES,
    EXPECTED,
    LABEL_MAP_CASES,
    MR_WARNING,
    ROUND_2,
    SEG_EVALUATE_CASES,
    SETTINGS_EXPECTED,
    TRAIN_CASES,
    body_volume,
    unwritable_folder,
    write_corpus,
)
from conftest import BUNDLES_DIR, REPO_ROOT, run_bundle

from ctfm_bundles.tools import bundle_scripts_switch
from ctfm_common import validate

ACCEPTED = sorted(k for k, v in EXPECTED.items() if v is None)
REJECTED = sorted(k for k, v in EXPECTED.items() if v is not None)
LOAD_TIME = {"truncated", "nan"}  # found while loading, not from the headers
SEG = {"init_filters": 8, "spacing": [6.0, 6.0, 6.0], "patch_size": [32, 32, 32], "sw_batch_size": 1}
TRIAGE = {
    "init_filters": 8,
    "spacing": [5.0, 3.0, 3.0],
    "patch_size": [16, 32, 32],
    "windows": ["stroke"],
    "num_workers": 0,
}
EMBED = {"init_filters": 8, "patch_size": [16, 32, 32], "spacing": [3.0, 3.0, 3.0], "batch_size": 2, "num_workers": 0}
PRETRAIN = {"init_filters": 8, "patch_size": [16, 32, 32], "num_crops": 3, "num_workers": 0}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("bad_inputs")
    paths = write_corpus(root / "corpus")
    from monai.networks.nets import SegResNetDS

    torch.manual_seed(0)
    seg = SegResNetDS(
        spatial_dims=3, in_channels=1, init_filters=8, blocks_down=[1, 2, 2, 4, 4], out_channels=118, dsdepth=4
    )
    torch.save(seg.state_dict(), root / "seg.pt")
    return {"root": root, "paths": paths}


def datalist(path, paths, section="testing"):
    path.write_text(json.dumps({section: [{"image": str(p)} for p in paths]}))
    return path


def check_message(case: str, message: str, paths: dict) -> None:
    """A reported problem names the scan and says what :data:`EXPECTED` says."""
    assert str(paths[case]) in message and EXPECTED[case] in message, (case, message)
    assert "\n" not in message and "Traceback" not in message, message


# ------------------------------------------------------------------------------------------------
# the checks themselves (headers only, in-process)
# ------------------------------------------------------------------------------------------------


def test_header_checks_name_each_problem_before_loading(corpus):
    paths = corpus["paths"]
    for case in ACCEPTED + sorted(LOAD_TIME):
        assert validate.check_input(paths[case]) is not None, case  # a shape: the header is fine
    for case in sorted(set(REJECTED) - LOAD_TIME):
        with pytest.raises(validate.InputError) as error:
            validate.check_input(paths[case])
        check_message(case, str(error.value), paths)
    # the enormous header is refused from its 544 header bytes: nothing near 2 PiB is allocated
    start = time.perf_counter()
    with pytest.raises(validate.InputError, match="100000 x 100000 x 100000 voxels"):
        validate.check_input(paths["huge_header"])
    assert time.perf_counter() - start < 1.0


def test_size_is_checked_against_the_available_memory(corpus, monkeypatch):
    monkeypatch.setattr(validate, "available_memory_bytes", lambda: 10 * 2**20)  # 10 MiB free
    with pytest.raises(validate.InputError, match=r"more than the .* of memory available; refusing to load it"):
        validate.check_size("big.nii.gz", (512, 512, 300))
    validate.check_size("small.nii.gz", (64, 64, 64))  # 1 MiB as float32: fine


def test_loaded_volume_checks_and_the_mr_warning(caplog):
    from monai.data import MetaTensor

    good = MetaTensor(torch.from_numpy(body_volume().astype(np.float32))[None], meta={"filename_or_obj": "ct.nii"})
    validate.check_volume(good)
    nan = good.clone()
    nan[0, 1, 2, 3] = float("nan")
    with pytest.raises(validate.InputError, match="ct.nii: 1 of .* voxels are NaN or infinite"):
        validate.check_volume(nan)
    # the affine rule holds for every format once loaded (a DICOM series or an NRRD has no NIfTI header)
    squashed = good.clone()
    squashed.affine = torch.diag(torch.tensor([0.7, 0.7, 1e-4, 1.0], dtype=torch.float64))
    with pytest.raises(validate.InputError, match=r"ct.nii: implausible voxel spacing \(0.7, 0.7, 0.0001\) mm"):
        validate.check_volume(squashed)
    with pytest.raises(validate.InputError, match="3 channels"):
        validate.check_volume(torch.zeros(3, 8, 8, 8), "four_d.nii")
    with caplog.at_level(logging.WARNING, logger="ctfm_common.validate"):
        validate.check_volume(good + 1024, "mr.nii")
    assert "mr.nii" in caplog.text and MR_WARNING in caplog.text


# ------------------------------------------------------------------------------------------------
# whole-body segmentation inference
# ------------------------------------------------------------------------------------------------


def test_seg_inference_batch_goes_on_past_every_bad_input(corpus, tmp_path):
    paths = corpus["paths"]
    out = tmp_path / "out"
    proc = run_bundle(
        "ctfm_wholebody_seg",
        "inference.json",
        input=str(datalist(tmp_path / "all.json", paths.values())),
        output_dir=str(out),
        ckpt=str(corpus["root"] / "seg.pt"),
        save_preview=False,
        **SEG,
    )
    log = proc.stdout + proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    status = {c["case"]: c for c in summary["cases"]}
    assert sorted(c for c, r in status.items() if r["status"] == "ok") == ACCEPTED
    assert summary["num_failed"] == len(REJECTED)
    for case in REJECTED:
        check_message(case, status[case]["error"], paths)
        assert f"failed: {status[case]['error']}" in log  # the summary at the end of the log, one line each
        assert not (out / case).exists()  # nothing half-written for a failed scan
    assert f"{paths['mr_like']}: intensities" in log and MR_WARNING in log
    assert "trained with" not in log  # weights without training settings (as the public release): nothing compared
    tiny = nib.load(out / "tiny" / "tiny_seg.nii.gz")
    assert tiny.shape == (8, 8, 4)  # padded for the network, written back on its own grid
    assert nib.load(out / "dicom_good" / "dicom_good_seg.nii.gz").shape == (32, 32, 8)


def test_seg_inference_single_bad_input_exits_nonzero_and_keeps_the_previous_output(corpus, tmp_path):
    out = tmp_path / "out"
    previous = out / "nan" / "nan_seg.nii.gz"
    previous.parent.mkdir(parents=True)
    previous.write_bytes(b"an earlier result")
    proc = run_bundle(
        "ctfm_wholebody_seg",
        "inference.json",
        input=str(corpus["paths"]["nan"]),
        output_dir=str(out),
        ckpt=str(corpus["root"] / "seg.pt"),
        check=False,
        **SEG,
    )
    assert proc.returncode != 0
    line = f"failed: {corpus['paths']['nan']}: 400 of 25600 voxels are NaN or infinite"
    assert line in proc.stdout + proc.stderr
    assert previous.read_bytes() == b"an earlier result"
    assert sorted(p.name for p in previous.parent.iterdir()) == ["nan_seg.nii.gz"]  # no temporary file left


# ------------------------------------------------------------------------------------------------
# triage inference, retrieval embedding, pretraining cache
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def triage_ckpt(corpus):
    with bundle_scripts_switch() as use:
        use(BUNDLES_DIR / "ctfm_triage")
        from scripts.model import TriageClassifier

        torch.manual_seed(0)
        path = corpus["root"] / "triage.pt"
        torch.save(TriageClassifier(init_filters=8, in_channels=1, num_labels=1).state_dict(), path)
    return path


TRIAGE_CASES = [
    "good",
    "tiny",
    "mr_like",
    "zero_byte",
    "image_4d",
    "nan",
    "huge_header",
    "missing_file",
    "dicom_missing_slice",
    "dicom_sr",
    *ROUND_2,
]


def test_triage_inference_reports_bad_scans_and_an_all_bad_run_keeps_old_predictions(corpus, triage_ckpt, tmp_path):
    paths = corpus["paths"]
    out = tmp_path / "out"
    items = datalist(tmp_path / "batch.json", [paths[c] for c in TRIAGE_CASES])
    run_bundle("ctfm_triage", "inference.json", input=str(items), output_dir=str(out), ckpt=str(triage_ckpt), **TRIAGE)
    rows = {r["case"]: r for r in csv.DictReader(open(out / "predictions.csv"))}
    assert sorted(rows) == sorted(TRIAGE_CASES)
    for case in TRIAGE_CASES:
        if EXPECTED[case] is None:
            assert not rows[case]["error"] and 0.0 <= float(rows[case]["probability_abnormal"]) <= 1.0, rows[case]
        else:
            check_message(case, rows[case]["error"], paths)
    # every scan bad: non-zero exit, each named, and the predictions of the earlier run untouched
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad = datalist(tmp_path / "bad.json", [paths[c] for c in ("zero_byte", "dicom_sr")])
    proc = run_bundle(
        "ctfm_triage",
        "inference.json",
        input=str(bad),
        output_dir=str(out),
        ckpt=str(triage_ckpt),
        check=False,
        **TRIAGE,
    )
    assert proc.returncode != 0
    assert f"{paths['zero_byte']}: empty file (0 bytes)" in proc.stdout + proc.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


EMBED_CASES = ["good", "tiny", "truncated", "image_2d", "nan", "huge_header", "dicom_two_series", "dicom_seg", *ROUND_2]


def test_retrieval_embed_skips_bad_scans_with_an_error_table(corpus, tmp_path):
    paths = corpus["paths"]
    out = tmp_path / "out"
    items = datalist(tmp_path / "batch.json", [paths[c] for c in EMBED_CASES])
    proc = run_bundle("ctfm_retrieval", "embed.json", input=str(items), output_dir=str(out), **EMBED)
    emb = out / "embeddings"
    index = {r["case"] for r in csv.DictReader(open(emb / "index.csv"))}
    assert index == {"good", "tiny"}
    assert sorted(p.name for p in emb.glob("*.safetensors")) == ["good.safetensors", "tiny.safetensors"]
    errors = {r["case"]: r for r in csv.DictReader(open(emb / "errors.csv"))}
    assert sorted(errors) == sorted(set(EMBED_CASES) - {"good", "tiny"})
    for case, row in errors.items():
        check_message(case, f"{row['source']}: {row['error']}", paths)
        assert f"failed: {row['source']}: {row['error']}" in proc.stdout + proc.stderr
    # a run where every scan fails exits non-zero and leaves the index as it was
    before = (emb / "index.csv").read_bytes()
    bad = datalist(tmp_path / "bad.json", [paths["image_4d"]])
    proc = run_bundle("ctfm_retrieval", "embed.json", input=str(bad), output_dir=str(out), check=False, **EMBED)
    assert proc.returncode != 0 and EXPECTED["image_4d"] in proc.stdout + proc.stderr
    assert (emb / "index.csv").read_bytes() == before


def test_pretrain_cache_skips_bad_scans_and_remembers_why(corpus, tmp_path):
    paths = corpus["paths"]
    cases = [
        "good",
        "tiny",
        "zero_byte",
        "truncated",
        "image_4d",
        "nan",
        "huge_header",
        "missing_file",
        "mr_like",
        "dicom_uneven_spacing",
        *ROUND_2,
    ]
    items = datalist(tmp_path / "pretrain.json", [paths[c] for c in cases], section="training")
    cache = tmp_path / "cache"
    proc = run_bundle(
        "ctfm_pretrain",
        "train.json",
        "cache",
        datalist=str(items),
        dataset_dir=str(tmp_path),
        output_dir=str(tmp_path / "out"),
        cache_dir=str(cache),
        **PRETRAIN,
    )
    log = proc.stdout + proc.stderr
    cached = sorted(p.name.split("_")[0] for p in cache.glob("*.npy"))
    assert cached == ["good", "mr"]  # tiny: padded, then too little foreground to crop from (degenerate)
    markers = {p.name.rsplit("_", 1)[0]: p.read_text().strip() for p in cache.glob("*.bad.txt")}
    assert "degenerate scan" in markers.pop("tiny")
    assert sorted(markers) == sorted(set(cases) - {"good", "tiny", "mr_like"})
    for case, message in markers.items():
        check_message(case, message, paths)
        assert message in log
    assert "'cached': 2" in log and f"'skipped': {len(cases) - 2}" in log


# ------------------------------------------------------------------------------------------------
# training data, tools
# ------------------------------------------------------------------------------------------------


def test_seg_training_refuses_labels_outside_the_label_map(tmp_path):
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    nib.save(nib.Nifti1Image(body_volume(), affine), tmp_path / "ct.nii.gz")
    label = np.zeros((40, 40, 16), np.uint8)
    label[10:20, 10:20, 4:10] = 200  # 118 classes: 200 is no structure of the label map
    nib.save(nib.Nifti1Image(label, affine), tmp_path / "ct_labels.nii.gz")
    item = {"image": "ct.nii.gz", "label": "ct_labels.nii.gz"}
    items = tmp_path / "datalist.json"
    items.write_text(json.dumps({"training": [item], "validation": [item]}))
    models = tmp_path / "models"
    proc = run_bundle(
        "ctfm_wholebody_seg",
        "train.json",
        "training",
        check=False,
        dataset_dir=str(tmp_path),
        datalist=str(items),
        output_dir=str(tmp_path / "out"),
        ckpt_dir=str(models),
        max_epochs=1,
        init_filters=8,
        spacing=[6.0, 6.0, 6.0],
        patch_size=[32, 32, 32],
        num_workers=0,
        batch_size=1,
    )
    assert proc.returncode != 0
    assert (
        f"training stopped by a bad input: {tmp_path / 'ct_labels.nii.gz'}: label values 200 outside the label "
        f"map 0..117"
    ) in proc.stdout + proc.stderr
    assert not list(models.glob("*.pt"))
    # the run ends with that line, not a traceback (the bundles' error hook; CTFM_TRACEBACK=1 shows it)
    assert "Traceback" not in proc.stderr and proc.stderr.rstrip().splitlines()[-1].startswith(
        f"error: {tmp_path / 'ct_labels.nii.gz'}: label values 200"
    ), proc.stderr[-3000:]


def test_triage_csv_with_bad_rows_exits_nonzero_naming_lines_and_keeps_the_old_datalist(tmp_path):
    nib.save(nib.Nifti1Image(body_volume(), np.eye(4)), tmp_path / "a.nii.gz")
    (tmp_path / "labels.csv").write_text("path,abnormal\na.nii.gz,1\nmissing.nii.gz,0\na.nii.gz,maybe\n")
    output = tmp_path / "datalist.json"
    output.write_text('{"training": []}\n')
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ctfm_bundles.tools.data.triage_csv_to_datalist",
            "--csv",
            str(tmp_path / "labels.csv"),
            "--output",
            str(output),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "line 3" in proc.stderr and "missing.nii.gz" in proc.stderr and "line 4" in proc.stderr, proc.stderr
    assert output.read_text() == '{"training": []}\n'


# ------------------------------------------------------------------------------------------------
# untrusted files: weights never unpickle code
# ------------------------------------------------------------------------------------------------


def _calls(tree: ast.AST, module: str, name: str) -> list[ast.Call]:
    return [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.Call)
        and isinstance(n.func, ast.Attribute)
        and n.func.attr == name
        and isinstance(n.func.value, ast.Name)
        and n.func.value.id == module
    ]


def test_every_weight_load_uses_weights_only_or_safetensors():
    sources = [
        p for p in REPO_ROOT.rglob("*.py") if not {".venv", "build", ".git"} & set(p.relative_to(REPO_ROOT).parts)
    ]
    unsafe = []
    for path in sources:
        tree = ast.parse(path.read_text(), str(path))
        for call in _calls(tree, "torch", "load"):
            flags = {k.arg: k.value for k in call.keywords}
            if not (isinstance(flags.get("weights_only"), ast.Constant) and flags["weights_only"].value is True):
                unsafe.append(f"{path.relative_to(REPO_ROOT)}:{call.lineno}: torch.load without weights_only=True")
        for call in _calls(tree, "pickle", "load") + _calls(tree, "pickle", "loads"):
            unsafe.append(f"{path.relative_to(REPO_ROOT)}:{call.lineno}: pickle")
        for call in _calls(tree, "np", "load"):
            flags = {k.arg: k.value for k in call.keywords}
            if isinstance(flags.get("allow_pickle"), ast.Constant) and flags["allow_pickle"].value is True:
                unsafe.append(f"{path.relative_to(REPO_ROOT)}:{call.lineno}: np.load(allow_pickle=True)")
    assert not unsafe, unsafe
    # configs: no weight load written as an expression, and MONAI's CheckpointLoader (which resumes
    # training in the train configs) reads with weights_only=True in the installed MONAI
    loaders = 0
    for config in BUNDLES_DIR.glob("*/configs/*.json"):
        text = config.read_text()
        assert "torch.load" not in text and "pickle" not in text, config
        loaders += text.count('"CheckpointLoader"')
    assert loaders >= 3
    from monai.handlers import CheckpointLoader

    assert "weights_only=True" in inspect.getsource(CheckpointLoader.__call__)


# ------------------------------------------------------------------------------------------------
# bad settings through every runner: one line naming the file, no traceback
# ------------------------------------------------------------------------------------------------

#: runner -> (bundle, config files, run id, what names its data: datalist or input, needs labels)
RUNNERS = {
    "seg_train": ("ctfm_wholebody_seg", ["train.json"], "training", "datalist", True),
    "seg_evaluate": ("ctfm_wholebody_seg", ["train.json", "evaluate.json"], "run", "datalist", True),
    "seg_inference": ("ctfm_wholebody_seg", ["inference.json"], "run", "input", False),
    "triage_train": ("ctfm_triage", ["train.json"], "training", "datalist", True),
    "triage_evaluate": ("ctfm_triage", ["train.json", "evaluate.json"], "run", "datalist", True),
    "triage_inference": ("ctfm_triage", ["inference.json"], "run", "input", False),
    "pretrain_train": ("ctfm_pretrain", ["train.json"], "training", "datalist", False),
    "retrieval_embed": ("ctfm_retrieval", ["embed.json"], "run", "input", False),
}


#: ``metrics.json`` of an earlier evaluation in the output folder of one where every case fails
EARLIER_REPORT = '{"mean_dice": 0.5}\n'


def settings_cases(corpus, tmp_path) -> dict[str, list[dict]]:
    """Every case of SETTINGS_EXPECTED for every runner that reads that kind of input, grouped by bundle."""
    paths, root = corpus["paths"], tmp_path
    label = np.zeros((40, 40, 16), np.uint8)
    label[10:30, 10:30, 4:12] = 5
    nib.save(nib.Nifti1Image(label, np.diag([3.0, 3.0, 3.0, 1.0])), root / "good_labels.nii.gz")
    seg_item = {"image": str(paths["good"]), "label": str(root / "good_labels.nii.gz")}
    files = {
        "good_seg": {"training": [seg_item], "validation": [seg_item], "testing": [seg_item]},
        "good_triage": {
            s: [{"image": str(paths["good"]), "label": k} for k in (0, 1)] for s in ("training", "validation")
        },
        "datalist_malformed": '{"training": [{"image": "a.nii.gz", "label": 1}',
        "datalist_empty": {"training": [], "validation": [], "testing": []},
        "item_without_label": {s: [{"image": str(paths["good"])}] for s in ("training", "validation")},
    }
    # label maps off their image's grid: another shape, and the right shape shifted 30 mm
    nib.save(nib.Nifti1Image(label[:, :, :12], np.diag([3.0, 3.0, 4.0, 1.0])), root / "other_grid.nii.gz")
    shifted = np.diag([3.0, 3.0, 3.0, 1.0])
    shifted[0, 3] = 30.0
    nib.save(nib.Nifti1Image(label, shifted), root / "shifted.nii.gz")
    for case, name in (("label_other_grid", "other_grid"), ("label_shifted_30mm", "shifted")):
        bad = {"image": str(paths["good"]), "label": str(root / f"{name}.nii.gz")}
        files[case] = {"training": [seg_item, bad], "validation": [bad]}
    # an evaluation goes on past a bad pair and scores the rest
    files["evaluate_past_bad_pairs"] = {"validation": [files["label_shifted_30mm"]["training"][1], seg_item]}
    # ... and past files whose headers pass but whose data does not load (a truncated image, a truncated label)
    data = (root / "good_labels.nii.gz").read_bytes()
    (root / "truncated_labels.nii.gz").write_bytes(data[: len(data) // 2])
    truncated_image = {"image": str(paths["truncated"]), "label": str(root / "good_labels.nii.gz")}
    truncated_label = {"image": str(paths["good"]), "label": str(root / "truncated_labels.nii.gz")}
    files["evaluate_past_load_failures"] = {"validation": [truncated_image, truncated_label, seg_item]}
    files["evaluate_every_case_fails_to_load"] = {"validation": [truncated_image]}
    # the triage evaluation as well (a truncated scan among good ones; only truncated scans)
    shutil.copy(paths["good"], root / "good_copy.nii.gz")  # two scans (one scan listed twice is one case)
    triage_good = [{"image": str(paths["good"]), "label": 0}, {"image": str(root / "good_copy.nii.gz"), "label": 1}]
    triage_truncated = {"image": str(paths["truncated"]), "label": 1}
    files["evaluate_past_load_failures_triage"] = {"validation": [triage_truncated, *triage_good]}
    files["evaluate_every_case_fails_to_load_triage"] = {"validation": [triage_truncated]}
    # training with a truncated image among good ones (pretraining reads the triage datalists)
    files["train_truncated_image"] = {"training": [seg_item, truncated_image], "validation": [seg_item]}
    files["train_truncated_image_triage"] = {"training": [*triage_good, triage_truncated], "validation": triage_good}
    for name, content in files.items():
        (root / f"{name}.json").write_text(content if isinstance(content, str) else json.dumps(content))
    (root / "a_file").write_text("not a folder")
    tiny = {
        "ctfm_wholebody_seg": {
            **SEG, "patch_size": [32, 32, 32], "num_workers": 0, "max_epochs": 1, "save_preview": False
        },
        "ctfm_triage": {**TRIAGE, "max_epochs": 1, "batch_size": 2},
        "ctfm_pretrain": {**PRETRAIN, "max_epochs": 1, "cache_dir": str(root / "cache")},
        "ctfm_retrieval": EMBED,
    }
    ckpts = {"ctfm_wholebody_seg": str(corpus["root"] / "seg.pt"), "ctfm_triage": str(corpus["root"] / "triage.pt")}
    unwritable = unwritable_folder()  # None: no folder here that even root cannot create (case left out)
    by_bundle: dict[str, list[dict]] = {}
    for runner, (bundle, configs, run_id, data_id, labelled) in RUNNERS.items():
        good = root / ("good_seg.json" if bundle == "ctfm_wholebody_seg" else "good_triage.json")
        for case in dict.fromkeys([*SETTINGS_EXPECTED, *EVALUATE_CASES]):
            if case == "item_without_label" and not labelled:
                continue
            if case in LABEL_MAP_CASES and runner not in ("seg_train", "seg_evaluate"):
                continue
            if case in EVALUATE_CASES and runner not in ("seg_evaluate", "triage_evaluate"):
                continue
            if case in SEG_EVALUATE_CASES and runner != "seg_evaluate":
                continue
            if case in TRAIN_CASES and runner not in ("seg_train", "triage_train", "pretrain_train"):
                continue
            if case == "output_dir_unwritable" and unwritable is None:
                continue
            out = root / "runs" / runner / case
            named_data = case.startswith(("datalist", "item", "label", "evaluate", "train"))
            data = root / f"{case}.json" if named_data else good
            if bundle != "ctfm_wholebody_seg" and case in (*EVALUATE_CASES, *TRAIN_CASES):
                data = root / f"{case}_triage.json"
            overrides = {**tiny[bundle], data_id: str(data), "output_dir": str(out / "out")}
            overrides = {k: v for k, v in overrides.items() if not (bundle == "ctfm_retrieval" and k == "save_preview")}
            if data_id == "datalist":
                overrides.update(dataset_dir=str(root), ckpt_dir=str(out / "models"))
            if run_id == "run" and bundle in ckpts and runner != "seg_train":
                overrides["ckpt"] = ckpts[bundle]
            if case == "output_dir_is_a_file":
                overrides["output_dir"] = str(root / "a_file")
            if case == "output_dir_unwritable":
                overrides["output_dir"] = unwritable
            if case == "device_cuda_without_cuda":
                overrides["device"] = "cuda"
            if runner == "pretrain_train" and case == "train_truncated_image":  # it trains: one step, all 3 scans
                overrides.update(epoch_length=1, batch_size=3)
            if case == "evaluate_every_case_fails_to_load":  # a report of an earlier run, to be kept
                (out / "out").mkdir(parents=True)
                (out / "out" / "metrics.json").write_text(EARLIER_REPORT)
            files_named = {
                "output_dir_is_a_file": [str(root / "a_file")],
                "output_dir_unwritable": [str(unwritable)],
                "evaluate_every_case_fails_to_load": [str(paths["truncated"]), "metrics_errors.csv"],
                "train_truncated_image": [str(paths["truncated"])],
                "device_cuda_without_cuda": ["--device cpu"],
                "label_other_grid": [str(root / "other_grid.nii.gz"), str(paths["good"])],
                "label_shifted_30mm": [str(root / "shifted.nii.gz"), str(paths["good"]), "30 mm"],
            }.get(case, [str(data)])
            by_bundle.setdefault(bundle, []).append({
                "name": case, "runner": runner, "run_id": run_id, "named": files_named, "overrides": overrides,
                "output_dir": overrides["output_dir"],
                "config_files": [str(BUNDLES_DIR / bundle / "configs" / c) for c in configs],
            })
    return by_bundle


def test_a_file_failing_to_load_in_training_ends_in_one_line_naming_it_also_from_a_worker(corpus):
    from monai.data import DataLoader
    from monai.transforms import Compose, Lambdad, LoadImaged

    from ctfm_common import runtime
    from ctfm_common.failed_cases import CacheDatasetNamingFailures

    good, truncated = str(corpus["paths"]["good"]), str(corpus["paths"]["truncated"])
    data, load = [{"image": good}, {"image": truncated}], LoadImaged("image", image_only=True)
    expected = f"{truncated}: truncated or corrupt file: EOFError"
    # cache_rate 1: the cache is built up front; cache_rate 0: loaded by the DataLoader, in a worker process too
    with pytest.raises(Exception) as error:
        CacheDatasetNamingFailures(data=data, transform=load, cache_rate=1.0, keys=["image"], progress=False)
    assert (runtime.user_error_line(error.value) or "").startswith(expected), error.value
    dataset = CacheDatasetNamingFailures(data=data, transform=load, cache_rate=0.0, keys=["image"])
    for workers in (0, 1):
        with pytest.raises(Exception) as error:
            list(DataLoader(dataset, batch_size=1, num_workers=workers))
        line = runtime.user_error_line(error.value)
        assert line is not None and line.startswith(expected) and "\n" not in line, (workers, error.value)
    # a failure that is not the files' (each loads alone) keeps its traceback: a bug is not blamed on a scan
    bug = Compose([load, Lambdad("image", lambda x: 1 / 0)])
    with pytest.raises(Exception) as error:
        CacheDatasetNamingFailures(data=data[:1], transform=bug, cache_rate=0.0, keys=["image"])[0]
    assert runtime.user_error_line(error.value) is None


def test_read_only_or_forbidden_folders_end_in_one_line_naming_the_folder():
    import errno
    import os

    from ctfm_common import runtime

    for code in (errno.EROFS, errno.EACCES, errno.EPERM):
        wrapped = RuntimeError("applying transform <SaveImaged>")  # as MONAI wraps what a transform raised
        wrapped.__cause__ = OSError(code, os.strerror(code), "/data/results")
        line = runtime.user_error_line(wrapped)
        assert line == f"/data/results: {os.strerror(code)} ({runtime._ENVIRONMENT_ERRNOS[code]})", line
        assert "pick a writable --output_dir" in line
    folder = unwritable_folder()  # the corpus runs every runner into it where this machine has one
    if folder is not None:
        with pytest.raises(OSError) as error:
            Path(folder, "run").mkdir(parents=True)
        assert runtime.user_error_line(error.value).startswith(f"{folder}: ")


def test_training_settings_are_compared_only_with_the_weights_they_describe(tmp_path, caplog):
    from ctfm_common import checkpoint

    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(b"weights of a tiny run")
    trained = {"spacing": (6.0, 6.0, 6.0), "patch_size": [32, 32, 32], "hu_min": -1024, "num_classes": 118}
    assert checkpoint.write_training_settings(ckpt, trained) == tmp_path / "model.pt.settings.json"
    with caplog.at_level(logging.INFO, logger="ctfm_common.checkpoint"):
        same = {"spacing": [6, 6, 6], "roi_size": [32, 32, 32], "hu_min": -1024.0, "num_classes": 118}
        assert checkpoint.check_training_settings(ckpt, same) == []
        assert "trained with" not in caplog.text
        assert checkpoint.check_training_settings(ckpt, {**same, "spacing": [1.5, 1.5, 1.5]}) == [
            "spacing [1.5, 1.5, 1.5] (trained with [6.0, 6.0, 6.0])"]
        assert f"{ckpt}: this run's settings differ" in caplog.text
        caplog.clear()
        ckpt.write_bytes(b"other weights written over the same path")  # the settings file is stale now
        assert checkpoint.check_training_settings(ckpt, {**same, "spacing": [1.5, 1.5, 1.5]}) == []
        assert "describes other weights" in caplog.text and "trained with" not in caplog.text
        # no settings file (the public release, a hub id) or an unreadable one: nothing compared, no error
        assert checkpoint.check_training_settings(tmp_path / "release.safetensors", same) == []
        assert checkpoint.check_training_settings("project-lighter/whole_body_segmentation", same) == []
        (tmp_path / "model.pt.settings.json").write_text("{not json")
        assert checkpoint.check_training_settings(ckpt, same) == []
        assert "unreadable training settings" in caplog.text


@pytest.mark.skipif(torch.cuda.is_available(), reason="the device case needs a machine without CUDA")
def test_bad_settings_end_in_one_line_naming_the_file_in_every_runner(corpus, triage_ckpt, tmp_path):
    import os

    results = []
    for bundle, cases in settings_cases(corpus, tmp_path).items():
        (tmp_path / f"{bundle}.json").write_text(json.dumps(cases))
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT / "tests"))
        proc = subprocess.run(
            [sys.executable, str(REPO_ROOT / "tests" / "bad_inputs.py"), str(BUNDLES_DIR / bundle),
             str(tmp_path / f"{bundle}.json"), str(tmp_path / f"{bundle}_results.json")],
            capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        named = {(c["runner"], c["name"]): c["named"] for c in cases}
        for result in json.loads((tmp_path / f"{bundle}_results.json").read_text()):
            results.append((result, named[(result["runner"], result["name"])]))
    problems = []
    for result, named in results:
        line = result["line"] or ""
        if result["name"] == "evaluate_every_case_fails_to_load":  # the earlier report is kept as it was
            out = Path(result["output_dir"])
            assert (out / "metrics.json").read_text() == EARLIER_REPORT, result
        if result["name"] == "train_truncated_image" and result["runner"] == "pretrain_train":
            # pretraining skips the scan (named in a warning and a marker in its cache) and trains on the rest
            assert result["ok"], result["line"] or result["traceback"]
            truncated = str(corpus["paths"]["truncated"])
            assert any(m.startswith(f"skipping scan: {truncated}: truncated or corrupt file: EOFError")
                       for m in result["log"]), result["log"]
            continue
        if result["name"] == "train_truncated_image":  # supervised training stops, nothing half-written
            models = Path(result["output_dir"]).parent / "models"
            assert not models.exists() or not [p for p in models.rglob("*") if p.is_file()], list(models.rglob("*"))
        if result["name"] == "evaluate_past_bad_pairs":  # scored the good pair, named the bad one
            out = Path(result["output_dir"])
            assert result["ok"] and json.loads((out / "metrics.json").read_text())["num_cases"] == 1, result
            assert any(m.startswith("skipped: ") and "shifted.nii.gz" in m for m in result["log"]), result["log"]
            continue
        if result["name"] == "evaluate_past_load_failures":  # each file that failed to load named, the rest scored
            out = Path(result["output_dir"])
            assert result["ok"], result["line"] or result["traceback"]
            metrics = json.loads((out / "metrics.json").read_text())
            assert metrics["num_failed"] == (1 if result["runner"] == "triage_evaluate" else 2), metrics
            assert result["runner"] == "triage_evaluate" or metrics["num_cases"] == 1, metrics
            errors = list(csv.DictReader(open(out / "metrics_errors.csv")))
            if result["runner"] == "triage_evaluate":  # a truncated scan among two good ones, both scored
                assert [(r["case"], r["source"]) for r in errors] == [("truncated", str(corpus["paths"]["truncated"]))]
                assert errors[0]["error"].startswith("truncated or corrupt file: EOFError"), errors
                assert metrics["failed"] == errors
                assert len(list(csv.DictReader(open(out / "predictions.csv")))) == 2
                assert f"failed: {errors[0]['source']}: {errors[0]['error']}; going on with the other cases" in \
                    result["log"], result["log"]
                continue
            truncated_label = str(tmp_path / "truncated_labels.nii.gz")
            assert [r["source"] for r in errors] == [str(corpus["paths"]["truncated"]), truncated_label], errors
            assert [r["case"] for r in errors] == ["truncated", "good"]
            assert [f["source"] for f in metrics["failed"]] == [r["source"] for r in errors]
            for row in errors:
                assert row["error"].startswith("truncated or corrupt file: EOFError"), row
                assert f"failed: {row['source']}: {row['error']}; going on with the other cases" in result["log"]
            continue
        if (result["traceback"] or SETTINGS_EXPECTED[result["name"]] not in line
                or any(n not in line for n in named) or "\n" in line):
            tail = " | ".join((result["traceback"] or "").strip().splitlines()[-4:])
            problems.append(f"{result['runner']} / {result['name']}: {line or tail or 'ran without an error'}")
    assert not problems, "\n".join(problems)
    # 5 cases x 8 runners (6 with a folder nobody can create), less the 4 runners that read no labels; 2 label-map
    # cases x the 2 segmentation runners; 3 evaluations: past bad pairs, past load failures, every case failing
    # + the triage evaluation past a truncated scan and where every scan is truncated; training with a truncated
    # image in the 3 training runners
    assert len(results) == (6 if unwritable_folder() else 5) * 8 - 4 + 2 * 2 + 3 + 2 + 3
