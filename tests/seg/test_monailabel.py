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
"""ctfm_wholebody_seg served by a real MONAI Label server on 127.0.0.1, offline.

The monaibundle sample app is taken from the monailabel wheel (``monailabel apps --download``),
the bundle is placed under ``<app>/model/ctfm_wholebody_seg`` and ``monailabel start_server``
runs it with ``--conf zoo_source github`` (no zoo lookup). The studies folder holds the real CT
``ct_small`` twice (two studies, so that the server's train/validation split has one of each)
with its TotalSegmentator labels as final labels.

The served bundle is a copy whose configs differ from the committed ones only in speed
settings (``init_filters`` 8, coarse grids, small windows, no loader workers), and its ``models/model.pt``
is a randomly initialised network written by this test: no trained weights exist in the repo
and none are needed to check the serving path. The tests check geometry (the returned label map
is on the study's grid with its affine), label range, and that a 1-epoch training through the
server's train endpoint finishes and writes checkpoints.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import BUNDLES_DIR

pytest.importorskip("monailabel", reason="monailabel is not installed (pinned in requirements.txt)")
requests = pytest.importorskip("requests")

BUNDLE = "ctfm_wholebody_seg"
STUDIES = ("ct_small_a", "ct_small_b")
NUM_CLASSES = 118
# Speed settings of the served copy (the committed configs keep the real model's values).
INFER_OVERRIDES = {"init_filters": 8, "preset": "fast", "patch_size": [32, 112, 128], "sw_batch_size": 1}
TRAIN_OVERRIDES = {
    "init_filters": 8,
    "spacing": [6.0, 6.0, 6.0],
    "patch_size": [16, 32, 32],
    "batch_size": 1,
    "sw_batch_size": 1,
    "num_workers": 0,
}
STARTUP_TIMEOUT_S = 150
TRAIN_TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _edit_config(path: Path, overrides: dict) -> None:
    config = json.loads(path.read_text())
    missing = sorted(set(overrides) - set(config))
    assert not missing, f"{path.name} has no ids {missing} (the test's speed overrides are stale)"
    config.update(overrides)
    path.write_text(json.dumps(config, indent=4))


def _serve_copy_of_bundle(model_dir: Path) -> Path:
    """Copy the bundle into ``<app>/model``, with test speed settings and a random-init model.pt."""
    import torch
    from monai.networks.nets import SegResNetDS

    dst = model_dir / BUNDLE
    shutil.copytree(BUNDLES_DIR / BUNDLE, dst, ignore=shutil.ignore_patterns("__pycache__", "eval", "*.pt", "*.ts"))
    _edit_config(dst / "configs" / "inference.json", INFER_OVERRIDES)
    _edit_config(dst / "configs" / "train.json", TRAIN_OVERRIDES)
    # TEST ONLY: random weights with the served network's shape, so the server has a model.pt to load.
    torch.manual_seed(0)
    network = SegResNetDS(
        spatial_dims=3, in_channels=1, init_filters=8, blocks_down=[1, 2, 2, 4, 4], out_channels=NUM_CLASSES, dsdepth=4
    )
    (dst / "models").mkdir(exist_ok=True)
    torch.save(network.state_dict(), dst / "models" / "model.pt")
    return dst


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _log_tail(log_path: Path, chars: int = 6000) -> str:
    return log_path.read_text(errors="replace")[-chars:] if log_path.exists() else "(no server log)"


@pytest.fixture(scope="module")
def server(shared_data, tmp_path_factory):
    """A MONAI Label server with the monaibundle app serving the bundle; killed on teardown."""
    root = tmp_path_factory.mktemp("monailabel")
    home = root / "home"
    home.mkdir()
    env = dict(
        os.environ,
        HOME=str(home),
        PYTHONUNBUFFERED="1",
        PYTHONPATH=os.environ.get("PYTHONPATH", ""),  # the server's train task appends the bundle to it
        OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"),
        MONAI_LABEL_TRACKING_ENABLED="false",  # no MLflow
        MONAI_LABEL_DATASTORE_AUTO_RELOAD="false",
        MONAI_LABEL_SESSION_PATH=str(home / "sessions"),
        BUNDLE_DOWNLOAD_SRC="github",
    )
    cli = [sys.executable, "-m", "monailabel.main"]

    # The monaibundle sample app ships inside the wheel: no network needed.
    download = [*cli, "apps", "--download", "--name", "monaibundle", "--output", str(root / "apps")]
    subprocess.run(download, check=True, capture_output=True, text=True, timeout=120, env=env, cwd=root)
    app = root / "apps" / "monaibundle"
    assert (app / "main.py").is_file(), f"monaibundle app not found under {app}"
    bundle = _serve_copy_of_bundle(app / "model")

    studies = root / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    ct = shared_data / "totalseg_example" / "ct_small.nii.gz"
    labels = shared_data / "totalseg_example" / "ct_small_labels.nii.gz"
    for name in STUDIES:
        shutil.copyfile(ct, studies / f"{name}.nii.gz")
        shutil.copyfile(labels, studies / "labels" / "final" / f"{name}.nii.gz")

    port = _free_port()
    log_path = root / "server.log"
    cmd = [*cli, "start_server", "--app", str(app), "--studies", str(studies)]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]
    # zoo_source other than the default "monaihosting": take the bundle folder under <app>/model, no zoo lookup.
    for key, value in {"models": BUNDLE, "zoo_source": "github", "sam2": "false"}.items():
        cmd += ["--conf", key, value]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        info = None
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"MONAI Label server exited ({proc.returncode}):\n{_log_tail(log_path)}")
            try:
                response = requests.get(f"{url}/info/", timeout=5)
                if response.status_code == 200:
                    info = response.json()
                    break
            except requests.ConnectionError:
                pass
            time.sleep(1)
        if info is None:
            pytest.fail(f"MONAI Label server not up in {STARTUP_TIMEOUT_S} s:\n{_log_tail(log_path)}")
        yield {"url": url, "info": info, "bundle": bundle, "studies": studies, "ct": ct, "log": log_path}
    finally:
        # The server runs training in child processes: end its whole process group (its own session).
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)


def test_server_lists_bundle(server):
    """/info/ lists the bundle as a segmentation model with its 117 structures and a trainer."""
    info = server["info"]
    model = info["models"].get(BUNDLE)
    assert model is not None, f"{BUNDLE} not served: {sorted(info['models'])}\n{_log_tail(server['log'])}"
    assert model["type"] == "segmentation"
    labels = model["labels"]
    assert len(labels) == NUM_CLASSES - 1 and "background" not in labels
    assert labels["liver"] == 5 and labels["costal_cartilages"] == 117
    assert BUNDLE in info["trainers"]
    assert model["config"]["preset"] == "fast"  # displayable_configs: a per-request setting (params {"preset": ...})
    metadata = json.loads((BUNDLES_DIR / BUNDLE / "configs" / "metadata.json").read_text())
    assert model["version"] == metadata["version"]


def test_ohif_viewer_is_served(server):
    """/ohif/ serves the OHIF viewer bundled with MONAI Label (it reads studies from a DICOMweb server)."""
    response = requests.get(f"{server['url']}/ohif/", timeout=30)
    assert response.status_code == 200 and "<html" in response.text.lower()


def test_infer_returns_label_map_on_study_grid(server, tmp_path):
    """POST /infer/<bundle>?image=<id>: the label map comes back on the study's grid, with its affine."""
    response = requests.post(
        f"{server['url']}/infer/{BUNDLE}",
        params={"image": STUDIES[0], "output": "image"},
        data={"params": json.dumps({"device": "cpu"})},
        timeout=300,
    )
    assert response.status_code == 200, f"{response.status_code}: {response.text[:2000]}\n{_log_tail(server['log'])}"
    out = tmp_path / "label.nii.gz"
    out.write_bytes(response.content)
    pred, study = nib.load(out), nib.load(server["ct"])
    assert pred.shape == study.shape
    np.testing.assert_allclose(pred.affine, study.affine, atol=1e-4)
    assert pred.get_data_dtype().kind in "iu", f"label map stored as {pred.get_data_dtype()}, not as integers"
    values = np.unique(np.asarray(pred.dataobj))
    assert values.min() >= 0 and values.max() < NUM_CLASSES and np.all(values == np.round(values))


