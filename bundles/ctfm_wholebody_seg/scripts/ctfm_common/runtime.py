# GENERATED from ctfm_common/runtime.py by ctfm-sync-bundles: edit the source, not this copy.
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
"""Small runtime rules every bundle and tool shares: flags, shards, atomic writes.

- Flags: ``--amp false`` reaches a config as the string ``'false'`` (fire keeps lowercase
  words as strings), so flags go through :func:`as_bool`.
- Shards (DESIGN.md): per-scan batch work takes ``shard_index`` / ``num_shards``, defaulting
  from torchrun (``RANK``/``WORLD_SIZE``) or a SLURM array, so any scheduler can spread it.
- Atomic writes: a file is written beside its destination and moved into place with
  ``os.replace``, so a crash never leaves a half-written output or destroys the previous one.
- Shared result files (a run's ``summary.json``, ``predictions.csv``) are merged under
  :func:`file_lock` by case, so earlier and concurrent runs into one folder keep their rows.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

TRUE_WORDS = ("1", "true", "yes", "on")
#: ``CTFM_TRACEBACK=1`` prints the full traceback of a refused input or setting too.
TRACEBACK_VARIABLE = "CTFM_TRACEBACK"


class UsageError(ValueError):
    """A setting or file a run cannot use (a datalist, an output folder, a device); the message is one line
    naming it and what to do."""


#: ``OSError`` numbers that are the user's environment, not a bug: one line, no traceback.
_ENVIRONMENT_ERRNOS = {
    errno.ENOSPC: "the disk is full: free space or write elsewhere",
    errno.EDQUOT: "disk quota exceeded: free space or write elsewhere",
    errno.EROFS: "a read-only file system: pick a writable --output_dir / --ckpt_dir",
    errno.EACCES: "no permission: pick a writable --output_dir / --ckpt_dir",
    errno.EPERM: "no permission: pick a writable --output_dir / --ckpt_dir",
    errno.ENOTDIR: "a file is in the way where a folder is needed",
    errno.EEXIST: "a file is in the way where a folder is needed",
    errno.EISDIR: "a folder where a file is needed",
    errno.ENOENT: "",
    errno.EIO: "",
}#: Error types of the bundles whose message is already one line naming the file (a scan, a datalist).
_ONE_LINE_ERRORS = {"InputError", "DatalistError", "EncoderWeightsError"}
_NO_CUDA = ("Torch not compiled with CUDA enabled", "Found no NVIDIA driver", "No CUDA GPUs are available",
            "CUDA driver initialization failed", "invalid device ordinal")


def _chain(error: BaseException) -> list[BaseException]:
    chain, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def user_error_line(error: BaseException) -> str | None:
    """One line for an error caused by the input or the environment, ``None`` for anything else (a bug).

    Recognised anywhere in the exception's chain (MONAI and Ignite wrap what a transform or a
    handler raised): a refused scan (``InputError``) or setting (:class:`UsageError`), an
    ``OSError`` of the environment (disk full, read-only or missing folder, a file where a folder
    should be, permissions) with its path, and a CUDA device requested on a machine without one.
    """
    chain = _chain(error)
    for cause in chain:
        if isinstance(cause, UsageError) or type(cause).__name__ in _ONE_LINE_ERRORS:
            return str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    for cause in chain:
        line = _worker_error_line(str(cause))
        if line:
            return line
    for cause in chain:
        if isinstance(cause, OSError) and cause.errno in _ENVIRONMENT_ERRNOS:
            where = cause.filename if cause.filename is not None else ""
            what = cause.strerror or os.strerror(cause.errno)
            hint = _ENVIRONMENT_ERRNOS[cause.errno]
            what = f"{what} ({hint})" if hint and hint.split(":")[0] not in what else what
            return f"{where}: {what}" if where and str(where) not in what else what
    for cause in chain:
        text = str(cause)
        if any(marker in text for marker in _NO_CUDA):
            reason = text.strip().splitlines()[0].split(". ")[0][:120]
            return f"a CUDA device was requested but this machine has none usable ({reason}); run with --device cpu"
    return None


def _worker_error_line(text: str) -> str | None:
    """The one line of a refused input or setting raised in a ``DataLoader`` worker: PyTorch re-raises it in
    the main process as an error whose message is the worker's traceback (``Caught InputError in DataLoader
    worker process 0.`` ... ``scripts.ctfm_common.validate.InputError: <file>: <problem>``)."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if not lines or not lines[0].startswith("Caught ") or "DataLoader worker" not in lines[0]:
        return None
    kind, _, message = lines[-1].partition(": ")
    if kind.rsplit(".", 1)[-1] in {*_ONE_LINE_ERRORS, "UsageError"} and message.strip():
        return message.strip()
    return None


