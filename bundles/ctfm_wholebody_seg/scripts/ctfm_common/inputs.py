# GENERATED from ctfm_common/inputs.py by ctfm-sync-bundles: edit the source, not this copy.
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
"""The common ``input`` id: one CT file, a DICOM series folder, a glob, or a datalist JSON."""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from .runtime import UsageError, atomic_write_text, file_lock

IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
DATALIST_SECTIONS = ("testing", "validation", "training")


def case_name(path: str | os.PathLike) -> str:
    """Name outputs after their input: ``ct.nii.gz`` -> ``ct``; a DICOM folder -> its folder name."""
    name = Path(path).name
    for suffix in sorted(IMAGE_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def case_source(path: str | os.PathLike) -> str:
    """A case's identity: its full input path, resolved (``..``, symlinks, the working folder).

    Unique within a run and the same in every run: every row, output file and join of a case
    goes through it (or :func:`case_names`, the file names derived from it).
    """
    text = os.fspath(path)
    return str(Path(text.rstrip("/\\") or text).expanduser().resolve())


def case_names(
    paths: Sequence[str | os.PathLike],
    taken: Mapping[str, str] | None = None,
    logger: logging.Logger | None = None,
) -> list[str]:
    """Output names of a run's cases, one per input path, never shared by two different scans.

    A case is named after its input (:func:`case_name`: ``s0001/ct.nii.gz`` -> ``ct``) when no
    other scan has that name; otherwise (two inputs of the run share it, e.g. TotalSegmentator's
    ``<case>/ct.nii.gz`` layout, or ``taken`` holds it for another scan) it is
    ``<parent folder>_<name>-<8 hex digits of the SHA-1 of its full path>``, which depends on
    the full path only, so a case gets the same disambiguated name in every run that needs one.
    The same scan listed twice keeps one name (it is one case).

    Args:
        paths: the run's input paths.
        taken: ``name -> source`` of cases already written where this run writes (earlier runs).
        logger: where to say which names were disambiguated (default: ``ctfm_common``).

    Returns:
        One name per path, in order.
    """
    sources = [case_source(p) for p in paths]
    plain = [case_name(os.fspath(p).rstrip("/\\") or os.fspath(p)) for p in paths]
    owners: dict[str, set[str]] = {}
    for name, source in zip(plain, sources):
        owners.setdefault(name, set()).add(source)
    for name, source in (taken or {}).items():
        if name in owners and source:
            owners[name].add(case_source(source))
    names, renamed = [], []
    for name, source in zip(plain, sources):
        if len(owners[name]) > 1:
            parent = Path(source).parent.name
            digest = hashlib.sha1(source.encode()).hexdigest()[:8]
            unique = f"{parent}_{name}-{digest}" if parent else f"{name}-{digest}"
            if unique not in names:
                renamed.append(f"{source} -> {unique}")
            name = unique
        names.append(name)
    if renamed:
        (logger or logging.getLogger("ctfm_common")).warning(
            f"{len(renamed)} case(s) share a file name with another scan; named after their full path instead: "
            + "; ".join(renamed)
        )
    return names


#: The registry of the case names given out in an output folder (``name -> source``).
CASE_NAMES_FILE = ".case_names.json"


def claim_case_names(
    output_dir: str | os.PathLike,
    paths: Sequence[str | os.PathLike],
    taken: Mapping[str, str] | None = None,
    logger: logging.Logger | None = None,
) -> list[str]:
    """:func:`case_names` for a run writing into ``output_dir``, reserved there before any output.

    The names given out in the folder are kept in its ``.case_names.json`` (``name -> source``),
    read and extended under a file lock: a name already given to another scan, by an earlier run
    or by one running at the same time, counts as taken, and a scan named there before keeps its
    name (a rerun rewrites its own outputs). Two runs that write into one folder
    at once therefore never give one name to two different scans (the outputs of one would
    replace the other's).

    Args:
        output_dir: the folder the run writes its per-case outputs into.
        paths: the run's input paths.
        taken: further ``name -> source`` known to be taken (e.g. rows of an earlier run's table).
        logger: as :func:`case_names`.

    Returns:
        One name per path, in order.
    """
    registry = Path(output_dir) / CASE_NAMES_FILE
    with file_lock(registry):
        try:
            claimed = json.loads(registry.read_text()) if registry.is_file() else {}
        except (OSError, json.JSONDecodeError):
            claimed = {}  # an unreadable registry: names are still checked against ``taken``
        owned = {source: name for name, source in claimed.items()}  # a scan named here before keeps its name
        sources = [case_source(p) for p in paths]
        new = [p for p, source in zip(paths, sources) if source not in owned]
        fresh = dict(zip(map(case_source, new), case_names(new, {**dict(taken or {}), **claimed}, logger)))
        names = [owned.get(source) or fresh[source] for source in sources]
        claimed.update(zip(names, sources))
        atomic_write_text(registry, json.dumps(claimed, indent=1, sort_keys=True) + "\n")
    return names


def _is_dicom_folder(folder: Path) -> bool:
    for child in folder.iterdir():
        if child.is_file():
            with open(child, "rb") as f:
                head = f.read(132)
            if head[128:132] == b"DICM" or child.suffix.lower() == ".dcm":
                return True
    return False


def _datalist_items(path: Path, dataset_dir: str | None, key: str, sections: Sequence[str] | None) -> list[dict]:
    try:
        content = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}: not a valid datalist JSON ({e}).") from e
    if not isinstance(content, dict):
        raise UsageError(f"{path}: a datalist is a JSON object with 'training'/'validation'/'testing' lists.")
    base = Path(dataset_dir) if dataset_dir else path.parent
    if sections is None:  # the first non-empty of testing, validation, training
        sections = [next((s for s in DATALIST_SECTIONS if content.get(s)), DATALIST_SECTIONS[0])]
    resolved = []
    for section in sections:
        for i, item in enumerate(content.get(section) or []):
            item = {key: item} if isinstance(item, str) else dict(item)
            if key not in item:
                raise UsageError(f"{path}: item {i} of '{section}' has no '{key}' entry: {item}")
            item[key] = str(base / item[key]) if not os.path.isabs(item[key]) else item[key]
            resolved.append(item)
    if not resolved:
        raise UsageError(f"{path}: the '{', '.join(sections)}' list is empty or missing.")
    return resolved


