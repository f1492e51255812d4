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
"""ctfm_triage: train / evaluate / infer on head phantoms, metrics, thresholds, multi-window input, CSV lists.

The workflows run as a user runs them (``conftest.run_bundle``, subprocesses). The phantom data:
training holds matched pairs (the same head with and without a hyperdense lesion, so the only
thing to learn is the lesion), validation and testing hold other heads, half with a lesion.
The tiny model (init_filters 8) sees a 16 x 32 x 32 central crop at 5 x 3 x 3 mm through the
``stroke`` HU window, with low phantom noise (2 HU) so that a 14-epoch CPU run learns.
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import BUNDLES_DIR, SHARED_DATA, run_bundle, tensorboard_scalars

from ctfm_bundles.tools import bundle_scripts_switch
from ctfm_bundles.tools.synthetic import phantom

BUNDLE = "ctfm_triage"
TRAIN_EVAL = ["train.json", "evaluate.json"]
SETTINGS = {  # the tiny recipe every workflow here shares
    "init_filters": 8,
    "spacing": [5.0, 3.0, 3.0],
    "patch_size": [16, 32, 32],
    "windows": ["blood"],
    "num_workers": 0,
}
# A check of the training machinery, not of the recipe (tests/project/test_recipe.py checks that): on these tiny
# heads (lesions of 8-30 voxels, 32 training scans, 14 epochs) CT-FM's augmentation (RandAffine p 0.2, no
# flip) left the held-out AUC at 0.59 over 24 heads; a left-right flip instead learns it.
TRAIN = {"max_epochs": 14, "batch_size": 4, "learning_rate": 0.0005, "flip_prob": 0.5, "affine_prob": 0.0}


def make_head_datalist(root: Path, *, pairs: int = 16, validation: int = 10, testing: int = 24) -> Path:
    """Head phantoms (64 x 64 x 32 at 3 x 3 x 5 mm) and a datalist with held-out heads."""
    return Path(phantom.make_triage_dataset(output_dir=str(root), pairs=pairs, validation=validation, testing=testing))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A short training run on head phantoms: its data, checkpoints and log."""
    root = tmp_path_factory.mktemp("triage")
    datalist = make_head_datalist(root / "data")
    common = dict(SETTINGS, dataset_dir=str(root / "data"), datalist=str(datalist), ckpt_dir=str(root / "models"))
    proc = run_bundle(BUNDLE, "train.json", "training", timeout=600, output_dir=str(root / "train_out"),
                      **common, **TRAIN)
    return {"root": root, "common": common, "log": proc.stdout + proc.stderr}


@pytest.fixture
def triage_scripts():
    """The bundle's ``scripts`` package imported in this process (and forgotten afterwards)."""
    with bundle_scripts_switch() as use:
        use(BUNDLES_DIR / BUNDLE)
        import scripts

        yield scripts


@pytest.fixture
def shared_data_optional():
    """../shared/data when present (the DICOM part of the inference test), else None."""
    return SHARED_DATA if (SHARED_DATA / "totalseg_example" / "dicom").is_dir() else None


