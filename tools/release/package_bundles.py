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
"""Package bundles as MONAI Model Zoo zips after verifying them; check and unpack zips safely.

``package`` builds ``<out>/<bundle>_v<version>.zip`` (top folder = bundle name; configs,
docs, scripts, LICENSE, large_files.yml, an empty ``models/``; no weights, caches or run
outputs; fixed timestamps and sorted members, so the same tree gives the same bytes) and a
``model_info.json`` entry ``"<bundle>_v<version>": {"version", "sha256", "source"}``. The zip
is written only after its own extracted copy passed, in a clean interpreter whose working
directory is that copy:

- static checks: semver ``version`` with a ``changelog`` entry, ``large_files.yml`` entries
  with a ``path`` inside the bundle, an ``http(s)`` url and a SHA-256 hash, and no config
  string that points outside the bundle folder (absolute paths, ``..``, other bundles,
  ``%file::id`` macros);
- ``monai.bundle verify_metadata`` against the zoo schema (this project's copy, ``schemas/meta_schema.json``, offline);
- every config parses with ``bundle_root`` (and the paths derived from it) inside the copy;
- ``verify_net_in_out`` of the network each bundle declares in its metadata;
- ``ckpt_export`` to TorchScript from RANDOMLY INITIALISED weights written to a temporary
  ``models/model.pt`` of the copy (they prove the export path, they are not a model, and
  they never enter the zip), then ``torch.jit.load`` of the ``.ts`` and the same output as
  the eager network on the same input.

``verify`` / ``extract`` / ``download`` check a zip before anything is written (SHA-256,
members that would escape the folder, the zoo layout). ``python -m monai.bundle download``
also installs these zips (``--url``, or ``--source github --repo owner/repo/tag``), but it
checks no hash for them and leaves a partial folder behind when it meets an unsafe member;
verify a zip from an untrusted place with this tool first.

Usage::

    ctfm-package package --out dist --repo OWNER/REPO/TAG
    ctfm-package package --out dist --bundles ctfm_wholebody_seg --init_filters 8
    ctfm-package verify dist/ctfm_wholebody_seg_v0.3.0.zip --model_info dist/model_info.json
    ctfm-package extract dist/ctfm_wholebody_seg_v0.3.0.zip --bundle_dir bundles_dl --sha256 HEX
    ctfm-package download URL --sha256 HEX --bundle_dir bundles_dl
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

import yaml

from ctfm_bundles.tools import REPO_ROOT

from ctfm_common.download import (
    SHA256_PATTERN,
    check_sha256_text,
    check_zip_members,
    fetch,
    safe_extract,
    sha256_of,
    verify_sha256,
    zip_top_folder,
)
from ctfm_common.runtime import atomic_write, atomic_write_text

BUNDLES_DIR = REPO_ROOT / "bundles"
META_SCHEMA = REPO_ROOT / "schemas" / "meta_schema.json"  # MONAI's published schema, carried (schemas/README.md)

# What a zoo bundle holds (top level); anything else in the folder (run outputs, weights) stays out.
BUNDLE_CONTENT = ("LICENSE", "large_files.yml", "configs", "docs", "scripts", "models/.gitkeep")
SKIPPED_DIRS = {"__pycache__", ".ipynb_checkpoints", ".pytest_cache"}
SKIPPED_SUFFIXES = (".pyc", ".pyo", ".tmp")
WEIGHT_SUFFIXES = (".pt", ".pth", ".ts", ".safetensors", ".ckpt", ".bin", ".onnx", ".engine", ".npy", ".faiss")
ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # the earliest zip timestamp: same tree, same bytes

# The config whose ``network_def`` is the network of the metadata's network_data_format.
NETWORK_CONFIG = {
    "ctfm_pretrain": "train.json",
    "ctfm_retrieval": "inference.json",  # = embed.json (tools/release/sync_bundles.py)
    "ctfm_triage": "inference.json",
    "ctfm_wholebody_seg": "inference.json",
}
# Override files and the config each is merged after, where the bundle has that base: the
# variants of train.json, and the retrieval tasks that share embed.json's preprocessing.
OVERRIDE_CONFIGS = {
    "evaluate.json": "train.json",
    "multi_gpu_train.json": "train.json",
    "query.json": "embed.json",
    "robustness.json": "embed.json",
    "saliency.json": "embed.json",
    "semantic_search.json": "embed.json",
}
EMBEDDING_DIM_PER_FILTER = 16  # the encoder's last level: 16 x init_filters channels (512 for 32)

SEMVER = re.compile(r"^\d+\.\d+\.\d+([-+][0-9A-Za-z.-]+)?$")
GITHUB_RELEASE = "https://github.com/{owner}/{name}/releases/download/{tag}"
PLACEHOLDER_REPO = "OWNER/REPO/TAG"


class PackagingError(RuntimeError):
    """Bundles that may not be packaged, with every reason found (``packaged``: those that were)."""

    def __init__(self, message: str, packaged: list[dict] | None = None) -> None:
        super().__init__(message)
        self.packaged = packaged or []


def bundle_names(bundles_dir: Path = BUNDLES_DIR) -> list[str]:
    """Every bundle folder name (one with ``configs/metadata.json``), sorted."""
    return sorted(p.parents[1].name for p in bundles_dir.glob("*/configs/metadata.json"))


def read_metadata(bundle_dir: Path) -> dict:
    return json.loads((bundle_dir / "configs" / "metadata.json").read_text())


def zip_name(bundle: str, version: str) -> str:
    """The zoo's file name: ``<bundle>_v<version>.zip``."""
    return f"{bundle}_v{version}.zip"


