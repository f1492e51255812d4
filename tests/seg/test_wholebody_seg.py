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
"""ctfm_wholebody_seg: train, resume, evaluate and segment through ``monai.bundle``, as a user does.

A tiny network (init_filters 8) is trained for one epoch on three body phantoms relabelled to
TotalSegmentator indices, at a coarse 6 mm spacing with 32^3 patches; its checkpoint then segments
a phantom, the real CT ``ct_small`` and the real DICOM series of ../shared/data. That network is
far too small and briefly trained to segment well: those tests check geometry, label ranges,
files and metrics. A second training run fine-tunes on the real ``ct_small`` labels (three
structures through a label map) and checks that the training Dice rises and that training resumes.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
from pathlib import Path
import pytest
from conftest import BUNDLES_DIR, run_bundle, tensorboard_scalars

from ctfm_bundles.tools.synthetic import phantom

BUNDLE = "ctfm_wholebody_seg"
TINY = {"init_filters": 8, "spacing": [6.0, 6.0, 6.0]}
TRAIN = {**TINY, "patch_size": [32, 32, 32], "num_workers": 0, "batch_size": 1, "sw_batch_size": 1}
INFER = {**TINY, "patch_size": [32, 32, 32], "sw_batch_size": 1}
FINE_TUNE_LABELS = {"5": 1, "1": 2, "2": 3, "3": 3}  # ct_small: liver, spleen, both kidneys
FINE_TUNE_EPOCHS = 15  # one iteration (two 16 x 64 x 64 patches at 6 mm) per epoch; resumed for as many again


def _write_totalseg_phantoms(root, num_cases=3):
    """Body phantoms (small grid) with labels relabelled to TotalSegmentator v2 indices."""
    datalist = phantom.make_dataset(output_dir=str(root), num_cases=num_cases, kind="body", shape=(48, 40, 32),
                                    spacing=(8.0, 8.0, 10.0), seed=3)
    content = json.loads(open(datalist).read())
    for item in content["training"] + content["validation"]:
        path = root / item["label"]
        img = nib.load(path)
        relabelled = phantom.to_totalseg_labels(np.asarray(img.dataobj), kind="body")
        nib.save(nib.Nifti1Image(relabelled, img.affine, img.header), path)
    return datalist, content


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One epoch of training from a shared-encoder checkpoint; returns paths and the run log."""
    from ctfm_common import encoder as enc

    root = tmp_path_factory.mktemp("wholebody")
    datalist, content = _write_totalseg_phantoms(root / "data")
    encoder_ckpt = enc.save_encoder_weights(enc.build_encoder(init_filters=8), root / "encoder.safetensors")
    ckpt_dir = root / "models"
    proc = run_bundle(BUNDLE, "train.json", "training", dataset_dir=str(root / "data"), datalist=datalist,
                      output_dir=str(root / "train"), ckpt_dir=str(ckpt_dir), encoder_ckpt=str(encoder_ckpt),
                      max_epochs=1, **TRAIN)
    return {"root": root, "data": root / "data", "datalist": datalist, "content": content, "ckpt_dir": ckpt_dir,
            "model": ckpt_dir / "model.pt", "log": proc.stdout + proc.stderr, "train_args": {
                "dataset_dir": str(root / "data"), "datalist": datalist, "output_dir": str(root / "train"),
                "ckpt_dir": str(ckpt_dir), "encoder_ckpt": str(encoder_ckpt)}}


def test_training_loads_the_encoder_and_writes_best_and_last_checkpoints(trained):
    log = trained["log"]
    assert "encoder weights from" in log and "tensors loaded into 'encoder.'" in log
    assert "val_mean_dice" in log
    assert (trained["ckpt_dir"] / "model.pt").stat().st_size > 0
    assert (trained["ckpt_dir"] / "last.pt").stat().st_size > 0
    assert list((trained["root"] / "train" / "tensorboard").glob("events.out.tfevents.*"))
    # the learning rate is logged to TensorBoard, each iteration (the first epoch warms up from
    # warmup_multiplier x the configured rate, as CT-FM's schedule does)
    rates = tensorboard_scalars(trained["root"] / "train" / "tensorboard")["learning_rate"]
    config = json.loads((BUNDLES_DIR / BUNDLE / "configs" / "train.json").read_text())
    assert rates and rates[0] == pytest.approx(config["learning_rate"] * config["warmup_multiplier"])
    # the best checkpoint holds the complete SegResNetDS (118 outputs), readable with weights_only=True
    import torch

    state = torch.load(trained["model"], map_location="cpu", weights_only=True)
    head = [v for k, v in state.items() if k.endswith("head.weight") or k.endswith("heads.0.weight")]
    assert any(v.shape[0] == 118 for v in head) or any(v.shape[0] == 118 for v in state.values() if v.ndim == 5)
    # the pretraining bundle's encoder export loads into the SegResNetDS with zero missing keys
    from ctfm_common import encoder as enc
    from monai.networks.nets import SegResNetDS

    network = SegResNetDS(spatial_dims=3, in_channels=1, out_channels=118, init_filters=8, blocks_down=[1, 2, 2, 4, 4],
                          dsdepth=4)
    report = enc.load_encoder_weights(network, trained["train_args"]["encoder_ckpt"])
    assert report.missing == [] and report.mismatched == [] and report.unexpected == []
    assert len(report.loaded) == len(enc.encoder_of(network)[0].state_dict()) > 0
    assert "missing in the file" not in log