def test_short_training_separates_held_out_phantoms(trained):
    root, common = trained["root"], trained["common"]
    models = root / "models"
    assert (models / "model.pt").is_file() and (models / "last.pt").is_file()
    assert list((root / "train_out" / "tensorboard").glob("events.out.tfevents.*"))
    rates = tensorboard_scalars(root / "train_out" / "tensorboard")["learning_rate"]  # logged each iteration
    assert rates and rates[0] == pytest.approx(TRAIN["learning_rate"])
    stored = json.loads((models / "thresholds.json").read_text())
    assert stored["threshold_method"] == "youden" and 0.0 < stored["thresholds"]["abnormal"] < 1.0
    # the best checkpoint carries the threshold chosen on validation with its own weights
    state = torch.load(models / "model.pt", map_location="cpu", weights_only=True)
    assert state["threshold"].tolist() == pytest.approx([stored["thresholds"]["abnormal"]], abs=1e-6)
    # the last checkpoint remembers the best score, so a resumed run does not replace model.pt with worse weights
    last = torch.load(models / "last.pt", map_location="cpu", weights_only=True)
    assert {"model", "optimizer", "trainer", "best_saver"} <= set(last)
    (best_auc, best_file), = last["best_saver"]["_saved"]
    assert best_file.startswith("model") and 0.5 < best_auc <= 1.0

    # both checkpoints carry the settings they were trained with, bound to their bytes
    import hashlib

    for name in ("model.pt", "last.pt"):
        content = json.loads((models / f"{name}.settings.json").read_text())
        assert content["sha256"] == hashlib.sha256((models / name).read_bytes()).hexdigest()
        assert content["settings"] == {"spacing": [5.0, 3.0, 3.0], "patch_size": [16, 32, 32], "windows": ["blood"],
                                       "window_dim": 0, "foreground_hu": 0, "label_names": ["abnormal"],
                                       "init_filters": 8}

    out = root / "eval_test"
    proc = run_bundle(BUNDLE, TRAIN_EVAL, "run", timeout=300, output_dir=str(out), val_section="testing",
                      num_bootstrap=200, **common)
    assert "trained with" not in proc.stdout + proc.stderr  # evaluated with the training settings: no warning
    report = json.loads((out / "metrics.json").read_text())
    entry = report["labels"]["abnormal"]
    assert report["num_cases"] == 24 and entry["num_positive"] == 12  # held-out heads, never trained on
    auc = entry["metrics"]["auc"]
    assert auc["value"] >= 0.8, f"held-out AUC {auc['value']} (training log tail: {trained['log'][-2000:]})"
    assert auc["ci_low"] <= auc["value"] <= auc["ci_high"]
    assert entry["threshold"] == pytest.approx(stored["thresholds"]["abnormal"], abs=1e-6)
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert {r["metric"] for r in rows} == {"auc", "average_precision", "f1", "sensitivity", "specificity"}
    assert (out / "roc_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cases = json.loads((out / "predictions.json").read_text())["cases"]
    assert len(cases) == 24 and all(c["case"].startswith("head_") for c in cases)


def test_inference_applies_the_threshold_chosen_on_validation(trained, tmp_path, shared_data_optional):
    root, common = trained["root"], trained["common"]
    stored = json.loads((root / "models" / "thresholds.json").read_text())["thresholds"]["abnormal"]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for path in sorted((root / "data" / "testing").glob("*.nii.gz"))[:2]:
        shutil.copy(path, inputs / path.name)
    (inputs / "broken.nii.gz").write_bytes(b"this is not a NIfTI file")
    if shared_data_optional is not None:  # a real DICOM series folder goes through the same batch
        shutil.copytree(shared_data_optional / "totalseg_example" / "dicom", inputs / "dicom_series")
    out = tmp_path / "pred"
    args = {k: v for k, v in common.items() if k not in ("dataset_dir", "datalist")}
    proc = run_bundle(BUNDLE, "inference.json", "run", timeout=300, input=str(inputs / "*"), output_dir=str(out),
                      ckpt=str(root / "models" / "model.pt"), **{k: v for k, v in args.items() if k != "ckpt_dir"})
    assert "trained with" not in proc.stdout + proc.stderr  # the training settings: nothing to warn of
    result = json.loads((out / "predictions.json").read_text())
    assert result["thresholds"]["abnormal"] == pytest.approx(stored, abs=1e-6)
    cases = {c["case"]: c for c in result["cases"]}
    assert cases["broken"]["error"] and "broken.nii.gz" in cases["broken"]["error"]  # reported, batch went on
    good = [c for c in cases.values() if not c["error"]]
    assert len(good) == (3 if shared_data_optional is not None else 2)
    for case in good:
        p, t = case["probabilities"]["abnormal"], case["thresholds"]["abnormal"]
        assert t == pytest.approx(stored, abs=1e-6)
        assert case["decisions"]["abnormal"] == int(p >= t)
    rows = {r["case"]: r for r in csv.DictReader(open(out / "predictions.csv"))}
    assert set(rows) == set(cases)
    assert float(rows[good[0]["case"]]["threshold_abnormal"]) == pytest.approx(stored, abs=1e-6)


def test_inference_settings_other_than_the_training_ones_are_warned_of(trained, triage_scripts, caplog):
    from monai.bundle import ConfigParser

    config = BUNDLES_DIR / BUNDLE / "configs" / "inference.json"
    assert "$scripts.checkpoint.check_training_settings(@ckpt, @checkpoint_settings)" in json.loads(
        config.read_text())["run"]
    parser = ConfigParser()
    parser.read_config(str(config))
    parser.update({**SETTINGS, "spacing": [5.0, 2.0, 2.0], "windows": ["blood", "bone"]})
    settings = parser.get_parsed_content("checkpoint_settings")
    model = trained["root"] / "models" / "model.pt"
    with caplog.at_level(logging.WARNING):
        assert triage_scripts.checkpoint.check_training_settings(model, settings) == [
            "spacing [5.0, 2.0, 2.0] (trained with [5.0, 3.0, 3.0])", "windows ['blood', 'bone'] (trained with "
            "['blood'])"]
    assert f"{model}: this run's settings differ from those the checkpoint was trained with" in caplog.text


def test_metrics_agree_with_scikit_learn(triage_scripts):
    from sklearn.metrics import average_precision_score, confusion_matrix, f1_score, roc_auc_score

    metrics = triage_scripts.metrics
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 60)
    p = np.clip(0.35 * y + rng.normal(0.4, 0.2, 60), 0, 1).round(2)  # rounded: ties included
    threshold = 0.5
    assert metrics.roc_auc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert metrics.average_precision(y, p) == pytest.approx(average_precision_score(y, p), abs=1e-12)
    called = (p >= threshold).astype(int)
    tn, fp, fn, tp = confusion_matrix(y, called).ravel()
    values = metrics.threshold_metrics(y, p, threshold)
    assert values["f1"] == pytest.approx(f1_score(y, called))
    assert values["sensitivity"] == pytest.approx(tp / (tp + fn))
    assert values["specificity"] == pytest.approx(tn / (tn + fp))
    # multi-label report: per label, with bootstrap intervals around the value
    y2 = np.stack([y, 1 - y], 1)
    p2 = np.stack([p, 1 - p], 1)
    report = metrics.evaluate_predictions(y2, p2, [0.5, 0.4], label_names=["any", "none"], num_bootstrap=100)
    assert report["labels"]["none"]["metrics"]["auc"]["value"] == pytest.approx(roc_auc_score(1 - y, 1 - p))
    auc = report["labels"]["any"]["metrics"]["auc"]
    assert auc["ci_low"] < auc["value"] < auc["ci_high"]
    # Youden's J: the threshold maximises sensitivity + specificity - 1 over all cut points
    t = metrics.choose_threshold(y, p, method="youden")
    j = lambda th: sum(metrics.threshold_metrics(y, p, th)[k] for k in ("sensitivity", "specificity")) - 1  # noqa: E731
    assert j(t) == pytest.approx(max(j(c) for c in np.unique(p)))
    t90 = metrics.choose_threshold(y, p, method="sensitivity", target_sensitivity=0.9)
    assert metrics.threshold_metrics(y, p, t90)["sensitivity"] >= 0.9