def github_release_url(repo: str, filename: str) -> str:
    """The URL ``monai.bundle download --source github --repo owner/repo/tag`` fetches ``filename`` from."""
    parts = repo.split("/")
    if len(parts) != 3 or not all(parts):
        raise ValueError(f"repo must be 'owner/repo/tag' (MONAI's github source layout), got '{repo}'")
    owner, name, tag = parts
    return GITHUB_RELEASE.format(owner=owner, name=name, tag=tag) + "/" + filename


def bundle_files(bundle_dir: Path) -> list[str]:
    """The files that go into a bundle's zip, as sorted POSIX paths relative to the bundle folder.

    Only the zoo layout (:data:`BUNDLE_CONTENT`); caches, temporary files and weights are left out.
    """
    files = []
    for entry in BUNDLE_CONTENT:
        path = bundle_dir / entry
        candidates = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for file in candidates:
            rel = file.relative_to(bundle_dir)
            if SKIPPED_DIRS & set(rel.parts[:-1]) or file.name.endswith(SKIPPED_SUFFIXES):
                continue
            if file.suffix in WEIGHT_SUFFIXES or file.is_symlink():
                continue
            files.append(rel.as_posix())
    return sorted(files)


def check_version(meta: dict) -> list[str]:
    """Problems with the metadata's ``version`` / ``changelog``."""
    version = str(meta.get("version", ""))
    problems = []
    if not SEMVER.match(version):
        problems.append(f"metadata version '{version}' is not semver (MAJOR.MINOR.PATCH)")
    if version not in meta.get("changelog", {}):
        problems.append(f"metadata changelog has no entry for version '{version}'")
    return problems


def check_large_files(bundle_dir: Path) -> list[str]:
    """Problems with ``large_files.yml``: every entry needs a path inside the bundle, an http(s) url and a SHA-256.

    The format is the one ``python -m monai.bundle download_large_files`` reads
    (``path``, ``url``, ``hash_val``, ``hash_type``). An entry may declare that no hash is known
    with an explicitly empty ``hash_val: ""`` and ``hash_type: ""`` (a public release whose
    SHA-256 is not published); an entry without ``hash_val`` is a problem.
    """
    path = bundle_dir / "large_files.yml"
    if not path.is_file():
        return ["large_files.yml is missing"]
    try:
        content = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        return [f"large_files.yml: invalid YAML: {e}"]
    entries = content.get("large_files") if isinstance(content, dict) else None
    if not isinstance(entries, list):
        return ["large_files.yml: needs a 'large_files' list (may be empty)"]
    problems = []
    for i, entry in enumerate(entries):
        where = f"large_files.yml entry {i}"
        if not isinstance(entry, dict):
            problems.append(f"{where}: not a mapping")
            continue
        rel = str(entry.get("path", ""))
        parts = PurePosixPath(rel).parts
        if not rel or rel.startswith(("/", "~")) or ".." in parts or "\\" in rel:
            problems.append(f"{where}: path '{rel}' must be a relative path inside the bundle")
        if urlparse(str(entry.get("url", ""))).scheme not in ("http", "https"):
            problems.append(f"{where} ({rel}): url '{entry.get('url', '')}' must be http(s)")
        hash_val, hash_type = str(entry.get("hash_val", "") or ""), str(entry.get("hash_type", "") or "")
        if entry.get("hash_val", None) == "" and entry.get("hash_type", None) == "":
            continue  # declared unknown: download_large_files warns that it checks nothing
        if not hash_val:
            problems.append(f"{where} ({rel}): no hash_val: every large file needs a SHA-256")
        elif hash_type.lower() != "sha256":
            problems.append(f"{where} ({rel}): hash_type '{hash_type}' must be 'sha256'")
        elif not SHA256_PATTERN.match(hash_val.lower()):
            problems.append(f"{where} ({rel}): hash_val '{hash_val}' is not a SHA-256 hex digest (64 hex characters)")
    return problems


