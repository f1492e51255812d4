# GENERATED from ctfm_common/runtime.py by tools/sync_bundles.py: edit the source, not this copy.
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
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

TRUE_WORDS = ("1", "true", "yes", "on")
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