def test_multi_window_input_loads_the_pretrained_one_channel_encoder(triage_scripts, tmp_path):
    from monai.bundle import ConfigParser

    scripts = triage_scripts
    torch.manual_seed(0)
    single = scripts.model.TriageClassifier(init_filters=8, in_channels=1).eval()
    weights = scripts.encoder.save_encoder_weights(single, tmp_path / "ctfm_encoder.safetensors")
    # the bundle's config builds a 3-channel network from three named windows
    parser = ConfigParser()
    parser.read_config(str(BUNDLES_DIR / BUNDLE / "configs" / "inference.json"))
    parser.update({"init_filters": 8, "windows": ["blood", "subdural", "bone"]})
    parser.parse()
    network = parser.get_parsed_content("network_def").eval()
    assert network.encoder.conv_init.weight.shape[1] == 3
    report = scripts.encoder.load_encoder_weights(network, weights)
    assert report.ok and len(report.loaded) == len(single.encoder.state_dict())
    expected = single.encoder.conv_init.weight.repeat(1, 3, 1, 1, 1) / 3
    assert torch.equal(network.encoder.conv_init.weight, expected)
    # with identical windows the adapted network computes exactly the 1-channel embedding
    x = torch.rand(2, 1, 16, 32, 32)
    with torch.no_grad():
        assert torch.allclose(network.embed(x.repeat(1, 3, 1, 1, 1)), single.embed(x), atol=1e-5)
    # the windows transform stacks the HU windows as channels on the image grid
    image, _, affine = phantom.make_head_phantom(shape=(32, 32, 16), spacing=(6.0, 6.0, 10.0), seed=1, lesion=True)
    path = phantom.save_phantom(image, None, affine, image_path=tmp_path / "head.nii.gz")["image"]
    item = parser.get_parsed_content("preprocessing")({"image": path})
    assert item["image"].shape[0] == 3 and float(item["image"].min()) >= 0 and float(item["image"].max()) <= 1