# Config strings that point outside the bundle folder.
OUTSIDE_PATTERNS = (
    (re.compile(r"(^|[^\w.])\.\.[/\\]"), "a '..' path"),
    (re.compile(r"(^|['\"\s(=])/(home|root|work|tmp|mnt|data|srv|opt|Users|usr|var)/"), "an absolute path"),
    (re.compile(r"(^|['\"\s(=])[A-Za-z]:\\"), "an absolute Windows path"),
    (re.compile(r"(^|['\"\s(=])~/"), "a home-folder path"),
    (re.compile(r"dirname\(\s*@bundle_root"), "the folder above bundle_root"),
    (re.compile(r"^%[^#:]+\.(json|ya?ml)"), "a '%file::id' macro (resolved against the working directory)"),
    (re.compile(r"(^|[^.\w])ctfm_common\b"), "the repository's ctfm_common (use scripts.ctfm_common)"),
    (re.compile(r"(^|[^\w])(tools|bundles)/"), "a repository folder"),
)


def config_strings(value, where: str = ""):
    """Yield ``(id path, string)`` for every string in a parsed config (keys included)."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield f"{where}#{key}".lstrip("#"), str(key)
            yield from config_strings(item, f"{where}#{key}".lstrip("#"))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from config_strings(item, f"{where}#{i}".lstrip("#"))
    elif isinstance(value, str):
        yield where, value


def check_self_contained(bundle_dir: Path, all_bundles: list[str] | None = None) -> list[str]:
    """Config strings that reference something outside the bundle folder, as ``file::id: reason``."""
    others = [b for b in (all_bundles or bundle_names(bundle_dir.parent)) if b != bundle_dir.name]
    problems = []
    configs = sorted((bundle_dir / "configs").glob("*.json")) + sorted((bundle_dir / "configs").glob("*.yaml"))
    for config in [c for c in configs if c.name != "metadata.json"]:  # metadata is free text, never resolved
        content = yaml.safe_load(config.read_text()) if config.suffix == ".yaml" else json.loads(config.read_text())
        for where, text in config_strings(content):
            reasons = [reason for pattern, reason in OUTSIDE_PATTERNS if pattern.search(text)]
            reasons += [f"another bundle ({b})" for b in others if re.search(rf"(^|[^\w]){b}[/'\"]", text)]
            problems += [f"configs/{config.name}::{where}: '{text[:120]}' references {r}" for r in reasons]
    return problems


def config_sets(bundle_dir: Path) -> list[list[str]]:
    """Config file lists as users run them (relative to the bundle): stand-alone files, overrides after their base."""
    names = sorted(p.name for p in (bundle_dir / "configs").glob("*.json") if p.name != "metadata.json")
    return [
        [f"configs/{OVERRIDE_CONFIGS[n]}", f"configs/{n}"] if OVERRIDE_CONFIGS.get(n) in names else [f"configs/{n}"]
        for n in names
    ]


def network_check(bundle_dir: Path, init_filters: int | None) -> dict | None:
    """What to run ``verify_net_in_out`` / ``ckpt_export`` on, with the overrides for a reduced width."""
    meta = read_metadata(bundle_dir)
    name = NETWORK_CONFIG.get(bundle_dir.name)
    if name is None:
        standalone = [s for s in config_sets(bundle_dir) if len(s) == 1]
        with_net = [s[0] for s in standalone if "network_def" in json.loads((bundle_dir / s[0]).read_text())]
        if not with_net:
            return None
        name = Path(with_net[0]).name
    override: dict = {}
    if init_filters is not None:
        override["init_filters"] = int(init_filters)
        pred = meta["network_data_format"]["outputs"].get("pred", {})
        # an embedding is the encoder's last level, 16 x init_filters wide: scale what the metadata expects
        if pred.get("format") == "embedding" and pred.get("num_channels") == EMBEDDING_DIM_PER_FILTER * 32:
            override["_meta_#network_data_format#outputs#pred#num_channels"] = EMBEDDING_DIM_PER_FILTER * init_filters
    return {"config_file": [f"configs/{name}"], "override": override}


# A zoo download or a MONAI Label app has none of this repository's packages, but the editable install
# of a checkout (tools/setup_env.sh) makes them importable from anywhere: the interpreters that stand in
# for a bundle copied alone run this first, so that importing one fails there as it would after a download.
HIDE_REPOSITORY_PACKAGES = r"""
import sys


