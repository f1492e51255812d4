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
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLES_DIR = REPO_ROOT / "bundles"
SHARED_DIR = REPO_ROOT.parent / "shared"
SHARED_DATA = SHARED_DIR / "data"
META_SCHEMA = REPO_ROOT / "schemas" / "meta_schema.json"  # MONAI's published schema, carried (schemas/README.md)
BUNDLE_NAMES = sorted(p.parents[1].name for p in BUNDLES_DIR.glob("*/configs/metadata.json"))

from ctfm_bundles.tools.demo import bundle_command  # noqa: E402  (one definition of how a bundle is run)


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
