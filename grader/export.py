"""Machine-readable results for a whole run: a CSV gradebook, Gradescope JSON, JUnit XML.

``write_exports(results, out_dir, rubric_check_names)`` writes

* ``gradebook.csv``: a row per submission, a column per rubric check's points, total and maximum;
  submissions that could not be graded keep their status and reason and leave the check columns
  empty;
* ``<submission_id>/results.json`` for each submission, in Gradescope's autograder format
  (https://gradescope-autograders.readthedocs.io/en/latest/specs/): top-level ``score`` and a test
  per check with ``name``, ``score``, ``max_score``, ``status`` ("passed"/"failed"), ``output``
  and ``visibility`` ("visible"/"hidden");
* ``junit.xml``: one ``<testsuite>`` for the run, a ``<testcase>`` per submission and check;
* ``canvas_gradebook.csv``: Canvas's gradebook import (``Student, ID, SIS User ID, SIS Login ID,
  Section`` and one assignment column ``<title>`` or ``<title> (<assignment id>)``, a
  ``Points Possible`` row first), as Canvas's own gradebook export lays it out. Canvas matches a
  row to a student by ``ID`` (its user id), so rows carry the id the LMS gave (``students``); a
  submission that could not be graded leaves its points empty, which Canvas reads as "no change";
* ``moodle_grading_worksheet.csv``: the offline grading worksheet of a Moodle assignment, with the
  columns Moodle's importer reads (``Identifier`` "Participant <id>", ``Grade``, ``Last modified
  (grade)``, ``Feedback comments``) among those its download has. ``Last modified (grade)`` is
  when labgrader graded: Moodle skips a row whose grade was changed in Moodle after that, unless
  the instructor ticks "ignore modified".

Students' LMS ids and names come from ``students`` (submission id -> (LMS id, name)); without an
entry the name is the submission id and the LMS id is left empty (the LMS then reports the row as
unmatched instead of grading the wrong student).

A hidden check's message, inputs and warnings are never written to any of them: its output only
says that it is hidden and how many points it earned. Every file is written atomically (a
temporary file in the same folder, then ``os.replace``), so a reader never sees half a file.
"""
from __future__ import annotations

import csv
import html
import io
import json
import math
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from grader.results import GradeResult, ScoredCheck
from reference import atomic

__all__ = ["write_exports", "gradebook_csv", "gradescope_json", "write_gradescope", "junit_xml", "canvas_csv",
           "moodle_csv", "hidden_output", "visible_output", "points"]

GRADEBOOK = "gradebook.csv"
GRADESCOPE = "results.json"
JUNIT = "junit.xml"
CANVAS = "canvas_gradebook.csv"
MOODLE = "moodle_grading_worksheet.csv"
SUITE_NAME = "labgrader"
DEFAULT_TITLE = "labgrader"  # the assignment's name where the caller gives none

# submission id -> (the student's id in the LMS, their name as the LMS gave it)
Students = Mapping[str, tuple[str, str]]
MAX_OUTPUT_CHARS = 20_000  # per text field taken from a notebook (tracebacks can be huge)

# Characters XML 1.0 cannot carry at all (tracebacks may hold ANSI escapes or NULs).
_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
# A spreadsheet reads a cell starting with one of these as a formula.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _clip(text: str | None, limit: int = MAX_OUTPUT_CHARS) -> str:
    text = text or ""
    if len(text) > limit:
        return text[:limit] + f"\n… ({len(text) - limit} more characters cut)"
    return text


def points(x: float) -> float | int:
    """Points as JSON/CSV numbers: whole numbers without ``.0``, others rounded to 4 places."""
    x = float(x)
    if not math.isfinite(x):
        return 0
    x = round(x, 4)
    return int(x) if x.is_integer() else x


def hidden_output(check: ScoredCheck) -> str:
    """All that is ever said about a hidden check: that it is hidden, and its points."""
    return (f"Hidden check: {points(check.points)}/{points(check.max_points)} points. "
            "Its details are not shown.")


