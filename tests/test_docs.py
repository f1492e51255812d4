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
"""The documented commands cannot rot: every fenced ``bash`` block of the README, each bundle's
``docs/README.md`` and ``docs/packaging.md`` is extracted and checked.

- ``python -m monai.bundle run|ckpt_export``: the config files exist (from the directory the
  block ``cd``'s into), MONAI's ``ConfigParser`` reads them, the run id and every ``--id``
  override exist in them (nested ``a#b`` ids included), and the whole set of documented
  overrides merges into the config;
- ``python -m monai.bundle download``: the bundle exists and a literal ``--version`` is its
  current version;
- ``python tools/<tool>.py <command>`` and ``bash tools/<script>.sh``: the tool exists and has
  that command; paths under ``bundles/`` exist;
- cheap tool commands (:data:`RUN`) actually run, in a scratch folder.

Commands that need data, a GPU or the network (paths such as ``data/...``) are checked this way
only; the bundles' workflows themselves run on phantoms in the bundle test modules.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from string import Template

import pytest
from conftest import BUNDLES_DIR, REPO_ROOT
from monai.bundle import ConfigParser

DOCS = [REPO_ROOT / "README.md", REPO_ROOT / "docs" / "packaging.md", *sorted(BUNDLES_DIR.glob("*/docs/README.md"))]
# monai.bundle arguments that are not config ids
MONAI_ARGS = {"config_file", "meta_file", "logging_file", "args_file", "tracking", "bundle_root", "net_id", "filepath",
              "ckpt_file", "key_in_ckpt", "use_trace", "input_shape", "converter_kwargs"}
# documented commands cheap enough to run in the suite (prefix match on the command line)
CREATED = {"bundles_dl", "apps"}  # folders that earlier documented commands create
RUN = ("python tools/phantom.py dataset --output_dir demo/phantoms --num_cases 2", "python tools/sync_bundles.py --check")


def doc_commands(path: Path) -> list[tuple[str, Path, dict]]:
    """``(command line, working directory, shell variables)`` of every command in ``path``'s bash blocks."""
    commands = []
    variables: dict[str, str] = {}  # a doc defines B=... once for its later blocks
    for block in re.findall(r"```bash\n(.*?)```", path.read_text(), re.S):
        block = re.sub(r"<<'(\w+)'\n.*?\n\1\n", "\n", block, flags=re.S)  # heredocs are Python, not commands
        block = re.sub(r"\\\n\s*", " ", block)
        cwd = REPO_ROOT
        for line in block.splitlines():
            for part in (p.strip() for p in line.split("&&")):
                if not part or part.startswith("#"):
                    continue
                assignment = re.fullmatch(r"([A-Z_]+)=(.*)", part.split("   #")[0].strip())
                if assignment:
                    value = assignment.group(2)
                    variables[assignment.group(1)] = "VALUE" if value.startswith("$(") else shlex.split(value)[0]
                    continue
                if part.startswith("cd "):
                    target = shlex.split(part)[1]
                    cwd = REPO_ROOT if target == "-" else (cwd / target).resolve()
                    continue
                commands.append((Template(part).safe_substitute(variables), cwd, dict(variables)))
    return commands


ALL = [(path, *command) for path in DOCS for command in doc_commands(path)]


def options(tokens: list[str]) -> tuple[list[str], dict[str, str]]:
    """Positional tokens and ``--key value`` pairs (``[--flag value]`` optional syntax allowed)."""
    positional, pairs, i = [], {}, 0
    while i < len(tokens):
        optional = tokens[i].startswith("[--")
        token = tokens[i].lstrip("[").rstrip("]") if optional else tokens[i]
        if token.startswith("--"):
            value = tokens[i + 1] if i + 1 < len(tokens) and not tokens[i + 1].startswith(("--", "[--")) else ""
            pairs[token[2:]] = value[:-1] if optional and value.endswith("]") else value
            i += 2 if value else 1
        elif token != "...":
            positional.append(token)
            i += 1
        else:
            i += 1
    return positional, pairs


