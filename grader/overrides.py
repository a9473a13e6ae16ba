"""The instructor's last word: overrides of a batch's grades, applied on top of the automatic ones.

An override names a student (a submission id, or the LMS id of the student's graded submission), a
rubric check or ``total`` (the whole submission), the points it gives, a comment, who decided and
when (ISO 8601). ``overrides.toml``::

    [[override]]
    student = "smithjohn_12345"
    check = "train_epoch_result"
    points = 2
    comment = "Returns a percentage, but the method is right."
    by = "J. Doe"
    at = 2025-03-14T10:00:00Z

or ``overrides.csv``, a row each under the header ``student,check,points,comment,by,at``.

Guarantees:

* :func:`load` checks the whole file before anything is graded, and raises :class:`OverrideError`,
  one line naming the file, the override and what to fix: a student or check this batch does not
  have, a submission that cannot be graded or is not the one graded for its student, points outside
  0 to the check's (or, for ``total``, the rubric's) maximum, a field missing or unknown, one check
  of one student overridden twice.
* :func:`apply` executes nothing: it changes the points of a result already scored. It starts from
  the automatic grade (a kept result's overrides from an earlier run are taken off first), so the
  same overrides always give the same result and an override deleted from the file is gone. A check
  override sets that check's points; its verdict and message stay the grader's. The score is the
  checks' sum, or what a ``total`` override sets. ``GradeResult.overrides`` keeps each override with
  the points it replaced, and ``automatic_score`` the grader's score, for the audit.
* A result that is not graded (the grader failed on it while running it) is left as the grader
  made it: its overrides are not applied, and the result has none.
"""
from __future__ import annotations

import csv
import dataclasses
import datetime
import math
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from grader.results import GradeResult, Override, Submission

if TYPE_CHECKING:
    from grader.score import Rubric

TOTAL = "total"
FIELDS = ("student", "check", "points", "comment", "by", "at")
_EXAMPLE_TIME = "2025-03-14T10:00:00Z"


class OverrideError(ValueError):
    """The overrides file cannot be applied; the message says where and why, in one line."""


@dataclass(frozen=True)
class Decision:
    """One override as the file gives it, its student resolved to a submission id."""

    check: str  # a rubric check's name, or TOTAL
    points: float
    comment: str
    by: str
    at: str


# submission id -> the overrides of that submission
Decisions = Mapping[str, tuple[Decision, ...]]


def load(path: Path, submissions: Sequence[Submission], rubric: Rubric) -> dict[str, tuple[Decision, ...]]:
    """The overrides in ``path`` (``.toml`` or ``.csv``), checked against the batch's submissions and
    rubric; raises :class:`OverrideError`."""
    path = Path(path)
    decided: dict[str, dict[str, tuple[int, Decision]]] = {}
    for number, entry in enumerate(_entries(path), 1):
        where = f"{path}: override {number}"
        student, check = _text(entry, "student", where), _text(entry, "check", where)
        where = f"{where} (student {student!r}, check {check!r})"
        submission = _submission(student, submissions, where)
        decision = Decision(check=check, points=_points(entry, check, rubric, where),
                            comment=_text(entry, "comment", where), by=_text(entry, "by", where),
                            at=_time(entry, where))
        mine = decided.setdefault(submission.id, {})
        if check in mine:
            raise OverrideError(f"{where}: override {mine[check][0]} already overrides {check} of "
                                f"{submission.id}; keep one")
        mine[check] = (number, decision)
    return {sid: tuple(decision for _, decision in mine.values()) for sid, mine in decided.items()}


def apply(result: GradeResult, decisions: Iterable[Decision]) -> GradeResult:
    """``result``'s automatic grade with ``decisions`` on top (see the module's guarantees)."""
    automatic = _automatic(result)
    wanted = {decision.check: decision for decision in decisions}
    if not wanted or automatic.status != "graded":
        return automatic
    made, checks = [], []
    for check in automatic.checks:
        if (decision := wanted.get(check.name)) is not None:
            made.append(_override(decision, check.points))
            check = dataclasses.replace(check, points=decision.points)
        checks.append(check)
    score = round(sum(check.points for check in checks), 4)
    if (total := wanted.get(TOTAL)) is not None:
        made.append(_override(total, score))
        score = total.points
    return dataclasses.replace(automatic, checks=tuple(checks), score=score, overrides=tuple(made),
                               automatic_score=automatic.score)


def _override(decision: Decision, replaced: float) -> Override:
    return Override(check=decision.check, automatic_points=replaced, points=decision.points,
                    comment=decision.comment, by=decision.by, at=decision.at)


def _automatic(result: GradeResult) -> GradeResult:
    """``result`` as the grader scored it, without the overrides it carries."""
    if not result.overrides:
        return result
    replaced = {o.check: o.automatic_points for o in result.overrides}
    checks = tuple(dataclasses.replace(c, points=replaced[c.name]) if c.name in replaced else c
                   for c in result.checks)
    return dataclasses.replace(result, checks=checks, score=result.automatic_score, overrides=(),
                               automatic_score=None)


