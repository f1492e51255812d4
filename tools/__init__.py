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

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]  # the source checkout the tools work on (bundles/, ctfm_common/)
