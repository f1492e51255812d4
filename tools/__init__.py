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
"""The repository's tools, grouped by the stage of the pipeline they serve (installed as ``ctfm_bundles.tools``).

- ``data/``: getting real CTs and writing the bundles' datalists (IDC corpus, TotalSegmentator, triage CSV);
- ``synthetic/``: phantom CTs with label maps (tests, demo, benchmarks);
- ``release/``: the bundles' generated copies, Model Zoo packaging and Hugging Face hub repos;
- ``bench/``: benchmarks, run by hand;
- ``demo.py`` and the ``*.sh`` front doors: the main job, the test suite and the environment.

``pip install --no-deps -e .`` (tools/setup_env.sh) makes them importable and installs their console commands
(``[project.scripts]`` of pyproject.toml). Bundles never import this package: each bundle runs copied alone.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]  # the source checkout the tools work on (bundles/, ctfm_common/)


def forget_bundle_scripts() -> None:
    """Drop every imported ``scripts`` module: each bundle has its own ``scripts`` package, never two at once."""
    for name in [m for m in sys.modules if m == "scripts" or m.startswith("scripts.")]:
        del sys.modules[name]


def use_bundle_scripts(bundle_folder: str | os.PathLike) -> None:
    """Make ``import scripts`` (and a config's ``$import scripts``) find this bundle's package, as
    ``python -m monai.bundle run`` does for the bundle it runs: the folder first on ``sys.path``, any other
    bundle's ``scripts`` forgotten. The one place tools and tests do this; bundles never need it."""
    forget_bundle_scripts()
    folder = str(bundle_folder)
    if folder in sys.path:
        sys.path.remove(folder)
    sys.path.insert(0, folder)


@contextlib.contextmanager
def bundle_scripts_switch() -> Iterator[Callable[[str | os.PathLike], None]]:
    """Yields :func:`use_bundle_scripts`; on exit ``sys.path`` is as before and no ``scripts`` stays imported."""
    saved = list(sys.path)
    try:
        yield use_bundle_scripts
    finally:
        sys.path[:] = saved
        forget_bundle_scripts()