def _epoch_dice(log: str) -> dict[int, float]:
    """``train_mean_dice`` per epoch from the StatsHandler lines of a training log."""
    return {int(m.group(1)): float(m.group(2))
            for m in re.finditer(r"Epoch\[(\d+)\] Metrics -- .*?train_mean_dice: ([0-9.]+)", log)}


def test_fine_tune_on_real_ct_raises_training_dice_and_resumes(tmp_path, shared_data):
    """A real ``training`` run on ct_small with three of its structures (label map): training Dice rises
    clearly over a few dozen iterations, and a second run resumes from last.pt instead of starting over."""
    example = shared_data / "totalseg_example"
    datalist = tmp_path / "datalist.json"
    item = {"image": str(example / "ct_small.nii.gz"), "label": str(example / "ct_small_labels.nii.gz")}
    datalist.write_text(json.dumps({"training": [item], "validation": [item]}))
    args = dict(dataset_dir=str(tmp_path), datalist=str(datalist), output_dir=str(tmp_path / "train"),
                ckpt_dir=str(tmp_path / "models"), init_filters=8, spacing=[6.0, 6.0, 6.0], patch_size=[16, 64, 64],
                label_map=json.dumps(FINE_TUNE_LABELS), num_samples=2, batch_size=1, num_workers=0, cache_rate=1.0,
                learning_rate=0.002, val_interval=1000)
    first = run_bundle(BUNDLE, "train.json", "training", max_epochs=FINE_TUNE_EPOCHS, **args)
    log = first.stdout + first.stderr
    resumed = run_bundle(BUNDLE, "train.json", "training", max_epochs=2 * FINE_TUNE_EPOCHS, **args)
    out = resumed.stdout + resumed.stderr
    assert "Restored all variables from" in out and "last.pt" in out, out[-3000:]
    dice = {**_epoch_dice(log), **_epoch_dice(out)}
    assert sorted(dice) == list(range(1, 2 * FINE_TUNE_EPOCHS + 1)), (sorted(dice), log[-2000:])
    assert sorted(_epoch_dice(out)) == list(range(FINE_TUNE_EPOCHS + 1, 2 * FINE_TUNE_EPOCHS + 1))
    # the resumed run follows the longer cosine (t_total 15 -> 30): from half the rate down, never back up
    assert f"t_total {FINE_TUNE_EPOCHS} -> {2 * FINE_TUNE_EPOCHS}" in out, out[-3000:]
    rates = [float(r) for r in re.findall(r"Current learning rate: ([0-9.e-]+)", out)]
    # down along the cosine, then held at its floor, 1 % of the rate (CT-FM's end_lr)
    floor = 0.01 * args["learning_rate"]
    assert len(rates) == FINE_TUNE_EPOCHS and all(a > b or a == b == pytest.approx(floor) for a, b in
                                                  zip(rates, rates[1:])), rates
    assert min(rates) == pytest.approx(floor), rates
    assert 0.3 * args["learning_rate"] < rates[0] < 0.5 * args["learning_rate"], rates
    # two patches per epoch: compare the means of the first and the last three epochs
    start = np.mean([dice[e] for e in (1, 2, 3)])
    end = np.mean([dice[e] for e in range(2 * FINE_TUNE_EPOCHS - 2, 2 * FINE_TUNE_EPOCHS + 1)])
    assert end > start + 0.1, dice
    assert (tmp_path / "models" / "last.pt").stat().st_size > 0


