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
"""tools/data/idc.py: select from the real shipped IDC index, download from a local S3 server, convert real DICOM.

No test needs the internet: ``select`` reads the index shipped in the idc-index-data wheel,
``download`` talks to a moto S3 server on 127.0.0.1 holding the real DICOM series of
../shared/data laid out as IDC lays out series (``<bucket>/<crdc_series_uuid>/<instance uuid>.dcm``),
and ``convert`` reads that series with ITK.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest


from ctfm_bundles.tools.data import idc

BUCKET = "idc-open-data"


# ---------------------------------------------------------------------------------------
# select (real shipped index)
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ctfm_manifest(tmp_path_factory) -> tuple[dict, pd.DataFrame]:
    """The CT-FM selection of the whole shipped index, without the attribute indices."""
    path = tmp_path_factory.mktemp("select") / "ctfm.parquet"
    summary = idc.select(output=str(path), attribute_indices="", quiet=True)
    return summary, pd.read_parquet(path)


def test_select_ctfm_filters_on_the_shipped_index(ctfm_manifest):
    summary, manifest = ctfm_manifest
    filters = idc.CTFM_FILTERS
    # DESIGN.md: v25 has 178,517 CT series with > 50 instances; CT Image Storage keeps ~99.5% of them
    assert 150_000 < summary["series"] < 200_000, summary
    assert summary["series"] == len(manifest) and 10 < summary["size_tb"] < 25 and summary["collections"] >= 50
    assert summary["patients"] > 10_000
    assert (manifest["Modality"] == filters["modality"]).all()
    assert (manifest["instanceCount"] > filters["min_instances_exclusive"]).all()
    assert manifest["SeriesInstanceUID"].is_unique
    assert set(idc.MANIFEST_COLUMNS) <= set(manifest.columns)
    assert manifest["series_aws_url"].str.match(r"^s3://[^/]+/[0-9a-f-]{36}/\*$").all()
    # the per-series CT attribute filters were not applied, and the summary says so
    assert set(summary["filters_skipped"]) == {label for _, _, label in idc.ATTRIBUTE_FILTERS.values()}
    assert summary["filters_applied"]["more than 50 instances"] > 0


def test_select_user_filters_and_seeded_sampling(tmp_path):
    args = dict(collections="nlst,lidc_idri", body_parts=["chest"], licenses="CC BY 4.0,CC BY 3.0")
    first = idc.select(output=str(tmp_path / "a.csv"), sample=25, seed=3, attribute_indices="", quiet=True, **args)
    again = idc.select(output=str(tmp_path / "b.csv"), sample=25, seed=3, attribute_indices="", quiet=True, **args)
    idc.select(output=str(tmp_path / "c.csv"), sample=25, seed=4, attribute_indices="", quiet=True, **args)
    a, b, c = (idc.read_manifest(tmp_path / f"{n}.csv") for n in "abc")
    assert first["series"] == len(a) == 25 and a.equals(b) and first == {**again, "manifest": first["manifest"]}
    assert set(a["SeriesInstanceUID"]) != set(c["SeriesInstanceUID"])
    assert set(a["collection_id"]) <= {"nlst", "lidc_idri"}
    assert (a["BodyPartExamined"] == "CHEST").all()
    assert set(a["license_short_name"]) <= {"CC BY 4.0", "CC BY 3.0"}
    assert (a["instanceCount"] > 50).all()
    # a size budget
    budget = idc.select(output=str(tmp_path / "d.csv"), max_total_gb=2, attribute_indices="", quiet=True, **args)
    d = idc.read_manifest(tmp_path / "d.csv")
    assert 0 < d["series_size_MB"].sum() <= 2000 and budget["series"] == len(d)
    assert "summary.json" in "".join(os.listdir(tmp_path))  # the summary is kept beside the manifest


def test_select_applies_attribute_filters_when_the_indices_are_available(ctfm_manifest, tmp_path):
    _, manifest = ctfm_manifest
    counts = manifest["collection_id"].value_counts()
    collection = counts[counts >= 5].index[-1]  # a small collection
    uids = sorted(manifest.loc[manifest["collection_id"] == collection, "SeriesInstanceUID"])[:5]
    # an offline mirror of the two indices with idc-index's columns: series 0 kept, 1 too thin,
    # 2 a localizer, 3 with two instances at one position, 4 absent from ct_index
    mirror = tmp_path / "indices"
    mirror.mkdir()
    pd.DataFrame(
        {
            "SeriesInstanceUID": uids[:4],
            "SliceThickness": [2.5, 0.625, 3.0, 5.0],
            "ImageType": [["ORIGINAL", "PRIMARY", "AXIAL"], ["ORIGINAL", "PRIMARY", "AXIAL"],
                          ["ORIGINAL", "PRIMARY", "LOCALIZER"], ["DERIVED", "SECONDARY", "AXIAL"]],
        }
    ).to_parquet(mirror / "ct_index.parquet")
    pd.DataFrame({"SeriesInstanceUID": uids, "unique_slice_positions": [True, True, True, False, True]}).to_parquet(
        mirror / "volume_geometry_index.parquet"
    )
    summary = idc.select(output=str(tmp_path / "m.csv"), collections=collection, attribute_indices=str(mirror),
                         quiet=True)
    kept = idc.read_manifest(tmp_path / "m.csv")
    assert list(kept["SeriesInstanceUID"]) == [uids[0]]
    assert float(kept["SliceThickness"].iloc[0]) == 2.5
    assert summary["filters_skipped"] == {}
    applied = summary["filters_applied"]
    assert applied["slice thickness 1-5 mm"] >= 2 and applied["no LOCALIZER image type"] == 1
    assert applied["one instance per position"] == 1


def test_select_reports_an_unfetchable_index_as_skipped(tmp_path, monkeypatch):
    from idc_index import IDCClient

    client = IDCClient()
    with socket.socket() as s:  # a port nobody listens on: the fetch fails at once, as offline
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    for name in ("ct_index", "volume_geometry_index"):
        client.indices_overview[name].update(installed=False, file_path=None,
                                             url=f"http://127.0.0.1:{closed}/{name}.parquet")
        setattr(client, name, None)
    monkeypatch.setattr(IDCClient, "_client", client, raising=False)  # idc-index's shared client, used by select
    summary = idc.select(output=str(tmp_path / "m.csv"), collections="lidc_idri", quiet=True)
    assert summary["series"] > 0
    skipped = summary["filters_skipped"]
    assert set(skipped) == {"slice thickness 1-5 mm", "no LOCALIZER image type", "one instance per position"}
    assert all("could not be fetched by idc-index" in reason for reason in skipped.values())
    assert "filter skipped: slice thickness 1-5 mm" in idc.format_summary(summary)


def test_select_rejects_an_unknown_manifest_format(tmp_path):
    with pytest.raises(ValueError, match=r"\.csv or \.parquet"):
        idc.write_table(pd.DataFrame({"a": [1]}), tmp_path / "m.txt")


# ---------------------------------------------------------------------------------------
# shards
# ---------------------------------------------------------------------------------------


def test_shards_default_from_torchrun_or_slurm_and_split_the_work(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN"):
        monkeypatch.delenv(key, raising=False)
    assert idc.default_shard() == (0, 1)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")
    assert idc.resolve_shard(None, None) == (2, 4)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert idc.resolve_shard(None, None) == (1, 2) and idc.resolve_shard(0, None) == (0, 2)
    items = list(range(11))
    shards = [idc.shard_items(items, i, 3) for i in range(3)]
    assert sorted(sum(shards, [])) == items and all(len(s) in (3, 4) for s in shards)
    with pytest.raises(ValueError, match="shard_index"):
        idc.resolve_shard(2, 2)


# ---------------------------------------------------------------------------------------
# download (local S3 server)
# ---------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def s3_server(tmp_path):
    """A moto S3 server on 127.0.0.1 (free port), started and stopped here, bounded in time."""
    moto_server = Path(sys.executable).parent / "moto_server"
    assert moto_server.is_file(), "moto_server not found beside python: pip install 'moto[server]==5.2.5'"
    port = _free_port()
    log = open(tmp_path / "moto.log", "w")
    proc = subprocess.Popen([str(moto_server), "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not start: {(tmp_path / 'moto.log').read_text()[-2000:]}")
                time.sleep(0.2)
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


def _s5cmd_upload(endpoint: str, files: list[Path], crdc_series_uuid: str, workdir: Path) -> None:
    """Put a series in the bucket as IDC lays it out: <bucket>/<crdc_series_uuid>/<instance uuid>.dcm (public)."""
    env = dict(os.environ, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_REGION="us-east-1")
    s5cmd = [idc.s5cmd_path(), "--endpoint-url", endpoint]
    subprocess.run(s5cmd + ["mb", f"s3://{BUCKET}"], env=env, capture_output=True, timeout=60)
    commands = workdir / f"upload-{crdc_series_uuid}.txt"
    commands.write_text("".join(
        f"cp --acl public-read {f} s3://{BUCKET}/{crdc_series_uuid}/{uuid.uuid4()}.dcm\n" for f in files
    ))
    subprocess.run(s5cmd + ["run", str(commands)], env=env, check=True, capture_output=True, timeout=120)


def _manifest_row(series_uid: str, crdc_series_uuid: str, count: int) -> dict:
    return {
        "SeriesInstanceUID": series_uid, "StudyInstanceUID": "1.2.3", "PatientID": "patient 1",
        "collection_id": "totalseg_example", "Modality": "CT", "BodyPartExamined": "ABDOMEN",
        "instanceCount": count, "series_size_MB": 3.1, "license_short_name": "CC BY 4.0",
        "source_DOI": "10.5281/zenodo.6802613", "series_aws_url": f"s3://{BUCKET}/{crdc_series_uuid}/*",
    }


def test_download_resumes_verifies_and_records_failures_then_build_converts(shared_data, s3_server, tmp_path):
    dicom = sorted((shared_data / "totalseg_example" / "dicom").iterdir())
    root = tmp_path / "corpus"
    first_uuid, second_uuid = str(uuid.uuid4()), str(uuid.uuid4())
    _s5cmd_upload(s3_server, dicom, first_uuid, tmp_path)
    rows = [_manifest_row("1.2.3.1", first_uuid, len(dicom)), _manifest_row("1.2.3.2", second_uuid, len(dicom))]
    manifest = root / "manifest.csv"
    idc.write_table(pd.DataFrame(rows), manifest)
    dicom_dir = root / "dicom"
    folders = [dicom_dir / idc.series_folder(r) for r in rows]

    # 1. the second series is not in the bucket: recorded as failed (after a retry), the first is fine;
    #    the CLI exits 1 so a scheduler can retry
    cmd = [sys.executable, "-m", "ctfm_bundles.tools.data.idc", "download", "--manifest", str(manifest),
           "--output_dir", str(dicom_dir), "--endpoint_url", s3_server, "--retries", "1", "--retry_delay_s", "0.1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "1 downloaded, 0 already complete, 1 failed" in proc.stdout
    report = json.loads((dicom_dir / "download_report.json").read_text())
    assert report["downloaded"] == 1 and [f["SeriesInstanceUID"] for f in report["failed"]] == ["1.2.3.2"]
    assert report["failed"][0]["attempts"] == 2 and "no object found" in report["failed"][0]["reason"]
    assert folders[0].name == "1.2.3.1" and folders[0].parent.name == "patient_1"
    assert len(list(folders[0].glob("*.dcm"))) == len(dicom) and not folders[1].exists()

    # 2. upload the missing series; damage the complete one (a lost file) and leave a stale partial:
    #    the damaged one and the missing one are (re)done, verified, and nothing partial stays
    _s5cmd_upload(s3_server, dicom, second_uuid, tmp_path)
    next(folders[0].glob("*.dcm")).unlink()
    stale = folders[1].with_name(folders[1].name + ".partial")  # left by the failed attempt
    assert stale.is_dir()
    (stale / "junk.dcm").write_text("not dicom")
    report = idc.download(manifest=str(manifest), output_dir=str(dicom_dir), endpoint_url=s3_server,
                          num_workers=2, progress=False)
    assert (report["downloaded"], report["skipped"], report["failed"]) == (2, 0, [])
    assert all(len(list(f.glob("*.dcm"))) == len(dicom) for f in folders)
    assert not list(dicom_dir.rglob("*.partial"))

    # 3. a rerun skips complete series; a wrong instance count is caught by the verification
    report = idc.download(manifest=str(manifest), output_dir=str(dicom_dir), endpoint_url=s3_server, progress=False)
    assert (report["downloaded"], report["skipped"]) == (0, 2)
    assert idc.verify_series_folder(folders[0], 19).startswith(f"{len(dicom)} of 19 instances in ")
    assert idc.verify_series_folder(folders[0], len(dicom)) == ""
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.dcm").write_text("not dicom")
    assert "1 file(s) without a DICOM preamble" in idc.verify_series_folder(tmp_path / "bad", 1)

    # 4. one command: build reuses the manifest, skips the downloads and converts both series
    result = idc.build(output_dir=str(root), endpoint_url=s3_server, convert_workers=1, progress=False)
    assert result["select"]["reused"] and result["download"]["skipped"] == 2
    nifti = root / "nifti"
    datalist = json.loads((nifti / "datalist.json").read_text())
    images = [item["image"] for item in datalist["training"]]
    assert images == [f"images/{idc.series_folder(r)}.nii.gz" for r in rows]
    assert all(nib.load(nifti / image).shape == (512, 512, 20) for image in images)
    sources = pd.read_csv(nifti / "sources.csv")
    assert list(sources["SeriesInstanceUID"]) == ["1.2.3.1", "1.2.3.2"]
    assert set(sources["license_short_name"]) == {"CC BY 4.0"}
    attribution = (nifti / "ATTRIBUTION.md").read_text()
    assert "| totalseg_example | CC BY 4.0 | https://doi.org/10.5281/zenodo.6802613 | 2 |" in attribution
    assert "Imaging Data Commons" in attribution


# ---------------------------------------------------------------------------------------
# convert (real DICOM)
# ---------------------------------------------------------------------------------------


def _positions(files: list[Path]) -> list[float]:
    import pydicom

    return [float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) for f in files]


def test_convert_real_series_geometry_and_rejections(shared_data, tmp_path):
    import pydicom

    source = shared_data / "totalseg_example" / "dicom"
    files = sorted(source.iterdir())
    inputs = tmp_path / "dicom"
    shutil.copytree(source, inputs / "good")
    # a series with one slice removed from the middle of the stack
    by_position = [f for _, f in sorted(zip(_positions(files), files))]
    shutil.copytree(source, inputs / "missing_slice")
    (inputs / "missing_slice" / by_position[10].name).unlink()
    # a folder mixing two series: the files, and copies with new SeriesInstanceUID/SOPInstanceUID
    shutil.copytree(source, inputs / "mixed")
    new_series = pydicom.uid.generate_uid()
    for f in files:
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = new_series
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.save_as(inputs / "mixed" / f"second_{f.name}")

    out = tmp_path / "nifti"
    summary = idc.convert(input_dir=str(inputs), output_dir=str(out), num_workers=2, progress=False)
    assert (summary["converted"], summary["rejected"], summary["failed"]) == (1, 2, 0)
    datalist = json.loads((out / "datalist.json").read_text())
    assert datalist == {"training": [{"image": "images/good.nii.gz"}]}

    # same shape and affine as the reference label map, up to orientation, and the HU line up with it
    image = nib.as_closest_canonical(nib.load(out / "images" / "good.nii.gz"))
    labels = nib.as_closest_canonical(nib.load(shared_data / "totalseg_example" / "dicom_labels.nii.gz"))
    assert image.shape == labels.shape == (512, 512, 20)
    np.testing.assert_allclose(image.affine, labels.affine, atol=1e-3)
    assert image.get_data_dtype() == np.int16
    hu, organs = np.asarray(image.dataobj), np.asarray(labels.dataobj) > 0
    assert hu.min() >= -1024 and hu[organs].mean() > 0 > -500 > hu[~organs].mean()

    rejected = pd.read_csv(out / "rejected.csv").set_index("folder")["reason"].to_dict()
    assert rejected["missing_slice"].startswith("missing slice(s): 1 gap(s)")
    assert "about 1 slice(s) missing" in rejected["missing_slice"] and "spacing is 2 mm" in rejected["missing_slice"]
    assert rejected["mixed"].startswith("folder mixes 2 series") and new_series in rejected["mixed"]

    # resumable: a rerun converts nothing again
    again = idc.convert(input_dir=str(inputs), output_dir=str(out), num_workers=1, progress=False)
    assert again["this_run"] == {"skipped": 3} and again["converted"] == 1


def _headers(n: int = 10, spacing: float = 2.0, **changes) -> list[dict]:
    headers = [
        {
            "path": f"{i}.dcm", "series_uid": "1.2", "position": (-100.0, -100.0, i * spacing),
            "orientation": (1.0, 0.0, 0.0, 0.0, 1.0, 0.0), "pixel_spacing": (0.8, 0.8), "rows": 64, "columns": 64,
            "frames": 1, "image_type": ("ORIGINAL", "PRIMARY", "AXIAL"), "slice_thickness": 2.0, "gantry_tilt": 0.0,
        }
        for i in range(n)
    ]
    for index, values in changes.items():
        headers[int(index.lstrip("h"))].update(values)
    return headers


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({}, ""),
        ({"h3": {"position": (-100.0, -100.0, 4.0)}}, "more than one instance"),
        ({"h3": {"position": (-100.0, -100.0, 6.5)}}, "inconsistent slice spacing"),
        ({"h9": {"position": (-100.0, -100.0, 40.0)}}, "missing slice(s)"),
        ({"h0": {"gantry_tilt": 15.0}}, "gantry tilt 15 degrees"),
        ({f"h{i}": {"position": (-100.0, -100.0 + 0.5 * i, 2.0 * i)} for i in range(10)}, "sheared by 14.04 degrees"),
        ({"h2": {"pixel_spacing": (0.7, 0.7)}}, "inconsistent PixelSpacing"),
        ({"h2": {"rows": 32}}, "inconsistent image size"),
        ({"h2": {"orientation": (1.0, 0.0, 0.0, 0.0, 0.8, 0.6)}}, "inconsistent ImageOrientationPatient"),
        ({"h2": {"image_type": ("ORIGINAL", "PRIMARY", "LOCALIZER")}}, "LOCALIZER"),
        ({f"h{i}": {"slice_thickness": 0.625} for i in range(10)}, "slice thickness 0.625 mm outside"),
        ({"h2": {"position": None}}, "lack ImagePositionPatient"),
        ({"h2": {"frames": 90}}, "multi-frame"),
    ],
)
def test_geometry_checks_name_the_problem(changes, expected):
    reason, ordered = idc.check_series_geometry(_headers(**changes))
    if expected:
        assert expected in reason and ordered == []
    else:
        assert reason == "" and [h["position"][2] for h in ordered] == sorted(h["position"][2] for h in ordered)


def test_geometry_sorts_slices_along_the_normal_and_ctfm_filters_can_be_off():
    headers = _headers()[::-1]
    reason, ordered = idc.check_series_geometry(headers)
    assert reason == "" and [h["path"] for h in ordered] == [f"{i}.dcm" for i in range(10)]
    thin = _headers(**{f"h{i}": {"slice_thickness": 0.5} for i in range(10)})
    assert idc.check_series_geometry(thin, ctfm_filters=False)[0] == ""


def test_convert_refuses_other_modalities_and_non_image_objects(tmp_path):
    """Only CT image slices enter the corpus: an MR series and a secondary capture filed as CT are rejected."""
    from bad_inputs import write_ct_series

    inputs = tmp_path / "dicom"
    positions = [2.0 * i for i in range(6)]
    write_ct_series(inputs / "ct", positions)
    write_ct_series(inputs / "mr", positions, modality="MR", sop_class="1.2.840.10008.5.1.4.1.1.4")
    write_ct_series(inputs / "screenshot", positions, sop_class="1.2.840.10008.5.1.4.1.1.7")  # Modality CT
    out = tmp_path / "nifti"
    summary = idc.convert(input_dir=str(inputs), output_dir=str(out), num_workers=1, progress=False)
    assert (summary["converted"], summary["rejected"], summary["failed"]) == (1, 2, 0)
    assert json.loads((out / "datalist.json").read_text()) == {"training": [{"image": "images/ct.nii.gz"}]}
    rejected = pd.read_csv(out / "rejected.csv").set_index("folder")["reason"].to_dict()
    assert rejected["mr"].startswith("Modality MR: 6 files; expected CT images")
    assert rejected["screenshot"].startswith("SOP class Secondary Capture Image Storage (1.2.840.10008.5.1.4.1.1.7)")
    assert sorted(p.name for p in (out / "images").iterdir()) == ["ct.nii.gz"]
