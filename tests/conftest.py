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
"""Shared test helpers: repo paths, the real CT data in ../shared/data, and running bundles.

Bundle workflows run in subprocesses through ``python -m monai.bundle run``, exactly as a
user runs them, so two bundles' ``scripts`` packages never meet in one interpreter.
"""

from __future__ import annotations

import contextlib
import csv
import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ctfm_bundles.tools.demo import bundle_command  # one definition of how a bundle is run

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLES_DIR = REPO_ROOT / "bundles"
SHARED_DIR = REPO_ROOT.parent / "shared"
SHARED_DATA = SHARED_DIR / "data"
META_SCHEMA = REPO_ROOT / "schemas" / "meta_schema.json"  # MONAI's published schema, carried (schemas/README.md)
BUNDLE_NAMES = sorted(p.parents[1].name for p in BUNDLES_DIR.glob("*/configs/metadata.json"))


def run_bundle(
    bundle: str,
    configs: str | list[str],
    run_id: str = "run",
    *,
    cwd: str | os.PathLike | None = None,
    timeout: float = 900,
    check: bool = True,
    **overrides,
) -> subprocess.CompletedProcess:
    """Run ``python -m monai.bundle run <run_id> --config_file ...`` for a bundle, as a user would.

    Args:
        bundle: bundle folder name under ``bundles/``.
        configs: config file name(s) under the bundle's ``configs/`` (merged in order).
        run_id: the runnable id.
        cwd: working directory (default: a neutral one, the repo root, to prove configs do not
            depend on it).
        timeout: seconds before the run is killed.
        check: raise with the run's output when it exits non-zero.
        overrides: ``--id value`` overrides.

    Returns:
        The completed process, with ``stdout``/``stderr`` text.
    """
    cmd = bundle_command(bundle, configs, run_id, **overrides)
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    proc = subprocess.run(cmd, cwd=cwd or REPO_ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"bundle run failed ({proc.returncode}): {' '.join(cmd)}\n--- stdout ---\n{proc.stdout[-6000:]}"
            f"\n--- stderr ---\n{proc.stderr[-6000:]}"
        )
    return proc


@contextlib.contextmanager
def serve_folder(folder: str | os.PathLike):
    """A plain HTTP server on 127.0.0.1 serving ``folder`` while the block runs; yields its base URL."""
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args, **kwargs: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (real CTs with labels); tests that need it skip with the reason when absent."""
    if not (SHARED_DATA / "totalseg_example" / "ct_small.nii.gz").is_file():
        pytest.skip(f"real CT test data not found at {SHARED_DATA} (it ships beside the repo as ../shared/data)")
    return SHARED_DATA


def tensorboard_scalars(log_dir: str | os.PathLike) -> dict[str, list[float]]:
    """Every scalar tag in the TensorBoard event files of ``log_dir``: ``{tag: [values by step]}``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, list[tuple[int, float]]] = {}
    for events in sorted(Path(log_dir).glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in accumulator.Scalars(tag))
    return {tag: [v for _, v in sorted(values)] for tag, values in scalars.items()}


