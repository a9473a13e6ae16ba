"""GitHub Classroom's autograding reporter, fed with labgrader's points per check.

A Classroom workflow ends with ``classroom-resources/autograding-grading-reporter``. For each step
id listed in its ``runners`` input it reads the environment variable ``<STEP ID>_RESULTS``: base64
of a JSON document that the step exposed as its output ``result``. What the reporter reads of that
document (its ``src/main.js``, ``console-results.js``, ``notify-classroom.js``,
``aggregate-results.js``; the graders ``autograding-command-grader`` and ``-python-grader`` write
the same shape with ``version: 1``):

* ``status``: ``"pass"``, ``"fail"`` or ``"error"``; "fail" or "error" fails the workflow run;
* ``max_score``: the step's points. Classroom is sent, over the steps with a ``max_score``, the sum
  of every test's ``score`` out of the sum of the ``max_score``s;
* ``tests``: each with ``name``, ``status`` (only ``"pass"`` counts as passed), ``score``,
  ``message`` (printed for a test that did not pass or errored, by version) and ``line_no``
  (printed after the name unless it is 0, so it must be there).

The reporter's log shows each test's name and a tick or cross, not its points, so
:func:`reporter_output` puts the points in the name: the student sees every check with its points,
and Classroom gets labgrader's score. A hidden check is a test with its title and points and an
empty message. The step passes by the rule ``labgrader check`` exits by (:func:`passes`).

``python -m grader.classroom RESULT_JSON [--min-score S]`` reads the ``result.json`` that
``labgrader check`` wrote and appends ``result=<base64>`` to ``$GITHUB_OUTPUT`` (stdout when it is
not set). base64 has no newline, so the output is one line.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import sys
from pathlib import Path
from typing import Any

from grader.export import points, visible_output
from grader.results import GradeResult

__all__ = ["passes", "reporter_document", "reporter_output", "main"]

FORMAT_VERSION = 1  # the "version" the Classroom graders write
NOT_GRADED = "labgrader could not grade the notebook"


def passes(result: GradeResult, min_score: float | None = None) -> bool:
    """Whether the student's run passes: every visible check passed, or the score reached ``min_score``."""
    if result.status != "graded":
        return False
    if min_score is not None:
        return result.score >= min_score
    return all(c.status == "passed" for c in result.checks if c.visibility == "visible")


def _test(name: str, status: str, score: float, message: str) -> dict[str, Any]:
    return {"name": name, "status": status, "score": points(score), "message": message, "line_no": 0}


def reporter_document(result: GradeResult, min_score: float | None = None) -> dict[str, Any]:
    """The result as the reporter's JSON: one test per check, hidden ones without their message."""
    if result.status != "graded":
        tests = [_test(NOT_GRADED, "error", 0, result.reason or "")]
        status = "error"
    else:
        tests = [_test(f"{c.title or c.name}: {points(c.points)}/{points(c.max_points)} points",
                       "pass" if c.status == "passed" else "fail", c.points,
                       "" if c.visibility == "hidden" else visible_output(c))
                 for c in result.checks]
        status = "pass" if passes(result, min_score) else "fail"
    return {"version": FORMAT_VERSION, "status": status, "max_score": points(result.max_score), "tests": tests}


def reporter_output(result: GradeResult, min_score: float | None = None) -> str:
    """:func:`reporter_document` as the reporter reads it: base64 of its UTF-8 JSON."""
    document = json.dumps(reporter_document(result, min_score), ensure_ascii=False, separators=(",", ":"))
    return base64.b64encode(document.encode("utf-8")).decode("ascii")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m grader.classroom", description=__doc__.splitlines()[0])
    parser.add_argument("result", type=Path, help="the result.json `labgrader check` wrote")
    parser.add_argument("--min-score", type=float, help="pass when the score reaches this instead")
    args = parser.parse_args(argv)
    try:
        result = GradeResult.from_json(json.loads(args.result.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError, KeyError) as error:
        print(f"labgrader: {args.result} is not a labgrader result ({type(error).__name__}: {error})",
              file=sys.stderr)
        return 2
    line = f"result={reporter_output(result, args.min_score)}\n"
    target = os.environ.get("GITHUB_OUTPUT")
    if target:
        with open(target, "a", encoding="utf-8") as fh:
            fh.write(line)
    else:
        sys.stdout.write(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
