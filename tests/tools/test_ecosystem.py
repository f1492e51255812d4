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
"""Model Zoo zips, downloads, the Hugging Face hub layout and TorchScript export, end to end and offline.

Every bundle is packaged once (``tools/release/package_bundles.py``: schema, ``verify_net_in_out``,
``ckpt_export`` + TorchScript reload on random weights, all in a clean interpreter on the zip's
extracted copy, at init_filters 8) and served by a real HTTP server on 127.0.0.1; ``monai.bundle
download`` installs a zip, by ``--url`` and by the ``--source github`` layout (its GitHub URLs
redirected to that server), and the downloaded whole-body bundle segments the real CT
``ct_small``. Hub repos are written by ``tools/release/hub.py`` and installed in a temporary
huggingface_hub cache, where every config option that takes weights finds them by repo id with
the hub offline. Weights here are random: these tests check files, hashes, geometry and errors.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import threading
import zipfile
from functools import partial
from unittest import mock
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import BUNDLE_NAMES, BUNDLES_DIR, META_SCHEMA
from monai.bundle import ConfigParser
from monai.networks.nets import SegResNetDS

from ctfm_bundles.tools import bundle_scripts_switch, use_bundle_scripts
from ctfm_bundles.tools.release import hub
from ctfm_bundles.tools.release import package_bundles as pb
from ctfm_common import download as dl
from ctfm_common import encoder as enc
from ctfm_bundles.tools.demo import cli_value

SEG = "ctfm_wholebody_seg"
# a tiny network at a coarse grid, few windows (overlap 0.25; channels_last only pays off at the contract's width):
# the downloaded bundle's outputs are checked for geometry, not accuracy
INFER = {
    "init_filters": 8,
    "spacing": [6.0, 6.0, 6.0],
    "patch_size": [32, 32, 32],
    "sw_batch_size": 1,
    "overlap": 0.25,
    "channels_last": False,
    "save_csv": False,
    "save_preview": False,
}
OUTPUT_SHAPES = {
    "ctfm_pretrain": [1, 128],
    "ctfm_retrieval": [1, 128],
    "ctfm_triage": [1, 1],
    SEG: [1, 118, 16, 16, 16],
}
REPOS = {"encoder": "ctfm-test/ct_fm_tiny", "seg": "ctfm-test/wholebody_seg_tiny", "triage": "ctfm-test/triage_tiny"}
PUBLIC = {"encoder": "project-lighter/ct_fm_feature_extractor", "seg": "project-lighter/whole_body_segmentation"}


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 (the base class's name)
        pass


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real HTTP server on 127.0.0.1 serving a temporary folder: ``(root folder, base URL)``."""
    root = tmp_path_factory.mktemp("www")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def dist(server, tmp_path_factory):
    """Every bundle packaged into the served ``dist/``, plus a broken copy that must not be packaged."""
    root, url = server
    tree = tmp_path_factory.mktemp("tree")
    for name in BUNDLE_NAMES:
        shutil.copytree(BUNDLES_DIR / name, tree / name, ignore=shutil.ignore_patterns("__pycache__", "eval"))
    # a bundle whose scripts import the repository's ctfm_common: fine in the repo, broken once zipped alone
    broken = tree / "ctfm_broken"
    shutil.copytree(BUNDLES_DIR / SEG, broken, ignore=shutil.ignore_patterns("__pycache__", "eval"))
    init = broken / "scripts" / "__init__.py"
    init.write_text(init.read_text() + "\nfrom ctfm_common import encoder as repository_encoder  # noqa\n")
    out = root / "dist"
    with pytest.raises(pb.PackagingError) as failure:
        pb.package(out=str(out), base_url=f"{url}/dist", init_filters=8, bundles_dir=str(tree))
    info = json.loads((out / "model_info.json").read_text())
    results = {r["name"]: r for r in failure.value.packaged}
    return {
        "out": out,
        "url": f"{url}/dist",
        "info": info,
        "results": results,
        "error": str(failure.value),
        "tree": tree,
    }


