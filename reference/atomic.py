"""Write a file whole or not at all: the one way labgrader writes a file someone else may read while
it is written (a resumed batch, a browser on the report, a second grader deriving the same spec).

The bytes go to a uniquely named temporary file in the same folder, are flushed to disk, and replace
the target with ``os.replace``: a reader sees the old file or the new one, never half of one, and two
writers of the same file never mix their bytes. The file is made 0644 (``mkstemp`` makes 0600): a
sandboxed notebook reads the dataset's files as another, unprivileged user, and an instructor's web
server the reports. Lives in ``reference`` because both it and ``grader`` write so.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO


@contextlib.contextmanager
def replacing(path: str | Path, *, binary: bool = False) -> Iterator[IO]:
    """A file object whose content replaces ``path`` when the block ends without an exception;
    text is UTF-8 with newlines written as given."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8", newline="") as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write(path: str | Path, data: str | bytes) -> None:
    """Replace ``path`` with ``data`` (text or bytes), atomically."""
    with replacing(path, binary=isinstance(data, bytes)) as file:
        file.write(data)
