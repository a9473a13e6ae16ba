"""Find the notebooks to grade: files, folders and zip archives (as an LMS download gives them).

Guarantees:

* Nothing here raises on bad input. A file that can't be graded becomes a :class:`Submission` with
  a one-line ``error`` saying why, whatever failed while reading it: any exception, not a list of
  expected ones (a notebook whose JSON nests deeper than Python's parser goes raises
  ``RecursionError``; a zip entry with a damaged deflate stream, ``zlib.error``; an encrypted one,
  ``RuntimeError``), and the batch goes on.
* Every entry of a folder or archive is graded or listed with the reason it is not, so no student
  drops out of the gradebook without a word: notebooks (``.ipynb``) are graded, zip archives found
  in a folder are opened (one inside an archive is not), and everything else is listed as not
  graded: other files (``.py``, ``.html``, ...), folders named like a notebook (their contents are
  walked too), symbolic links, pipes, sockets and devices.
* Symbolic links are never followed, wherever they are: in a folder, in an archive, or named on
  the command line (a shell glob over a class folder names the students' own links). Each is
  listed with where it points. Files are opened without following a link or blocking on a pipe,
  checked to be regular files, and read no further than the size limit.
* Skipped without a word, because they are never a student's work: macOS's metadata
  (``__MACOSX/``, ``._*``) and hidden entries other than notebooks (``.DS_Store``, ``.git/``).
  Hidden notebooks (Jupyter's ``.ipynb_checkpoints/`` copies) are listed as not graded: a
  checkpoint can be the only copy a student uploaded.

Students, as LMS downloads name them, are recognised from the paths (first match, nearest the file):

* Canvas: ``lastfirst_USERID_SUBMISSIONID_name.ipynb``, ``late_`` before or after ``lastfirst``,
  ``-1``, ``-2``... before the extension for a resubmitted file of the same name (also on a zip
  archive or a folder with that name, for what it holds). ``student_id`` is the user id,
  ``student_name`` the ``lastfirst``.
* Moodle: a folder ``Full Name_ID_assignsubmission_file_/`` per participant (or, downloaded without
  folders, files named ``Full Name_ID_assignsubmission_file_name.ipynb``). ``student_id`` is the
  participant id the grading worksheet names, ``student_name`` the full name.
* Otherwise, a folder per student: each folder directly below a folder named on the command line
  (or at the top of a named archive; an archive's own name does not count) is taken to be one
  student's; ``student_name`` is the folder's name, ``student_id`` None. Notebooks at the top of a
  named folder, and files named one by one, belong to no recognised student.

One notebook per LMS student is graded: **the newest**. For Canvas that is the highest
SUBMISSIONID, then the highest resubmission number (none counts as 0); for Moodle, and for ties,
the latest modification time (a zip entry's date), then the last path in sorted order. Only
notebooks that were read count (a link or a file over the size limit is listed with its own
reason); when a student has none, their newest file stands for them. Each other file of the
student is still listed, with ``superseded_by`` naming the graded one, and a notebook among them
with the reason "an older resubmission of STUDENT; graded: FILE". Every notebook of a folder per
student is graded: nothing there says that its notebooks are one student's versions (this
project's own ``lab/examples/invalid/`` holds three different broken notebooks, and a class's
folders may be sections or groups), and guessing wrong would leave work ungraded.

Ids: unique (also when compared case-insensitively, as a case-insensitive file system compares
folder names), the same for the same inputs on every run, never one of ``reserved`` (a batch's
class-wide file names), and made of letters, digits, ``_``, ``-`` and ``.`` (never leading or
trailing) so that each is one folder name. A recognised LMS student's graded notebook is named after
the student (``smithjohn_12345``, ``John_Smith_1234567``), which stays the same when they resubmit;
any other entry after its path below what was named (a folder's contents, an archive's members;
an archive found in a folder counts as a folder), or its name when it was named itself, with
``/`` as ``_`` and ``.ipynb`` left out: ``alice/lab.ipynb`` -> ``alice_lab``. When entries would
share an id (or take a reserved one), each of them gets, until they differ: a short hash of its
path below what was named (``x y.ipynb`` and ``x_y.ipynb`` in one archive:
``x_y-1f0c2a9b3e``); then the folders above, nearest first (``alice/lab.ipynb`` and
``bob/lab.ipynb`` named one by one: ``alice_lab``, ``bob_lab``); last, a hash of its full path.
No counter depends on the order found, so adding a student renames no one whose id they do not
share.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import stat
import unicodedata
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import BinaryIO

import nbformat

from grader.results import Submission

MAX_NOTEBOOK_BYTES = 20_000_000
MAX_ZIP_MEMBERS = 2_000
MAX_ZIP_UNPACKED = 500_000_000
MAX_COMPRESSION_RATIO = 200  # deflate rarely beats 10:1 on notebooks; a bomb goes far past this
NOTEBOOK, ARCHIVE = ".ipynb", ".zip"


class NotRegularFile(OSError):
    """What :func:`open_regular` found instead of a regular file (``kind``: "a folder", ...)."""

    def __init__(self, kind: str):
        super().__init__(f"not a regular file: {kind}")
        self.kind = kind


def open_regular(path: Path) -> BinaryIO:
    """Open ``path`` for reading if it is a regular file: never through a symbolic link, never
    blocking on a pipe. Raises :class:`NotRegularFile` for anything else, OSError when unreadable."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        mode = os.lstat(path).st_mode  # a link (ELOOP) or a socket (ENXIO) is named; else re-raises
        if stat.S_ISREG(mode):
            raise
        raise NotRegularFile(_kind(mode, path)) from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise NotRegularFile(_kind(mode, path))
    return os.fdopen(fd, "rb")