def _safe_dir(submission_id: str) -> str:
    """The submission id as one folder name; an id that could escape ``out_dir`` is refused."""
    sid = str(submission_id)
    if (not sid or sid in (".", "..") or "/" in sid or "\\" in sid or "\x00" in sid
            or os.sep in sid or (os.altsep and os.altsep in sid)):
        raise ValueError(f"submission id {sid!r} cannot be used as a folder name")
    return sid


# --------------------------------------------------------------------------------------------
# CSV

def _cell(value: Any) -> Any:
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value  # shown as text by spreadsheets, never evaluated
    return value


def _csv(rows: Iterable[Iterable[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    for row in rows:
        writer.writerow([_cell(v) for v in row])
    return buf.getvalue()


def gradebook_csv(results: Iterable[GradeResult], rubric_check_names: list[str]) -> str:
    results = list(results)
    names = list(rubric_check_names)
    for r in results:  # checks the rubric list does not name still get a column
        for c in r.checks:
            if c.name not in names:
                names.append(c.name)
    rows: list[list[Any]] = [["submission_id", "source", "status", "reason", *names, "total", "max_score",
                              "execution_status", "flagged_for_review", "notebook_sha256", "graded_at"]]
    for r in results:
        by_name = {c.name: c for c in r.checks}
        graded = r.status == "graded"
        per_check = [points(by_name[n].points) if graded and n in by_name else "" for n in names]
        rows.append([r.submission_id, r.source, r.status, r.reason or "", *per_check,
                     points(r.score) if graded else "", points(r.max_score),
                     r.execution_status or "", flagged(r), r.notebook_sha256 or "", r.graded_at])
    return _csv(rows)


def flagged(result: GradeResult) -> str:
    """Why an instructor should look at this submission (the probe's integrity findings), or ""."""
    return "; ".join(result.integrity)


# --------------------------------------------------------------------------------------------
# Gradescope

def visible_output(check: ScoredCheck) -> str:
    """What a visible check tells the student: its message and warnings, clipped."""
    parts = [check.message or ""]
    parts += [f"Warning: {w}" for w in check.warnings]
    return _clip("\n".join(p for p in parts if p))


def _overall_output(r: GradeResult) -> str:
    if r.status != "graded":
        return _clip(f"Not graded: {r.reason or 'the grader could not grade this submission.'}")
    lines = [f"Score: {points(r.score)}/{points(r.max_score)}"]
    if r.execution_status and r.execution_status != "completed":
        lines.append(f"The notebook's run ended with status: {r.execution_status}.")
    if r.output_truncated:
        lines.append("Some of the notebook's output was too long and was cut.")
    if r.network_blocked:
        lines.append("Network access was blocked in: " + ", ".join(r.network_blocked) + ".")
    if r.data_profile:
        lines.append(f"Data profile: {r.data_profile}.")
    if r.integrity:
        lines.append("Flagged for your instructor to review: the grader had to undo changes the notebook "
                     "made to its own kernel: " + flagged(r) + ".")
    hidden = [c for c in r.checks if c.visibility == "hidden"]
    visible = [c for c in r.checks if c.visibility != "hidden"]
    if hidden and all(c.status == "passed" for c in visible) and any(
            c.status != "passed" for c in hidden):
        lines.append("All visible checks pass, but not all hidden checks do.")
    for cell in r.cells:
        if cell.status in ("error", "timeout", "kernel-died"):
            lines.append(f"Cell {cell.number} ({cell.status}): {cell.error or ''}".rstrip(": "))
    return _clip("\n".join(lines))


def gradescope_json(result: GradeResult) -> dict[str, Any]:
    """One submission as Gradescope's ``results.json``."""
    tests = []
    for c in result.checks:
        hidden = c.visibility == "hidden"
        tests.append({
            "name": c.title or c.name,
            "score": points(c.points),
            "max_score": points(c.max_points),
            "status": "passed" if c.status == "passed" else "failed",
            "output": hidden_output(c) if hidden else visible_output(c),
            "visibility": "hidden" if hidden else "visible",
        })
    out: dict[str, Any] = {
        "score": points(result.score) if result.status == "graded" else 0,
        "execution_time": max(0, round(result.seconds)),
        "output": _overall_output(result),
        "output_format": "text",
        "test_output_format": "text",
        "visibility": "visible",
        "stdout_visibility": "hidden",
        "tests": tests,
    }
    return out


def write_gradescope(result: GradeResult, path: Path) -> None:
    """:func:`gradescope_json` of ``result``, written atomically to ``path``."""
    atomic.write(path, json.dumps(gradescope_json(result), indent=2, ensure_ascii=False) + "\n")


# --------------------------------------------------------------------------------------------
# JUnit

def _xml_text(text: Any) -> str:
    return _XML_INVALID.sub("\ufffd", _clip(str(text) if text is not None else ""))


def junit_xml(results: Iterable[GradeResult], rubric_check_names: list[str],
              timestamp: datetime | None = None) -> str:
    """The run as JUnit XML: ``<testsuites><testsuite>`` with a testcase per submission×check.

    A check that did not fully pass is a ``<failure>`` (its message, or for a hidden check only
    its points); a submission that could not be graded has an ``<error>`` in each rubric check.
    """
    results = list(results)
    stamp = (timestamp or datetime.now()).strftime("%Y-%m-%dT%H:%M:%S")
    root = ET.Element("testsuites", {"name": SUITE_NAME})
    suite = ET.SubElement(root, "testsuite", {
        "name": SUITE_NAME, "package": SUITE_NAME, "id": "0", "timestamp": stamp,
        "hostname": "localhost"})
    properties = ET.SubElement(suite, "properties")
    for r in results:
        if r.integrity:
            ET.SubElement(properties, "property", {"name": _xml_text(f"flagged_for_review {r.submission_id}"),
                                                   "value": _xml_text(flagged(r))})
    tests = failures = errors = 0
    total_time = 0.0
    for r in results:
        by_name = {c.name: c for c in r.checks}
        names = list(rubric_check_names) + [n for n in by_name if n not in rubric_check_names]
        per_check = (r.seconds / len(names)) if names else 0.0
        total_time += r.seconds
        for name in names:
            case = ET.SubElement(suite, "testcase", {
                "name": _xml_text(name), "classname": _xml_text(r.submission_id),
                "time": f"{per_check:.3f}"})
            tests += 1
            check = by_name.get(name)
            if r.status != "graded":
                errors += 1
                reason = r.reason or "the submission could not be graded"
                el = ET.SubElement(case, "error", {"type": "NotGraded",
                                                   "message": _xml_text(reason)})
                el.text = _xml_text(reason)
            elif check is None:
                errors += 1
                ET.SubElement(case, "error", {"type": "NotScored",
                                              "message": "this check has no result"})
            elif check.status != "passed":
                failures += 1
                hidden = check.visibility == "hidden"
                message = hidden_output(check) if hidden else (
                    f"{points(check.points)}/{points(check.max_points)} points: {check.message}")
                el = ET.SubElement(case, "failure", {
                    "type": "hidden" if hidden else check.status,
                    "message": _xml_text(message.splitlines()[0] if message else "")})
                el.text = _xml_text(message if hidden else visible_output(check))
    ET.SubElement(suite, "system-out")
    ET.SubElement(suite, "system-err")
    for el in (root, suite):
        el.set("tests", str(tests))
        el.set("failures", str(failures))
        el.set("errors", str(errors))
        el.set("time", f"{total_time:.3f}")
    suite.set("skipped", "0")
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


# --------------------------------------------------------------------------------------------
# LMS gradebooks: Canvas and Moodle

def _identity(r: GradeResult, students: Students | None) -> tuple[str, str]:
    """(LMS id, name) of the student who sent ``r``: from ``students``, else ("", submission id)."""
    return (students or {}).get(r.submission_id, ("", r.submission_id))


def canvas_csv(results: Iterable[GradeResult], title: str = DEFAULT_TITLE,
               students: Students | None = None, assignment_id: str | None = None) -> str:
    """The run as a Canvas gradebook import: one assignment column, total points per student.

    With ``assignment_id`` (the number in the assignment's Canvas URL) the column updates that
    assignment; without it Canvas offers to create an assignment named ``title``."""
    results = list(results)
    column = f"{title} ({assignment_id})" if assignment_id else title
    possible = max((r.max_score for r in results), default=0.0)
    rows: list[list[Any]] = [["Student", "ID", "SIS User ID", "SIS Login ID", "Section", column],
                             ["    Points Possible", "", "", "", "", points(possible)]]
    for r in results:
        lms_id, name = _identity(r, students)
        rows.append([name, lms_id, "", "", "", points(r.score) if r.status == "graded" else ""])
    return _csv(rows)


def _moodle_feedback(r: GradeResult) -> str:
    """The feedback comment, as the HTML Moodle's comment editor stores: every check's points, a
    visible check's message when it lost points, a hidden check's points only."""
    if r.status != "graded":
        lines = [f"Not graded: {r.reason or 'the grader could not grade this submission.'}"]
    else:
        lines = [f"Score: {points(r.score)}/{points(r.max_score)}"]
        for c in r.checks:
            earned = f"{c.title or c.name}: {points(c.points)}/{points(c.max_points)}"
            if c.visibility == "hidden":
                lines.append(f"{earned} (hidden check)")
            else:
                lines.append(earned if c.status == "passed" else f"{earned}. {c.message}")
    return "<br>\n".join(html.escape(_clip(line, 2_000)) for line in lines)


def moodle_csv(results: Iterable[GradeResult], students: Students | None = None) -> str:
    """The run as a Moodle assignment's offline grading worksheet (Moodle's column names)."""
    rows: list[list[Any]] = [["Identifier", "Full name", "Email address", "Status", "Grade", "Maximum Grade",
                              "Grade can be changed", "Last modified (submission)", "Last modified (grade)",
                              "Feedback comments"]]
    for r in results:
        lms_id, name = _identity(r, students)
        graded = r.status == "graded"
        rows.append([f"Participant {lms_id}" if lms_id else "", name, "",
                     "Graded" if graded else "Submitted for grading",
                     points(r.score) if graded else "", points(r.max_score), "Yes", "",
                     r.graded_at, _moodle_feedback(r)])
    return _csv(rows)


# --------------------------------------------------------------------------------------------

def write_exports(results: list[GradeResult], out_dir: Path, rubric_check_names: list[str], *,
                  title: str = DEFAULT_TITLE, students: Students | None = None) -> list[Path]:
    """Write the gradebook, each submission's Gradescope JSON, the JUnit XML and the Canvas and
    Moodle gradebooks under ``out_dir``; ``title`` names the assignment in the LMS gradebooks.

    Returns the paths written. Raises ``ValueError`` (before writing anything) if a submission id
    could not be a single folder name, or two submissions share an id.
    """
    out_dir = Path(out_dir)
    results = list(results)
    dirs = {r.submission_id: _safe_dir(r.submission_id) for r in results}  # refuse before writing
    if len(dirs) != len(results):
        raise ValueError("two results share a submission id")
    written = [out_dir / GRADEBOOK]
    atomic.write(written[-1], gradebook_csv(results, rubric_check_names))
    for r in results:
        written.append(out_dir / dirs[r.submission_id] / GRADESCOPE)
        write_gradescope(r, written[-1])
    written.append(out_dir / JUNIT)
    atomic.write(written[-1], junit_xml(results, rubric_check_names))
    written.append(out_dir / CANVAS)
    atomic.write(written[-1], canvas_csv(results, title, students))
    written.append(out_dir / MOODLE)
    atomic.write(written[-1], moodle_csv(results, students))
    return written
