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
"""Package the shared code (``ctfm_common/``) into every bundle as ``scripts/ctfm_common/``.

The model zoo and MONAI Label copy one bundle folder, so each bundle must carry the shared
code it runs. ``ctfm_common/`` is the only place to edit it; this build step writes the
copies, each stamped with where it came from, and ``--check`` (run by the test suite)
fails when a copy has drifted. A bundle gets only the modules it uses (:func:`used_modules`):
those its ``scripts/`` import or its configs name (``scripts.ctfm_common.<module>``), and
what those import in turn; a copy it no longer uses is removed.

It also writes the config copies of :data:`CONFIG_COPIES`: the Model Zoo's CI looks for
``configs/inference.json`` in every bundle, and the retrieval bundle's inference is its embed
workflow, so ``ctfm_retrieval/configs/inference.json`` is ``embed.json`` byte for byte (edit
``embed.json``).

Usage::

    ctfm-sync-bundles            # write the copies
    ctfm-sync-bundles --check    # exit 1 and list stale copies
"""

from __future__ import annotations

import ast
import os
import re
import sys
from pathlib import Path

import fire

from ctfm_bundles.tools import REPO_ROOT

SOURCE = REPO_ROOT / "ctfm_common"
BUNDLES_DIR = REPO_ROOT / "bundles"
TARGET = Path("scripts") / "ctfm_common"
# bundle -> {generated config: its source config} (JSON carries no stamp: the pair is listed here)
CONFIG_COPIES = {"ctfm_retrieval": {"inference.json": "embed.json"}}
STAMP = "# GENERATED from ctfm_common/{name} by ctfm-sync-bundles: edit the source, not this copy.\n"


def bundle_dirs(bundles_dir: Path = BUNDLES_DIR) -> list[Path]:
    """Every bundle folder (one with ``configs/metadata.json``), sorted."""
    return sorted(p.parents[1] for p in bundles_dir.glob("*/configs/metadata.json"))


def _imported(path: Path, package: str | None) -> set[str]:
    """Names of the shared modules ``path`` imports: relative imports of ``package`` (a bundle script:
    ``from .ctfm_common[.x] import ...``), or, with ``package`` ``None``, of its own package (a shared
    module: ``from .x import ...``, ``from . import x``)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if not isinstance(node, ast.ImportFrom) or node.level != 1:
            continue
        parts = (node.module or "").split(".")
        if package is not None:
            if parts[0] != package:
                continue
            parts = parts[1:]
        names |= {parts[0]} if parts and parts[0] else {alias.name for alias in node.names}
    return names


def used_modules(bundle: Path, source: Path = SOURCE) -> set[str]:
    """The shared modules ``bundle`` runs: those its ``scripts/*.py`` import or its configs name
    (``scripts.ctfm_common.<module>``), and every shared module those import, transitively."""
    available = {p.stem for p in source.glob("*.py")} - {"__init__"}
    todo = set()
    for script in (bundle / "scripts").glob("*.py"):
        todo |= _imported(script, TARGET.name)
    for config in (bundle / "configs").glob("*.json"):
        todo |= set(re.findall(r"scripts\.ctfm_common\.(\w+)", config.read_text()))
    used: set[str] = set()
    while todo:
        name = todo.pop()
        if name in used or name not in available:
            continue
        used.add(name)
        todo |= _imported(source / f"{name}.py", None)
    return used


def expected_copies(source: Path = SOURCE, bundles_dir: Path = BUNDLES_DIR) -> dict[Path, str]:
    """Map each generated file path to the content it must have."""
    files = {}
    for bundle in bundle_dirs(bundles_dir):
        used = used_modules(bundle, source) | {"__init__"}
        for src in sorted(p for p in source.glob("*.py") if p.stem in used):
            files[bundle / TARGET / src.name] = STAMP.format(name=src.name) + src.read_text()
        for copy, original in CONFIG_COPIES.get(bundle.name, {}).items():
            if (bundle / "configs" / original).is_file():
                files[bundle / "configs" / copy] = (bundle / "configs" / original).read_text()
    return files


def stale_copies(source: Path = SOURCE, bundles_dir: Path = BUNDLES_DIR) -> list[Path]:
    """Generated files that are missing, differ from their source, or have no source any more."""
    expected = expected_copies(source, bundles_dir)
    stale = [p for p, text in expected.items() if not p.is_file() or p.read_text() != text]
    for bundle in bundle_dirs(bundles_dir):
        stale += [p for p in (bundle / TARGET).glob("*.py") if p not in expected]
    return sorted(stale)


def sync(*, check: bool = False) -> None:
    """Write (or with ``check``, verify) the shared code copies in every bundle.

    Args:
        check: only report stale copies; exit with status 1 if there are any.

    """
    stale = stale_copies()
    rel = [str(p.relative_to(REPO_ROOT)) for p in stale]
    if check:
        if rel:
            print("stale shared-code copies (run `ctfm-sync-bundles`):\n  " + "\n  ".join(rel))
            sys.exit(1)
        print("shared-code copies are up to date")
        return
    expected = expected_copies()
    for path, line in zip(stale, rel):
        if path not in expected:  # a module the bundle no longer uses
            path.unlink()
            print(f"removed {line}")
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(expected[path])
        os.replace(tmp, path)
        print(f"wrote {line}")


def cli() -> None:
    """The console command (``[project.scripts]`` of pyproject.toml)."""
    fire.Fire(sync)


if __name__ == "__main__":
    cli()
