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
"""The per-case runner (``ctfm_common.cases.run_cases``) that seg inference, triage inference and
embedding share: it reads the next scan while the current one is processed, lists a bad scan by
its file and goes on, stops in one line when every scan failed; ``atomic_write_csv`` keeps the old
file when writing fails; seg inference reads a NIfTI scan once and writes the same outputs as
when it read it again."""

from __future__ import annotations

import csv
import logging
import os
import threading

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import BUNDLES_DIR

from ctfm_bundles.tools import bundle_scripts_switch
from ctfm_bundles.tools.synthetic import phantom
from ctfm_common import cases, runtime


def _write_scans(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, name in enumerate(names):
        path = folder / name
        if name.startswith("bad"):
            path.write_bytes(b"\x1f\x8b not a gzip stream")  # a .nii.gz that is no NIfTI
        else:
            nib.save(nib.Nifti1Image(np.full((6, 5, 4), i, np.int16), np.eye(4)), path)
        paths.append(path)
    return paths


def test_runner_reads_the_next_case_while_the_current_one_is_processed():
    order = []
    second_loaded = threading.Event()

    def load(data):
        order.append(f"load {data['image']}")
        if data["image"] == "b":
            second_loaded.set()
        return {**data, "value": data["image"].upper()}

    def process(index, data):
        order.append(f"start {data['source']}")
        if index == 0:  # without a read-ahead, b is never loaded while a is being processed
            second_loaded.wait(timeout=10)
        order.append(f"end {data['source']}")
        return {"case": data["source"], "value": data["value"]}

    records = cases.run_cases(items=[{"image": n} for n in "abc"], load=load, process=process)
    assert [r["value"] for r in records] == ["A", "B", "C"]
    assert order.index("load b") < order.index("end a"), order
    assert order.index("load a") < order.index("start a") < order.index("end a") < order.index("start b"), order


def test_a_bad_case_among_good_ones_is_listed_by_its_file_and_the_others_are_written(tmp_path, caplog):
    from monai.transforms import LoadImaged

    good1, bad, good2 = _write_scans(tmp_path / "in", ["one.nii.gz", "bad.nii.gz", "two.nii.gz"])
    out = tmp_path / "out"
    summaries = []

    def process(index, data):
        path = runtime.atomic_write_text(out / f"{index}.txt", f"{float(data['image'].mean())}\n")
        return {"case": str(index), "source": data["source"], "file": str(path)}

    def failed(index, data, message):
        return {"case": str(index), "source": data["source"], "error": message}

    with caplog.at_level(logging.ERROR):
        records = cases.run_cases(items=[{"image": str(p)} for p in (good1, bad, good2)],
                                  load=LoadImaged("image", image_only=True), process=process, failed=failed,
                                  summary=summaries.append, error_list=out / "errors.csv")
    assert [sorted(p.name for p in out.iterdir())] == [["0.txt", "2.txt", "errors.csv"]]
    assert (out / "2.txt").read_text() == "2.0\n"
    rows = list(csv.DictReader(open(out / "errors.csv", newline="")))
    assert [(r["case"], r["source"]) for r in rows] == [("1", str(bad))]
    assert rows[0]["error"].startswith(f"{bad}: ") and "\n" not in rows[0]["error"]
    assert summaries == [records] and [r.get("error") is None for r in records] == [True, False, True]
    assert f"failed: {rows[0]['error']}" in caplog.messages
    # a rerun in which nothing fails removes the stale list
    cases.run_cases(items=[{"image": str(good1)}], load=LoadImaged("image", image_only=True), process=process,
                    error_list=out / "errors.csv")
    assert not (out / "errors.csv").exists()


def test_every_case_failed_raises_one_line_naming_the_count(tmp_path):
    from monai.transforms import LoadImaged

    bad1, bad2 = _write_scans(tmp_path, ["bad1.nii.gz", "bad2.nii.gz"])
    items = [{"image": str(bad1)}, {"image": str(bad2)}]
    summaries = []
    with pytest.raises(cases.AllCasesFailed) as raised:
        cases.run_cases(items=items, load=LoadImaged("image", image_only=True), process=lambda i, d: {},
                        summary=summaries.append)
    line = str(raised.value)
    assert line.startswith("every case failed (2): ") and "\n" not in line
    assert str(bad1) in line and str(bad2) in line
    assert len(summaries) == 1 and all(r["error"] for r in summaries[0])  # the failures are recorded
    # earlier results kept (triage): no summary written; a case that failed while processing counts too
    with pytest.raises(RuntimeError, match=r"^all 1 scan\(s\) failed, nothing written: .*one.nii.gz: ValueError: invalid literal"):
        cases.run_cases(items=[{"image": str(p)} for p in _write_scans(tmp_path, ["one.nii.gz"])],
                        load=LoadImaged("image", image_only=True), process=lambda i, d: int("odd"),
                        summary=summaries.append, summary_when_all_failed=False,
                        all_failed="all {count} scan(s) failed, nothing written")
    assert len(summaries) == 1
    # resumed cases count as done: a run whose only new case failed is no failure as a whole
    cases.run_cases(items=items[:1], load=LoadImaged("image", image_only=True), process=lambda i, d: {}, ok_before=1)


def test_atomic_write_csv_keeps_the_old_file_when_writing_fails_midway(tmp_path):
    target = tmp_path / "table.csv"
    runtime.atomic_write_csv(target, [{"case": "a", "value": 1, "other": "ignored"}, {"case": "b", "value": None}],
                             ("case", "value"))
    assert target.read_bytes() == b"case,value\r\na,1\r\nb,\r\n"

    def rows():
        yield {"case": "c", "value": 3}
        raise OSError("the source of the rows broke (simulated)")

    with pytest.raises(OSError, match="simulated"):
        runtime.atomic_write_csv(target, rows(), ("case", "value"), lineterminator="\n")
    assert target.read_bytes() == b"case,value\r\na,1\r\nb,\r\n"
    assert os.listdir(tmp_path) == ["table.csv"]


@pytest.fixture
def seg_parts(tmp_path):
    """The seg bundle's inference pieces (tiny network, 6 mm) parsed from configs/inference.json in this process."""
    from monai.bundle import ConfigParser

    bundle = BUNDLES_DIR / "ctfm_wholebody_seg"
    with bundle_scripts_switch() as use:
        use(bundle)
        parser = ConfigParser()
        parser.read_config(str(bundle / "configs" / "inference.json"))
        parser.update({"init_filters": 8, "spacing": [6.0, 6.0, 6.0], "patch_size": [16, 32, 32], "overlap": 0.25,
                       "device": "cpu", "amp": False, "progress": False})
        torch.manual_seed(0)
        parts = {name: parser.get_parsed_content(name) for name in
                 ("preprocessing", "postprocessing", "network", "inferer", "label_names", "stitch_dtype",
                  "network_batch_size", "channels_last")}
        import scripts.segment

        yield scripts.segment, parts


def test_seg_reads_a_nifti_scan_once_and_writes_the_same_outputs(seg_parts, tmp_path, monkeypatch):
    from monai.transforms import LoadImage

    segment, parts = seg_parts
    ct, labels, affine = phantom.make_body_phantom(shape=(36, 32, 24), spacing=(6.0, 6.0, 6.0), seed=2)
    image = tmp_path / "ct.nii.gz"
    phantom.save_phantom(ct, labels, affine, image_path=str(image), label_path=str(tmp_path / "labels.nii.gz"))
    reads = []
    real_call = LoadImage.__call__

    def counting_call(self, filename, *args, **kwargs):
        reads.append(str(filename))
        return real_call(self, filename, *args, **kwargs)

    monkeypatch.setattr(LoadImage, "__call__", counting_call)
    preprocessing = parts.pop("preprocessing")
    runs = {"once": preprocessing, "again": lambda data: preprocessing(data)}  # not a Compose: read again
    counts = {}
    for name, transform in runs.items():
        reads.clear()
        summary = segment.segment_cases(items=[{"image": str(image)}], preprocessing=transform,
                                        output_dir=tmp_path / name, device="cpu", amp=False, **parts)
        assert summary["num_ok"] == 1, summary
        counts[name] = reads.count(str(image))
    assert counts == {"once": 1, "again": 2}
    once, again = tmp_path / "once" / "ct", tmp_path / "again" / "ct"
    assert sorted(p.name for p in once.iterdir()) == sorted(p.name for p in again.iterdir())
    assert (once / "ct_structures.csv").read_text() == (again / "ct_structures.csv").read_text()
    assert len((once / "ct_structures.csv").read_text().splitlines()) > 2
    assert (once / "ct_preview.png").read_bytes() == (again / "ct_preview.png").read_bytes()
    np.testing.assert_array_equal(np.asarray(nib.load(once / "ct_seg.nii.gz").dataobj),
                                  np.asarray(nib.load(again / "ct_seg.nii.gz").dataobj))


def test_roi_subset_crop_refuses_a_word_that_is_no_boolean(seg_parts):
    segment, parts = seg_parts
    import scripts.sliding

    inferer = parts["inferer"]
    with pytest.raises(scripts.ctfm_common.runtime.UsageError,
                       match=r"^roi_subset_crop: not a boolean: 'maybe' \(use true/false\)$"):
        scripts.sliding.RoiSubsetCropInferer(inferer.inferer, inferer.coarse_inferer, enabled="maybe")
    assert scripts.sliding.RoiSubsetCropInferer(inferer.inferer, inferer.coarse_inferer, enabled="off").enabled is False
    assert scripts.sliding.RoiSubsetCropInferer(inferer.inferer, inferer.coarse_inferer, enabled="True").enabled