def _excepthook(kind, error, tb) -> None:
    line = user_error_line(error) if isinstance(error, Exception) else None
    if line is None or as_bool(os.environ.get(TRACEBACK_VARIABLE, "0") or "0"):
        sys.__excepthook__(kind, error, tb)
        return
    sys.stderr.write(f"error: {line}\n")
    sys.stderr.flush()


def install_error_hook() -> None:
    """Print errors of the input or the environment (:func:`user_error_line`) as one ``error: ...`` line on
    stderr instead of a traceback (exit status 1 as before); bugs keep their traceback. Bundles install it when
    ``scripts`` is imported, so every ``monai.bundle run`` gets it; ``CTFM_TRACEBACK=1`` shows tracebacks."""
    sys.excepthook = _excepthook

FALSE_WORDS = ("0", "false", "no", "off", "", "none")


def as_bool(value: bool | str | int | None) -> bool:
    """A flag from a config or the command line; ``'false'``/``'0'``/``'no'`` are false.

    Raises:
        ValueError: a string that is no boolean word, naming it.
    """
    if isinstance(value, str):
        word = value.strip().lower()
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
        raise ValueError(f"not a boolean: '{value}' (use true/false)")
    return bool(value)


def default_shard(environ: Mapping[str, str] | None = None) -> tuple[int, int]:
    """``(shard_index, num_shards)`` from torchrun (``RANK``/``WORLD_SIZE``) or a SLURM array, else ``(0, 1)``."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" in env and "RANK" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"])
    if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        first = int(env.get("SLURM_ARRAY_TASK_MIN", 0))
        return int(env["SLURM_ARRAY_TASK_ID"]) - first, int(env["SLURM_ARRAY_TASK_COUNT"])
    return 0, 1


def resolve_shard(shard_index: int | None = None, num_shards: int | None = None) -> tuple[int, int]:
    """Fill unset shard arguments from the environment and check them.

    Raises:
        ValueError: ``shard_index`` outside ``[0, num_shards)``.
    """
    env_index, env_count = default_shard()
    index = env_index if shard_index is None else int(shard_index)
    count = env_count if num_shards is None else int(num_shards)
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard_index must be in [0, num_shards): got shard_index={index}, num_shards={count}")
    return index, count


def shard_items(items: Sequence[Any], shard_index: int, num_shards: int) -> list[Any]:
    """One shard's items: every ``num_shards``-th item from ``shard_index`` (stable, disjoint, complete)."""
    return list(items[shard_index::num_shards])


def temporary_sibling(path: str | os.PathLike) -> Path:
    """A unique temporary path in ``path``'s folder (so ``os.replace`` is atomic), keeping its suffixes."""
    path = Path(path)
    suffix = "".join(path.suffixes) or ".tmp"
    return path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp{suffix}")


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp_path)``, then move the result to ``path``; the temporary file never survives.

    Args:
        path: destination; its folder is created.
        write: writes the complete file to the path it is given (any writer: ``np.save``,
            ``nib.save``, ``safetensors.save_file``, ...).

    Returns:
        ``path``, now complete and readable by others (mode 0644 less the umask).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o644 & ~umask)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a text file atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def atomic_write_csv(
    path: str | os.PathLike,
    rows: Sequence[Mapping],
    fieldnames: Sequence[str],
    *,
    lineterminator: str = "\r\n",
) -> Path:
    """Write dict rows as CSV atomically (see :func:`atomic_write`): the old file stays whole until the new
    one is complete.

    Args:
        path: the CSV file; its folder is created.
        rows: one dict per row; keys outside ``fieldnames`` are ignored, missing ones and ``None`` left empty.
        fieldnames: the columns, in order (the header).
        lineterminator: the line ending (the ``csv`` module's ``"\\r\\n"`` by default).

    Returns:
        ``path``.
    """
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(fieldnames), extrasaction="ignore", lineterminator=lineterminator)
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(buffer.getvalue(), newline=""))


