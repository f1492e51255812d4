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
``docs/README.md`` and ``docs/*.md`` is extracted, checked and run.

Checked (every command):

- ``python -m monai.bundle run|ckpt_export``: the config files exist (from the directory the
  block ``cd``'s into), MONAI's ``ConfigParser`` reads them, the run id and every ``--id``
  override exist in them (nested ``a#b`` ids included), and the whole set of documented
  overrides merges into the config;
- ``python -m monai.bundle download``: the bundle exists and a literal ``--version`` is its
  current version;
- the console commands of pyproject.toml's ``[project.scripts]`` (``ctfm-<tool> <command>``): the
  command is declared, its module imports and has that command; ``bash tools/<script>.sh``: the
  script exists.

Run (:func:`test_documented_commands_run_on_phantoms`): each document's commands run in order, as a
user types them, in a scratch folder that stands in for the repository root, on tiny phantoms with
tiny sizes (:data:`TINY` replaces the documented sizes); later documents reuse earlier outputs (the
pretrained encoder, the segmentation model: :data:`OUTPUTS`). To stay within the suite's time budget,
ONE representative runs per (bundle configs + run id) or (tool + verb): the first in :data:`RUN_ORDER`;
the others with the same key, and commands with an elided ``...``, are checked as above only (e.g. the
seg and triage demo trainings, whose inference and training runs already ran with the same configs).
Downloads run against a server on 127.0.0.1. Commands that cannot run offline on a CPU are listed in
:data:`EXEMPT` with the reason; a documented command that is neither run nor exempt fails
:func:`test_every_documented_command_runs_or_is_exempt_with_a_reason`.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from string import Template

import numpy as np
import pytest
from conftest import BUNDLES_DIR, REPO_ROOT, serve_folder
from monai.bundle import ConfigParser

DOCS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md")),
        *sorted(BUNDLES_DIR.glob("*/docs/README.md"))]
# monai.bundle arguments that are not config ids
MONAI_ARGS = {"config_file", "meta_file", "logging_file", "args_file", "tracking", "bundle_root", "net_id", "filepath",
              "ckpt_file", "key_in_ckpt", "use_trace", "input_shape", "converter_kwargs"}
CREATED = {"bundles_dl", "apps"}  # folders that earlier documented commands create
# console command -> "module:function" (pyproject.toml's [project.scripts]; ctfm-segment has its own checks)
CONSOLE = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]


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
    elif tokens[0] == "ctfm-segment" or tokens[:3] == ["python", "-m", "ctfm_bundles.wholebody"]:
        from ctfm_bundles.wholebody import parse_args

        _, overrides = parse_args(tokens[1:] if tokens[0] == "ctfm-segment" else tokens[3:])
        parser = ConfigParser()
        parser.read_config(str(BUNDLES_DIR / "ctfm_wholebody_seg" / "configs" / "inference.json"))
        unknown = [k for k in overrides if k not in parser]
        assert not unknown, f"{where}: {unknown} are not ids of ctfm_wholebody_seg/configs/inference.json"
    elif tokens[0] in CONSOLE:
        import importlib

        module = importlib.import_module(CONSOLE[tokens[0]].partition(":")[0])
        if len(tokens) > 1 and not tokens[1].startswith("-"):
            text = Path(module.__file__).read_text()
            assert re.search(rf"def {tokens[1]}\(|\"{tokens[1]}\":", text), f"{where}: {tokens[0]} has no '{tokens[1]}'"
    elif tokens[0].startswith("ctfm-"):
        pytest.fail(f"{where}: {tokens[0]} is not a console command of pyproject.toml's [project.scripts]")
    elif tokens[0] == "bash" and len(tokens) > 1 and tokens[1].startswith("tools/"):
        assert (REPO_ROOT / tokens[1]).is_file(), f"{where}: {tokens[1]} does not exist"


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