def test_evaluation_scores_labels_against_themselves_and_a_known_shift(tmp_path):
    """Dice (and NSD) 1.0 for a label map scored against itself; a 10^3 cube shifted by 2 voxels scores
    exactly 2 * 800 / 2000 = 0.8 Dice (and NSD 1.0 at 3 mm with 1 mm voxels: every surface point is
    within 2 mm)."""
    code = f"""
import json
import os
import numpy as np
from pathlib import Path
from scripts import evaluation

label = np.zeros((24, 24, 24), np.uint8)
label[4:14, 4:14, 4:14] = 5
label[16:22, 16:22, 16:22] = 1
shifted = np.zeros_like(label)
shifted[6:16, 4:14, 4:14] = 5
names = {{1: "spleen", 5: "liver"}}
same = evaluation.score_case(label, label, [1.0, 1.0, 1.0], names)
rows = [dict(r, case="shifted") for r in evaluation.score_case(shifted, label, [1.0, 1.0, 1.0], names)]
summary = evaluation.write_report(rows, {str(tmp_path)!r}, title="shifted")
print("RESULT", json.dumps({{"same": same, "shifted": rows, "mean_dice": summary["mean_dice"]}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=BUNDLES_DIR / BUNDLE, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert [(r["index"], r["dice"], r["nsd"]) for r in result["same"]] == [(1, 1.0, 1.0), (5, 1.0, 1.0)]
    by_index = {r["index"]: r for r in result["shifted"]}
    assert by_index[5]["dice"] == pytest.approx(0.8, abs=1e-6) and by_index[5]["nsd"] == pytest.approx(1.0)
    assert by_index[5]["reference_voxels"] == by_index[5]["predicted_voxels"] == 1000
    assert by_index[1]["dice"] == 0.0 and by_index[1]["predicted_voxels"] == 0  # a missed structure scores 0
    assert result["mean_dice"] == pytest.approx(0.4, abs=1e-6)
    assert json.loads((tmp_path / "metrics.json").read_text())["mean_dice"] == pytest.approx(0.4, abs=1e-6)


def _check_label_map(seg_path, reference_path):
    seg, ref = nib.load(seg_path), nib.load(reference_path)
    assert seg.shape == ref.shape
    np.testing.assert_allclose(seg.affine, ref.affine, atol=1e-3)
    values = np.unique(np.asarray(seg.dataobj))
    assert values.min() >= 0 and values.max() <= 117
    assert np.issubdtype(seg.get_data_dtype(), np.integer)
    return seg


def _check_extras(folder, case, seg):
    png = folder / f"{case}_preview.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader(open(folder / f"{case}_structures.csv")))
    labels = np.asarray(seg.dataobj)
    assert sum(int(r["voxels"]) for r in rows) == int((labels > 0).sum())
    voxel_ml = abs(np.linalg.det(seg.affine[:3, :3])) / 1000
    for row in rows:
        assert int(row["index"]) in np.unique(labels)
        assert float(row["volume_ml"]) == pytest.approx(int(row["voxels"]) * voxel_ml, rel=1e-3, abs=1e-3)


def test_inference_on_a_phantom_writes_label_map_on_the_input_grid_with_csv_and_preview(trained, tmp_path):
    image = trained["data"] / trained["content"]["validation"][0]["image"]
    out = tmp_path / "out"
    proc = run_bundle(BUNDLE, "inference.json", input=str(image), output_dir=str(out), ckpt=str(trained["model"]),
                      **INFER)
    assert "trained with" not in proc.stdout + proc.stderr  # the settings the checkpoint was trained with
    seg = _check_label_map(out / "body_002" / "body_002_seg.nii.gz", image)
    _check_extras(out / "body_002", "body_002", seg)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_ok"] == 1 and summary["num_failed"] == 0


def test_checkpoints_carry_their_training_settings_and_other_inference_settings_are_warned_of(trained, tmp_path):
    import hashlib

    for name in ("model.pt", "last.pt"):
        content = json.loads((trained["ckpt_dir"] / f"{name}.settings.json").read_text())
        assert content["sha256"] == hashlib.sha256((trained["ckpt_dir"] / name).read_bytes()).hexdigest()
        assert content["settings"] == {"spacing": [6.0, 6.0, 6.0], "patch_size": [32, 32, 32], "hu_min": -1024,
                                       "hu_max": 2048, "num_classes": 118, "init_filters": 8}
    image = trained["data"] / trained["content"]["validation"][0]["image"]
    proc = run_bundle(BUNDLE, "inference.json", input=str(image), output_dir=str(tmp_path / "out"),
                      ckpt=str(trained["model"]), **{**INFER, "spacing": [8.0, 8.0, 8.0], "patch_size": [32, 32, 48]})
    warning = (f"{trained['model']}: this run's settings differ from those the checkpoint was trained with: "
               "spacing [8.0, 8.0, 8.0] (trained with [6.0, 6.0, 6.0]); patch_size [32, 32, 48] (trained with "
               "[32, 32, 32]); results may be worse than the model can give")
    assert warning in proc.stdout + proc.stderr
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["num_ok"] == 1  # a warning, not an error


def test_inference_batch_real_ct_and_dicom_continues_past_a_bad_file(trained, tmp_path, shared_data):
    example = shared_data / "totalseg_example"
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"this is not a NIfTI file")
    datalist = tmp_path / "batch.json"
    datalist.write_text(json.dumps({"testing": [{"image": str(example / "ct_small.nii.gz")}, {"image": str(bad)},
                                                {"image": str(example / "dicom")}]}))
    out = tmp_path / "out"
    proc = run_bundle(BUNDLE, "inference.json", input=str(datalist), output_dir=str(out), ckpt=str(trained["model"]),
                      save_dicom_seg=True, **INFER)
    assert "broken.nii.gz" in proc.stdout + proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_ok"] == 2 and summary["num_failed"] == 1
    failed = [c for c in summary["cases"] if c["status"] == "failed"]
    assert failed[0]["case"] == "broken" and str(bad) in failed[0]["error"]
    # the NIfTI CT: exactly its grid and affine
    seg = _check_label_map(out / "ct_small" / "ct_small_seg.nii.gz", example / "ct_small.nii.gz")
    _check_extras(out / "ct_small", "ct_small", seg)
    # the DICOM series: the series' grid (the reference label map is stored LAS, ours in the DICOM's
    # own voxel order): the same voxels in space once both are put in RAS order
    seg = nib.load(out / "dicom" / "dicom_seg.nii.gz")
    ref = nib.load(example / "dicom_labels.nii.gz")
    assert seg.shape == ref.shape == (512, 512, 20)
    seg_ras, ref_ras = nib.as_closest_canonical(seg), nib.as_closest_canonical(ref)
    assert seg_ras.shape == ref_ras.shape
    np.testing.assert_allclose(seg_ras.affine, ref_ras.affine, atol=0.05)
    assert np.asarray(seg.dataobj).max() <= 117
    _check_extras(out / "dicom", "dicom", seg)
    # ... and a DICOM-SEG that highdicom reads back, one segment per structure, on the series' slices
    highdicom = pytest.importorskip("highdicom")
    dicom_seg = highdicom.seg.segread(str(out / "dicom" / "dicom_seg.dcm"))
    assert len(dicom_seg.SegmentSequence) == int((np.unique(np.asarray(seg.dataobj)) > 0).sum())
    assert len(dicom_seg.get_source_image_uids()) == 20
    assert "dicom_seg" not in json.dumps([c.get("outputs", {}) for c in summary["cases"] if c["case"] == "ct_small"])


def test_evaluate_dice_equals_a_hand_computation(trained, tmp_path):
    out = tmp_path / "eval"
    proc = run_bundle(BUNDLE, ["train.json", "evaluate.json"], dataset_dir=str(trained["data"]),
                      datalist=trained["datalist"], output_dir=str(out), ckpt=str(trained["model"]), **TRAIN)
    assert "trained with" not in proc.stdout + proc.stderr  # evaluated with the training settings: no warning
    item = trained["content"]["validation"][0]
    pred = np.asarray(nib.load(out / "predictions" / "body_002_seg.nii.gz").dataobj).squeeze()
    label = np.asarray(nib.load(trained["data"] / item["label"]).dataobj)
    assert pred.shape == label.shape
    rows = list(csv.DictReader(open(out / "metrics_per_case.csv")))
    expected = set(np.unique(pred)) | set(np.unique(label))
    assert {int(r["index"]) for r in rows} == expected - {0}
    for row in rows:
        p, r = pred == int(row["index"]), label == int(row["index"])
        dice = 2 * (p & r).sum() / (p.sum() + r.sum())
        assert float(row["dice"]) == pytest.approx(dice, abs=1e-5), row
        assert int(row["reference_voxels"]) == r.sum() and int(row["predicted_voxels"]) == p.sum()
        assert 0.0 <= float(row["nsd"]) <= 1.0
    report = json.loads((out / "metrics.json").read_text())
    assert report["mean_dice"] == pytest.approx(np.mean([float(r["dice"]) for r in rows]), abs=1e-5)
    assert (out / "metrics.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "metrics_per_class.csv").is_file()


def test_preprocessing_tolerates_monai_label_image_path_and_label_maps_select_structures(tmp_path):
    """MONAI Label puts ``image_path`` beside ``image``; a label map keeps only the structures it names;
    a batch whose every input is unreadable fails, naming the files."""
    image, labels, affine = phantom.make_body_phantom(shape=(40, 32, 24), spacing=(8.0, 8.0, 10.0), seed=1)
    phantom.save_phantom(image, labels, affine, image_path=tmp_path / "ct.nii.gz",
                         label_path=tmp_path / "ct_labels.nii.gz")
    (tmp_path / "map.json").write_text(json.dumps({str(phantom.BODY_LABELS["liver"]): 1,
                                                   str(phantom.BODY_LABELS["spleen"]): 2}))
    configs = BUNDLES_DIR / BUNDLE / "configs"
    code = f"""