def write_error_list(
    path: str | os.PathLike, errors: Sequence[Mapping], fields: Sequence[str], lineterminator: str = "\r\n"
) -> Path | None:
    """Write the list of failed items as CSV (atomically), or remove a stale list of an earlier run when
    nothing failed.

    Args:
        path: the CSV file.
        errors: one row per failed item.
        fields: the columns (other keys of a row are ignored).
        lineterminator: the CSV line ending.

    Returns:
        The CSV path, ``None`` when nothing failed.
    """
    path = Path(path)
    if not errors:
        path.unlink(missing_ok=True)
        return None
    return atomic_write_csv(path, errors, fields, lineterminator=lineterminator)


@contextlib.contextmanager
def file_lock(path: str | os.PathLike):
    """Hold an exclusive lock for ``path`` (on ``<path>.lock``) while reading-merging-writing it.

    Processes that share an output folder wait for each other here, so a merge never loses the
    rows another run wrote in between (POSIX ``flock``; without it, no lock is taken).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: atomic writes only
        yield
        return
    with open(path.with_name(path.name + ".lock"), "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def read_case_records(path: str | os.PathLike, *, expect: Mapping[str, Any] | None = None) -> list[dict]:
    """The ``cases`` records of an earlier run's JSON file (``[]`` when there is none).

    Args:
        path: the JSON file (``{"cases": [{...}, ...], ...}``).
        expect: top-level entries the file must hold to be merged with (``{"label_names": [...]}``);
            records of a file that differs are dropped, with a warning.

    Returns:
        The earlier records (dicts only); an unreadable file gives none, with a warning.
    """
    import json
    import logging

    path = Path(path)
    if not path.is_file():
        return []
    log = logging.getLogger(__name__)
    try:
        content = json.loads(path.read_text())
        if not isinstance(content, dict) or not isinstance(content.get("cases"), list):
            raise ValueError("no list of cases")
    except (OSError, ValueError) as e:
        log.warning(f"{path}: unreadable earlier records ({e}); they are replaced")
        return []
    for name, value in (expect or {}).items():
        if content.get(name) != value:
            log.warning(f"{path}: earlier records are for {name} {content.get(name)}, not {value}; they are replaced")
            return []
    return [case for case in content["cases"] if isinstance(case, dict)]


def merge_case_records(
    path: str | os.PathLike,
    records: Sequence[Mapping] | Callable[[list[dict]], Sequence[Mapping]],
    write: Callable[[list[dict]], object],
    *,
    key: Callable[[Mapping], Any] | None = None,
    expect: Mapping[str, Any] | None = None,
    keep_earlier: bool = True,
) -> list[dict]:
    """Merge this run's case records with an earlier run's, by case, under a lock, and write them.

    Runs sharing an output folder (shards, reruns, two users) wait for each other on
    :func:`file_lock`, so none drops the records another wrote in between. Earlier cases stay; a
    case of this run replaces the earlier record with the same ``key`` in its place; new cases follow.

    Args:
        path: the JSON file holding the records (``{"cases": [...]}``), read with :func:`read_case_records`.
        records: this run's records, or a function of the earlier records that returns them (called
            under the lock, e.g. to name new cases so that they do not take an earlier case's name).
        write: writes the merged records (the JSON file at ``path`` and any companion such as a CSV),
            atomically; called under the lock.
        key: a record's identity (default: its ``"case"``); records whose key is ``None`` are never replaced.
        expect: top-level entries the earlier file must hold to be merged with (see :func:`read_case_records`).
        keep_earlier: ``False`` writes this run's records only (still under the lock).

    Returns:
        The merged records, as written.
    """
    identity = key or (lambda record: record.get("case"))
    with file_lock(path):
        earlier = read_case_records(path, expect=expect) if keep_earlier else []
        new = records(earlier) if callable(records) else records
        merged: dict = {}
        for index, record in enumerate([*earlier, *(dict(r) for r in new)]):
            found = identity(record)
            merged[("<no key>", index) if found is None else ("key", found)] = record
        cases = list(merged.values())
        write(cases)
    return cases


def cpu_has_native_bf16(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes bfloat16 dot products natively (AVX512-BF16 or AMX-BF16).

    Where it does, bf16 autocast makes 3D convolutions about 2x faster on the CPU (oneDNN);
    where it does not, bf16 is emulated and slower than float32. Linux only (``False`` elsewhere).
    """
    try:
        flags = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))
