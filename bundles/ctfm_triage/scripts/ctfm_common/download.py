# GENERATED from ctfm_common/download.py by ctfm-sync-bundles: edit the source, not this copy.
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
"""Verified downloads and safe unzipping for bundle zips and weight files.

- :func:`fetch` downloads to a temporary file beside the destination, checks its SHA-256
  while it streams, and moves it into place only when the hash matches; on a mismatch the
  download is deleted and the error names the expected and the actual hash.
- :func:`check_zip_members` / :func:`safe_extract` refuse an archive whose members would
  land outside the target folder (absolute paths, ``..`` components, drive letters,
  backslashes, symbolic links) before writing anything, naming the member. MONAI 1.6.1's
  ``monai.bundle download`` checks members one at a time while it extracts, so a refused
  archive leaves the members before the bad one behind (and a later download then skips
  extraction because the folder is not empty); it also stores a symbolic link member as a
  regular file and checks no hash for ``--url`` downloads.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import tempfile
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath

from .runtime import atomic_write, temporary_sibling

SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")
CHUNK = 1 << 20
#: Largest uncompressed size of an archive we extract: a bundle without weights is a few MB.
MAX_UNCOMPRESSED_BYTES = 2 * 2**30
#: Largest compression ratio of a member above 1 MiB: text and code compress about 3-10x; a
#: "zip bomb" compresses zeros 1000x to fill the disk on extraction.
MAX_COMPRESSION_RATIO = 100


class IntegrityError(ValueError):
    """A downloaded or given file whose SHA-256 is not the expected one."""


class UnsafeArchiveError(ValueError):
    """An archive with a member that would be written outside the target folder (or is a link)."""


def check_sha256_text(sha256: str) -> str:
    """Normalise a SHA-256 hex digest (lower case) and check its format.

    Raises:
        ValueError: not 64 hexadecimal characters.
    """
    if not isinstance(sha256, str):  # e.g. an all-digit hash that a command line parsed as a number
        raise ValueError(
            f"a SHA-256 must be given as text of 64 hexadecimal characters, got the {type(sha256).__name__} "
            f"{sha256!r} (quote an all-digit hash: --sha256 \"'<hash>'\")"
        )
    text = sha256.strip().lower()
    if not SHA256_PATTERN.match(text):
        raise ValueError(f"not a SHA-256 hex digest (64 hexadecimal characters): '{sha256}'")
    return text


def sha256_of(path: str | os.PathLike) -> str:
    """The SHA-256 hex digest of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_sha256(path: str | os.PathLike, sha256: str) -> Path:
    """Check that ``path`` has the SHA-256 ``sha256``.

    Raises:
        IntegrityError: the hashes differ, naming both.
    """
    expected = check_sha256_text(sha256)
    actual = sha256_of(path)
    if actual != expected:
        raise IntegrityError(f"{path}: SHA-256 mismatch: expected {expected}, got {actual}")
    return Path(path)


