"""Find the notebooks to grade: files, directories and zip archives (as an LMS download gives them).

Nothing here raises on bad input: a file that can't be graded becomes a :class:`Submission` with an
``error`` saying why, and the batch goes on.
"""
from __future__ import annotations

import hashlib
import json
import re
import zipfile
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

import nbformat

from grader.results import Submission

MAX_NOTEBOOK_BYTES = 20_000_000
MAX_ZIP_MEMBERS = 2_000
MAX_ZIP_UNPACKED = 500_000_000
MAX_COMPRESSION_RATIO = 200  # deflate rarely beats 10:1 on notebooks; a bomb goes far past this


def collect(paths: Iterable[Path]) -> list[Submission]:
    submissions: list[Submission] = []
    for path in paths:
        if path.is_dir():
            for child in sorted(path.rglob("*")):
                if child.is_file() and child.suffix in (".ipynb", ".zip") and ".ipynb_checkpoints" not in child.parts:
                    submissions.extend(_from_file(child, str(child.relative_to(path))))
        elif path.is_file():
            submissions.extend(_from_file(path, path.name))
        else:
            submissions.append(_rejected(path.name, str(path), f"{path} does not exist"))
    return _unique_ids(submissions)


def _from_file(path: Path, display: str) -> list[Submission]:
    if path.suffix == ".zip":
        return _from_zip(path, display)
    try:
        size = path.stat().st_size
        if size > MAX_NOTEBOOK_BYTES:
            return [_rejected(display, str(path), f"the notebook is {size:,} bytes; the limit is "
                              f"{MAX_NOTEBOOK_BYTES:,}")]
        return [_validated(display, str(path), path.read_bytes())]
    except OSError as error:
        return [_rejected(display, str(path), f"cannot read the file: {error.strerror}")]


def _from_zip(path: Path, display: str) -> list[Submission]:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as error:
        return [_rejected(display, str(path), f"not a readable zip archive ({error})")]
    with archive:
        members = archive.infolist()
        if len(members) > MAX_ZIP_MEMBERS:
            return [_rejected(display, str(path), f"the archive has {len(members)} entries; the limit is "
                              f"{MAX_ZIP_MEMBERS}")]
        if sum(m.file_size for m in members) > MAX_ZIP_UNPACKED:
            return [_rejected(display, str(path), "the archive unpacks to more than "
                              f"{MAX_ZIP_UNPACKED:,} bytes (a zip bomb?); nothing was extracted")]
        found = []
        for member in members:
            name = PurePosixPath(member.filename)
            if member.is_dir() or name.suffix != ".ipynb" or "__MACOSX" in name.parts:
                continue
            where = f"{display}:{member.filename}"
            if name.is_absolute() or ".." in name.parts or re.match(r"^[A-Za-z]:", member.filename):
                found.append(_rejected(where, str(path), f"unsafe path {member.filename!r} in the archive "
                                       "(it points outside it); the entry was not extracted"))
            elif member.compress_size and member.file_size / member.compress_size > MAX_COMPRESSION_RATIO:
                found.append(_rejected(where, str(path), "the entry is compressed more than "
                                       f"{MAX_COMPRESSION_RATIO}:1 (a zip bomb?); it was not extracted"))
            elif member.file_size > MAX_NOTEBOOK_BYTES:
                found.append(_rejected(where, str(path), f"the notebook is {member.file_size:,} bytes; the "
                                       f"limit is {MAX_NOTEBOOK_BYTES:,}"))
            else:
                try:
                    found.append(_validated(where, str(path), archive.read(member)))
                except (zipfile.BadZipFile, OSError, EOFError, RuntimeError) as error:
                    found.append(_rejected(where, str(path), f"cannot extract the entry: {error}"))
        return found or [_rejected(display, str(path), "the archive holds no .ipynb notebook")]


def _validated(display: str, source: str, raw: bytes) -> Submission:
    sha = hashlib.sha256(raw).hexdigest()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return _rejected(display, source, "not a notebook: the file is not UTF-8 text", sha)
    try:
        json.loads(text)
    except ValueError as error:
        return _rejected(display, source, f"not a notebook: invalid JSON ({error})", sha)
    try:
        notebook = nbformat.reads(text, as_version=4)
        nbformat.validate(notebook)
    except Exception as error:  # nbformat raises several types for schema problems
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return _rejected(display, source, f"not a valid Jupyter notebook: {first_line[:300]}", sha)
    return Submission(id=_slug(display), source=source, notebook=raw, sha256=sha)


def _rejected(display: str, source: str, reason: str, sha: str | None = None) -> Submission:
    return Submission(id=_slug(display), source=source, sha256=sha, error=reason)


def _slug(display: str) -> str:
    stem = re.sub(r"\.ipynb$", "", display)
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("._") or "notebook"


def _unique_ids(submissions: list[Submission]) -> list[Submission]:
    seen: dict[str, int] = {}
    unique = []
    for sub in submissions:
        count = seen.get(sub.id, 0)
        seen[sub.id] = count + 1
        if count:
            sub = Submission(id=f"{sub.id}-{count + 1}", source=sub.source, notebook=sub.notebook,
                             sha256=sub.sha256, error=sub.error)
        unique.append(sub)
    return unique