_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device"))


def _kind(mode: int, path: Path | None = None) -> str:
    """What a file that is not regular is, in words; a link says where it points if ``path`` is given."""
    if stat.S_ISLNK(mode):
        return "a symbolic link" + (f" to {os.readlink(path)}" if path is not None else "")
    return next((what for test, what in _KINDS if test(mode)), "an unknown kind of file")


@dataclass(frozen=True)
class _Place:
    """Where an entry was found. ``below``: its path below what was named (for a file named itself,
    its name); ``above``: the folders above that, from the root, as named (links not resolved);
    ``archive``: the index in ``below`` of the archive holding it, for an archive found in a
    folder; ``copy``: which of several archive members of the same name it is."""

    above: tuple[str, ...]
    below: tuple[str, ...]
    modified: float = 0.0  # seconds since the epoch
    archive: int | None = None
    copy: int = 0

    @property
    def display(self) -> str:
        return "/".join(self.below)

    @property
    def origin(self) -> tuple[str, ...]:
        return (*self.above, *self.below, *([f"#{self.copy}"] if self.copy else []))

    def member(self, name: str, modified: float, copy: int, named: bool) -> _Place:
        """A member ``name`` of the archive at this place; ``named``: the archive was named itself."""
        parts = tuple(part for part in name.split("/") if part)
        if named:
            return _Place((*self.above, *self.below), parts, modified, copy=copy)
        return _Place(self.above, (*self.below, *parts), modified, len(self.below) - 1, copy)


@dataclass(frozen=True)
class _Found:
    """An entry and its place; ``submission.id`` is what it would be called alone, ``context`` the
    folders that can tell it apart from entries called the same, ``graded`` the index (in the
    collected list) of the file graded for its student when that is another one."""

    place: _Place
    submission: Submission
    context: tuple[str, ...]
    graded: int | None = None


def collect(paths: Iterable[Path], reserved: Iterable[str] = ()) -> list[Submission]:
    """Every entry of ``paths`` (files, folders, zip archives), in the order found, graded or
    listed; no id is one of ``reserved`` (see the module's docstring for ids and students)."""
    found: dict[tuple[str, ...], _Found] = {}
    for path in map(Path, paths):
        for entry in _named(path):
            found.setdefault(entry.place.origin, entry)  # a file named twice is one submission
    return _with_ids(_by_student(list(found.values())), reserved)