def test_package_writes_zoo_zips_and_model_info(dist):
    assert sorted(dist["results"]) == BUNDLE_NAMES
    assert sorted(dist["info"]) == sorted(f"{b}_v{pb.read_metadata(BUNDLES_DIR / b)['version']}" for b in BUNDLE_NAMES)
    for bundle in BUNDLE_NAMES:
        version = pb.read_metadata(BUNDLES_DIR / bundle)["version"]
        path = dist["out"] / f"{bundle}_v{version}.zip"
        entry = dist["info"][f"{bundle}_v{version}"]
        assert entry == {"version": version, "sha256": dl.sha256_of(path), "source": f"{dist['url']}/{path.name}"}
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
        names = [i.filename for i in infos]
        assert names == sorted(names) and all(n.startswith(f"{bundle}/") for n in names)
        for required in (
            "configs/metadata.json",
            "configs/logging.conf",
            "docs/README.md",
            "LICENSE",
            "large_files.yml",
            "models/.gitkeep",
            "scripts/__init__.py",
            "scripts/ctfm_common/encoder.py",
        ):
            assert f"{bundle}/{required}" in names, required
        assert not [n for n in names if "__pycache__" in n or n.endswith((".pt", ".ts", ".safetensors", ".pyc"))]
        assert {i.date_time for i in infos} == {pb.ZIP_TIME}
        # the same tree gives the same bytes
        again = dist["tree"] / f"{bundle}.zip"
        pb.write_zip(dist["tree"] / bundle, pb.bundle_files(dist["tree"] / bundle), again)
        assert dl.sha256_of(again) == entry["sha256"]


def test_package_checks_ran_on_each_zipped_copy(dist):
    for bundle, result in dist["results"].items():
        checks = result["checks"]
        assert checks["metadata"] == "verified"
        configs = sorted((BUNDLES_DIR / bundle / "configs").glob("*.json"))
        assert len(checks["configs"]) == len(configs) - 1  # every workflow config parsed, bundle_root inside the copy
        assert all("bundle_root" in ids for ids in checks["configs"].values())
        network = checks["network"]
        assert network["random_weights"] is True
        assert network["output_shape"] == OUTPUT_SHAPES[bundle]
        assert network["max_abs_diff"] <= 1e-5  # TorchScript reload == eager network
        assert network["ts_metadata_version"] == result["version"]
        assert "metadata.json" in network["ts_extra_files"] and len(network["ts_extra_files"]) == 2
    # the broken bundle: refused, naming the import that only worked inside the repository
    assert "ctfm_broken: checks of the zipped bundle failed" in dist["error"]
    assert "No module named 'ctfm_common'" in dist["error"]
    assert not list(dist["out"].glob("ctfm_broken*")) and not any(k.startswith("ctfm_broken") for k in dist["info"])


