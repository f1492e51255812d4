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
"""Whole-body segmentation as a user reaches for it: weights, structure choice, names, CLI, DICOM-SEG codes.

- Missing weights end a ``monai.bundle run`` with one line naming the file and the commands
  that get weights; every bundle's ``large_files.yml`` lists the public CT-FM release, and
  ``download_large_files`` (against a loopback HTTP server) puts it where the default
  ``ckpt`` / ``encoder_ckpt`` look.
"""

from __future__ import annotations

import functools
import http.server
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import yaml
from conftest import BUNDLE_NAMES, BUNDLES_DIR, REPO_ROOT

SEG = "ctfm_wholebody_seg"
RELEASES = {
    "ctfm_wholebody_seg": "project-lighter/whole_body_segmentation",
    "ctfm_pretrain": "project-lighter/ct_fm_feature_extractor",
    "ctfm_triage": "project-lighter/ct_fm_feature_extractor",
    "ctfm_retrieval": "project-lighter/ct_fm_feature_extractor",
}


def _copy_bundle(bundle: str, dst: Path) -> Path:
    """The bundle folder alone (as the zoo or MONAI Label have it), without weights or run outputs."""
    target = dst / bundle
    shutil.copytree(BUNDLES_DIR / bundle, target, ignore=shutil.ignore_patterns("__pycache__", "eval", "*.pt",
                                                                                "*.safetensors", "*.ts"))
    return target


@pytest.fixture
def loopback_server(tmp_path):
    """A plain HTTP server on 127.0.0.1 serving ``tmp_path / "served"``; yields ``(folder, base_url)``."""
    folder = tmp_path / "served"
    folder.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args, **kwargs: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield folder, f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.parametrize("bundle", BUNDLE_NAMES)
def test_large_files_list_the_public_release(bundle):
    """Every bundle's large_files.yml lists the public CT-FM release files (hub ``resolve/main`` URLs) in models/."""
    entries = yaml.safe_load((BUNDLES_DIR / bundle / "large_files.yml").read_text())["large_files"]
    urls = {e["url"] for e in entries}
    release = RELEASES[bundle]
    assert {f"https://huggingface.co/{release}/resolve/main/{name}" for name in ("model.safetensors", "config.json")} <= urls
    for entry in entries:
        assert entry["path"].startswith("models/") and set(entry) <= {"path", "url", "hash_val", "hash_type"}


def test_download_large_files_puts_weights_where_ckpt_looks(tmp_path, loopback_server):
    """``monai.bundle download_large_files`` (URLs rewritten to a loopback server) fetches the seg release into
    models/, and configs/inference.json's default ``ckpt`` then resolves to it."""
    from monai.bundle import download_large_files
    from safetensors.torch import save_file

    served, base = loopback_server
    tensors = {"encoder.conv_init.weight": torch.arange(12, dtype=torch.float32).reshape(1, 1, 3, 4)}
    save_file(tensors, str(served / "model.safetensors"))
    (served / "config.json").write_text('{"init_filters": 32}')
    bundle = _copy_bundle(SEG, tmp_path)
    text = (bundle / "large_files.yml").read_text()
    (bundle / "large_files.yml").write_text(text.replace("https://huggingface.co/project-lighter/whole_body_segmentation/resolve/main", base))

    download_large_files(bundle_path=str(bundle))

    weights = bundle / "models" / "model.safetensors"
    assert weights.read_bytes() == (served / "model.safetensors").read_bytes()
    assert _parsed(bundle / "configs" / "inference.json", "ckpt", bundle) == str(weights)
    for release_bundle in ("ctfm_triage", "ctfm_retrieval"):  # encoder_ckpt defaults to the downloaded folder
        config = BUNDLES_DIR / release_bundle / "configs" / ("train.json" if release_bundle == "ctfm_triage" else "embed.json")
        assert _parsed(config, "encoder_ckpt", tmp_path / release_bundle) == ""  # nothing downloaded: random init
        (tmp_path / release_bundle / "models" / "ct_fm_feature_extractor").mkdir(parents=True)
        assert _parsed(config, "encoder_ckpt", tmp_path / release_bundle) == str(
            tmp_path / release_bundle / "models" / "ct_fm_feature_extractor")


def _parsed(config: Path, key: str, bundle_root: Path) -> str:
    """``key`` of ``config`` resolved with ``bundle_root`` as the bundle folder (the shared encoder module as
    the bundle's ``scripts.encoder``, which is a generated copy of it)."""
    import types

    from monai.bundle import ConfigParser

    sys.path.insert(0, str(REPO_ROOT))
    try:
        from ctfm_common import encoder
    finally:
        sys.path.remove(str(REPO_ROOT))
    full = ConfigParser.load_config_file(str(config))
    ids = ("bundle_root", "ckpt_dir", key)  # the ids the weights path derives from (not the heavy imports)
    parser = ConfigParser({k: full[k] for k in ids if k in full},
                          globals={"scripts": types.SimpleNamespace(BUNDLE_ROOT=str(bundle_root), encoder=encoder)})
    return str(parser.get_parsed_content(key))


def test_missing_seg_weights_end_in_one_line(tmp_path):
    """Seg inference without weights: exit 1 with one line naming the missing file and the commands that get
    weights (download_large_files for this bundle folder, the hub release id), and no traceback."""
    bundle = _copy_bundle(SEG, tmp_path)
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs" / "inference.json"),
           "--init_filters", "8", "--input", str(tmp_path / "ct.nii.gz"), "--output_dir", str(tmp_path / "out")]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if "not found" in line]
    assert len(lines) == 1, proc.stderr[-3000:]
    line = lines[0]
    assert str(bundle / "models" / "model.pt") in line
    assert f"python -m monai.bundle download_large_files --bundle_path {bundle}" in line
    assert "project-lighter/whole_body_segmentation" in line


def test_missing_encoder_weights_are_one_line():
    """A missing ``encoder_ckpt`` (every encoder bundle reads it through the shared reader): a ``SystemExit``
    whose one line names the file and the commands that get the public feature extractor."""
    sys.path.insert(0, str(REPO_ROOT))
    try:
        from ctfm_common.encoder import WeightsNotFoundError, read_state_dict
    finally:
        sys.path.remove(str(REPO_ROOT))
    missing = BUNDLES_DIR / "ctfm_triage" / "models" / "missing" / "model.safetensors"
    with pytest.raises(WeightsNotFoundError) as caught:
        read_state_dict(missing)
    assert isinstance(caught.value, SystemExit)  # monai.bundle run prints it without a traceback
    line = str(caught.value)
    assert "\n" not in line and line.startswith(f"encoder weights not found: {missing}")
    assert f"python -m monai.bundle download_large_files --bundle_path {BUNDLES_DIR / 'ctfm_triage'}" in line
    assert "project-lighter/ct_fm_feature_extractor" in line