def resolve_input(
    input: str | os.PathLike,
    *,
    dataset_dir: str | None = None,
    key: str = "image",
    sections: Sequence[str] | None = None,
) -> list[dict]:
    """Turn the ``input`` id into MONAI data dicts ``[{key: path}, ...]``.

    Args:
        input: a CT file (NIfTI/NRRD/MHA), a DICOM series folder, a glob pattern, or a decathlon
            datalist JSON (its ``testing`` list, else ``validation``, else ``training``).
        dataset_dir: base folder of relative datalist paths (default: the datalist's folder).
        key: the dict key of the image path.
        sections: datalist lists to read, in order (e.g. ``["training", "validation"]`` for a whole
            dataset); default: the first non-empty of ``testing``, ``validation``, ``training``.

    Returns:
        One dict per scan, in a stable order. Datalist items keep their other entries.

    Raises:
        FileNotFoundError: nothing matches ``input``, naming what was looked for.
        ValueError: a folder without DICOM files, or a malformed datalist.
    """
    text = os.fspath(input)
    path = Path(text).expanduser()
    if path.is_file() and path.suffix.lower() == ".json":
        return _datalist_items(path, dataset_dir, key, sections)
    if path.is_dir():
        if not _is_dicom_folder(path):
            raise UsageError(
                f"{path}: folder holds no DICOM files; pass an image file, a DICOM series folder or a glob."
            )
        return [{key: str(path)}]
    if path.is_file():
        return [{key: str(path)}]
    if glob.has_magic(text):
        matches = sorted(glob.glob(os.path.expanduser(text)))
        if not matches:
            raise FileNotFoundError(errno.ENOENT, f"input pattern '{text}' matches no file", text)
        return [{key: m} for m in matches]
    raise FileNotFoundError(
        errno.ENOENT, f"input '{text}' does not exist (expected a CT file, a DICOM folder, a glob or a datalist)", text
    )