def test_packaging_refuses_bad_large_files_and_references_outside_the_bundle(tmp_path):
    bundle = tmp_path / "bundles" / SEG
    shutil.copytree(BUNDLES_DIR / SEG, bundle, ignore=shutil.ignore_patterns("__pycache__", "eval"))
    good = "a" * 64
    (bundle / "large_files.yml").write_text(
        json.dumps(
            {
                "large_files": [
                    {
                        "path": "models/model.pt",
                        "url": "https://example.org/model.pt",
                        "hash_val": good,
                        "hash_type": "sha256",
                    },
                    {
                        "path": "models/a.pt",
                        "url": "https://example.org/a.pt",
                        "hash_val": "0" * 32,
                        "hash_type": "md5",
                    },
                    {
                        "path": "models/b.pt",
                        "url": "https://example.org/b.pt",
                        "hash_val": "xyz",
                        "hash_type": "sha256",
                    },
                    {"path": "models/c.pt", "url": "https://example.org/c.pt"},
                    {"path": "../outside.pt", "url": "ftp://example.org/d.pt", "hash_val": good, "hash_type": "sha256"},
                ]
            }
        )
    )
    problems = pb.check_large_files(bundle)
    assert len(problems) == 5, problems
    assert "entry 1 (models/a.pt): hash_type 'md5' must be 'sha256'" in problems[0]
    assert "'xyz' is not a SHA-256 hex digest" in problems[1]
    assert "entry 3 (models/c.pt): no hash_val" in problems[2]
    assert "path '../outside.pt' must be a relative path inside the bundle" in problems[3]
    assert "url 'ftp://example.org/d.pt' must be http(s)" in problems[4]
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    config.update(
        label_names="$json.load(open(@bundle_root + '/../ctfm_pretrain/labels.json'))",
        dataset_dir="/mnt/datasets/totalseg",
        network_def="%../ctfm_pretrain/configs/train.json::network_def",
    )
    (bundle / "configs" / "inference.json").write_text(json.dumps(config))
    outside = "\n".join(pb.check_self_contained(bundle, all_bundles=BUNDLE_NAMES))
    assert "configs/inference.json::label_names" in outside and "a '..' path" in outside
    assert "another bundle (ctfm_pretrain)" in outside
    assert "configs/inference.json::dataset_dir: '/mnt/datasets/totalseg' references an absolute path" in outside
    assert "configs/inference.json::network_def" in outside and "'%file::id' macro" in outside
    # weights, caches and run outputs never enter a zip
    for junk in ("models/model.pt", "models/encoder.safetensors", "scripts/__pycache__/x.pyc", "eval/x.nii.gz"):
        (bundle / junk).parent.mkdir(parents=True, exist_ok=True)
        (bundle / junk).write_bytes(b"x")
    files = pb.bundle_files(bundle)
    assert "models/.gitkeep" in files and not [f for f in files if f.startswith(("eval/", "models/m", "models/e"))]
    assert not [f for f in files if "__pycache__" in f]
    with pytest.raises(pb.PackagingError, match="large_files.yml entry 1") as failure:
        pb.package_bundles([bundle], tmp_path / "out", init_filters=8, schema=META_SCHEMA)
    assert "references an absolute path" in str(failure.value)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def _run(cmd, cwd, env=None, timeout=600):
    proc = subprocess.run(
        cmd,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="2", **(env or {})),
    )
    return proc, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def hub_repos(tmp_path_factory):
    """Tiny random-weight hub repos written by tools/release/hub.py and installed in a temporary hub cache."""
    root = tmp_path_factory.mktemp("hub")
    torch.manual_seed(0)
    encoder = enc.build_encoder(init_filters=8)
    seg = SegResNetDS(
        spatial_dims=3, in_channels=1, init_filters=8, blocks_down=(1, 2, 2, 4, 4), out_channels=118, dsdepth=4
    )
    triage = enc.PooledEncoderHead(init_filters=8, out_features=1).state_dict()
    triage["threshold"] = torch.tensor([0.3])
    weights = {
        "encoder": enc.save_encoder_weights(encoder, root / "encoder.safetensors"),
        "seg": root / "seg.pt",
        "triage": root / "triage.pt",
    }
    torch.save(seg.state_dict(), weights["seg"])
    torch.save({"model": triage, "epoch": 1}, weights["triage"])
    bundles = {"encoder": "ctfm_pretrain", "seg": SEG, "triage": "ctfm_triage"}
    cache = root / "hf" / "hub"
    folders = {}
    for kind, repo_id in REPOS.items():
        folders[kind] = Path(
            hub.export(bundle=bundles[kind], weights=str(weights[kind]), out=str(root / kind), repo_id=repo_id)
        )
        hub.install(str(folders[kind]), repo_id=repo_id, cache_dir=str(cache))
    states = {"encoder": encoder.state_dict(), "seg": seg.state_dict(), "triage": triage}
    env = {"HF_HOME": str(root / "hf"), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    return {"folders": folders, "states": states, "cache": cache, "env": env}


@pytest.fixture
def offline_hub(hub_repos, monkeypatch):
    """huggingface_hub offline, its cache the temporary one (set in the constants it reads at call time)."""
    from huggingface_hub import constants

    for key, value in hub_repos["env"].items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_repos["cache"]))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hub_repos


