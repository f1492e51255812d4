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
"""ctfm_common's small shared pieces: the ``input`` id, flags, shards, atomic writes, checkpoints."""

from __future__ import annotations

import json
import time
import os
import shutil

import pytest
import torch

from ctfm_common import checkpoint, inputs, runtime


def touch(path, content=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def test_resolve_input_file_glob_datalist_and_sections(tmp_path):
    a = touch(tmp_path / "cases" / "a.nii.gz")
    b = touch(tmp_path / "cases" / "b.nrrd")
    assert inputs.resolve_input(a) == [{"image": str(a)}]
    assert inputs.resolve_input(str(tmp_path / "cases" / "*")) == [{"image": str(a)}, {"image": str(b)}]
    datalist = tmp_path / "list.json"
    datalist.write_text(json.dumps({"training": [{"image": "cases/a.nii.gz", "label": 1}],
                                    "validation": [{"image": "cases/b.nrrd", "label": 0}]}))
    # default: the first non-empty section of testing, validation, training; paths made absolute
    assert inputs.resolve_input(datalist) == [{"image": str(b), "label": 0}]
    both = inputs.resolve_input(datalist, sections=["training", "validation"])
    assert [item["image"] for item in both] == [str(a), str(b)] and both[0]["label"] == 1
    assert inputs.case_name(a) == "a" and inputs.case_name(b) == "b" and inputs.case_name(tmp_path / "dicom") == "dicom"


def test_resolve_input_dicom_folder(tmp_path, shared_data):
    folder = shared_data / "totalseg_example" / "dicom"
    assert inputs.resolve_input(folder) == [{"image": str(folder)}]


def test_resolve_input_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.nii.gz' does not exist"):
        inputs.resolve_input(tmp_path / "missing.nii.gz")
    with pytest.raises(FileNotFoundError, match="matches no file"):
        inputs.resolve_input(str(tmp_path / "*.nii.gz"))
    touch(tmp_path / "notes" / "readme.txt")
    with pytest.raises(ValueError, match="notes: folder holds no DICOM files"):
        inputs.resolve_input(tmp_path / "notes")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: not a valid datalist JSON"):
        inputs.resolve_input(bad)
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"training": []}))
    with pytest.raises(ValueError, match="empty.json: the .* list is empty or missing"):
        inputs.resolve_input(empty)
    keyless = tmp_path / "keyless.json"
    keyless.write_text(json.dumps({"training": [{"label": 1}]}))
    with pytest.raises(ValueError, match="item 0 of 'training' has no 'image' entry"):
        inputs.resolve_input(keyless)


def test_as_bool_reads_command_line_words():
    assert runtime.as_bool("false") is False and runtime.as_bool("False") is False and runtime.as_bool("0") is False
    assert runtime.as_bool("true") is True and runtime.as_bool(True) is True and runtime.as_bool(1) is True
    with pytest.raises(ValueError, match="not a boolean: 'maybe'"):
        runtime.as_bool("maybe")


def test_shards_default_from_torchrun_and_slurm_and_cover_everything(monkeypatch):
    assert runtime.default_shard({}) == (0, 1)
    assert runtime.default_shard({"RANK": "2", "WORLD_SIZE": "4"}) == (2, 4)
    assert runtime.default_shard({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "3", "SLURM_ARRAY_TASK_COUNT": "4"}) == (2, 4)
    items = list(range(10))
    shards = [runtime.shard_items(items, i, 3) for i in range(3)]
    assert sorted(sum(shards, [])) == items and all(len(s) >= 3 for s in shards)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert runtime.resolve_shard() == (1, 2) and runtime.resolve_shard(0, 3) == (0, 3)
    with pytest.raises(ValueError, match="shard_index must be in"):
        runtime.resolve_shard(3, 3)


