"""What grading provides a notebook besides the lab's own packages and data: the instructor's
support files (copied into every work dir) and extra packages (installed by the set-up command).

The rubric's ``[environment]`` table declares both (:func:`grader.score.load_rubric` reads it), and
``--support-file`` adds files; a run's key holds the files' digests and the packages' versions.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from packaging.utils import canonicalize_name

PACKAGE_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$")  # a distribution's name, no version


class SupportFileError(ValueError):
    """A support file that can't be provided; the message names it."""


@dataclass(frozen=True)
class SupportFile:
    """A file the instructor provides (the course's data helper, say): copied read-only into every
    notebook's work dir before its first cell. Read once, when the rubric or the command line names
    it, so every notebook of a batch gets the same bytes, and the run key the digest of those."""

    name: str
    content: bytes

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()


@dataclass(frozen=True)
class Environment:
    """The rubric's ``[environment]`` table (``support_files``, paths relative to the rubric;
    ``packages``, pip names the set-up command installs: ``labgrader packages`` prints them), plus
    ``--support-file`` paths."""

    support_files: tuple[SupportFile, ...] = ()
    packages: tuple[str, ...] = ()

    def adding(self, paths: Iterable[Path], reserved: Iterable[str] = ()) -> Environment:
        """This environment with the files at ``paths`` provided too; SupportFileError names one that
        is missing or whose name another file, or a name the work dir needs, already has."""
        files = list(self.support_files)
        for path in paths:
            path = Path(path)
            if not path.is_file():
                raise SupportFileError(f"support file {path}: not found (or not a regular file)")
            if path.name in {f.name for f in files} | {"data", *reserved}:
                raise SupportFileError(f"support file {path}: another support file, the dataset (data) or the "
                                       f"saved model already has the name {path.name!r} in the work dir")
            files.append(SupportFile(path.name, path.read_bytes()))
        return Environment(tuple(files), self.packages)

    def digest(self) -> dict[str, str]:
        """What decides a run: each support file's name and content."""
        return {f.name: f.sha256 for f in self.support_files}


def package_versions(packages: Iterable[str]) -> dict[str, str | None]:
    """Each declared package's installed version, None where it is not installed."""
    versions: dict[str, str | None] = {}
    for name in packages:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def import_names(package: str) -> tuple[str, ...]:
    """The top-level modules a declared package gives ``import`` (pip's name, normalised, when it is
    not installed or says nothing): what a ModuleNotFoundError names."""
    wanted = canonicalize_name(package)
    provides = [module for module, owners in _modules_by_distribution().items()
                if any(canonicalize_name(owner) == wanted for owner in owners)]
    return tuple(sorted(provides)) or (wanted.replace("-", "_"),)


@functools.cache
def _modules_by_distribution() -> dict[str, list[str]]:
    # Once per process: it reads every installed distribution's file list (0.5 s here, measured as
    # most of the grader's time outside the cells for each notebook), and a grading process never
    # installs anything.
    return importlib.metadata.packages_distributions()


def same_name(package: str, module: str) -> bool:
    """Whether a module's name is the package's under pip's normalisation (``torch_info`` and
    ``torch-info``): the guess for a declared package that is not installed."""
    return canonicalize_name(package) == canonicalize_name(module)