import json, torch
from monai.bundle import ConfigParser
p = ConfigParser(); p.read_config({str(configs / 'inference.json')!r}); p.update({{"spacing": [6, 6, 6]}}); p.parse()
ct, labels = {str(tmp_path / 'ct.nii.gz')!r}, {str(tmp_path / 'ct_labels.nii.gz')!r}
d = p.get_parsed_content("preprocessing")({{"image": ct, "image_path": "/somewhere/ct.nii.gz"}})
print("IMAGE", tuple(d["image"].shape), d["image_path"])
t = ConfigParser(); t.read_config({str(configs / 'train.json')!r})
t.update({{"label_map": {str(tmp_path / 'map.json')!r}, "spacing": [6, 6, 6], "patch_size": [32, 32, 32]}}); t.parse()
print("CLASSES", t.get_parsed_content("num_classes"))
v = t.get_parsed_content("validate#transforms")({{"image": ct, "label": labels, "label_path": "x"}})
print("VALUES", sorted(torch.unique(v["label"]).int().tolist()), v["label_path"])
open({str(tmp_path / 'scan_a.nii.gz')!r}, "wb").write(b"garbage")
p.update({{"input": {str(tmp_path / 'scan_*.nii.gz')!r}, "output_dir": {str(tmp_path / 'out')!r}, "ckpt": "",
          "init_filters": 8, "patch_size": [32, 32, 32]}}); p.parse()
