"""Turn check results into points with the instructor's rubric (``lab/rubric.toml``)."""
from __future__ import annotations

import hashlib
import tomllib
from dataclasses import dataclass
from pathlib import Path

from grader import limits as limits_
from grader.checks import CHECKS
from grader.environment import PACKAGE_NAME, Environment, SupportFileError
from grader.limits import Limits
from grader.results import CheckResult, ScoredCheck


class RubricError(ValueError):
    """The rubric file is not usable; the message names the file and the entry."""


@dataclass(frozen=True)
class RubricEntry:
    name: str
    title: str
    points: float
    visibility: str
    partial: bool


@dataclass(frozen=True)
class Rubric:
    path: Path
    sha256: str
    title: str
    model_file: str
    limits: Limits
    entries: tuple[RubricEntry, ...]
    environment: Environment = Environment()

    @property
    def names(self) -> list[str]:
        return [entry.name for entry in self.entries]

    @property
    def max_score(self) -> float:
        return sum(entry.points for entry in self.entries)


def load_rubric(path: Path) -> Rubric:
    raw = path.read_bytes()
    try:
        document = tomllib.loads(raw.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise RubricError(f"{path}: not valid TOML: {error}") from None
    checks = document.get("checks")
    if not isinstance(checks, dict) or not checks:
        raise RubricError(f"{path}: no [checks.NAME] tables")
    entries = []
    for name, table in checks.items():
        if name not in CHECKS:
            raise RubricError(f"{path}: [checks.{name}] names no check; known checks: {', '.join(CHECKS)}")
        points = table.get("points")
        if not isinstance(points, (int, float)) or isinstance(points, bool) or points < 0:
            raise RubricError(f"{path}: [checks.{name}] points must be a non-negative number")
        visibility = table.get("visibility", "visible")
        if visibility not in ("visible", "hidden"):
            raise RubricError(f"{path}: [checks.{name}] visibility must be \"visible\" or \"hidden\"")
        entries.append(RubricEntry(name, str(table.get("title", name)), float(points), visibility,
                                   bool(table.get("partial", False))))
    rubric = document.get("rubric", {})
    try:
        limits = limits_.from_table(document.get("limits", {}))
    except (ValueError, AttributeError) as error:
        raise RubricError(f"{path}: [limits]: {error}") from None
    model_file = str(rubric.get("model_file", "mnist_cnn.pt"))
    return Rubric(path=path, sha256=hashlib.sha256(raw).hexdigest(),
                  title=str(rubric.get("title", "Lab")), model_file=model_file,
                  limits=limits, entries=tuple(entries),
                  environment=_environment(path, document.get("environment", {}), model_file))


def _environment(path: Path, table: object, model_file: str) -> Environment:
    """The ``[environment]`` table: support files (relative to the rubric) and packages."""
    if not isinstance(table, dict) or set(table) - {"support_files", "packages"}:
        raise RubricError(f"{path}: [environment] takes support_files and packages (lists of strings)")
    lists = {key: table.get(key, []) for key in ("support_files", "packages")}
    for key, value in lists.items():
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise RubricError(f"{path}: [environment] {key} must be a list of strings")
    odd = [name for name in lists["packages"] if not PACKAGE_NAME.match(name)]
    if odd:
        raise RubricError(f"{path}: [environment] packages: {odd[0]!r} is not a package name (give pip's name, "
                          "no version: the installed version is recorded in each result)")
    try:
        return Environment(packages=tuple(lists["packages"])).adding(
            (path.parent / name for name in lists["support_files"]), reserved=(model_file,))
    except SupportFileError as error:
        raise RubricError(f"{path}: [environment] {error}") from None


def score(results: list[CheckResult], rubric: Rubric) -> tuple[ScoredCheck, ...]:
    by_name = {result.name: result for result in results}
    scored = []
    for entry in rubric.entries:
        result = by_name[entry.name]
        fraction = min(max(result.fraction, 0.0), 1.0)
        earned = fraction if entry.partial else float(fraction >= 1.0)
        status = "passed" if earned >= 1.0 else "partial" if earned > 0 else "failed"
        scored.append(ScoredCheck(name=entry.name, title=entry.title, points=round(entry.points * earned, 4),
                                  max_points=entry.points, status=status, message=result.message,
                                  visibility=entry.visibility, warnings=result.warnings))
    return tuple(scored)