class _RepositoryPackagesHidden:
    names = ("ctfm_common", "ctfm_bundles")

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {name!r} (a bundle copied alone has only its own files)",
                                      name=name)
        return None


sys.meta_path.insert(0, _RepositoryPackagesHidden())
"""

# Runs in a clean interpreter (no PYTHONPATH, not the repository, its installed packages hidden) on the
# extracted copies of the zips, one after the other, each as the working directory with its own ``scripts``
# package (the previous one is unloaded): only MONAI, torch and the bundle's own files are importable, as
# after a zoo download. One interpreter for all bundles: importing torch and MONAI is most of the cost.
CHECK_SCRIPT = HIDE_REPOSITORY_PACKAGES + r"""
import json, os, sys, tempfile, time, traceback
import torch
from monai.bundle import ConfigParser, ckpt_export, verify_metadata, verify_net_in_out
from monai.bundle.scripts import _get_fake_input_shape


def inside(root, path):
    return os.path.commonpath([root, os.path.realpath(path)]) == root


def check_bundle(job, schema):
    root = os.path.realpath(job["copy"])
    os.chdir(root)
    for name in [m for m in sys.modules if m == "scripts" or m.startswith("scripts.")]:
        del sys.modules[name]
    sys.path[:] = [root] + [p for p in sys.path if p not in job["previous"]]  # as `monai.bundle run` does
    result = {"configs": {}}
    verify_metadata(meta_file="configs/metadata.json", filepath=schema)
    result["metadata"] = "verified"
    for files in job["config_sets"]:
        parser = ConfigParser()
        parser.read_config(files)
        resolved = {}
        for key in ("bundle_root", "ckpt_dir", "output_dir", "ckpt", "encoder_export"):
            if key in parser:
                value = parser.get_parsed_content(key)
                resolved[key] = value
                if isinstance(value, str) and value and os.path.isabs(value) and not inside(root, value):
                    raise ValueError(f"{files}: '{key}' resolves to {value}, outside the bundle folder {root}")
        if os.path.realpath(str(resolved.get("bundle_root", ""))) != root:
            raise ValueError(f"{files}: bundle_root resolves to {resolved.get('bundle_root')!r}, not {root}")
        result["configs"][" + ".join(files)] = sorted(resolved)
    check = job["network"]
    if not check:
        return result
    files, override = check["config_file"], check["override"]
    verify_net_in_out(net_id="network_def", meta_file="configs/metadata.json", config_file=files, device="cpu",
                      p=1, n=1, any=1, **override)
    parser = ConfigParser()
    parser.read_config(files)
    parser.read_meta("configs/metadata.json")
    parser.update(override)
    torch.manual_seed(0)
    network = parser.get_parsed_content("network_def").eval()  # RANDOM weights: an export test, not a model
    os.makedirs("models", exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir="models", suffix=".pt")
    os.close(fd)
    torch.save(network.state_dict(), tmp)
    os.replace(tmp, "models/model.pt")
    ckpt_export(net_id="network_def", filepath="models/model.ts", ckpt_file="models/model.pt",
                meta_file="configs/metadata.json", config_file=files, bundle_root=root, **override)
    extra = {"metadata.json": "", **{os.path.basename(f): "" for f in files}}
    scripted = torch.jit.load("models/model.ts", map_location="cpu", _extra_files=extra).eval()
    shape = _get_fake_input_shape(parser)
    x = torch.rand(*shape)
    with torch.no_grad():
        eager, exported = network(x), scripted(x)
    diff = float((eager - exported).abs().max())
    if eager.shape != exported.shape or not torch.allclose(eager, exported, rtol=1e-4, atol=1e-5):
        raise ValueError(f"the TorchScript export's output differs from the eager network: max |diff| {diff:.3g}")
    result["network"] = {"config_file": files, "input_shape": list(shape), "output_shape": list(eager.shape),
                         "max_abs_diff": diff, "ts_metadata_version": json.loads(extra["metadata.json"]).get("version"),
                         "ts_extra_files": sorted(extra), "random_weights": True}
    return result