def fetch(url: str, dest: str | os.PathLike, sha256: str, *, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` only if its content has the SHA-256 ``sha256``.

    The download goes to a temporary file beside ``dest`` and is hashed while it streams; it is
    moved into place (atomically) only when the hash matches, so ``dest`` is never a partial or a
    tampered file. A ``dest`` that already has the expected hash is kept without downloading.

    Args:
        url: ``http(s)://`` or ``file://`` address.
        dest: destination file; its folder is created.
        sha256: expected SHA-256 hex digest (required: this function does not download unverified).
        timeout: seconds to wait for the server.

    Returns:
        ``dest``.

    Raises:
        IntegrityError: the downloaded content has another hash (the download is deleted; an
            existing ``dest`` is left as it was), naming the expected and the actual hash.
    """
    expected = check_sha256_text(sha256)
    dest = Path(dest)
    if dest.is_file() and sha256_of(dest) == expected:
        return dest
    actual = ""

    def download(tmp: Path) -> None:
        nonlocal actual
        digest = hashlib.sha256()
        with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
            for block in iter(lambda: response.read(CHUNK), b""):
                digest.update(block)
                out.write(block)
        actual = digest.hexdigest()
        if actual != expected:
            raise IntegrityError(
                f"{url}: SHA-256 mismatch: expected {expected}, got {actual}; the download was deleted and {dest} "
                f"was not written (a tampered or corrupt file, or the wrong hash?)"
            )

    return atomic_write(dest, download)


def unsafe_member_reason(info: zipfile.ZipInfo) -> str | None:
    """Why a zip member could write outside the extraction folder, or ``None`` when it is safe."""
    name = info.filename
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        return "is a symbolic link"
    if "\\" in name:
        return "contains a backslash (a Windows path separator)"
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return "is an absolute path"
    if ".." in PurePosixPath(name).parts:
        return "contains a '..' component"
    if "\x00" in name:
        return "contains a NUL character"
    return None


def check_zip_members(zip_path: str | os.PathLike, *, top: str | None = None) -> list[str]:
    """Check every member of a zip before anything is extracted.

    Args:
        zip_path: the archive.
        top: when given, every member must sit in this top-level folder (the zoo layout:
            ``<bundle>/...``).

    Returns:
        The member names, in archive order.

    Raises:
        UnsafeArchiveError: the first unsafe member, named with the reason.
        zipfile.BadZipFile: not a zip file.
    """
    with zipfile.ZipFile(zip_path) as archive:
        infos = archive.infolist()
    total = 0
    for info in infos:
        reason = unsafe_member_reason(info)
        if reason is None and top is not None and PurePosixPath(info.filename).parts[:1] != (top,):
            reason = f"is outside the bundle folder '{top}/'"
        ratio = info.file_size / max(info.compress_size, 1)
        if reason is None and info.file_size > CHUNK and ratio > MAX_COMPRESSION_RATIO:
            reason = (f"expands {ratio:.0f}x ({info.compress_size} -> {info.file_size} bytes), above the limit of "
                      f"{MAX_COMPRESSION_RATIO}x (a zip bomb?)")
        if reason:
            raise UnsafeArchiveError(f"{zip_path}: refused: member '{info.filename}' {reason}; nothing was extracted")
        total += info.file_size
    if total > MAX_UNCOMPRESSED_BYTES:
        raise UnsafeArchiveError(
            f"{zip_path}: refused: {total} bytes uncompressed, above the limit of {MAX_UNCOMPRESSED_BYTES} "
            f"(a zip bomb?); nothing was extracted"
        )
    return [info.filename for info in infos]


def zip_top_folder(zip_path: str | os.PathLike) -> str:
    """The single top-level folder of a zoo-layout zip.

    Raises:
        UnsafeArchiveError: an unsafe member (see :func:`check_zip_members`), members in more than one
            top-level folder, or files at the top level.
    """
    check_zip_members(zip_path)
    with zipfile.ZipFile(zip_path) as archive:
        tops = {PurePosixPath(i.filename).parts[0] for i in archive.infolist() if i.filename.strip("/")}
        flat = [i.filename for i in archive.infolist() if len(PurePosixPath(i.filename).parts) == 1 and not i.is_dir()]
    if len(tops) != 1 or flat:
        raise UnsafeArchiveError(
            f"{zip_path}: not a bundle zip: expected one top-level folder, found {sorted(tops)}"
            + (f" and top-level files {flat[:3]}" if flat else "")
        )
    return tops.pop()


def safe_extract(
    zip_path: str | os.PathLike,
    dest_dir: str | os.PathLike,
    *,
    sha256: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Extract a zoo-layout bundle zip (``<bundle>/...``) into ``dest_dir/<bundle>``, safely.

    The hash (when given) and every member are checked before anything is written; the bundle is
    extracted into a temporary folder beside it and moved into place, so ``dest_dir/<bundle>`` is
    either complete or absent.

    Args:
        zip_path: the archive.
        dest_dir: folder that receives the bundle folder.
        sha256: expected SHA-256 of the archive.
        overwrite: replace an existing ``dest_dir/<bundle>``; otherwise refuse.

    Returns:
        The extracted bundle folder.

    Raises:
        IntegrityError: the archive's hash is not ``sha256``.
        UnsafeArchiveError: a member that would escape the folder, naming it.
        FileExistsError: the bundle folder exists and ``overwrite`` is false.
    """
    if sha256 is not None:
        verify_sha256(zip_path, sha256)
    top = zip_top_folder(zip_path)
    check_zip_members(zip_path, top=top)
    dest_dir = Path(dest_dir)
    target = dest_dir / top
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; remove it or pass overwrite=True")
    dest_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{top}.", suffix=".extract", dir=dest_dir))
    try:
        with zipfile.ZipFile(zip_path) as archive:
            for info in archive.infolist():
                path = staging.joinpath(*PurePosixPath(info.filename).parts)
                if info.is_dir():
                    path.mkdir(parents=True, exist_ok=True)
                    continue
                path.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(info) as source, open(path, "wb") as out:
                    shutil.copyfileobj(source, out)
        if target.exists():
            old = temporary_sibling(target)
            os.replace(target, old)
            os.replace(staging / top, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging / top, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