# --- the documented commands run -------------------------------------------------------------------
#
# Each document's commands run in order in one interpreter (tests/project/doc_command_runner.py) inside its own
# scratch folder, which stands in for the repository root: a copy of bundles/ (so commands that write into a
# bundle's models/ or read its defaults work as documented), and the documented placeholder
# inputs (ct.nii.gz, data/..., labels.csv, /data/... read as data/...) written once as tiny phantoms.
# Documented sizes are replaced by TINY ones. Of each (bundle configs + run id) or (tool + verb), the first
# runnable command in RUN_ORDER runs; later ones with the same key, and commands with an elided "...", are
# checked parse-only (test_documented_command_resolves). Commands that cannot run offline on a CPU are
# in EXEMPT, with the reason.

EXEMPT = {  # command prefix (the whole command when it ends with $) -> why the suite does not run it
    "torchrun ": "multi-GPU data parallel (NCCL); its one-process form runs",
    "sbatch ": "a SLURM array job; the embed command it wraps runs",
    "bash tools/run_demo.sh": "the main job (and its venv setup); tests/tools/test_demo.py runs tools/demo.py end to end",
    "bash tools/run_tests.sh": "the test suite itself",
    "pip install": "installs from a package index (network)",
    "monailabel ": "MONAI Label app download and server (network, long-lived); tests/seg/test_monailabel.py serves "
                   "the bundle",
    "mkdir -p apps/": "MONAI Label app setup, with the monailabel commands beside it",
    "cp -r bundles/ctfm_wholebody_seg apps/": "MONAI Label app setup, with the monailabel commands beside it",
    "python - ": "a Python snippet of the MONAI Label app setup (heredoc)",
    "hf upload": "uploads to the Hugging Face hub (network, token)",
    "python -m monai.bundle download --name ctfm_wholebody_seg --source github": "a GitHub release (network); the "
                                                                                 "--url form runs on a loopback server",
    "ctfm-sync-bundles$": "rewrites this repository's bundle copies; its --check form runs",
    "ctfm-bench-": "a full-size benchmark (minutes); benchmarks run by hand, never timed in the suite",
    "ctfm-idc ": "the IDC corpus: download fetches from IDC's buckets (network) and the other steps work on "
                            "its results; tests/tools/test_idc.py runs select, download (local S3 stand-in) and convert",
}
# documents in the order their commands run (later ones reuse earlier outputs), each in its scratch folder
RUN_ORDER = [("pretrain", "bundles/ctfm_pretrain/docs/README.md"), ("seg", "bundles/ctfm_wholebody_seg/docs/README.md"),
             ("triage", "bundles/ctfm_triage/docs/README.md"), ("retrieval", "bundles/ctfm_retrieval/docs/README.md"),
             ("repo", "README.md"), ("repo", "docs/packaging.md"), ("repo", "docs/phantom.md")]
_SEG_TINY = {"init_filters": "8", "spacing": "[8,8,8]", "patch_size": "[32,32,32]", "max_epochs": "1",
             "batch_size": "1", "num_workers": "0", "sw_batch_size": "1"}
_EMBED_TINY = {"init_filters": "8", "spacing": "[6,6,6]", "patch_size": "[16,32,32]", "overlap": "0",
               "num_workers": "0", "batch_size": "2"}
_TRIAGE_TINY = {"init_filters": "8", "spacing": "[10,6,6]", "roi_size": "[16,32,32]", "max_epochs": "1",
                "batch_size": "2", "num_workers": "0", "num_bootstrap": "10"}
