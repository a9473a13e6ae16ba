"""What GitHub Classroom's autograding reporter gets from labgrader: points per check.

The schema below is written from what ``classroom-resources/autograding-grading-reporter`` reads of
each runner's ``result`` (src/main.js, console-results.js, notify-classroom.js,
aggregate-results.js): base64 of a JSON object with ``version``, ``status`` and ``max_score`` and a
``tests`` array whose entries the reporter prints by ``name``, ``status``, ``message`` and
``line_no`` and whose ``score``s it sums for Classroom. The graders that feed it
(autograding-command-grader, autograding-python-grader) write ``version: 1``.
"""
from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

import factories as f
from grader import batch
from grader.classroom import reporter_document, reporter_output
from grader.results import GradeResult

REPO = Path(__file__).resolve().parent.parent
HIDDEN_MARK = "HIDDEN"  # every hidden check's message in the factories carries it

REPORTER_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["version", "status", "max_score", "tests"],
    "properties": {
        "version": {"const": 1},
        "status": {"enum": ["pass", "fail", "error"]},
        "max_score": {"type": "number", "minimum": 0},
        "tests": {
            "type": "array",
            "minItems": 1,  # the reporter divides by the number of tests
            "items": {
                "type": "object",
                "required": ["name", "status", "score", "message", "line_no"],
                "properties": {
                    "name": {"type": "string", "minLength": 1},
                    "status": {"enum": ["pass", "fail", "error"]},
                    "score": {"type": "number", "minimum": 0},
                    "message": {"type": "string"},
                    "line_no": {"type": "integer"},
                    "test_code": {"type": "string"},
                    "filename": {"type": "string"},
                    "duration": {"type": "number"},
                },
            },
        },
    },
}


def _decoded(output: str) -> dict:
    return json.loads(base64.b64decode(output, validate=True).decode("utf-8"))


def _classroom_points(documents: list[dict]) -> tuple[float, float]:
    """What notify-classroom.js sends Classroom: the tests' scores over the max_scores, summed
    over runners that have a max_score."""
    total = sum(t["score"] for d in documents if d["max_score"] for t in d["tests"])
    return total, sum(d["max_score"] for d in documents if d["max_score"])


@pytest.mark.parametrize("result", f.cohort() + [f.hostile()], ids=lambda r: r.submission_id)
def test_reporter_output_decodes_to_the_reporters_format(result: GradeResult):
    jsonschema.Draft202012Validator.check_schema(REPORTER_SCHEMA)
    document = _decoded(reporter_output(result.for_students()))
    jsonschema.validate(document, REPORTER_SCHEMA)
    assert document["max_score"] == result.max_score
    if result.status != "graded":
        assert document["status"] == "error"
        assert [t["status"] for t in document["tests"]] == ["error"]
        assert result.reason in document["tests"][0]["message"]
        assert _classroom_points([document]) == (0, result.max_score)
        return
    # Classroom's total is labgrader's score; each check is one test, with its points in the name.
    assert _classroom_points([document]) == (pytest.approx(result.score), result.max_score)
    assert len(document["tests"]) == len(result.checks)
    for check, test in zip(result.checks, document["tests"]):
        assert test["name"].startswith(check.title)
        assert f"{check.points:g}/{check.max_points:g} points" in test["name"]
        assert test["score"] == pytest.approx(check.points)
        assert test["status"] == ("pass" if check.status == "passed" else "fail")
        if check.visibility == "hidden":
            assert test["message"] == ""
        else:
            assert check.message in test["message"]
    visible_pass = all(c.status == "passed" for c in result.checks if c.visibility == "visible")
    assert document["status"] == ("pass" if visible_pass else "fail")


def test_hidden_checks_are_points_only_even_from_the_instructors_result():
    # The full result (hidden messages included) still yields no hidden message.
    text = base64.b64decode(reporter_output(f.with_failed_cell())).decode("utf-8")
    assert HIDDEN_MARK not in text and "seed" not in text


def test_min_score_decides_the_status_as_labgrader_check_does():
    gap = f.hidden_gap()  # every visible check passes, a hidden one does not
    assert reporter_document(gap)["status"] == "pass"
    bob = f.with_failed_cell()
    assert reporter_document(bob)["status"] == "fail"
    assert reporter_document(bob, min_score=bob.score)["status"] == "pass"
    assert reporter_document(bob, min_score=bob.score + 0.5)["status"] == "fail"


@pytest.mark.parametrize("result", [f.with_failed_cell("lab"), f.error("lab")], ids=["graded", "not-graded"])
def test_command_appends_the_result_to_github_output(result: GradeResult, tmp_path: Path):
    # As the workflow runs it: `labgrader check` has written result.json (hidden messages removed).
    layout = batch.Layout(tmp_path / "labgrader-report")
    batch.write_result(result.for_students(), layout)
    github_output = tmp_path / "github_output"
    github_output.write_text("earlier=1\n")
    done = subprocess.run([sys.executable, "-m", "grader.classroom", str(layout.result("lab"))],
                          env={**os.environ, "GITHUB_OUTPUT": str(github_output)}, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = github_output.read_text().splitlines()
    assert lines[0] == "earlier=1" and len(lines) == 2 and lines[1].startswith("result=")
    document = _decoded(lines[1].removeprefix("result="))
    jsonschema.validate(document, REPORTER_SCHEMA)
    kept = json.loads(layout.result("lab").read_text())
    assert _classroom_points([document]) == (pytest.approx(kept["score"] if kept["status"] == "graded" else 0),
                                             kept["max_score"])


def test_command_refuses_a_file_that_is_not_a_result(tmp_path: Path):
    bogus = tmp_path / "result.json"
    bogus.write_text('{"score": 3}')
    done = subprocess.run([sys.executable, "-m", "grader.classroom", str(bogus)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "is not a labgrader result" in done.stderr and done.stdout == ""