def test_train_one_epoch_through_server(server):
    """POST /train/<bundle> (1 epoch, CPU): the task ends DONE and writes model.pt and last.pt."""
    models = server["bundle"] / "models"
    before = (models / "model.pt").stat().st_mtime_ns
    params = {"max_epochs": 1, "val_split": 0.5, "device": "cpu", "multi_gpu": False}
    response = requests.post(f"{server['url']}/train/{BUNDLE}", json=params, timeout=60)
    assert response.status_code == 200, f"{response.status_code}: {response.text[:2000]}"

    deadline = time.monotonic() + TRAIN_TIMEOUT_S
    task = {}
    while time.monotonic() < deadline:
        task = requests.get(f"{server['url']}/train/", timeout=30).json()
        if task.get("status") not in ("SUBMITTED", "RUNNING", None):
            break
        time.sleep(2)
    details = "\n".join(task.get("details", []))
    assert task.get("status") == "DONE", f"training task: {task.get('status')}\n{details}\n{_log_tail(server['log'])}"
    assert "Epoch[1] Complete" in server["log"].read_text(errors="replace"), "no completed epoch in the server log"
    assert (models / "last.pt").is_file(), f"no last.pt after training:\n{details}"
    assert (models / "model.pt").stat().st_mtime_ns != before, "the best-model checkpoint was not rewritten"
