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
"""Faults: a writer that fails midway, and SIGKILL during fine-tuning and during embedding.

A failed write leaves the previous file byte-identical and no temporary file behind. A killed
fine-tuning run, rerun with the same command, resumes from its last checkpoint and ends with
the epochs, iterations and files of an uninterrupted run; a killed embedding run, rerun,
skips the scans already written and ends with the files, index and embeddings of an
uninterrupted run. (Pretraining's kill test is in test_pretrain.py.)
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import BUNDLES_DIR, REPO_ROOT, run_bundle
from ctfm_bundles.tools import bundle_scripts_switch
from ctfm_bundles.tools.demo import bundle_command

from ctfm_bundles.tools.synthetic import phantom
from ctfm_common import encoder as enc
from ctfm_common import runtime

SEG_TRAIN = {
    "init_filters": 8,
    "spacing": [6.0, 6.0, 6.0],
    "patch_size": [32, 32, 32],
    "num_workers": 0,
    "batch_size": 1,
    "sw_batch_size": 1,
    "val_interval": 1000,
    "train_dice": False,
}
SEG_EPOCHS = 4
EMBED = {
    "init_filters": 8,
    "patch_size": [16, 32, 32],
    "spacing": [3.0, 3.0, 3.0],
    "overlap": 0.25,
    "batch_size": 2,
    "num_workers": 0,
}
NUM_SCANS = 5


def visible_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def run_until(cmd: list[str], ready, timeout: float = 300) -> subprocess.Popen:
    """Start ``cmd`` and SIGKILL it as soon as ``ready()`` holds; fail when it ends first."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            if proc.poll() is not None:
                pytest.fail(f"the run ended (exit {proc.returncode}) before it could be killed: {' '.join(cmd)}")
            if time.monotonic() > deadline:
                pytest.fail("the run never reached the point where it is killed")
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return proc


# ------------------------------------------------------------------------------------------------
# a writer that raises midway
# ------------------------------------------------------------------------------------------------