args = json.loads(sys.argv[1])
previous = []
for job in args["jobs"]:
    job["previous"] = list(previous)
    previous.append(os.path.realpath(job["copy"]))
    start = time.perf_counter()
    try:
        result = {"ok": True, **check_bundle(job, args["schema"]), "seconds": round(time.perf_counter() - start, 1)}
    except BaseException as e:  # report every bundle, not only the first failure
        result = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
    print("PACKAGE_CHECK " + json.dumps({"copy": job["copy"], **result}), flush=True)
"""


def run_checks(copies: list[Path], *, init_filters: int | None, schema: Path, timeout: float = 1800) -> dict:
    """Run :data:`CHECK_SCRIPT` on extracted bundle copies; return ``{copy: result}``.

    Raises:
        PackagingError: the check interpreter itself failed (not a bundle's check: those are results).
    """
    jobs = [{"copy": str(c), "config_sets": config_sets(c), "network": network_check(c, init_filters)} for c in copies]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env.setdefault("OMP_NUM_THREADS", "2")
    proc = subprocess.run(
        [sys.executable, "-c", CHECK_SCRIPT, json.dumps({"schema": str(schema), "jobs": jobs})],
        cwd=tempfile.gettempdir(),
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("PACKAGE_CHECK "):
            result = json.loads(line.split(" ", 1)[1])
            results[result.pop("copy")] = result
    missing = [str(c) for c in copies if str(c) not in results]
    if proc.returncode != 0 or missing:
        raise PackagingError(
            f"the bundle checks did not complete (exit {proc.returncode}) for {missing}:\n"
            f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return {Path(k): v for k, v in results.items()}


def write_zip(bundle_dir: Path, files: list[str], path: Path) -> None:
    """Write ``files`` of ``bundle_dir`` under the top folder ``<bundle>/``, deterministically."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        for rel in files:
            info = zipfile.ZipInfo(f"{bundle_dir.name}/{rel}", date_time=ZIP_TIME)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, (bundle_dir / rel).read_bytes())


def static_problems(bundle_dir: Path) -> list[str]:
    """Every problem found without running anything: version, large files, references outside the bundle."""
    return check_version(read_metadata(bundle_dir)) + check_large_files(bundle_dir) + check_self_contained(bundle_dir)