def test_linear_probe_keeps_the_encoder_fixed_then_unfreezes(triage_scripts):
    from ignite.engine import Engine

    scripts = triage_scripts
    network = scripts.model.TriageClassifier(init_filters=8)
    encoder_before = {k: v.clone() for k, v in network.encoder.state_dict().items()}
    head_before = network.head[0].weight.clone()
    engine = Engine(lambda e, b: None)
    handler = scripts.encoder.FreezeEncoder(network, epochs=1)
    engine.state.epoch = 1
    handler(engine)
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-2)
    network.train()  # what the trainer calls every iteration: the frozen encoder must run in eval mode
    loss = network(torch.rand(2, 1, 16, 16, 16)).sum()
    assert not network.encoder.training
    loss.backward()
    optimizer.step()
    assert all(torch.equal(v, encoder_before[k]) for k, v in network.encoder.state_dict().items())  # incl. BN stats
    assert not torch.equal(network.head[0].weight, head_before)
    engine.state.epoch = 2
    handler(engine)
    assert network.encoder.training and all(p.requires_grad for p in network.encoder.parameters())


def test_csv_with_missing_file_or_bad_label_is_rejected_by_row(tmp_path, triage_scripts):
    from ctfm_bundles.tools.data.triage_csv_to_datalist import triage_csv_to_datalist

    for name in ("a", "b", "c", "d"):
        (tmp_path / f"{name}.nii.gz").write_bytes(b"x")
    bad = tmp_path / "bad.csv"
    bad.write_text("path,abnormal\na.nii.gz,1\nmissing.nii.gz,0\nb.nii.gz,maybe\nc.nii.gz,1,0\n")
    with pytest.raises(ValueError) as error:
        triage_csv_to_datalist(csv=str(bad), output=str(tmp_path / "out.json"))
    message = str(error.value)
    assert "bad.csv: 3 invalid row(s)" in message
    assert "line 3: image file not found: 'missing.nii.gz'" in message
    assert "line 4: bad label 'maybe' in column 'abnormal' (must be 0 or 1)" in message
    assert "line 5: 3 columns, expected 2" in message
    assert not (tmp_path / "out.json").exists()
    # a valid multi-label CSV with a split column becomes a datalist that training reads
    good = tmp_path / "good.csv"
    good.write_text("path,any,subdural,split\na.nii.gz,1,1,training\nb.nii.gz,0,0,training\n"
                    "c.nii.gz,1,0,validation\nd.nii.gz,0,0,testing\n")
    summary = triage_csv_to_datalist(csv=str(good), output=str(tmp_path / "datalist.json"))
    assert summary["label_names"] == ["any", "subdural"] and summary["training"] == 2
    items = triage_scripts.datalist.load_datalist(tmp_path / "datalist.json", "training", num_labels=2)
    assert items[0] == {"image": str(tmp_path / "a.nii.gz"), "label": [1, 1]}
    # label-efficiency subsets: stratified, reproducible, at least one case per class
    many = [{"image": str(i), "label": [i % 2]} for i in range(40)]
    subset = triage_scripts.datalist.subsample(many, 0.1, seed=1)
    assert len(subset) == 4 and {item["label"][0] for item in subset} == {0, 1}
    assert subset == triage_scripts.datalist.subsample(many, 0.1, seed=1)