TINY = {  # first config (bundle/config) or tool -> overrides that replace the documented ones
    "ctfm_pretrain/train.json": {"init_filters": "8", "spacing": "[3,3,3]", "patch_size": "[16,32,32]",
                                 "num_crops": "2", "batch_size": "1", "max_epochs": "1", "epoch_length": "2",
                                 "checkpoint_interval": "2", "warmup_epochs": "0", "num_workers": "0"},
    "ctfm_wholebody_seg/train.json": _SEG_TINY,
    "ctfm_wholebody_seg/inference.json": {"init_filters": "8", "spacing": "[8,8,8]", "roi_size": "[32,32,32]",
                                          "sw_batch_size": "1", "overlap": "0"},
    "ctfm-segment": {"init_filters": "8", "spacing": "[8,8,8]", "roi_size": "[32,32,32]", "overlap": "0",
                     "ckpt": "bundles/ctfm_wholebody_seg/models/model.pt"},
    "ctfm_triage/train.json": _TRIAGE_TINY,
    "ctfm_triage/inference.json": {k: _TRIAGE_TINY[k] for k in ("init_filters", "spacing", "roi_size", "num_workers")},
    "ctfm_retrieval/embed.json": {**_EMBED_TINY, "mask_size": "16", "top_n": "3"},
    "ctfm_retrieval/inference.json": {"init_filters": "8"},
    "ctfm_retrieval/cluster.json": {"perplexity": "2"},
    "ctfm-package package": {"init_filters": "8", "bundles": "ctfm_wholebody_seg"},
    "ctfm-phantom body": {"shape": "40,40,20", "spacing": "3"},
    "ctfm-phantom head": {"shape": "32,32,16", "spacing": "6,6,10"},
}
# documented path (from a scratch folder) -> the earlier output (scratch name, path) that stands in for it
ENCODER = ("pretrain", "runs/pretrain/models/encoder.safetensors")
OUTPUTS = {
    ("pretrain", "runs/pretrain/models/checkpoint_iteration=50000.pt"):
        ("pretrain", "runs/pretrain/models/checkpoint_iteration=2.pt"),
    ("pretrain", "bundles/ctfm_pretrain/models/checkpoint_final_iteration=N.pt"):
        ("pretrain", "runs/pretrain/models/checkpoint_final_iteration=2.pt"),
    ("seg", "pretrain/encoder.safetensors"): ENCODER,
    ("triage", "bundles/ctfm_pretrain/models/encoder.safetensors"): ENCODER,
    ("retrieval", "models/encoder.safetensors"): ENCODER,
    ("retrieval", "outputs/demo/pretrain/models/encoder.safetensors"): ENCODER,
    ("repo", "model.pt"): ("seg", "bundles/ctfm_wholebody_seg/models/model.pt"),
    ("repo", "path/to/model.pt"): ("seg", "bundles/ctfm_wholebody_seg/models/model.pt"),
    ("repo", "hub/wholebody"): ("repo", "hub/seg"),
    ("repo", "ctfm_wholebody_seg_vVERSION.zip"): ("repo", "dist/ctfm_wholebody_seg_vVERSION.zip"),
    ("repo", "model_info.json"): ("repo", "dist/model_info.json"),
}


def _command_key(tokens: list[str], cwd: Path) -> tuple | None:
    """What one run of a command stands for: ``(bundle/configs, subcommand, run id)`` or ``(tool, verb)``."""
    if tokens[:3] == ["python", "-m", "monai.bundle"]:
        positional, pairs = options(tokens[4:])
        files = pairs.get("config_file", pairs.get("bundle_path", pairs.get("name", "")))
        files = ast.literal_eval(files) if files.startswith("[") else [files]
        names = tuple(f"{(cwd / f).resolve().parents[1].name}/{Path(f).name}" if "configs" in f else f for f in files)
        if tokens[3] == "run":
            return (names, "run", positional[0] if positional else "run")
        return (names, tokens[3], "url" if "url" in pairs else pairs.get("source", ""))
    if tokens[0] == "ctfm-segment" or tokens[:3] == ["python", "-m", "ctfm_bundles.wholebody"]:
        return ("ctfm-segment",) if tokens[0] == "ctfm-segment" else ("ctfm_bundles.wholebody",)
    if tokens[0] in CONSOLE:
        verb = tokens[1] if len(tokens) > 1 and not tokens[1].startswith("-") else ""
        return (tokens[0], verb)
    return None


def _exemption(line: str) -> str | None:
    """EXEMPT's reason for ``line`` (compared without its comment), or None."""
    command = " ".join(shlex.split(line, comments=True))
    return next((reason for prefix, reason in EXEMPT.items()
                 if (command == prefix[:-1] if prefix.endswith("$") else command.startswith(prefix))), None)