def _named(path: Path) -> list[_Found]:
    """A path the user named: a folder is walked, anything else is one entry."""
    absolute = Path(os.path.abspath(path))
    place = _Place(absolute.parent.parts[1:], (absolute.name,))
    try:
        status = path.lstat()
    except FileNotFoundError:
        return [_rejected(place, str(path), f"{path} does not exist")]
    except OSError as error:
        return [_rejected(place, str(path), f"cannot read {path}: {error.strerror}")]
    if stat.S_ISDIR(status.st_mode):
        return list(_walk(path, absolute.parts[1:], path))
    return _entry(path, dataclasses.replace(place, modified=status.st_mtime), status.st_mode, folder=None)


def _walk(folder: Path, above: tuple[str, ...], directory: Path) -> Iterator[_Found]:
    """Every entry below ``directory`` (sorted by name, depth first), graded or listed; ``above``:
    the named ``folder``'s own path."""
    try:
        with os.scandir(directory) as listing:
            entries = sorted(listing, key=lambda e: e.name)
    except OSError as error:
        place = (_Place(above, directory.relative_to(folder).parts) if directory != folder
                 else _Place(above[:-1], above[-1:]))
        yield _rejected(place, str(directory), f"cannot list the folder: {error.strerror}")
        return
    for entry in entries:
        path = Path(entry.path)
        name = PurePosixPath(path.relative_to(folder).as_posix())
        place = _Place(above, name.parts)
        try:
            status = entry.stat(follow_symlinks=False)
        except OSError as error:
            yield _rejected(place, str(path), f"cannot read it: {error.strerror}")
            continue
        if stat.S_ISDIR(status.st_mode):
            if "__MACOSX" in name.parts:
                continue
            if _named_like_a_notebook(name):
                yield _rejected(place, str(path), _FOLDER_NAMED_LIKE_A_NOTEBOOK)
            yield from _walk(folder, above, path)
        elif _quiet(name):
            continue
        elif _hidden(name):
            yield _rejected(place, str(path), _HIDDEN_NOTEBOOK)
        else:
            yield from _entry(path, dataclasses.replace(place, modified=status.st_mtime), status.st_mode, folder)


def _entry(path: Path, place: _Place, mode: int, folder: Path | None) -> list[_Found]:
    """One file (``mode`` as lstat gave it); ``folder``: the folder named that holds it, if any."""
    def read() -> list[_Found]:
        if stat.S_ISLNK(mode):
            return [_rejected(place, str(path), _link_reason(path, folder))]
        if not stat.S_ISREG(mode):
            return [_rejected(place, str(path), f"{_kind(mode)}, not a regular file; it was not read")]
        if path.suffix == ARCHIVE:
            return _from_zip(path, place, named=folder is None)
        if path.suffix != NOTEBOOK:
            return [_rejected(place, str(path), _not_a_notebook(path.suffix))]
        with open_regular(path) as handle:
            size = os.fstat(handle.fileno()).st_size
            if size > MAX_NOTEBOOK_BYTES:
                return [_rejected(place, str(path), f"the notebook is {size:,} bytes; the limit is "
                                  f"{MAX_NOTEBOOK_BYTES:,}")]
            return [_validated(place, str(path), handle.read(MAX_NOTEBOOK_BYTES + 1))]

    return _guarded(place, str(path), read)


def _from_zip(path: Path, place: _Place, named: bool) -> list[_Found]:
    with open_regular(path) as handle:
        try:
            archive = zipfile.ZipFile(handle)
        except (zipfile.BadZipFile, OSError) as error:
            return [_rejected(place, str(path), f"not a readable zip archive ({error})")]
        with archive:
            return _from_archive(archive, place, str(path), named)


def _from_archive(archive: zipfile.ZipFile, place: _Place, source: str, named: bool) -> list[_Found]:
    members = archive.infolist()
    if len(members) > MAX_ZIP_MEMBERS:
        return [_rejected(place, source, f"the archive has {len(members)} entries; the limit is "
                          f"{MAX_ZIP_MEMBERS}")]
    if sum(m.file_size for m in members) > MAX_ZIP_UNPACKED:
        return [_rejected(place, source, "the archive unpacks to more than "
                          f"{MAX_ZIP_UNPACKED:,} bytes (a zip bomb?); nothing was extracted")]
    found = []
    seen: Counter[str] = Counter()
    for member in members:
        seen[member.filename] += 1  # a zip may hold one name twice: each is listed
        where = place.member(member.filename, _zip_time(member), seen[member.filename] - 1, named)
        found.extend(_guarded(where, source, _from_member, archive, member, where, source))
    return found or [_rejected(place, source, "the archive holds no .ipynb notebook")]