def package_bundles(
    bundle_dirs: list[Path], out: Path, *, init_filters: int | None = None, schema: Path = META_SCHEMA
) -> list[dict]:
    """Check bundles, zip them, check each zip's extracted copy, then move the zips that passed into ``out``.

    Returns:
        One ``{"zip", "name", "version", "sha256", "files", "checks"}`` per bundle.

    Raises:
        PackagingError: with every problem of every bundle that failed; the zips of the bundles that
            passed are written first.
    """
    failures, staged = [], []
    with tempfile.TemporaryDirectory(prefix="ctfm_package_") as scratch:
        for bundle_dir in map(Path, bundle_dirs):
            problems = static_problems(bundle_dir)
            if problems:
                failures.append(f"{bundle_dir.name}: not packaged:\n  " + "\n  ".join(problems))
                continue
            version = read_metadata(bundle_dir)["version"]
            files = bundle_files(bundle_dir)
            tmp_zip = Path(scratch) / zip_name(bundle_dir.name, version)
            write_zip(bundle_dir, files, tmp_zip)
            copy = safe_extract(tmp_zip, Path(scratch) / "copies")
            staged.append({"name": bundle_dir.name, "version": version, "files": files, "tmp": tmp_zip, "copy": copy})
        checks = run_checks([s["copy"] for s in staged], init_filters=init_filters, schema=schema) if staged else {}
        results = []
        for item in staged:
            check = checks[item["copy"]]
            if not check.pop("ok"):
                failures.append(
                    f"{item['name']}: checks of the zipped bundle failed: {check['error']}\n{check['traceback']}"
                )
                continue
            data = item["tmp"].read_bytes()
            path = atomic_write(Path(out) / item["tmp"].name, lambda tmp, data=data: Path(tmp).write_bytes(data))
            results.append(
                {
                    "zip": path,
                    "name": item["name"],
                    "version": item["version"],
                    "sha256": sha256_of(path),
                    "files": item["files"],
                    "checks": check,
                }
            )
    if failures:
        raise PackagingError("\n".join(failures), results)
    return results


def model_info_entry(result: dict, *, base_url: str | None, repo: str | None) -> tuple[str, dict]:
    filename = zip_name(result["name"], result["version"])
    if base_url:
        source = base_url.rstrip("/") + "/" + filename
    else:
        source = github_release_url(repo or PLACEHOLDER_REPO, filename)
    return filename[: -len(".zip")], {"version": result["version"], "sha256": result["sha256"], "source": source}


def package(
    *,
    out: str = "dist",
    bundles: list[str] | str | None = None,
    base_url: str | None = None,
    repo: str | None = None,
    init_filters: int | None = None,
    schema: str | None = None,
    bundles_dir: str | None = None,
) -> dict:
    """Verify and zip bundles in the Model Zoo layout, and record them in ``<out>/model_info.json``.

    Args:
        out: output folder for the zips and ``model_info.json`` (entries of other bundles kept).
        bundles: bundle names (default: all under ``bundles/``).
        base_url: where the zips will be served; ``source`` = ``<base_url>/<zip>``.
        repo: ``owner/repo/tag`` of a GitHub release (MONAI's ``--source github`` layout); used when
            ``base_url`` is not given. Without either, ``source`` carries the placeholder
            ``OWNER/REPO/TAG`` to fill in before publishing.
        init_filters: encoder width for the network checks (default: the bundle's, 32; 8 is quick).
        schema: the zoo metadata schema (default: this project's copy, ``schemas/meta_schema.json``).
        bundles_dir: the folder holding the bundles (default: this repository's ``bundles/``).

    Returns:
        The ``model_info.json`` content.
    """
    root = Path(bundles_dir) if bundles_dir else BUNDLES_DIR
    names = [bundles] if isinstance(bundles, str) else list(bundles or bundle_names(root))
    unknown = [n for n in names if not (root / n / "configs" / "metadata.json").is_file()]
    if unknown:
        raise SystemExit(f"unknown bundle(s) {unknown}; bundles in {root} are {bundle_names(root)}")
    schema_path = Path(schema) if schema else META_SCHEMA
    if not schema_path.is_file():
        raise SystemExit(f"metadata schema not found: {schema_path} (pass --schema PATH)")
    out_dir = Path(out)
    info_path = out_dir / "model_info.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    try:
        results = package_bundles([root / n for n in names], out_dir, init_filters=init_filters, schema=schema_path)
        error = None
    except PackagingError as e:  # record the bundles that passed, then report the others
        results, error = e.packaged, e
    for result in results:
        key, entry = model_info_entry(result, base_url=base_url, repo=repo)
        info[key] = entry
        net = result["checks"].get("network")
        detail = f", network {net['input_shape']} -> {net['output_shape']}, TorchScript reload identical" if net else ""
        print(f"packaged {result['zip']} ({len(result['files'])} files, sha256 {result['sha256'][:12]}...{detail})")
    if results:
        atomic_write_text(info_path, json.dumps(dict(sorted(info.items())), indent=4) + "\n")
    if error is not None:
        raise error
    if not base_url and not repo:
        print(f"note: {info_path} sources use the placeholder {PLACEHOLDER_REPO}; pass --repo or --base_url")
    return info


