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
"""Python API and console commands over the CT-FM bundles (installed by ``pip install .``).

Each command runs a bundle's own config through MONAI's bundle API, exactly as
``python -m monai.bundle run --config_file <bundle>/configs/<config>.json`` does; nothing is
re-implemented here. Installed, the bundles travel inside this package (``ctfm_bundles/bundles``);
in a source checkout they are the repository's ``bundles/``.
"""

from __future__ import annotations

from pathlib import Path


def __getattr__(name: str):
    """``ctfm_bundles.segment``: :func:`ctfm_bundles.wholebody.segment`, imported when first used."""
    if name == "segment":
        from .wholebody import segment

        return segment
    raise AttributeError(f"module 'ctfm_bundles' has no attribute '{name}'")


def bundle_dir(name: str) -> Path:
    """The folder of bundle ``name`` (holding ``configs/metadata.json``).

    Raises:
        FileNotFoundError: no such bundle, naming where it was looked for.
    """
    here = Path(__file__).resolve().parent
    roots = [here / "bundles", here.parent / "bundles"]
    for root in roots:
        if (root / name / "configs" / "metadata.json").is_file():
            return root / name
    raise FileNotFoundError(f"bundle '{name}' not found in {' or '.join(str(r) for r in roots)}")