def check_monai_bundle(tokens: list[str], cwd: Path, where: str) -> None:
    command = tokens[0]
    positional, pairs = options(tokens[1:])
    if command == "download":
        bundle = BUNDLES_DIR / pairs["name"]
        assert bundle.is_dir(), f"{where}: no bundle {pairs['name']}"
        version = pairs.get("version", "$V")
        if not version.startswith("$") and version != "VALUE":
            current = json.loads((bundle / "configs" / "metadata.json").read_text())["version"]
            assert version == current, f"{where}: documents version {version}, the bundle is {current}"
        return
    if command not in ("run", "ckpt_export"):
        return
    files = pairs["config_file"]
    files = ast.literal_eval(files) if files.startswith("[") else [files]
    paths = [(cwd / f) for f in files]
    if Path(files[0]).parts[0] in CREATED:
        return  # a bundle the documented steps download first
    for p in paths:
        assert p.is_file(), f"{where}: config {p} does not exist"
    parser = ConfigParser()
    parser.read_config([str(p) for p in paths])
    if command == "run" and positional:
        assert positional[0] in parser, f"{where}: run id '{positional[0]}' is not in {files}"
    for key in pairs:
        if key not in MONAI_ARGS:
            assert key in parser, f"{where}: override --{key} is not an id of {files}"


@pytest.mark.parametrize(("doc", "line", "cwd", "variables"), ALL,
                         ids=[f"{p.relative_to(REPO_ROOT)}:{c[:60]}" for p, c, _, _ in ALL])
def test_documented_command_resolves(doc, line, cwd, variables):
    where = f"{doc.relative_to(REPO_ROOT)}: {line}"
    try:
        tokens = shlex.split(line, comments=True)
    except ValueError as e:
        pytest.fail(f"{where}: does not parse as a shell command ({e})")
    if not tokens:
        return
    if tokens[0] == "torchrun":
        tokens = tokens[tokens.index("-m"):]
        tokens = ["python", *tokens]
    if tokens[:3] == ["python", "-m", "monai.bundle"]:
        check_monai_bundle(tokens[3:], cwd, where)
    elif tokens[0] in ("python", "bash") and len(tokens) > 1 and tokens[1].startswith("tools/"):
        tool = REPO_ROOT / tokens[1]
        assert tool.is_file(), f"{where}: {tokens[1]} does not exist"
        if tool.suffix == ".py" and len(tokens) > 2 and not tokens[2].startswith("-"):
            text = tool.read_text()
            assert re.search(rf"def {tokens[2]}\(|\"{tokens[2]}\":", text), f"{where}: {tokens[1]} has no '{tokens[2]}'"


def test_cheap_documented_commands_run(tmp_path):
    ran = []
    for doc, line, cwd, _ in ALL:
        if not line.startswith(RUN):
            continue
        tokens = shlex.split(line, comments=True)
        tokens[0] = sys.executable
        tokens[1] = str(REPO_ROOT / tokens[1])
        proc = subprocess.run(tokens, cwd=tmp_path if "phantom" in line else REPO_ROOT, capture_output=True, text=True,
                              timeout=300, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
        assert proc.returncode == 0, f"{doc}: {line}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
        ran.append(line)
    assert len(ran) >= 2, ran
    datalist = json.loads((tmp_path / "demo" / "phantoms" / "datalist.json").read_text())
    assert len(datalist["training"]) + len(datalist.get("validation", [])) == 2


def test_environment_variables_of_the_front_door_scripts_are_documented():
    readme = (REPO_ROOT / "README.md").read_text()
    names = set()
    for script in (REPO_ROOT / "tools").glob("*.sh"):  # the front-door scripts and what they source
        if script.name not in ("run_demo.sh", "run_tests.sh", "setup_env.sh"):
            continue
        names |= set(re.findall(r"\$\{([A-Z_]+):-", script.read_text()))
    assert "CTFM_VENV" in names
    assert [n for n in sorted(names) if f"`{n}`" not in readme] == []


def test_documented_demo_encoder_paths_are_where_the_pretrain_demo_writes():
    """``--encoder_ckpt .../demo/pretrain/...`` must name the file the documented pretraining writes."""
    written = {(REPO_ROOT / "outputs/demo/pretrain/models/encoder.safetensors").resolve()}  # tools/demo.py
    uses = []
    for doc, line, cwd, _ in ALL:
        _, pairs = options(shlex.split(line, comments=True))
        if "bundles/ctfm_pretrain/configs/train.json" in pairs.get("config_file", "") and "ckpt_dir" in pairs:
            written.add((cwd / pairs["ckpt_dir"] / "encoder.safetensors").resolve())
        if "demo/pretrain" in pairs.get("encoder_ckpt", ""):
            uses.append((doc, line, (cwd / pairs["encoder_ckpt"]).resolve()))
    assert uses
    for doc, line, path in uses:
        assert path in written, f"{doc.relative_to(REPO_ROOT)}: {line}\n  {path} is not written by the pretrain demo"