try:
    p.get_parsed_content("run")
except RuntimeError as e:
    print("ALLFAILED", repr(e.__cause__ or e))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=BUNDLES_DIR / BUNDLE, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "IMAGE (1," in proc.stdout and "/somewhere/ct.nii.gz" in proc.stdout
    assert "CLASSES 3" in proc.stdout
    assert "VALUES [0, 1, 2] x" in proc.stdout
    assert "ALLFAILED" in proc.stdout and "every case failed" in proc.stdout and "scan_a.nii.gz" in proc.stdout


def test_totalseg_layout_converts_to_label_maps_and_a_datalist(tmp_path):
    from ctfm_bundles.tools.data import totalseg_to_datalist as conv

    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    for case, split in (("s0001", "train"), ("s0002", "val"), ("s0003", "test")):
        seg = tmp_path / "ts" / case / "segmentations"
        seg.mkdir(parents=True)
        nib.save(nib.Nifti1Image(np.zeros((8, 8, 4), np.int16), affine), seg.parent / "ct.nii.gz")
        liver, spleen = np.zeros((8, 8, 4), np.uint8), np.zeros((8, 8, 4), np.uint8)
        liver[:4] = 1
        spleen[6:, 6:] = 1
        nib.save(nib.Nifti1Image(liver, affine), seg / "liver.nii.gz")
        nib.save(nib.Nifti1Image(spleen, affine), seg / "spleen.nii.gz")
    (tmp_path / "ts" / "meta.csv").write_text("image_id;age;split\ns0001;50;train\ns0002;60;val\ns0003;70;test\n")
    path = conv.totalseg_to_datalist(input_dir=str(tmp_path / "ts"), output_dir=str(tmp_path / "out"), num_workers=1)
    datalist = json.loads(open(path).read())
    assert [len(datalist[s]) for s in ("training", "validation", "testing")] == [1, 1, 1]
    item = datalist["training"][0]
    label = nib.load(tmp_path / "out" / item["label"])
    values = np.asarray(label.dataobj)
    assert np.allclose(label.affine, affine) and values.dtype == np.uint8
    assert (values[:4] == 5).all() and (values[6:, 6:] == 1).all() and values[4:6].max() == 0  # liver 5, spleen 1
    assert (tmp_path / "out" / item["image"]).resolve() == (tmp_path / "ts" / "s0001" / "ct.nii.gz").resolve()