def test_monai_bundle_download_installs_our_zip_and_it_segments_real_ct(dist, hub_repos, shared_data, tmp_path):
    """``python -m monai.bundle download --url`` from the local server, then the downloaded bundle (and only it:
    neutral working directory, no repository on the path) segments ct_small with weights found by hub repo id."""
    version = dist["results"][SEG]["version"]
    proc, log = _run(
        [
            sys.executable,
            "-m",
            "monai.bundle",
            "download",
            "--name",
            SEG,
            "--version",
            version,
            "--url",
            f"{dist['url']}/{SEG}_v{version}.zip",
            "--bundle_dir",
            str(tmp_path / "zoo"),
            "--progress",
            "False",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, log[-3000:]
    bundle = tmp_path / "zoo" / SEG
    with zipfile.ZipFile(dist["out"] / f"{SEG}_v{version}.zip") as archive:
        members = sorted(n.split("/", 1)[1] for n in archive.namelist())
    assert sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()) == members
    ct = shared_data / "totalseg_example" / "ct_small.nii.gz"
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "run",
        "--config_file",
        str(bundle / "configs" / "inference.json"),
        "--input",
        str(ct),
        "--output_dir",
        str(tmp_path / "out"),
        "--ckpt",
        REPOS["seg"],
    ]
    for key, value in INFER.items():
        cmd += [f"--{key}", cli_value(value)]
    env = dict(hub_repos["env"], PYTHONPATH="")
    proc, log = _run(cmd, cwd=tmp_path, env=env)
    assert proc.returncode == 0, log[-4000:]
    assert f"whole-body model weights from {REPOS['seg']}: {len(hub_repos['states']['seg'])} tensors loaded" in log
    seg, ref = nib.load(tmp_path / "out" / "ct_small" / "ct_small_seg.nii.gz"), nib.load(ct)
    assert seg.shape == ref.shape
    np.testing.assert_allclose(seg.affine, ref.affine, atol=1e-4)
    assert np.asarray(seg.dataobj).max() <= 117
    assert not list(bundle.glob("eval"))


class RedirectedRequests:
    """``requests`` for monai.bundle with GitHub's raw-content host answered by the local server."""

    def __init__(self, mapping: dict[str, str]) -> None:
        import requests

        self.mapping, self.requests, self.asked = mapping, requests, []

    def get(self, url, **kwargs):
        self.asked.append(url)
        return self.requests.get(self.mapping.get(url, url), **kwargs)


def test_github_source_layout_downloads_through_model_info(dist, server, tmp_path, monkeypatch):
    """``monai.bundle download --source github --repo owner/repo/tag``: the latest version comes from the repo's
    ``models/model_info.json`` at the tag, the zip from the release; both GitHub URLs are the ones our
    ``model_info.json`` (``--repo``) records, answered here by the local server."""
    import monai.bundle.scripts as bundle_scripts

    root, url = server
    repo = "ctfm-test/ct-fm-bundles/v1"
    release = root / "release"
    shutil.copytree(dist["out"], release)
    info = {}
    for result in dist["results"].values():
        key, entry = pb.model_info_entry(result, base_url=None, repo=repo)
        info[key] = entry
    (release / "model_info.json").write_text(json.dumps(info))
    version = dist["results"][SEG]["version"]
    requests = RedirectedRequests(
        {
            "https://raw.githubusercontent.com/ctfm-test/ct-fm-bundles/v1/models/model_info.json": f"{url}/release/model_info.json"
        }
    )
    monkeypatch.setattr(bundle_scripts, "requests", requests)
    asked = []
    original = bundle_scripts._get_git_release_url

    def release_url(owner, name, tag_name, filename):
        asked.append(original(owner, name, tag_name, filename))
        return f"{url}/release/{filename}"

    monkeypatch.setattr(bundle_scripts, "_get_git_release_url", release_url)
    versions = bundle_scripts.get_bundle_versions(SEG, repo="ctfm-test/ct-fm-bundles", tag="v1")
    assert versions == {"latest_version": version, "all_versions": [version]}
    bundle_scripts.download(name=SEG, source="github", repo=repo, bundle_dir=str(tmp_path), progress=False)
    assert asked == [info[f"{SEG}_v{version}"]["source"]]
    assert asked[0] == f"https://github.com/ctfm-test/ct-fm-bundles/releases/download/v1/{SEG}_v{version}.zip"
    assert json.loads((tmp_path / SEG / "configs" / "metadata.json").read_text())["version"] == version
    assert (tmp_path / SEG / "scripts" / "ctfm_common" / "encoder.py").is_file()