def test_atomic_write_keeps_the_previous_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "out" / "result.json"
    runtime.atomic_write_text(target, "first\n")
    assert target.read_text() == "first\n" and oct(target.stat().st_mode & 0o777) != oct(0o600)

    def broken_writer(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        runtime.atomic_write(target, broken_writer)
    assert target.read_text() == "first\n"
    assert sorted(os.listdir(target.parent)) == ["result.json"], "no temporary file left behind"


def test_atomic_checkpoint_saver_replaces_fixed_names_and_resume_finds_the_latest(tmp_path):
    from ignite.engine import Engine, Events

    net = torch.nn.Linear(2, 1)
    engine = Engine(lambda e, b: None)
    engine.state.metrics = {}
    saver = checkpoint.AtomicCheckpointSaver(save_dir=str(tmp_path), save_dict={"model": net}, save_interval=1,
                                             epoch_level=True, last_filename="last.pt")
    saver.attach(engine)
    seen = []
    engine.add_event_handler(Events.EPOCH_COMPLETED(every=1), lambda e: seen.append(sorted(os.listdir(tmp_path))))
    engine.run([0], max_epochs=3)
    assert seen[-1] == ["last.pt"], "one fixed-name file, replaced each epoch, never a temporary left"
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert torch.equal(state["weight"], net.weight.detach())
    for name in ("checkpoint_epoch=2.pt", "checkpoint_epoch=10.pt", "checkpoint_final_iteration=7.pt"):
        shutil.copy(tmp_path / "last.pt", tmp_path / name)
    assert checkpoint.latest_checkpoint(tmp_path).endswith("checkpoint_epoch=10.pt")
    assert checkpoint.latest_checkpoint(tmp_path / "none") == ""


def test_training_state_keeps_the_loss_scale_and_resumes_older_checkpoints(tmp_path, caplog):
    from ignite.engine import Engine
    from ignite.handlers import Checkpoint

    def trainer_with_scaler(scale: float | None):
        engine = Engine(lambda e, b: None)
        engine.scaler = None
        if scale is not None:  # what a MONAI trainer holds with amp on
            engine.scaler = torch.amp.GradScaler("cpu", init_scale=65536.0)
            engine.scaler.scale(torch.ones(()))
            engine.scaler.update(new_scale=scale)
        return engine

    net = torch.nn.Linear(2, 1)
    saved = checkpoint.training_state(network=net, lr_scheduler=None, trainer=trainer_with_scaler(8.0))
    assert sorted(saved) == ["network", "scaler", "trainer"], "None dropped, the GradScaler added"
    path = tmp_path / "checkpoint_iteration=5.pt"
    torch.save({name: obj.state_dict() for name, obj in saved.items()}, path)

    fresh = checkpoint.training_state(network=torch.nn.Linear(2, 1), trainer=trainer_with_scaler(65536.0))
    Checkpoint.load_objects(checkpoint.resumable_state(fresh, str(path)), str(path))
    assert fresh["scaler"].get_scale() == 8.0, "the loss scale continues where it stopped"
    assert torch.equal(fresh["network"].weight, net.weight)

    no_amp = tmp_path / "checkpoint_iteration=6.pt"  # written by a run without amp
    torch.save({"network": net.state_dict(), "trainer": saved["trainer"].state_dict()}, no_amp)
    with caplog.at_level("WARNING"):
        loadable = checkpoint.resumable_state(fresh, str(no_amp))
    assert sorted(loadable) == ["network", "trainer"] and "holds no scaler" in caplog.text
    torch.save({"trainer": saved["trainer"].state_dict()}, no_amp)
    with pytest.raises(RuntimeError, match=r"checkpoint_iteration=6.pt: cannot resume, the checkpoint has no network"):
        checkpoint.resumable_state(fresh, str(no_amp))
    assert checkpoint.resumable_state(fresh, "") is fresh, "nothing to resume: everything stays"


def test_native_bf16_is_read_from_the_cpu_flags(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n")
    assert runtime.cpu_has_native_bf16(info)
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n")  # bf16 only emulated here
    assert not runtime.cpu_has_native_bf16(info)
    assert not runtime.cpu_has_native_bf16(tmp_path / "absent")


def test_case_names_are_unique_stable_and_never_take_another_scans_name(tmp_path, caplog):
    from ctfm_common.inputs import case_names, case_source

    paths = [tmp_path / "s0001" / "ct.nii.gz", tmp_path / "s0002" / "ct.nii.gz", tmp_path / "other.nii.gz"]
    first = case_names(paths)
    assert first[2] == "other" and len(set(first)) == 3
    assert first[0].startswith("s0001_ct-") and first[1].startswith("s0002_ct-")
    assert "named after their full path" in caplog.text
    assert case_names(list(reversed(paths))) == list(reversed(first))  # a function of the path, not the order
    assert case_names([paths[0], paths[0]]) == ["ct", "ct"]  # one scan listed twice is one case
    # a later run: the plain name held by another scan is not reused; by the same scan (a rerun) it is
    assert case_names([paths[1]], taken={"ct": str(paths[0])}) == [first[1]]
    assert case_names([paths[0]], taken={"ct": str(tmp_path / "s0001" / ".." / "s0001" / "ct.nii.gz")}) == ["ct"]
    assert case_source(tmp_path / "s0001" / ".." / "s0001" / "ct.nii.gz") == str(paths[0].resolve())
    deep = [tmp_path / "p1" / "ct" / "image.nii.gz", tmp_path / "p2" / "ct" / "image.nii.gz"]
    assert len(set(case_names(deep))) == 2


def _claim(args):
    from ctfm_common.inputs import claim_case_names

    folder, path, start = args
    while time.time() < start:  # every process claims at the same moment
        time.sleep(0.001)
    return claim_case_names(folder, [path])[0]


def test_runs_writing_into_one_folder_at_once_never_share_a_case_name(tmp_path):
    """Four runs start together, each with its own ``<case>/ct.nii.gz``, into one empty folder: before any
    output exists, each reserves its name in the folder's registry, so no run takes another scan's name."""
    import multiprocessing

    from ctfm_common.inputs import CASE_NAMES_FILE, case_source, claim_case_names

    out = tmp_path / "out"
    paths = [str(tmp_path / f"p{i}" / "ct.nii.gz") for i in range(4)]
    start = time.time() + 1.0
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        names = pool.map(_claim, [(str(out), p, start) for p in paths])
    assert len(set(names)) == 4 and names.count("ct") <= 1, names
    registry = json.loads((out / CASE_NAMES_FILE).read_text())
    assert {registry[n] for n in names} == {case_source(p) for p in paths}
    assert claim_case_names(out, paths) == names  # a rerun of the same scans keeps their names


def test_case_records_merge_by_key_under_the_lock(tmp_path, caplog):
    """The one merge of per-case records (seg summary.json, triage predictions.json): earlier cases stay, a case
    of this run replaces its own record in place, new cases follow, records without a key are never replaced;
    an earlier file for other labels (``expect``) or an unreadable one is replaced with a warning."""
    path = tmp_path / "out" / "records.json"

    def write(cases):
        runtime.atomic_write_text(path, json.dumps({"labels": ["a"], "cases": cases}))

    runtime.merge_case_records(path, [{"case": "x", "v": 1}, {"case": "y", "v": 1}, {"v": "no key"}], write)
    seen = []

    def this_run(earlier):
        seen.extend(c.get("case") for c in earlier)
        return [{"case": "x", "v": 2}, {"case": "z", "v": 2}, {"v": "no key"}]

    merged = runtime.merge_case_records(path, this_run, write, expect={"labels": ["a"]})
    assert seen == ["x", "y", None]  # this run's records are made knowing the earlier ones
    assert merged == [{"case": "x", "v": 2}, {"case": "y", "v": 1}, {"v": "no key"}, {"case": "z", "v": 2},
                      {"v": "no key"}]
    assert json.loads(path.read_text())["cases"] == merged
    assert not path.with_name("records.json.lock").read_text()  # the lock file holds nothing
    merged = runtime.merge_case_records(path, [{"case": "q"}], write, key=lambda c: c.get("case"),
                                        expect={"labels": ["b"]})
    assert merged == [{"case": "q"}] and "not ['b']; they are replaced" in caplog.text
    path.write_text("{truncated")
    assert runtime.merge_case_records(path, [{"case": "r"}], write) == [{"case": "r"}]
    assert "unreadable earlier records" in caplog.text
    assert runtime.merge_case_records(path, [{"case": "s"}], write, keep_earlier=False) == [{"case": "s"}]


def test_root_cause_ends_on_a_cause_chain_that_loops_back():
    """An error re-raised ``from`` one of its own causes makes a loop: the walk still ends, at the innermost
    error before it (a training stopped by a bad label once spun here for ever)."""
    from ctfm_common.validate import InputError, root_cause

    named = InputError("ct_labels.nii.gz", "label values 200 outside the label map")
    wrapper = RuntimeError("applying transform CheckLabelsd")
    wrapper.__cause__ = named
    named.__cause__ = wrapper  # ``raise named from wrapper`` after the wrapper already came from it
    assert root_cause(wrapper) is named
    assert root_cause(RuntimeError("plain")).args == ("plain",)