def expected_sha256(zip_path: Path, sha256: str | None, model_info: str | None) -> str | None:
    """The SHA-256 to check ``zip_path`` against: given directly, or the zip's ``model_info.json`` entry.

    A hash given explicitly must be 64 hexadecimal characters: an empty string or a number (an
    all-digit hash parsed by the command line) is refused, never taken as "no hash".
    """
    if sha256 is not None:
        try:
            return check_sha256_text(sha256)
        except ValueError as e:
            raise SystemExit(f"--sha256: {e}") from None
    if model_info:
        info = json.loads(Path(model_info).read_text())
        key = zip_path.name.removesuffix(".zip")
        if key not in info:
            raise SystemExit(f"{model_info} has no entry '{key}' (it lists {sorted(info)})")
        return info[key]["sha256"]
    return None


def verify(zip_path: str, *, sha256: str | None = None, model_info: str | None = None) -> dict:
    """Check a bundle zip without extracting it: hash, safe members, zoo layout, version.

    Args:
        zip_path: ``<bundle>_v<version>.zip`` (or ``<bundle>.zip``, as ``monai.bundle download`` saves it).
        sha256: expected SHA-256 (or take it from ``model_info``).
        model_info: a ``model_info.json`` with the zip's entry.

    Returns:
        ``{"bundle", "version", "sha256", "members", "hash_checked"}``.

    Raises:
        IntegrityError, UnsafeArchiveError, PackagingError: naming what is wrong.
    """
    path = Path(zip_path)
    expected = expected_sha256(path, sha256, model_info)
    if expected:
        verify_sha256(path, expected)
    top = zip_top_folder(path)
    members = check_zip_members(path, top=top)
    with zipfile.ZipFile(path) as archive:
        try:
            meta = json.loads(archive.read(f"{top}/configs/metadata.json"))
        except KeyError:
            raise PackagingError(f"{path}: no {top}/configs/metadata.json: not a bundle zip") from None
    # the zoo's name must match what the zip holds (``monai.bundle download --name`` saves it as ``<bundle>.zip``)
    if path.name not in (zip_name(top, meta.get("version", "")), f"{top}.zip"):
        raise PackagingError(
            f"{path}: holds {top} version {meta.get('version')}, expected name {zip_name(top, meta.get('version', ''))}"
        )
    return {
        "bundle": top,
        "version": meta["version"],
        "sha256": sha256_of(path),
        "members": len(members),
        "hash_checked": bool(expected),
    }


def extract(
    zip_path: str,
    *,
    bundle_dir: str = ".",
    sha256: str | None = None,
    model_info: str | None = None,
    overwrite: bool = False,
) -> str:
    """:func:`verify` a bundle zip, then extract it to ``<bundle_dir>/<bundle>`` (complete or not at all)."""
    path = Path(zip_path)
    verify(zip_path, sha256=sha256, model_info=model_info)
    return str(safe_extract(path, bundle_dir, sha256=expected_sha256(path, sha256, model_info), overwrite=overwrite))


def download(url: str, *, sha256: str, bundle_dir: str = ".", overwrite: bool = False) -> str:
    """Download a bundle zip (SHA-256 required), :func:`verify` it and extract it: the safe ``monai.bundle download``.

    Args:
        url: the zip's address (its file name must be ``<bundle>_v<version>.zip``).
        sha256: the zip's SHA-256 (from ``model_info.json``).
        bundle_dir: folder that receives the zip and the bundle folder.
        overwrite: replace an existing bundle folder.

    Returns:
        The bundle folder.
    """
    filename = PurePosixPath(urlparse(url).path).name
    if not filename.endswith(".zip"):
        raise SystemExit(f"{url}: expected a URL ending in <bundle>_v<version>.zip")
    zip_path = fetch(url, Path(bundle_dir) / filename, sha256)
    return extract(str(zip_path), bundle_dir=bundle_dir, sha256=sha256, overwrite=overwrite)


def cli() -> None:
    """The console command (``[project.scripts]`` of pyproject.toml)."""
    import fire

    fire.Fire({"package": package, "verify": verify, "extract": extract, "download": download})


if __name__ == "__main__":
    cli()