def test_largest_component_keeps_one_blob_per_chosen_structure_only():
    """``--largest_component`` (names or indices) drops stray islands of those structures and
    leaves every other structure alone; an unknown name is refused by name."""
    configs = BUNDLES_DIR / BUNDLE / "configs"
    code = f"""
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
p = ConfigParser(); p.read_config({str(configs / 'inference.json')!r})
p.update({{"largest_component": ["spleen", "5"]}}); p.parse()
print("LABELS", p.get_parsed_content("largest_component_labels"))
post = p.get_parsed_content("postprocessing").transforms[1]  # after argmax, before inverting
pred = torch.zeros(1, 20, 20, 20)
pred[0, 2:8, 2:8, 2:8] = 5; pred[0, 15:17, 15:17, 15:17] = 5     # label 5 (chosen): a big and a small blob
pred[0, 10:14, 2:6, 2:6] = 7; pred[0, 18:20, 18:20, 0:2] = 7    # a structure not chosen: both blobs stay
out = post({{"pred": MetaTensor(pred)}})["pred"]
print("COUNTS", int((out == 5).sum()), int((out == 7).sum()))
p.update({{"largest_component": ["not_an_organ"]}}); p.parse()
try:
    p.get_parsed_content("largest_component_labels")
except Exception as e:
    print("ERROR", repr(e.__cause__ or e))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=BUNDLES_DIR / BUNDLE, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = json.loads((configs / "metadata.json").read_text())["network_data_format"]["outputs"]["pred"]["channel_def"]
    spleen = int(next(k for k, v in names.items() if v == "spleen"))
    assert spleen != 5 and f"LABELS {sorted({spleen, 5})}" in proc.stdout
    assert f"COUNTS {6 ** 3} {4 ** 3 + 2 ** 3}" in proc.stdout, proc.stdout
    assert "ERROR" in proc.stdout and "not_an_organ" in proc.stdout


def test_resolution_ceiling_of_the_presets_on_real_labels(tmp_path, shared_data):
    # the Dice that a perfect model at each preset's spacing would reach on real labels
    from ctfm_bundles.tools.bench import wholebody_seg as bench_wholebody_seg

    example = shared_data / "totalseg_example"
    same = bench_wholebody_seg.resolution_ceiling(labels=str(example / "ct_small_labels.nii.gz"), spacings="3.0")
    assert same["spacing_mm"] == pytest.approx([3.0, 3.0, 3.0]) and same["structures"] == 41
    assert set(same["3mm"]["per_structure"].values()) == {1.0}  # its own spacing: nothing lost
    report = bench_wholebody_seg.resolution_ceiling(
        labels=str(example / "dicom_labels.nii.gz"), spacings=[1.5, 3.0], output=str(tmp_path / "ceiling.json")
    )
    assert json.loads((tmp_path / "ceiling.json").read_text()) == report
    standard, fast = report["1.5mm"], report["3mm"]
    assert report["structures"] == 31 and len(fast["per_structure"]) == 31
    assert 0.5 < fast["mean"] < standard["mean"] < 1.0  # the fast preset's spacing costs Dice
    assert fast["per_structure"]["liver"] > 0.95  # large organs keep almost all of it...
    assert fast["smaller_half"] < fast["larger_half"]  # ...small and thin structures lose most


def test_threaded_copy_reader_loads_exactly_what_monai_loads(tmp_path, shared_data):
    # the inference config's NIfTI reader only copies faster: same voxels, dtype, affine; a DICOM
    # folder still goes to MONAI's other readers
    example = shared_data / "totalseg_example"
    ct, labels, affine = phantom.make_body_phantom(shape=(40, 36, 24), spacing=(2.0, 2.0, 3.0), seed=0)
    phantom.save_phantom(ct, labels, affine, image_path=str(tmp_path / "ct.nii.gz"),
                         label_path=str(tmp_path / "labels.nii.gz"))
    paths = [str(tmp_path / "ct.nii.gz"), str(example / "ct_small.nii.gz"), str(example / "dicom")]
    code = f"""
import json
import os
import numpy as np
from pathlib import Path
from monai.transforms import LoadImage
from scripts.transforms import ThreadedCopyNibabelReader