def _half_then_raise(real_writer_output: bytes):
    """A writer (``f(path)``, ``nib.save(img, path)``, ``save_file(tensors, path)``) that writes half a
    file to its path argument, then fails."""

    def writer(*args, **kwargs):
        path = next(a for a in args if isinstance(a, (str, os.PathLike)))
        Path(path).write_bytes(real_writer_output[: len(real_writer_output) // 2])
        raise OSError("disk full (simulated)")

    return writer


@pytest.fixture
def seg_scripts():
    with bundle_scripts_switch() as use:
        use(BUNDLES_DIR / "ctfm_wholebody_seg")
        import scripts.segment

        yield scripts


def test_atomic_write_that_fails_midway_keeps_the_previous_file(tmp_path):
    target = tmp_path / "out" / "table.csv"
    runtime.atomic_write_text(target, "the previous, complete file\n")
    with pytest.raises(OSError, match="simulated"):
        runtime.atomic_write(target, _half_then_raise(b"a new file that never completes\n" * 100))
    assert target.read_text() == "the previous, complete file\n"
    assert os.listdir(target.parent) == ["table.csv"]


def test_nifti_writer_that_fails_midway_keeps_the_previous_label_map(seg_scripts, tmp_path, monkeypatch):
    segment = seg_scripts.segment
    target = tmp_path / "case" / "case_seg.nii.gz"
    labels = np.zeros((8, 8, 8), np.int32)
    labels[2:5, 2:5, 2:5] = 5
    segment.write_label_map(labels, np.eye(4), target)
    before = target.read_bytes()
    monkeypatch.setattr(nib, "save", _half_then_raise(before))
    with pytest.raises(OSError, match="simulated"):
        segment.write_label_map(labels + 1, np.eye(4), target)
    assert target.read_bytes() == before
    assert os.listdir(target.parent) == ["case_seg.nii.gz"]


def test_weights_writer_that_fails_midway_keeps_the_previous_weights(tmp_path, monkeypatch):
    import safetensors.torch

    target = tmp_path / "encoder.safetensors"
    torch.manual_seed(0)
    enc.save_encoder_weights(enc.build_encoder(init_filters=8), target)
    before = target.read_bytes()
    monkeypatch.setattr(safetensors.torch, "save_file", _half_then_raise(before))
    with pytest.raises(OSError, match="simulated"):
        enc.save_encoder_weights(enc.build_encoder(init_filters=8), target)
    assert target.read_bytes() == before and os.listdir(tmp_path) == ["encoder.safetensors"]
    assert enc.load_encoder_weights(enc.build_encoder(init_filters=8), target).ok


# ------------------------------------------------------------------------------------------------
# SIGKILL during fine-tuning
# ------------------------------------------------------------------------------------------------


def checkpoint_state(path: Path) -> dict:
    """The trainer's ``epoch`` and ``iteration`` stored in a checkpoint."""
    state = torch.load(path, map_location="cpu", weights_only=True)["trainer"]
    return {"epoch": state["iteration"] // state["epoch_length"], "iteration": state["iteration"]}


@pytest.fixture(scope="module")
def seg_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("seg_faults")
    datalist = phantom.make_dataset(
        output_dir=str(root), num_cases=3, kind="body", shape=(48, 40, 32), spacing=(8.0, 8.0, 10.0), seed=3
    )
    for item in json.loads(Path(datalist).read_text())["training"]:
        img = nib.load(root / item["label"])
        relabelled = phantom.to_totalseg_labels(np.asarray(img.dataobj), kind="body")
        nib.save(nib.Nifti1Image(relabelled, img.affine, img.header), root / item["label"])
    return root


def seg_args(data: Path, out: Path) -> dict:
    return {
        **SEG_TRAIN,
        "dataset_dir": str(data),
        "datalist": str(data / "datalist.json"),
        "output_dir": str(out / "train"),
        "ckpt_dir": str(out / "models"),
        "max_epochs": SEG_EPOCHS,
    }


def logged_epochs(log: str) -> list[int]:
    return sorted({int(e) for e in re.findall(r"Epoch\[(\d+)\] Complete", log)})


def test_fine_tuning_killed_then_rerun_ends_like_an_uninterrupted_run(seg_data, tmp_path):
    whole = run_bundle("ctfm_wholebody_seg", "train.json", "training", **seg_args(seg_data, tmp_path / "whole"))
    reference = checkpoint_state(tmp_path / "whole" / "models" / "last.pt")
    assert reference["epoch"] == SEG_EPOCHS and logged_epochs(whole.stdout + whole.stderr) == list(
        range(1, SEG_EPOCHS + 1)
    )

    args = seg_args(seg_data, tmp_path / "killed")
    last = tmp_path / "killed" / "models" / "last.pt"
    run_until(bundle_command("ctfm_wholebody_seg", "train.json", "training", **args), last.is_file)
    killed_at = checkpoint_state(last)["epoch"]
    assert 1 <= killed_at < SEG_EPOCHS
    resumed = run_bundle("ctfm_wholebody_seg", "train.json", "training", **args)
    log = resumed.stdout + resumed.stderr
    assert "Restored all variables from" in log and "last.pt" in log
    assert logged_epochs(log) == list(range(killed_at + 1, SEG_EPOCHS + 1))  # resumed, not restarted
    final = checkpoint_state(last)
    assert (final["epoch"], final["iteration"]) == (reference["epoch"], reference["iteration"])
    assert visible_files(last.parent) == visible_files(tmp_path / "whole" / "models")


# ------------------------------------------------------------------------------------------------
# SIGKILL during embedding
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embed_data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("embed_faults")
    items = []
    for i in range(NUM_SCANS):
        path = root / "scans" / f"scan_{i}.nii.gz"
        phantom.write_phantom(
            output=str(path),
            kind="body" if i % 2 else "head",
            shape=(48, 48, 24),
            spacing=3.0,
            seed=i,
            label_output=str(root / f"labels_{i}.nii.gz"),
        )
        items.append({"image": f"scans/{path.name}", "label": i % 2})
    (root / "datalist.json").write_text(json.dumps({"testing": items}))
    torch.manual_seed(0)
    ckpt = enc.save_encoder_weights(enc.build_encoder(init_filters=8), root / "encoder.safetensors")
    return {"root": root, "datalist": str(root / "datalist.json"), "ckpt": str(ckpt)}


def embed_args(data: dict, out: Path) -> dict:
    return {**EMBED, "input": data["datalist"], "output_dir": str(out), "encoder_ckpt": data["ckpt"]}


def read_embeddings(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {p.stem: load_file(str(p))["embedding"] for p in sorted(folder.glob("[!.]*.safetensors"))}


def test_embedding_killed_then_rerun_ends_like_an_uninterrupted_run(embed_data, tmp_path):
    run_bundle("ctfm_retrieval", "embed.json", **embed_args(embed_data, tmp_path / "whole"))
    reference = tmp_path / "whole" / "embeddings"

    args = embed_args(embed_data, tmp_path / "killed")
    emb = tmp_path / "killed" / "embeddings"
    run_until(
        bundle_command("ctfm_retrieval", "embed.json", **args),
        lambda: emb.is_dir() and len(list(emb.glob("[!.]*.safetensors"))) >= 1,
    )
    done_before = len(list(emb.glob("[!.]*.safetensors")))
    assert 1 <= done_before < NUM_SCANS and not (emb / "index.csv").exists()
    resumed = run_bundle("ctfm_retrieval", "embed.json", **args)
    assert f"{done_before} case(s) already embedded, skipped" in resumed.stdout + resumed.stderr

    assert visible_files(emb) == visible_files(reference)
    rows = [{k: r[k] for k in ("case", "file", "dim", "label")} for r in csv.DictReader(open(emb / "index.csv"))]
    assert rows == [
        {k: r[k] for k in ("case", "file", "dim", "label")} for r in csv.DictReader(open(reference / "index.csv"))
    ]
    assert len(rows) == NUM_SCANS
    got, expected = read_embeddings(emb), read_embeddings(reference)
    assert sorted(got) == sorted(expected) and all(torch.equal(got[k], expected[k]) for k in got)


# ------------------------------------------------------------------------------------------------
# rerunning a training run: continue, never silently start over (the same rule in every train config)
# ------------------------------------------------------------------------------------------------

TRIAGE_TRAIN = {
    "init_filters": 8,
    "spacing": [5.0, 4.0, 4.0],
    "patch_size": [16, 16, 16],
    "windows": ["stroke"],
    "num_workers": 0,
    "batch_size": 4,
    "num_bootstrap": 10,
}


@pytest.fixture(scope="module")
def head_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("triage_resume")
    items: dict[str, list] = {"training": [], "validation": []}
    for i in range(6):
        section = "training" if i < 4 else "validation"
        image, _, affine = phantom.make_head_phantom(
            shape=(32, 32, 16), spacing=(4.0, 4.0, 5.0), seed=i, lesion=bool(i % 2), noise_hu=2.0
        )
        phantom.save_phantom(image, None, affine, image_path=root / f"head_{i}.nii.gz")
        items[section].append({"image": f"head_{i}.nii.gz", "label": i % 2})
    (root / "datalist.json").write_text(json.dumps(items))
    return root


def test_triage_rerun_continues_keeps_the_best_model_and_removes_a_killed_save(head_data, tmp_path):
    models = tmp_path / "models"
    args = {
        **TRIAGE_TRAIN,
        "dataset_dir": str(head_data),
        "datalist": str(head_data / "datalist.json"),
        "output_dir": str(tmp_path / "out"),
        "ckpt_dir": str(models),
    }
    run_bundle("ctfm_triage", "train.json", "training", max_epochs=2, **args)
    best_auc = torch.load(models / "last.pt", weights_only=True)["best_saver"]["_saved"][0][0]
    thresholds = json.loads((models / "thresholds.json").read_text())
    (models / "tmpk1ll3d00").write_bytes(b"\x00" * 1000)  # what a kill -9 during a save leaves behind
    # a run of the earlier release named its resumable checkpoint model_last.pt: it still resumes
    (models / "last.pt").rename(models / "model_last.pt")

    # the same command with more epochs (as after a kill): continues, and model.pt only gets better
    rerun = run_bundle("ctfm_triage", "train.json", "training", max_epochs=3, **args)
    log = rerun.stdout + rerun.stderr
    assert "Restored all variables from" in log and "model_last.pt" in log and logged_epochs(log) == [3], log[-3000:]
    assert not (models / "tmpk1ll3d00").exists()
    assert visible_files(models) == ["last.pt", "last.pt.settings.json", "model.pt", "model.pt.settings.json",
                                     "model_last.pt", "thresholds.json"]  # writes the new name (+ its settings)
    after = torch.load(models / "last.pt", weights_only=True)["best_saver"]["_saved"][0][0]
    assert after >= best_auc
    assert json.loads((models / "thresholds.json").read_text())["key_metric"] >= thresholds["key_metric"]


@pytest.mark.parametrize(
    "bundle, last, best",
    [("ctfm_triage", "last.pt", "model.pt"), ("ctfm_wholebody_seg", "last.pt", "model.pt"),
     ("ctfm_pretrain", "checkpoint_iteration=4.pt", "")],
)
def test_every_train_config_runs_the_same_resume_rule_first(bundle, last, best, tmp_path):
    """Each train config (and its multi-GPU variant) starts with checkpoint.prepare_run on its own files."""
    from monai.bundle import ConfigParser

    for configs in (["train.json"], ["train.json", "multi_gpu_train.json"]):
        parser = ConfigParser()
        parser.read_config([str(BUNDLES_DIR / bundle / "configs" / c) for c in configs])
        parser.update({"ckpt_dir": str(tmp_path)})
        assert parser["resume"] is True, "a rerun continues by default"
        for run_id in ("training", "run"):
            steps = parser[run_id] if isinstance(parser[run_id], list) else parser[run_id.replace("run", "training")]
            # before anything is loaded, attached or run (seeding may come first: seg's resume rule looks at
            # the handlers, whose network must be built after seeding)
            first = next(s for s in steps if any(k in s for k in ("prepare_run", "load_", "attach(", "run_engine")))
            assert "scripts.checkpoint.prepare_run(@ckpt_dir, @resume" in first, (configs, run_id, steps)
            if best:
                assert "best=@ckpt" in first and parser.get_parsed_content("ckpt").endswith(best)
    # and the rule itself
    with bundle_scripts_switch() as use:
        use(BUNDLES_DIR / bundle)
        from scripts.ctfm_common import checkpoint
        from scripts.ctfm_common.runtime import UsageError

        last_path = str(tmp_path / last) if bundle != "ctfm_pretrain" else ""
        checkpoint.prepare_run(tmp_path, True, last=last_path, best=str(tmp_path / best) if best else "")
        (tmp_path / last).write_bytes(b"x")
        (tmp_path / "tmpab_cd123").write_bytes(b"partial")
        checkpoint.prepare_run(tmp_path, True, last=last_path, best=str(tmp_path / best) if best else "")
        assert sorted(p.name for p in tmp_path.iterdir()) == [last]
        refusal = "--resume true to continue it, or to start fresh, pass another --ckpt_dir"
        with pytest.raises(UsageError, match=refusal):
            checkpoint.prepare_run(tmp_path, "false", last=last_path, best=str(tmp_path / best) if best else "")
        if best:  # a best model but nothing to continue from (killed between the two saves): refused too
            (tmp_path / last).rename(tmp_path / best)
            with pytest.raises(UsageError, match=f"holds {best} of an earlier run but no {last} to continue from"):
                checkpoint.prepare_run(tmp_path, True, last=last_path, best=str(tmp_path / best))
            assert (tmp_path / best).read_bytes() == b"x"


def test_disk_full_while_saving_a_checkpoint_says_so_and_keeps_the_previous_one(tmp_path, monkeypatch):
    """torch's zip writer reports a full disk as "unexpected pos ..."; every train config's saver says what it is."""
    import errno
    import shutil
    from collections import namedtuple

    from ignite.engine import Engine

    from ctfm_common.checkpoint import AtomicCheckpointSaver

    model = torch.nn.Linear(4, 2)
    engine = Engine(lambda engine, batch: None)
    AtomicCheckpointSaver(
        save_dir=str(tmp_path), save_dict={"model": model}, save_interval=1, epoch_level=True, last_filename="last.pt"
    ).attach(engine)
    engine.run([0], max_epochs=1)
    before = (tmp_path / "last.pt").read_bytes()

    def full_disk_save(obj, f, *args, **kwargs):
        f.write(b"\x00" * 100)
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 16008960 vs 16008854")

    monkeypatch.setattr(torch, "save", full_disk_save)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 * 2**30, 10 * 2**30 - 2**20, 2**20))
    with pytest.raises(OSError) as error:
        engine.run([0], max_epochs=2)
    cause = error.value if isinstance(error.value, OSError) and error.value.errno else error.value.__cause__
    assert cause.errno == errno.ENOSPC
    line = runtime.user_error_line(error.value)
    full = f"{tmp_path / 'last.pt'}: No space left on device while writing this checkpoint (1 MiB free)"
    assert line.startswith(full), line
    assert (tmp_path / "last.pt").read_bytes() == before and os.listdir(tmp_path) == ["last.pt"]