def test_a_one_class_training_set_is_refused(tmp_path, triage_scripts):
    """All-negative (or all-positive) training data would train to an undefined AUC: refused, naming the list."""
    items = [{"image": f"{i}.nii.gz", "label": [0, i % 2]} for i in range(4)]
    (tmp_path / "datalist.json").write_text(json.dumps({"training": items, "validation": items}))
    with pytest.raises(triage_scripts.datalist.DatalistError,
                       match=r"datalist.json: every one of the 4 'training' items has label 0 = 0"):
        triage_scripts.datalist.load_datalist(tmp_path / "datalist.json", "training", num_labels=2)
    assert len(triage_scripts.datalist.load_datalist(tmp_path / "datalist.json", "validation", num_labels=2)) == 4


def test_inference_runs_into_one_folder_keep_every_case_including_same_named_scans(trained, tmp_path):
    """``a/ct.nii.gz``, then ``b/ct.nii.gz`` and ``c/ct.nii.gz`` in two runs at once, into one folder:
    predictions.csv/.json hold all three scans under three names, each with its own probability."""
    import subprocess

    from ctfm_bundles.tools.demo import bundle_command

    root, common = trained["root"], trained["common"]
    scans = sorted((root / "data" / "testing").glob("*.nii.gz"))[:3]
    for case, scan in zip("abc", scans):
        (tmp_path / case).mkdir()
        shutil.copy(scan, tmp_path / case / "ct.nii.gz")
    out = tmp_path / "pred"
    args = {k: v for k, v in common.items() if k not in ("dataset_dir", "datalist", "ckpt_dir")}
    args.update(output_dir=str(out), ckpt=str(root / "models" / "model.pt"))
    run_bundle(BUNDLE, "inference.json", "run", timeout=300, input=str(tmp_path / "a" / "ct.nii.gz"), **args)
    procs = [subprocess.Popen(bundle_command(BUNDLE, "inference.json", "run", input=str(tmp_path / c / "ct.nii.gz"), **args),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for c in "bc"]
    for proc in procs:
        assert proc.wait(timeout=300) == 0, proc.stderr.read()[-3000:]
    result = json.loads((out / "predictions.json").read_text())
    by_image = {c["image"]: c for c in result["cases"]}
    assert sorted(by_image) == sorted(str(tmp_path / c / "ct.nii.gz") for c in "abc") and result["num_cases"] == 3
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert len(rows) == 3 and len({r["case"] for r in rows}) == 3
    assert {r["case"] for r in rows} == {c["case"] for c in result["cases"]}
    probabilities = [c["probabilities"]["abnormal"] for c in by_image.values()]
    assert len(set(probabilities)) == 3  # three different phantoms, three scores: no row copied over another