# --------------------------------------------------------------------------------------------
# Reading and checking the file

def _entries(path: Path) -> list[Mapping[str, Any]]:
    try:
        if path.suffix == ".toml":
            return _toml_entries(path)
        if path.suffix == ".csv":
            return _csv_entries(path)
    except (OSError, UnicodeDecodeError) as error:
        raise OverrideError(f"cannot read {path}: {error}") from None
    raise OverrideError(f"{path}: overrides are read from a .toml or a .csv file")


def _toml_entries(path: Path) -> list[Mapping[str, Any]]:
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as error:
        raise OverrideError(f"{path}: not valid TOML: {error}") from None
    entries = document.get("override", [])
    if set(document) - {"override"} or not (isinstance(entries, list)
                                           and all(isinstance(e, dict) for e in entries)):
        raise OverrideError(f"{path}: write each override as an [[override]] table, with "
                            f"{', '.join(FIELDS)}")
    for number, entry in enumerate(entries, 1):
        _known_fields(entry, f"{path}: override {number}")
    return entries


def _csv_entries(path: Path) -> list[Mapping[str, Any]]:
    with path.open(newline="", encoding="utf-8-sig") as handle:  # a spreadsheet may add a BOM
        rows = csv.DictReader(handle)
        if rows.fieldnames is None or set(rows.fieldnames) != set(FIELDS):
            raise OverrideError(f"{path}: the first row must name the columns {','.join(FIELDS)} "
                                f"(it has {','.join(rows.fieldnames or []) or 'nothing'})")
        return [row for row in rows if any((value or "").strip() for value in row.values())]


def _known_fields(entry: Mapping[str, Any], where: str) -> None:
    unknown = sorted(set(entry) - set(FIELDS))
    if unknown:
        raise OverrideError(f"{where}: unknown field {unknown[0]!r}; an override has {', '.join(FIELDS)}")


def _text(entry: Mapping[str, Any], field: str, where: str) -> str:
    value = entry.get(field)
    if not isinstance(value, str) or not value.strip():
        raise OverrideError(f"{where}: give {field} as text ({_MEANING[field]})")
    return value.strip()


_MEANING = {"student": "a submission id, or the student's LMS id", "check": "a rubric check's name, or "
            f"{TOTAL} for the whole submission", "comment": "why the points change",
            "by": "who decided", "at": f"when, in ISO 8601: {_EXAMPLE_TIME}"}


def _submission(student: str, submissions: Sequence[Submission], where: str) -> Submission:
    named = [s for s in submissions if s.id == student
             or (s.student_id == student and s.superseded_by is None)]
    if not named:
        raise OverrideError(f"{where}: no submission of this batch has id or LMS id {student!r} "
                            "(the ids are in the class summary and gradebook.csv)")
    if len(named) > 1:
        raise OverrideError(f"{where}: {student!r} names several submissions "
                            f"({', '.join(s.id for s in named)}); give the submission id")
    [submission] = named
    if submission.superseded_by is not None:
        why = submission.error or "another file of the same student is graded"
        raise OverrideError(f"{where}: {submission.id} is not graded ({why}); override "
                            f"{submission.superseded_by} instead")
    if submission.error is not None:
        raise OverrideError(f"{where}: {submission.id} cannot be graded ({submission.error}), so it has no "
                            "points to override")
    return submission


def _points(entry: Mapping[str, Any], check: str, rubric: Rubric, where: str) -> float:
    maxima = {e.name: e.points for e in rubric.entries} | {TOTAL: rubric.max_score}
    if check not in maxima:
        raise OverrideError(f"{where}: the rubric {rubric.path} has no check {check!r}; its checks are "
                            f"{', '.join(rubric.names)}, and {TOTAL} is the whole submission")
    value = entry.get("points")
    try:
        points = float(value) if isinstance(value, (int, float, str)) and not isinstance(value, bool) else math.nan
    except ValueError:
        points = math.nan
    if not 0 <= points <= maxima[check]:  # NaN fails too
        raise OverrideError(f"{where}: points must be a number from 0 to {maxima[check]:g}, the most "
                            f"{check} can give (got {value!r})")
    return points


def _time(entry: Mapping[str, Any], where: str) -> str:
    value = entry.get("at")
    if isinstance(value, (datetime.date, datetime.datetime)):  # TOML's own dates and times
        return value.isoformat()
    if isinstance(value, str):
        try:
            datetime.datetime.fromisoformat(value.strip())
        except ValueError:
            pass
        else:
            return value.strip()
    raise OverrideError(f"{where}: give at as a date and time in ISO 8601, such as {_EXAMPLE_TIME} "
                        f"(got {value!r})")