def bundle_scripts(bundle: str, *submodules: str):
    """Bundle ``bundle``'s ``scripts`` package (and its ``submodules``), imported under the unique name
    ``<bundle>_scripts``: tests of several bundles share one interpreter without their ``scripts`` clashing,
    and nothing is added to ``sys.path``."""
    name = f"{bundle}_scripts"
    if name not in sys.modules:
        root = BUNDLES_DIR / bundle / "scripts"
        spec = importlib.util.spec_from_file_location(name, root / "__init__.py",
                                                      submodule_search_locations=[str(root)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    for sub in submodules:
        importlib.import_module(f"{name}.{sub}")
    return sys.modules[name]


def read_safetensors(path: str | os.PathLike) -> tuple[dict, dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def read_csv_rows(path: str | os.PathLike) -> list[dict]:
    """The rows of a CSV file with a header, as dicts."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# --- ctfm_retrieval: the scans, embeddings, index and in-process recipe that tests/retrieval/ share ----------------
# (session fixtures: the embed run is the costliest step of those tests and runs once for all their files)

RETRIEVAL = "ctfm_retrieval"
RETRIEVAL_FAST = {"init_filters": 8, "patch_size": [8, 32, 32], "overlap": 0.0, "num_workers": 0, "batch_size": 8}
RETRIEVAL_BODY = ("body0", "body1")
RETRIEVAL_HEAD = ("head0", "head1")


def retrieval_scripts():
    """ctfm_retrieval's ``scripts`` (as ``ctfm_retrieval_scripts``) with the modules the tests call."""
    return bundle_scripts(RETRIEVAL, "embedding", "evaluation", "metrics", "vector_index")


def retrieval_case_names(scans: dict) -> list[str]:
    """The case names that embedding ``scans`` gives (the phantoms, and ct_small when it is there)."""
    return sorted([*RETRIEVAL_BODY, *RETRIEVAL_HEAD] + (["ct_small"] if scans["real"] else []))


@pytest.fixture(scope="session")
def scans(tmp_path_factory) -> dict:
    """Two body and two head phantoms, a corrupt file, ct_small when available, and encoder weights."""
    import torch

    from ctfm_bundles.tools.synthetic import phantom
    from ctfm_common import encoder as enc

    root = tmp_path_factory.mktemp("retrieval")
    (root / "scans").mkdir()
    for kind, names in (("body", RETRIEVAL_BODY), ("head", RETRIEVAL_HEAD)):
        for i, name in enumerate(names):
            phantom.write_phantom(
                output=str(root / "scans" / f"{name}.nii.gz"),
                kind=kind,
                shape=(40, 40, 16),
                spacing=(3.0, 3.0, 3.0),
                seed=i,
                label_output=str(root / f"{name}_labels.nii.gz"),
            )
    (root / "scans" / "broken.nii.gz").write_bytes(b"not a nifti file")
    real = SHARED_DATA / "totalseg_example" / "ct_small.nii.gz"
    if real.is_file():
        shutil.copy(real, root / "scans" / "ct_small.nii.gz")
    phantom.write_phantom(
        output=str(root / "new_body.nii.gz"),
        kind="body",
        shape=(40, 40, 16),
        spacing=3.0,
        seed=7,
        label_output=str(root / "new_body_labels.nii.gz"),
    )
    torch.manual_seed(0)
    ckpt = enc.save_encoder_weights(enc.build_encoder(init_filters=8), root / "encoder.safetensors")
    return {"root": root, "glob": str(root / "scans" / "*.nii.gz"), "ckpt": str(ckpt), "real": real.is_file()}


@pytest.fixture(scope="session")
def embedded(scans) -> dict:
    """embed.json over the glob, with patch embeddings and min aggregation."""
    out = scans["root"] / "out_a"
    proc = run_bundle(
        RETRIEVAL,
        "embed.json",
        input=scans["glob"],
        output_dir=str(out),
        encoder_ckpt=scans["ckpt"],
        save_patches=True,
        aggregation="min",
        **RETRIEVAL_FAST,
    )
    return {"out": out, "emb": out / "embeddings", "log": proc.stdout + proc.stderr}


@pytest.fixture(scope="session")
def local(scans) -> dict:
    """The embed recipe built in this process (the preprocessing of embed.json, the trained-weights encoder)."""
    from monai import transforms as mt

    scripts = retrieval_scripts()
    preprocessing = mt.Compose(
        [
            mt.LoadImaged("image", image_only=True),
            mt.EnsureChannelFirstd("image"),
            mt.Orientationd("image", "SPL"),
            mt.Spacingd("image", (3.0, 1.0, 1.0)),
            mt.CropForegroundd("image", "image"),  # MONAI's default x > 0: HU > 0, as in CT-FM
            mt.ScaleIntensityRanged("image", -1024, 2048, 0, 1, clip=True),
            mt.SpatialPadd("image", (8, 32, 32)),
        ]
    )
    net = scripts.encoder.load_encoder(scripts.encoder.PooledEncoderHead(init_filters=8), scans["ckpt"]).eval()
    settings = scripts.embedding.embedding_settings(
        aggregation="min",
        patch_size=(8, 32, 32),
        overlap=RETRIEVAL_FAST["overlap"],
        spacing=(3.0, 1.0, 1.0),
        init_filters=8,
        encoder_ckpt=scans["ckpt"],
    )
    return {"preprocessing": preprocessing, "network": net, "settings": settings}


@pytest.fixture(scope="session")
def indexed(embedded) -> Path:
    """The index built in this process (index.json itself runs in the incremental-add test)."""
    retrieval_scripts().vector_index.build_index(embeddings_dir=embedded["emb"], index_dir=embedded["out"] / "index")
    return embedded["out"] / "index"