same = []
for path in {paths!r}:
    plain = LoadImage(image_only=True, dtype=None)(path)
    fast = LoadImage(image_only=True, dtype=None, reader=ThreadedCopyNibabelReader())(path)
    same.append(dict(path=path, shape=list(fast.shape), dtype=str(fast.dtype), contiguous=fast.is_contiguous(),
                     values=bool(np.array_equal(plain.numpy(), fast.numpy())),
                     affine=bool(np.allclose(plain.affine.numpy(), fast.affine.numpy()))))
print("RESULT", json.dumps(same))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=BUNDLES_DIR / BUNDLE, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert [r["shape"] for r in results] == [[40, 36, 24], [122, 101, 30], [512, 512, 20]]
    assert all(r["values"] and r["affine"] and r["contiguous"] for r in results), results
    assert results[1]["dtype"] == "torch.int16"  # the stored dtype: converted to float32 on the device


def test_totalseg_conversion_goes_on_past_a_bad_case_and_names_it(tmp_path, capsys):
    from ctfm_bundles.tools.data import totalseg_to_datalist as conv

    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    for case in ("s0001", "s0002", "s0003"):
        seg = tmp_path / "ts" / case / "segmentations"
        seg.mkdir(parents=True)
        nib.save(nib.Nifti1Image(np.zeros((8, 8, 4), np.int16), affine), seg.parent / "ct.nii.gz")
        liver = np.zeros((8, 8, 4), np.uint8)
        liver[:4] = 1
        off_grid = np.diag([2.0, 2.0, 6.0, 1.0])  # s0003's mask is not on its CT's grid
        nib.save(nib.Nifti1Image(liver, affine if case != "s0003" else off_grid), seg / "liver.nii.gz")
    broken = tmp_path / "ts" / "s0002" / "ct.nii.gz"
    broken.write_bytes(broken.read_bytes()[:40])  # truncated
    path = conv.totalseg_to_datalist(input_dir=str(tmp_path / "ts"), output_dir=str(tmp_path / "out"), num_workers=1)
    datalist = json.loads(open(path).read())
    cases = [item["label"] for s in ("training", "validation", "testing") for item in datalist[s]]
    assert cases == ["labelsTr/s0001.nii.gz"]
    err = capsys.readouterr().err
    assert f"failed: {broken}:" in err
    assert f"failed: {tmp_path / 'ts' / 's0003' / 'ct.nii.gz'}: ValueError: " in err and "not on the grid" in err
    assert sorted(p.name for p in (tmp_path / "out" / "labelsTr").iterdir()) == ["s0001.nii.gz"]


def test_cases_with_one_file_name_keep_their_own_outputs_metrics_and_earlier_runs(trained, tmp_path):
    """TotalSegmentator's ``<case>/ct.nii.gz`` layout and same-stem inputs from different folders:
    every case keeps its own prediction, metrics row and summary record; earlier runs survive."""
    data = tmp_path / "totalseg"
    items = (trained["content"]["training"] + trained["content"]["validation"])[:2]
    for case, item in zip(("s0001", "s0002"), items):
        (data / case).mkdir(parents=True)
        shutil.copy(trained["data"] / item["image"], data / case / "ct.nii.gz")
        shutil.copy(trained["data"] / item["label"], data / case / "labels.nii.gz")
    datalist = data / "datalist.json"
    datalist.write_text(json.dumps({"validation": [{"image": f"{c}/ct.nii.gz", "label": f"{c}/labels.nii.gz"}
                                                   for c in ("s0001", "s0002")]}))
    out = tmp_path / "eval"
    run_bundle(BUNDLE, ["train.json", "evaluate.json"], dataset_dir=str(data), datalist=str(datalist),
               output_dir=str(out), ckpt=str(trained["model"]), **TRAIN)
    report = json.loads((out / "metrics.json").read_text())
    assert report["num_cases"] == 2
    rows = list(csv.DictReader(open(out / "metrics_per_case.csv")))
    names = sorted({r["case"] for r in rows})
    assert len(names) == 2 and [n.split("-")[0] for n in names] == ["s0001_ct", "s0002_ct"]
    case_means = [np.mean([float(r["dice"]) for r in rows if r["case"] == n]) for n in names]
    assert report["mean_dice"] == pytest.approx(np.mean(case_means), abs=1e-5)  # mean of case means
    predictions = sorted(p.name for p in (out / "predictions").iterdir())
    assert predictions == [f"{n}_seg.nii.gz" for n in names]  # one prediction per case, none overwritten
    for name, case in zip(names, ("s0001", "s0002")):
        pred = np.asarray(nib.load(out / "predictions" / f"{name}_seg.nii.gz").dataobj).squeeze()
        label = np.asarray(nib.load(data / case / "labels.nii.gz").dataobj)
        for row in (r for r in rows if r["case"] == name):
            p, r = pred == int(row["index"]), label == int(row["index"])
            assert float(row["dice"]) == pytest.approx(2 * (p & r).sum() / (p.sum() + r.sum()), abs=1e-5)

    # inference: p1/ct/image.nii.gz and p2/ct/image.nii.gz, then a later run with a third scan
    for case in ("p1", "p2"):
        (data / case / "ct").mkdir(parents=True)
        shutil.copy(data / ("s0001" if case == "p1" else "s0002") / "ct.nii.gz", data / case / "ct" / "image.nii.gz")
    seg_out = tmp_path / "seg"
    proc = run_bundle(BUNDLE, "inference.json", input=str(data / "p*" / "ct" / "image.nii.gz"),
                      output_dir=str(seg_out), ckpt=str(trained["model"]), save_preview=False, **INFER)
    assert "named after their full path" in proc.stdout + proc.stderr
    summary = json.loads((seg_out / "summary.json").read_text())
    records = {c["input"]: c for c in summary["cases"]}
    assert summary["num_ok"] == 2 and len({c["case"] for c in summary["cases"]}) == 2
    for case in ("p1", "p2"):
        record = records[str(data / case / "ct" / "image.nii.gz")]
        _check_label_map(record["outputs"]["label_map"], data / case / "ct" / "image.nii.gz")
    assert len({Path(r["outputs"]["label_map"]).parent for r in records.values()}) == 2