def _zip_time(member: zipfile.ZipInfo) -> float:
    try:
        return datetime(*member.date_time, tzinfo=timezone.utc).timestamp()
    except ValueError:  # a date no calendar has (month 0): it orders first
        return 0.0


def _from_member(archive: zipfile.ZipFile, member: zipfile.ZipInfo, where: _Place,
                 source: str) -> list[_Found]:
    name = PurePosixPath(member.filename)
    if name.is_absolute() or ".." in name.parts or re.match(r"^[A-Za-z]:", member.filename):
        return [_rejected(where, source, f"unsafe path {member.filename!r} in the archive "
                          "(it points outside it); the entry was not extracted")]
    if member.is_dir():
        named_like = _named_like_a_notebook(name)
        return [_rejected(where, source, _FOLDER_NAMED_LIKE_A_NOTEBOOK)] if named_like else []
    if _quiet(name):
        return []
    if _hidden(name):
        return [_rejected(where, source, _HIDDEN_NOTEBOOK)]
    if stat.S_ISLNK(member.external_attr >> 16):
        return [_rejected(where, source, "a symbolic link stored in the archive; links are never "
                          "followed, so it was not read")]
    if name.suffix == ARCHIVE:
        return [_rejected(where, source, "an archive inside the archive is not opened; unpack it and "
                          "grade what it holds")]
    if name.suffix != NOTEBOOK:
        return [_rejected(where, source, _not_a_notebook(name.suffix))]
    if member.compress_size and member.file_size / member.compress_size > MAX_COMPRESSION_RATIO:
        return [_rejected(where, source, "the entry is compressed more than "
                          f"{MAX_COMPRESSION_RATIO}:1 (a zip bomb?); it was not extracted")]
    if member.file_size > MAX_NOTEBOOK_BYTES:
        return [_rejected(where, source, f"the notebook is {member.file_size:,} bytes; the "
                          f"limit is {MAX_NOTEBOOK_BYTES:,}")]
    # zipfile stops at the entry's declared size, checked above, however much the data inflates to.
    return [_validated(where, source, archive.read(member))]


def _guarded(place: _Place, source: str, read: Callable[..., list[_Found]], *args) -> list[_Found]:
    """``read(*args)``, or the entry with why it failed: one unreadable file never stops the rest."""
    try:
        return read(*args)
    except Exception as error:  # noqa: BLE001 - any failure here is this file's, not the batch's
        return [_rejected(place, source, f"cannot read it: {_one_line(error)}")]


def _one_line(error: BaseException) -> str:
    cls = type(error)
    name = cls.__name__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__name__}"
    text = str(error).strip()
    return f"{name}: {text.splitlines()[0] if text else ''}"[:300]


_FOLDER_NAMED_LIKE_A_NOTEBOOK = ("a folder, not a notebook file; what it holds is listed separately. "
                                 "Submit the notebook file itself")
_HIDDEN_NOTEBOOK = ("a hidden copy (such as Jupyter's .ipynb_checkpoints), not graded; submit the "
                    "notebook itself")


def _not_a_notebook(suffix: str) -> str:
    what = f"a {suffix} file" if suffix else "a file without an extension"
    return (f"not a notebook ({what}): only Jupyter notebooks (.ipynb), alone or in zip archives, "
            "are graded")


def _link_reason(path: Path, folder: Path | None) -> str:
    target = os.readlink(path)
    if folder is None:
        return f"a symbolic link (to {target}); links are never followed: name what it points to instead"
    if Path(os.path.realpath(path)).is_relative_to(folder.resolve()):
        return f"a symbolic link (to {target}, inside the folder); links are never followed"
    return (f"a symbolic link leading out of the folder (to {target}); links are never followed, so it "
            "was not read")


def _hidden(name: PurePosixPath) -> bool:
    return any(part.startswith(".") for part in name.parts)