def test_fetch_verifies_sha256_and_refuses_a_tampered_zip(dist, server, tmp_path):
    root, url = server
    version = dist["results"][SEG]["version"]
    name = f"{SEG}_v{version}.zip"
    expected = dist["info"][name[:-4]]["sha256"]
    tampered = root / "tampered" / name
    tampered.parent.mkdir()
    data = bytearray((dist["out"] / name).read_bytes())
    data[len(data) // 2] ^= 0xFF
    tampered.write_bytes(bytes(data))
    actual = dl.sha256_of(tampered)
    # a good download lands complete; a tampered one is deleted, naming both hashes
    good = dl.fetch(f"{url}/dist/{name}", tmp_path / "good" / name, expected)
    assert dl.sha256_of(good) == expected
    with pytest.raises(dl.IntegrityError, match=f"expected {expected}, got {actual}"):
        dl.fetch(f"{url}/tampered/{name}", tmp_path / "bad" / name, expected)
    assert not list((tmp_path / "bad").iterdir())  # neither the file nor a temporary one
    # an existing good file is not replaced by a tampered download
    with pytest.raises(dl.IntegrityError):
        dl.fetch(f"{url}/tampered/{name}", good, "0" * 64)
    assert dl.sha256_of(good) == expected
    # the tool: download + verify + extract, or refuse
    folder = Path(pb.download(f"{url}/dist/{name}", sha256=expected, bundle_dir=str(tmp_path / "zoo")))
    assert folder == tmp_path / "zoo" / SEG and (folder / "configs" / "inference.json").is_file()
    assert pb.verify(str(good), model_info=str(dist["out"] / "model_info.json"))["hash_checked"] is True
    with pytest.raises(dl.IntegrityError, match="SHA-256 mismatch"):
        pb.verify(str(tampered), model_info=str(dist["out"] / "model_info.json"))
    renamed = shutil.copy(good, tmp_path / f"{SEG}_v9.9.9.zip")  # a name that lies about the version
    with pytest.raises(pb.PackagingError, match=f"holds {SEG} version {version}, expected name {name}"):
        pb.verify(str(renamed))
    with pytest.raises(dl.IntegrityError):
        pb.download(f"{url}/tampered/{name}", sha256=expected, bundle_dir=str(tmp_path / "zoo2"))
    assert not (tmp_path / "zoo2" / SEG).exists()
    # the command line says so too (and exits non-zero)
    proc, log = _run(
        [
            sys.executable,
            "-m", "ctfm_bundles.tools.release.package_bundles",
            "verify",
            str(tampered),
            "--sha256",
            expected,
        ],
        cwd=tmp_path,
    )
    assert proc.returncode != 0 and f"expected {expected}, got {actual}" in log


def _zip(path: Path, members: list[tuple[str, bytes, bool]]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data, link in members:
            info = zipfile.ZipInfo(name)
            info.external_attr = ((stat.S_IFLNK | 0o777) if link else (stat.S_IFREG | 0o644)) << 16
            archive.writestr(info, data)
    return path


UNSAFE = {
    "dotdot": ("ctfm_evil/../../escaped.txt", "contains a '..' component"),
    "absolute": ("/tmp/ctfm_escaped.txt", "is an absolute path"),
    "symlink": ("ctfm_evil/scripts/link", "is a symbolic link"),
    "backslash": ("ctfm_evil/..\\..\\escaped.txt", "contains a backslash"),
}


@pytest.mark.parametrize("kind", sorted(UNSAFE))
def test_unsafe_zip_members_are_refused_before_anything_is_written(kind, tmp_path):
    member, reason = UNSAFE[kind]
    path = _zip(
        tmp_path / "ctfm_evil_v0.1.0.zip",
        [
            ("ctfm_evil/configs/metadata.json", b'{"version": "0.1.0"}', False),
            (member, b"/etc/passwd" if kind == "symlink" else b"x", kind == "symlink"),
        ],
    )
    with pytest.raises(dl.UnsafeArchiveError, match=re.escape(f"member '{member}' {reason}")):
        pb.extract(str(path), bundle_dir=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").rglob("*"))
    assert not (tmp_path / "escaped.txt").exists()


def test_zip_outside_its_bundle_folder_is_refused(tmp_path):
    path = _zip(
        tmp_path / "ctfm_evil_v0.1.0.zip",
        [("ctfm_evil/configs/metadata.json", b"{}", False), ("other_bundle/scripts/__init__.py", b"", False)],
    )
    with pytest.raises(dl.UnsafeArchiveError, match="expected one top-level folder"):
        dl.safe_extract(path, tmp_path / "out")
    with pytest.raises(dl.UnsafeArchiveError, match="member 'other_bundle/scripts/__init__.py' is outside"):
        dl.check_zip_members(path, top="ctfm_evil")


def test_what_monai_download_does_with_a_traversal_zip(server, tmp_path):
    """MONAI 1.6.1 refuses a '..' member too, but only when it reaches it: the members before it stay behind, and
    the next download of the same name then skips extraction ("Non-empty folder exists"). Hence: verify a zip
    from an untrusted place with tools/release/package_bundles.py first (it refuses before writing anything)."""
    from monai.bundle import download

    root, url = server
    evil = root / "evil"
    evil.mkdir()
    _zip(
        evil / "ctfm_evil.zip",
        [
            ("ctfm_evil/configs/metadata.json", b'{"version": "0.1.0"}', False),
            ("ctfm_evil/../../escaped.txt", b"x", False),
        ],
    )
    with pytest.raises(ValueError, match="Unsafe path"):
        download(name="ctfm_evil", url=f"{url}/evil/ctfm_evil.zip", bundle_dir=str(tmp_path / "zoo"), progress=False)
    assert not (tmp_path / "escaped.txt").exists()
    assert (tmp_path / "zoo" / "ctfm_evil" / "configs" / "metadata.json").is_file()  # the partial bundle
    with pytest.raises(dl.UnsafeArchiveError, match="'ctfm_evil/../../escaped.txt' contains a '..' component"):
        pb.verify(str(tmp_path / "zoo" / "ctfm_evil.zip"))


def test_hub_exports_load_with_the_ct_fm_release_loader(hub_repos):
    """config.json holds constructor arguments only, so lighter-zoo (the CT-FM release's loader,
    ``PyTorchModelHubMixin.from_pretrained``) builds our exports, with exactly our weights."""
    lighter_zoo = pytest.importorskip("lighter_zoo", reason="lighter-zoo not installed (requirements-nodeps.txt)")
    folders, states = hub_repos["folders"], hub_repos["states"]
    for kind, cls in (("encoder", lighter_zoo.SegResEncoder), ("seg", lighter_zoo.SegResNet)):
        model = cls.from_pretrained(str(folders[kind]))
        loaded = model.state_dict()
        assert set(loaded) == set(states[kind]), kind
        assert all(torch.equal(loaded[k], states[kind][k]) for k in loaded), kind
    # ... and our own loader still reads the same folders
    assert set(enc.read_state_dict(folders["encoder"])) == set(states["encoder"])


def test_hub_export_writes_repo_layout_and_model_card(hub_repos):
    folders = hub_repos["folders"]
    configs = {kind: json.loads((folder / "config.json").read_text()) for kind, folder in folders.items()}
    assert configs["encoder"] == {
        "spatial_dims": 3,
        "in_channels": 1,
        "init_filters": 8,
        "blocks_down": [1, 2, 2, 4, 4],
    }
    assert configs["seg"] == {
        "spatial_dims": 3,
        "in_channels": 1,
        "init_filters": 8,
        "blocks_down": [1, 2, 2, 4, 4],
        "out_channels": 118,
        "dsdepth": 4,
    }
    assert configs["triage"] == {
        "init_filters": 8,
        "in_channels": 1,
        "hidden_features": 256,
        "num_labels": 1,
    }
    from safetensors import safe_open

    for kind, folder in folders.items():
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            assert set(f.keys()) == set(hub_repos["states"][kind])
            header = f.metadata()
        bundle = header["bundle"]
        version = pb.read_metadata(BUNDLES_DIR / bundle)["version"]
        assert header["version"] == version
        card = (folder / "README.md").read_text()
        assert card.startswith("---\nlicense: apache-2.0\nlibrary_name: monai\n")
        assert (
            f"# {bundle} {version}" in card
            and REPOS[kind] in card
            and dl.sha256_of(folder / "model.safetensors") in card
        )
        assert "SPL" in card  # the preprocessing contract, from the metadata
        files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        assert files == sorted(
            pb.bundle_files(BUNDLES_DIR / bundle) + ["README.md", "config.json", "model.safetensors"]
        )
        snapshot = hub_repos["cache"] / f"models--{REPOS[kind].replace('/', '--')}"
        commit = (snapshot / "refs" / "main").read_text()
        assert (snapshot / "snapshots" / commit / "model.safetensors").read_bytes() == (
            folder / "model.safetensors"
        ).read_bytes()


def test_hub_repo_ids_load_offline_from_the_cache(offline_hub):
    states = offline_hub["states"]
    loaded = enc.read_state_dict(REPOS["encoder"])
    assert set(loaded) == set(states["encoder"]) and all(torch.equal(loaded[k], states["encoder"][k]) for k in loaded)
    seg = SegResNetDS(
        spatial_dims=3, in_channels=1, init_filters=8, blocks_down=(1, 2, 2, 4, 4), out_channels=118, dsdepth=4
    )
    report = enc.load_encoder_weights(seg, REPOS["encoder"])
    assert not report.missing and not report.unexpected and len(report.loaded) == len(states["encoder"])
    assert torch.equal(seg.encoder.conv_init.weight, states["encoder"]["conv_init.weight"])
    # the complete segmentation network's repo feeds a bare encoder too (its decoder reported, not loaded)
    report = enc.load_encoder_weights(enc.build_encoder(init_filters=8), REPOS["seg"])
    assert report.source_prefix == "encoder." and any(k.startswith("up_layers.") for k in report.unexpected)
    # the hub folder itself (a copy of the repo) is the same source
    assert set(enc.read_state_dict(offline_hub["folders"]["seg"])) == set(states["seg"])


def _bundle_parser(bundle: str, files: list[Path], **overrides) -> ConfigParser:
    use_bundle_scripts(BUNDLES_DIR / bundle)
    parser = ConfigParser()
    parser.read_config([str(f) for f in files])
    parser.update(overrides)
    return parser


def weight_options() -> list[tuple[str, list[Path], str, str, str]]:
    """Every config expression that loads weights from an option: (bundle, config files, id, option, network id).

    Multi-GPU overrides are left out (their network is DDP-wrapped, which needs a process group)."""
    found = []
    for bundle in BUNDLE_NAMES:
        for names in pb.config_sets(BUNDLES_DIR / bundle):  # override files merged after train.json
            files = [BUNDLES_DIR / bundle / n for n in names]
            if files[-1].name == "multi_gpu_train.json":
                continue
            content = ConfigParser.load_config_files([str(f) for f in files])
            own = ConfigParser.load_config_file(str(files[-1]))
            for where, text in pb.config_strings(content):
                match = re.search(r"load_\w+\(@(network\w*), @(encoder_ckpt|ckpt)\b", text)
                if match and where.split("#")[0] in own:
                    found.append((bundle, files, where, match.group(2), match.group(1)))
    return found


WEIGHT_OPTIONS = weight_options()


def _source_kind(bundle: str, option: str) -> str:
    if option == "encoder_ckpt" or bundle in ("ctfm_pretrain", "ctfm_retrieval"):
        return "encoder"
    return "seg" if bundle == SEG else "triage"


@pytest.fixture
def restore_path():
    with bundle_scripts_switch():
        yield


def test_every_weight_option_takes_a_hub_repo_id(offline_hub, restore_path):
    """``encoder_ckpt`` / ``ckpt`` wherever a config loads them: a repo id resolves from the offline cache and
    the network holds exactly the hub weights; the public CT-FM ids fail offline saying what to do."""
    options = {(b, o) for b, _, _, o, _ in WEIGHT_OPTIONS}
    assert {(b, "encoder_ckpt") for b in BUNDLE_NAMES} <= options  # every bundle starts from encoder weights
    assert {(SEG, "ckpt"), ("ctfm_triage", "ckpt"), ("ctfm_pretrain", "ckpt")} <= options
    for bundle, files, where, option, network_id in WEIGHT_OPTIONS:
        kind = _source_kind(bundle, option)
        parser = _bundle_parser(bundle, files, init_filters=8, **{option: REPOS[kind], "input": "ct.nii.gz"})
        parser.get_parsed_content(where)
        encoder, _ = enc.encoder_of(parser.get_parsed_content(network_id))
        reference = offline_hub["states"][kind]
        key = "conv_init.weight" if kind == "encoder" else "encoder.conv_init.weight"
        assert torch.equal(encoder.conv_init.weight, reference[key]), (bundle, where)
        public = PUBLIC.get(kind)
        if public is None:  # no public triage model exists
            continue
        parser = _bundle_parser(bundle, files, init_filters=8, **{option: public, "input": "ct.nii.gz"})
        with pytest.raises(Exception) as failure:
            parser.get_parsed_content(where)
        chain, error = [], failure.value
        while error is not None:
            chain.append(str(error))
            error = error.__cause__ or error.__context__
        text = "\n".join(chain)
        assert f"cannot download '{public}' from the Hugging Face hub" in text, (bundle, where, text[-2000:])
        assert "pass the local folder or its model.safetensors" in text


def test_an_explicit_hash_must_be_64_hex_and_a_zip_bomb_is_refused(tmp_path):
    """``--sha256 ""`` and an all-digit hash (parsed as a number) are refused, not taken as "no hash"; a member
    that expands 1000x, or members adding up past the size cap, are refused before anything is written."""
    path = _zip(tmp_path / "ctfm_ok_v0.1.0.zip", [("ctfm_ok/configs/metadata.json", b'{"version": "0.1.0"}', False)])
    for bad in ("", 1234567890 * 10**54, "12ab"):
        with pytest.raises(SystemExit, match="--sha256: .*64 hexadecimal characters"):
            pb.extract(str(path), bundle_dir=str(tmp_path / "out"), sha256=bad)
        with pytest.raises(SystemExit, match="--sha256: .*64 hexadecimal characters"):
            pb.verify(str(path), sha256=bad)
    assert not (tmp_path / "out").exists()
    assert pb.verify(str(path), sha256=dl.sha256_of(path).upper())["hash_checked"]
    # through the command line too: fire turns an all-digit hash into an int
    proc = subprocess.run(
        [sys.executable, "-m", "ctfm_bundles.tools.release.package_bundles", "extract", str(path), "--sha256", "1" * 64,
         "--bundle_dir", str(tmp_path / "out")], capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0 and "quote an all-digit hash" in proc.stderr and not (tmp_path / "out").exists()

    bomb = tmp_path / "ctfm_bomb_v0.1.0.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("ctfm_bomb/configs/metadata.json", b'{"version": "0.1.0"}')
        archive.writestr("ctfm_bomb/models/zeros.bin", b"\x00" * (64 * 2**20))
    with pytest.raises(dl.UnsafeArchiveError, match=r"member 'ctfm_bomb/models/zeros.bin' expands \d+x .*zip bomb"):
        pb.verify(str(bomb))
    with pytest.raises(dl.UnsafeArchiveError, match="zip bomb"):
        dl.safe_extract(bomb, tmp_path / "out")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").rglob("*"))
    with mock.patch.object(dl, "MAX_UNCOMPRESSED_BYTES", 10):
        with pytest.raises(dl.UnsafeArchiveError, match="bytes uncompressed, above the limit of 10"):
            pb.verify(str(path))