def _ordered() -> list[tuple[str, Path, str, Path]]:
    """``(scratch name, doc, line, cwd)`` of every documented command, in RUN_ORDER (data preparation,
    the phantom and datalist tools, first within a document), then those of the other documents (name None:
    checked parse-only, so they must be exempt or like a command that runs)."""
    ordered = []
    for name, doc in RUN_ORDER:
        lines = [(line, cwd) for line, cwd, _ in doc_commands(REPO_ROOT / doc)]
        prepare = [c for c in lines if re.match(r"ctfm-(phantom|\w+-datalist)\b", c[0])]
        rest = [c for c in lines if c not in prepare]
        ordered += [(name, REPO_ROOT / doc, line, cwd) for line, cwd in prepare + rest]
    listed = {REPO_ROOT / doc for _, doc in RUN_ORDER}
    return ordered + [(None, doc, line, cwd) for doc, line, cwd, _ in ALL if doc not in listed]


def run_plan() -> tuple[dict, list[str]]:
    """``({scratch name: [(doc, line, cwd, tokens)]} to run, problems)``: problems are commands neither run,
    exempt nor parse-only with a run representative."""
    runs: dict[str, list] = {}
    seen, parse_only, problems = set(), [], []
    for name, doc, line, cwd in _ordered():
        where = f"{doc.relative_to(REPO_ROOT)}: {line}"
        if _exemption(line):
            continue
        tokens = shlex.split(line, comments=True)
        key = _command_key(tokens, cwd)
        if key is None:
            problems.append(f"{where}\n  neither run by the suite nor in EXEMPT (with the reason)")
            continue
        if key in seen or "..." in tokens or name is None:  # None: a document outside RUN_ORDER
            parse_only.append((where, key))
            continue
        seen.add(key)
        runs.setdefault(name, []).append((doc, line, cwd, tokens))
    problems += [f"{where}\n  parse-only, but no command like it runs" for where, key in parse_only if key not in seen]
    return runs, problems


def test_every_documented_command_runs_or_is_exempt_with_a_reason():
    """A new documented command fails here unless the suite runs it (or one like it) or EXEMPT says why not."""
    runs, problems = run_plan()
    assert not problems, "\n".join(problems)
    for name in ("pretrain", "seg", "triage", "retrieval", "repo"):
        assert runs.get(name), f"no documented command of '{name}' runs"
    keys = {_command_key(tokens, cwd) for commands in runs.values() for _, _, cwd, tokens in commands}
    assert ("ctfm-hub", "install") in keys and (("ctfm_wholebody_seg/inference.json",), "run", "run") in keys


SCRATCHES = ["pretrain", "seg", "triage", "retrieval", "repo"]  # in RUN_ORDER
NEEDS = {"seg": ["pretrain"], "triage": ["pretrain"], "retrieval": ["pretrain"], "repo": ["pretrain", "seg"]}  # OUTPUTS
EXPECTED = {  # files (from a scratch folder) that the documented commands write
    "pretrain": ["demo/phantoms/datalist.json", "runs/pretrain/models/encoder.safetensors",
                 "runs/pretrain/encoder_50k.safetensors", "bundles/ctfm_pretrain/models/model.ts"],
    "seg": ["data/totalseg/datalist.json", "bundles/ctfm_wholebody_seg/models/model.safetensors",
            "bundles/ctfm_wholebody_seg/models/model.pt", "out/ct/ct_seg.nii.gz", "out/ct/masks/liver.nii.gz",
            "out/summary.json"],
    "triage": ["data/head_ct/datalist.json", "bundles/ctfm_triage/models/model.pt", "results/test",
               "results/triage/predictions.csv"],
    "retrieval": ["runs/retrieval/index", "runs/retrieval/neighbours.csv", "runs/retrieval/retrieval_metrics.json",
                  "runs/retrieval/semantic_search", "runs/retrieval/saliency", "runs/retrieval/robustness_icc.csv",
                  "runs/retrieval/tsne.png", "bundles/ctfm_retrieval/models/model.pt",
                  "bundles/ctfm_retrieval/models/model.ts"],
    "repo": ["dist/model_info.json", "bundles_dl/ctfm_wholebody_seg/configs/inference.json",
             "bundles_checked/ctfm_wholebody_seg/configs/inference.json",
             "bundles_extracted/ctfm_wholebody_seg/configs/inference.json", "hub/seg/README.md",
             "hf_home/hub/models--OWNER--NAME/refs/main", "ct.nii.gz", "ct_labels.nii.gz", "head.nii.gz"],
}