def _named_like_a_notebook(folder: PurePosixPath) -> bool:
    return folder.suffix in (NOTEBOOK, ARCHIVE) and not _hidden(folder) and "__MACOSX" not in folder.parts


def _quiet(name: PurePosixPath) -> bool:
    """Never a student's work, so skipped without a word: macOS's metadata, and hidden entries
    other than notebooks."""
    return ("__MACOSX" in name.parts or name.name.startswith("._")
            or (_hidden(name) and name.suffix != NOTEBOOK))


def _validated(place: _Place, source: str, raw: bytes) -> _Found:
    sha = hashlib.sha256(raw).hexdigest()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return _rejected(place, source, "not a notebook: the file is not UTF-8 text", sha)
    try:
        json.loads(text)
    except RecursionError:
        return _rejected(place, source, "not a notebook: its JSON is nested too deeply to read", sha)
    except ValueError as error:
        return _rejected(place, source, f"not a notebook: invalid JSON ({error})", sha)
    try:
        notebook = nbformat.reads(text, as_version=4)
        nbformat.validate(notebook)
    except Exception as error:  # nbformat raises several types for schema problems
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return _rejected(place, source, f"not a valid Jupyter notebook: {first_line[:300]}", sha)
    return _Found(place, Submission(id=_slug(place.display), source=source, notebook=raw, sha256=sha),
                  place.above)


def _rejected(place: _Place, source: str, reason: str, sha: str | None = None) -> _Found:
    return _Found(place, Submission(id=_slug(place.display), source=source, sha256=sha, error=reason),
                  place.above)


# --------------------------------------------------------------------------------------------
# Students: who sent each file, and which of their files is graded

@dataclass(frozen=True)
class _Student:
    key: tuple[str, ...]  # two files are one student's when their keys are equal
    name: str
    lms: str | None = None  # "Canvas user", "Moodle participant"
    lms_id: str | None = None
    order: tuple[int, int] = (0, 0)  # Canvas: this file's (SUBMISSIONID, resubmission number)

    @property
    def who(self) -> str:
        return f"{self.name} ({self.lms} {self.lms_id})" if self.lms else self.name

    @property
    def label(self) -> str | None:
        """The id of their graded notebook, when the LMS names them for good."""
        return _slug_part(f"{self.name}_{self.lms_id}") if self.lms else None


_CANVAS = re.compile(r"(?:late_)?(?P<name>[^\W_]+)_(?:late_)?(?P<user>\d+)_(?P<submission>\d+)_(?P<file>.+)",
                     re.IGNORECASE)
_RESUBMISSION = re.compile(r"-(\d+)(?:\.[A-Za-z]+)?$")  # Canvas's "-1" on a re-uploaded file's name
_MOODLE = re.compile(r"(?P<name>.+?)_(?P<id>\d+)_assignsubmission_[a-z]+_(?P<file>.*)")


def _student(place: _Place) -> _Student | None:
    """Whose ``place`` is: the LMS's name nearest the file (the named folder's own included), else
    the folder per student it is in, if any."""
    for part in reversed((*place.above[-1:], *place.below)):
        if canvas := _CANVAS.fullmatch(part):
            again = _RESUBMISSION.search(canvas["file"])
            return _Student(("canvas", canvas["user"]), canvas["name"], "Canvas user", canvas["user"],
                            (int(canvas["submission"]), int(again[1]) if again else 0))
        if moodle := _MOODLE.fullmatch(part):
            return _Student(("moodle", moodle["id"]), moodle["name"], "Moodle participant", moodle["id"])
    for index, folder in enumerate(place.below[:-1]):
        if index != place.archive:
            plain = not folder.startswith(".") and folder != "__MACOSX"
            return _Student(("folder", *place.above, *place.below[:index + 1]), folder) if plain else None
    return None