def test_summary_merges_earlier_and_concurrent_runs(tmp_path):
    """summary.json keeps earlier runs' cases, a rerun replaces its own record, and four processes merging
    into one folder at once lose nothing (lock + atomic write)."""
    code = f"""
import json, multiprocessing
from pathlib import Path
from scripts import segment

path = Path({str(tmp_path / "summary.json")!r})

def run(worker):
    for i in range(10):
        segment.merge_summary(path, [{{"case": f"w{{worker}}_{{i}}", "input": f"/d/w{{worker}}/{{i}}.nii.gz", "status": "ok"}}])

if __name__ == "__main__":
    segment.merge_summary(path, [{{"case": "old", "input": "/d/old.nii.gz", "status": "failed"}}])
    procs = [multiprocessing.Process(target=run, args=(w,)) for w in range(4)]
    [p.start() for p in procs]
    [p.join() for p in procs]
    segment.merge_summary(path, [{{"case": "old", "input": "/d/old.nii.gz", "status": "ok"}}])
    print("RESULT", path.read_text())
"""
    script = tmp_path / "merge.py"
    script.write_text(code)
    proc = subprocess.run([sys.executable, str(script)], cwd=BUNDLES_DIR / BUNDLE, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(BUNDLES_DIR / BUNDLE)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.split("RESULT ", 1)[1])
    cases = {c["case"]: c for c in summary["cases"]}
    assert len(cases) == 41 == len(summary["cases"]) and summary["num_ok"] == 41 and summary["num_failed"] == 0
    assert cases["old"]["status"] == "ok"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merge.py", "summary.json", "summary.json.lock"]


def test_preview_voxel_sizes_follow_the_inverse_orientation_permutation(tmp_path):
    """An ASR grid (a 3-cycle of axes) with voxels 1 x 2 x 4 mm: the preview's RAS sizes are those of the
    grid nibabel reorients to RAS, so the views keep their true aspect ratio."""
    code = """
import json
import os
import nibabel as nib
import numpy as np
from scripts import segment

affine = np.zeros((4, 4)); affine[3, 3] = 1
affine[1, 0], affine[2, 1], affine[0, 2] = 1.0, 2.0, 4.0  # axis 0 -> A, axis 1 -> S, axis 2 -> R
assert "".join(nib.aff2axcodes(affine)) == "ASR"
shape = (10, 12, 14)
ornt = nib.orientations.io_orientation(affine)
reoriented = affine @ nib.orientations.inv_ornt_aff(ornt, shape)
print("RESULT", json.dumps([segment.ras_voxel_sizes(affine).tolist(), nib.affines.voxel_sizes(reoriented).tolist()]))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=BUNDLES_DIR / BUNDLE, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours, reference = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert ours == pytest.approx(reference) and ours == pytest.approx([4.0, 1.0, 2.0])  # R, A, S