def _write_phantom(path: Path, kind: str = "body", seed: int = 0, labels: Path | None = None):
    import nibabel as nib
    from ctfm_bundles.tools.synthetic import phantom

    shape, spacing = ((40, 40, 20), 3.0) if kind == "body" else ((32, 32, 16), (6.0, 6.0, 10.0))
    image, label_map, affine = phantom.make_phantom(kind=kind, shape=shape, spacing=spacing, seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    phantom.save_phantom(image, label_map, affine, image_path=path, label_path=labels or path.parent / f"_{path.name}")
    return label_map, affine, nib


def _stage(name: str, root: Path, base_url: str) -> None:
    """The documented placeholder inputs of scratch ``name``, as tiny phantoms."""
    from ctfm_bundles.tools.synthetic import phantom

    shutil.copytree(BUNDLES_DIR, root / "bundles", ignore=shutil.ignore_patterns("__pycache__", "eval", "*.pt",
                                                                                 "*.safetensors", "*.ts"))
    if name == "pretrain":
        phantom.make_dataset(output_dir=str(root / "data"), num_cases=2, shape=(40, 40, 20), spacing=3.0)
    elif name == "seg":
        _write_phantom(root / "ct.nii.gz")
        meta = json.loads((BUNDLES_DIR / "ctfm_wholebody_seg" / "configs" / "metadata.json").read_text())
        names = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
        rows = ["image_id;split"]
        for i, split in enumerate(("train", "val", "test")):
            case = root / "Totalsegmentator_dataset_v201" / f"s000{i}"
            label_map, affine, nib = _write_phantom(case / "ct.nii.gz", seed=i)
            totalseg = phantom.to_totalseg_labels(label_map)
            (case / "segmentations").mkdir()
            for value in [v for v in np.unique(totalseg) if v]:
                nib.save(nib.Nifti1Image((totalseg == value).astype(np.uint8), affine),
                         case / "segmentations" / f"{names[str(value)]}.nii.gz")
            (case / "_ct.nii.gz").unlink()
            rows.append(f"s000{i};{split}")
        (root / "Totalsegmentator_dataset_v201" / "meta.csv").write_text("\n".join(rows) + "\n")
        served = root / "served"  # the release files, for download_large_files against the loopback server
        served.mkdir()
        (served / "model.safetensors").write_bytes(b"stand-in for the release weights")
        (served / "config.json").write_text('{"init_filters": 32}')
        large = root / "bundles" / "ctfm_wholebody_seg" / "large_files.yml"
        hub = "https://huggingface.co/project-lighter/whole_body_segmentation/resolve/main"
        large.write_text(large.read_text().replace(hub, f"{base_url}/seg/served"))
    elif name == "triage":
        heads = root / "data" / "head_ct"
        phantom.make_dataset(output_dir=str(heads), num_cases=8, kind="head", shape=(32, 32, 16),
                             spacing=(6.0, 6.0, 10.0), datalist_name="phantom_datalist.json")
        items = json.loads((heads / "phantom_datalist.json").read_text())
        items = [i for section in items.values() if isinstance(section, list) for i in section]
        splits = ["training", "training", "validation", "testing"]  # per class, so every split has both
        rows = [f"{i['image']},{i['label']},{split}" for label in (1, 0)
                for i, split in zip([i for i in items if i["label"] == label], splits)]
        (root / "labels.csv").write_text("path,abnormal,split\n" + "\n".join(rows) + "\n")
        for item in items[:2]:
            target = root / "data" / "new_scans" / Path(item["image"]).name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(heads / item["image"], target)
    elif name == "retrieval":
        for i, kind in enumerate(("body", "head", "body", "head")):
            _write_phantom(root / "data" / "ct" / f"case{i + 4}.nii.gz", kind, seed=i)
        _write_phantom(root / "data" / "ct" / "case7.nii.gz", "body", seed=7)
        for path in (root / "data" / "ct").glob("_*"):
            path.unlink()
        (root / "labels.csv").write_text("case,label\n" + "".join(
            f"case{i},{'body' if i in (4, 6, 7) else 'head'}\n" for i in (4, 5, 6, 7)))
        _write_phantom(root / "target.nii.gz", labels=root / "target_labels.nii.gz", seed=1)
        _write_phantom(root / "query.nii.gz", seed=2)
        _write_phantom(root / "ct.nii.gz", seed=3)
        (root / "pairs.csv").write_text("test,retest\ndata/ct/case4.nii.gz,data/ct/case6.nii.gz\n"
                                        "data/ct/case5.nii.gz,data/ct/case7.nii.gz\n")


def _argv(name: str, root: Path, workspace: Path, base_url: str, line: str, cwd: Path, tokens: list[str]) -> dict:
    """The runner's entry for one documented command: tiny overrides, placeholders and their stand-ins."""
    version = json.loads((BUNDLES_DIR / "ctfm_wholebody_seg" / "configs" / "metadata.json").read_text())["version"]
    zip_name = f"ctfm_wholebody_seg_v{version}.zip"
    here = root / cwd.relative_to(REPO_ROOT)
    key = _command_key(tokens, cwd)
    optional = [i for i, t in enumerate(tokens) if t.startswith("[--")]  # "[--opt value]": run without it
    tokens = [t for i, t in enumerate(tokens) if not any(j <= i <= j + 1 for j in optional)]
    tokens = [t.replace("VALUE", version) for t in tokens]
    tokens = [t.replace("https://host/path/", f"{base_url}/repo/dist/") if t.startswith("https://host/") else t
              for t in tokens]
    tokens = [f"{base_url}/repo/dist/{zip_name}" if t == "URL" else t for t in tokens]
    tokens = [t[1:] if t.startswith("/data/") else t for t in tokens]  # /data/... -> data/... of the scratch folder
    if tokens[0] == "ctfm-segment":
        entry, args, tiny_key = {"module": "ctfm_bundles.wholebody"}, tokens[1:], "ctfm-segment"
    elif tokens[:2] == ["python", "-m"]:
        entry, args = {"module": tokens[2]}, tokens[3:]
        tiny_key = "ctfm-segment" if tokens[2] == "ctfm_bundles.wholebody" else "/".join(key[0][0].split("/")[-2:])
    else:  # a console command: its "module:function", called as the installed command calls it
        entry, args, tiny_key = {"entry": CONSOLE[tokens[0]]}, tokens[1:], " ".join(key)
    tiny = dict(TINY.get(tiny_key, {}))
    if tokens[:3] == ["python", "-m", "monai.bundle"] and tiny:
        _, pairs = options(args)
        files = pairs["config_file"]
        parser = ConfigParser()
        parser.read_config([str(cwd / f) for f in (ast.literal_eval(files) if files.startswith("[") else [files])])
        tiny = {k: v for k, v in tiny.items() if k in parser}
    kept, i = [], 0
    while i < len(args):
        if args[i].startswith("--") and args[i][2:] in tiny:
            i += 1 if i + 1 == len(args) or args[i + 1].startswith("--") else 2
            continue
        kept.append(args[i])
        i += 1
    args = kept + [a for k, v in tiny.items() for a in (f"--{k}", v)]
    copies = []
    for token in args:
        rel = os.path.normpath(os.path.relpath(here / token, root)) if not token.startswith(("-", "http")) else ""
        stand_in = OUTPUTS.get((name, rel.replace(version, "VERSION")))
        if stand_in:
            copies.append([str(root / rel), str(workspace / stand_in[0] / stand_in[1].replace("VERSION", version))])
    hashes = {"HEX": str(root / "dist" / zip_name)} if "HEX" in args else {}
    return {**entry, "argv": args, "cwd": str(here), "copies": copies, "hashes": hashes, "line": line}


@pytest.fixture(scope="session")
def doc_workspace(tmp_path_factory):
    """``(folder, base URL, results)``: one scratch folder per SCRATCHES entry, served on 127.0.0.1."""
    folder = tmp_path_factory.mktemp("documented")
    with serve_folder(folder) as base_url:
        yield folder, base_url, {}


def run_commands(plan: list[dict], root: Path) -> str | None:
    """Run ``plan`` (entries of :func:`_argv`) with tests/project/doc_command_runner.py in ``root``: None when every
    command succeeded, else a message naming the failed command, how it ran and its stderr tail."""
    (root / "plan.json").write_text(json.dumps(plan, indent=1))
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"),
               PYTHONPATH=str(REPO_ROOT), HF_HOME=str(root / "hf_home"), HF_HUB_OFFLINE="1", MPLBACKEND="Agg")
    runner = Path(__file__).with_name("doc_command_runner.py")
    proc = subprocess.run([sys.executable, str(runner), str(root / "plan.json")], cwd=root, capture_output=True,
                          text=True, timeout=900, env=env)
    (root / "runner.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode == 0:
        return None
    failed = re.search(r"@@@ FAILED (\d+)", proc.stderr)
    index = int(failed.group(1)) if failed else -1
    command = plan[index] if failed else {"line": "(the runner itself)", "argv": []}
    stderr = proc.stderr.split(f"@@@ COMMAND {index}")[-1] if failed else proc.stderr
    errors = "\n".join(re.findall(r"^\w*(?:Error|Exception)\b.*$", stderr, re.M)[:5])
    return (f"documented command failed: {command['line']}\n  run as: {' '.join(command['argv'])}\n"
            f"  in {command.get('cwd', root)}\n--- errors ---\n{errors}\n--- stderr tail ---\n{stderr[-3000:]}")


def _run_scratch(name: str, workspace: Path, base_url: str, results: dict) -> str | None:
    """Run scratch ``name``'s documented commands once per session; the failure message, or None."""
    if name not in results:
        root = workspace / name
        root.mkdir()
        _stage(name, root, base_url)
        plan = [_argv(name, root, workspace, base_url, line, cwd, tokens)
                for _, line, cwd, tokens in run_plan()[0][name]]
        results[name] = run_commands(plan, root)
    return results[name]


@pytest.mark.parametrize("name", SCRATCHES)
def test_documented_commands_run_on_phantoms(name, doc_workspace):
    """The documented commands of each document, on tiny phantoms with tiny sizes, in one interpreter per
    document (see RUN_ORDER / TINY / OUTPUTS above); later documents reuse earlier outputs (the pretrained
    encoder, the segmentation model)."""
    workspace, base_url, results = doc_workspace
    for earlier in NEEDS.get(name, []):
        if _run_scratch(earlier, workspace, base_url, results):
            pytest.fail(f"'{name}' reuses the outputs of '{earlier}', whose commands failed: {results[earlier]}")
    failure = _run_scratch(name, workspace, base_url, results)
    assert failure is None, failure
    missing = [p for p in EXPECTED[name] if not (workspace / name / p).exists()]
    assert not missing, f"the documented commands of '{name}' did not write {missing}"


def test_a_failing_documented_command_fails_with_the_command_and_its_stderr(tmp_path):
    """The runner stops at the first failing command; the message names it and carries its error."""
    good_line = "ctfm-phantom body --output ok.nii.gz --shape 40,40,20 --spacing 3"
    line = "ctfm-phantom dataset --output_dir demo/phantoms --num_cases 0"
    plan = [_argv("repo", tmp_path, tmp_path, "", text, REPO_ROOT, shlex.split(text)) for text in (good_line, line)]
    message = run_commands([*plan, plan[0]], tmp_path)
    assert message is not None and message.startswith(f"documented command failed: {line}\n")
    assert "num_cases" in message.split("--- errors ---")[1]
    assert (tmp_path / "ok.nii.gz").is_file()