def _by_student(found: list[_Found]) -> list[_Found]:
    """Each recognised student's files, with their name; of an LMS student's, the newest notebook
    graded and named after them, the others listed with the one graded instead."""
    students = [_student(entry.place) for entry in found]
    groups: dict[tuple[str, ...], list[int]] = {}
    for index, student in enumerate(students):
        if student is not None:
            groups.setdefault(student.key, []).append(index)
    out = list(found)
    for members in groups.values():
        graded = max([n for n in members if _read_notebook(found[n])] or members,
                     key=lambda n: (students[n].order, found[n].place.modified, found[n].place.below))
        for n in members:
            instead = students[n].lms is not None and n != graded  # a folder per student: each graded
            out[n] = _as_students(found[n], students[n], (graded, found[graded]) if instead else None)
    return out


def _read_notebook(entry: _Found) -> bool:
    """A notebook file that was read, valid or not: one that may be graded for its student."""
    return entry.submission.sha256 is not None and entry.place.display.endswith(NOTEBOOK)


def _as_students(entry: _Found, student: _Student, graded: tuple[int, _Found] | None) -> _Found:
    submission = dataclasses.replace(entry.submission, student_id=student.lms_id, student_name=student.name)
    if graded is None:
        if student.label is None:
            return dataclasses.replace(entry, submission=submission)
        # Named after the student, it can be told apart by the folders that hold the file.
        return _Found(entry.place, dataclasses.replace(submission, id=student.label),
                      (*entry.place.above, *entry.place.below[:-1]))
    index, chosen = graded
    if _read_notebook(entry):
        submission = dataclasses.replace(submission, notebook=None, error=(
            f"an older resubmission of {student.who}; graded: {chosen.place.display}"))
    return dataclasses.replace(entry, submission=submission, graded=index)


# --------------------------------------------------------------------------------------------
# Ids

MAX_ID_BYTES = 120  # a folder name may have 255; the id is one, with room to spare


def _with_ids(found: list[_Found], reserved: Iterable[str]) -> list[Submission]:
    """The submissions with their final ids: entries that would share one (compared
    case-insensitively), or take a reserved one, all move on to their next form together
    (:func:`_id`) until none do. What is found first changes nothing."""
    taken = {name.casefold() for name in reserved}
    levels = [0] * len(found)
    while True:
        ids = [_id(entry, level) for entry, level in zip(found, levels)]
        counts = Counter(i.casefold() for i in ids)
        clashing = [n for n, i in enumerate(ids) if (counts[i.casefold()] > 1 or i.casefold() in taken)
                    and levels[n] <= len(found[n].context) + 1]
        if not clashing:
            break
        for n in clashing:
            levels[n] += 1
    return [dataclasses.replace(entry.submission, id=ids[n],
                                superseded_by=None if entry.graded is None else ids[entry.graded])
            for n, entry in enumerate(found)]


def _id(entry: _Found, level: int) -> str:
    """The id at ``level``: 0, the entry's own; 1, with a hash of its path below what was named;
    then with 1, 2... of the folders of its context in front; last, with a hash of its full path."""
    own = entry.submission.id
    if level == 0:
        return own
    if level == 1:
        return _fit(f"{own}-{_digest(entry.place.below, entry.place.copy)}")
    if level - 1 <= len(entry.context):
        return _fit("_".join([*map(_slug_part, entry.context[-(level - 1):]), own]))
    return _fit(f"{own}-{_digest(entry.place.origin)}")


def _digest(*parts) -> str:
    return hashlib.sha256(repr(parts).encode("utf-8", "surrogateescape")).hexdigest()[:10]


def _slug(display: str) -> str:
    """A path as an id: ``/`` and anything but letters, digits, ``.`` and ``-`` as ``_``, the
    ``.ipynb`` left out."""
    return _slug_part(re.sub(r"\.ipynb$", "", display))


def _slug_part(text: str) -> str:
    text = unicodedata.normalize("NFC", text)  # macOS's archives spell accents apart (NFD)
    return _fit(re.sub(r"[^\w.-]+", "_", text).strip("._") or "notebook")


def _fit(name: str) -> str:
    """``name``, or its start and a hash of the whole when longer than :data:`MAX_ID_BYTES`."""
    if len(name.encode()) <= MAX_ID_BYTES:
        return name
    cut = name
    while len(cut.encode()) > MAX_ID_BYTES - 11:
        cut = cut[:-1]
    return f"{cut.rstrip('._-')}-{_digest(name)}"
