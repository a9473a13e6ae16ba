"""The instructor has the last word (issue 14, item 5): overrides per check or for the whole
submission, applied without running any notebook, shown in the report, used by the summary and every
export, kept beside the automatic grade in result.json; a wrong override stops everything."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from test_ids import notebook

import factories as f
from grader import batch, cli, intake, overrides, resources, score
from grader.results import GradeResult, Submission

RUBRIC = score.load_rubric(resources.RUBRIC_PATH)
TOML = '''\
[[override]]
student = "alice"
check = "notebook_runs"
points = 1.5
comment = "The last cell fails only on the grader's data; the method is right."
by = "J. Doe"
at = 2025-03-14T10:00:00Z

[[override]]
student = "bob"
check = "total"
points = 10
comment = "Graded by hand: see my e-mail."
by = "J. Doe"
at = "2025-03-15"
'''
CSV = '''\
student,check,points,comment,by,at
alice,notebook_runs,1.5,The last cell fails only on the grader's data; the method is right.,J. Doe,2025-03-14T10:00:00+00:00
bob,total,10,Graded by hand: see my e-mail.,J. Doe,2025-03-15
'''


def _submissions() -> list[Submission]:
    return [Submission(id="alice", source="alice.ipynb", notebook=b"{}", sha256="a"),
            Submission(id="bob", source="bob.ipynb", notebook=b"{}", sha256="b"),
            Submission(id="smithjohn_12345", source="c/x.ipynb", notebook=b"{}", sha256="c", student_id="12345",
                       student_name="smithjohn"),
            Submission(id="smithjohn_12345_1_lab", source="c/y.ipynb", sha256="d", student_id="12345",
                       student_name="smithjohn", superseded_by="smithjohn_12345",
                       error="an older resubmission of smithjohn (Canvas user 12345); graded: x.ipynb"),
            Submission(id="carol", source="carol.py", error="not a notebook (a .py file)")]


def _load(tmp_path: Path, text: str, suffix: str = ".toml") -> dict:
    path = tmp_path / f"overrides{suffix}"
    path.write_text(text)
    return overrides.load(path, _submissions(), RUBRIC)


# --- reading ---------------------------------------------------------------------------------

def test_toml_and_csv_say_the_same(tmp_path):
    from_toml = _load(tmp_path, TOML)
    from_csv = _load(tmp_path, CSV, ".csv")
    assert set(from_toml) == {"alice", "bob"}
    assert [d.points for d in from_toml["alice"]] == [1.5] and from_toml["bob"][0].check == "total"
    assert from_toml["alice"][0].at == "2025-03-14T10:00:00+00:00"
    assert from_toml == from_csv


def test_a_student_is_named_by_submission_id_or_lms_id(tmp_path):
    decided = _load(tmp_path, CSV.replace("bob,total", "12345,total"), ".csv")
    assert set(decided) == {"alice", "smithjohn_12345"}  # the LMS id names the student's graded file


@pytest.mark.parametrize("change, names", [
    (("bob,total", "zed,total"), "'zed'"),
    (("alice,notebook_runs", "alice,notebook_walks"), "'notebook_walks'"),
    (("alice,notebook_runs,1.5", "alice,notebook_runs,3"), "from 0 to 2"),
    (("alice,notebook_runs,1.5", "alice,notebook_runs,lots"), "'lots'"),
    (("bob,total,10", "bob,total,-1"), "from 0 to"),
    (("J. Doe,2025-03-15", "J. Doe,last friday"), "'last friday'"),
    (("J. Doe,2025-03-15", ",2025-03-15"), "give by"),
    (("bob,total", "smithjohn_12345_1_lab,total"), "override smithjohn_12345 instead"),
    (("bob,total", "carol,total"), "carol cannot be graded (not a notebook"),
    (("bob,total,10", "alice,notebook_runs,1"), "already overrides notebook_runs of alice"),
    (("student,check", "student,kind"), "must name the columns"),
])
def test_a_wrong_override_is_one_line_naming_it(tmp_path, change, names):
    with pytest.raises(overrides.OverrideError) as refused:
        _load(tmp_path, CSV.replace(*change), ".csv")
    message = str(refused.value)
    assert names in message and "\n" not in message
    assert message.startswith(str(tmp_path / "overrides.csv"))


def test_toml_fields_are_checked_too(tmp_path):
    with pytest.raises(overrides.OverrideError, match="unknown field 'point'"):
        _load(tmp_path, TOML.replace("points = 10", "point = 10"))
    with pytest.raises(overrides.OverrideError, match=r"override 2 \(student 'bob', check 'total'\): give at"):
        _load(tmp_path, TOML.replace('at = "2025-03-15"', "at = 12"))
    with pytest.raises(overrides.OverrideError, match="a .toml or a .csv file"):
        _load(tmp_path, TOML, ".txt")


# --- applying ----------------------------------------------------------------------------------

def _decisions(*entries) -> tuple[overrides.Decision, ...]:
    return tuple(overrides.Decision(check, points, f"why {check}", "J. Doe", "2025-03-14") for check, points in entries)


def test_apply_keeps_the_automatic_grade_and_can_be_taken_back():
    automatic = f.with_failed_cell("bob")  # train_epoch 0/2, saved_model_accuracy 1/2, hidden 0/3
    decided = _decisions(("train_epoch", 2.0), ("hidden_train_other_data", 1.0))
    final = overrides.apply(automatic, decided)
    checks = {c.name: c for c in final.checks}
    assert checks["train_epoch"].points == 2.0 and checks["train_epoch"].status == "failed"  # the grader's verdict
    assert checks["train_epoch"].message == {c.name: c for c in automatic.checks}["train_epoch"].message
    assert final.score == automatic.score + 3 and final.automatic_score == automatic.score
    assert [(o.check, o.automatic_points, o.points) for o in final.overrides] == [
        ("train_epoch", 0.0, 2.0), ("hidden_train_other_data", 0.0, 1.0)]
    assert overrides.apply(final, decided) == final  # the same overrides again: the same result
    assert overrides.apply(final, ()) == automatic  # none: the grader's result, as it was
    total = overrides.apply(final, _decisions(("total", 12.5)))
    assert total.score == 12.5 and [(o.check, o.automatic_points) for o in total.overrides] == [("total", automatic.score)]
    assert GradeResult.from_json(json.loads(json.dumps(final.to_json()))) == final


def test_a_result_that_was_not_graded_is_left_as_it_is():
    failed = f.error("dave", reason="the grader failed on this notebook: its worker died")
    assert overrides.apply(failed, _decisions(("total", 3.0))) == failed


# --- end to end --------------------------------------------------------------------------------

def _files(folder: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def _grade(paths, out: Path, root: Path, *more: str) -> int:
    return cli.main(["grade", *map(str, paths), "--out", str(out), "--root", str(root), "--jobs", "2", "--quiet",
                     *more])


def _row(path: Path, column: int, key: str) -> list[str]:
    return next(row for row in csv.reader(io.StringIO(path.read_text())) if row[column] == key)


def test_overrides_regrade_without_running_a_notebook(tmp_path, mnist_sample_root, monkeypatch, capsys):
    folder = tmp_path / "class"
    folder.mkdir()
    (folder / "alice.ipynb").write_bytes(notebook("x = 1", "1 / 0"))
    (folder / "bob.ipynb").write_bytes(notebook("y = 2"))
    out, root = tmp_path / "out", mnist_sample_root.root
    assert _grade([folder], out, root) == 0
    automatic = {sid: json.loads((out / sid / "result.json").read_text()) for sid in ("alice", "bob")}
    assert all(r["status"] == "graded" and r["overrides"] == [] for r in automatic.values())
    runs = _files(out / ".runs")
    assert len(runs) >= 2 * 4  # each kept run: the executed notebook, the probe's answers, its key...

    (tmp_path / "overrides.toml").write_text(TOML)
    monkeypatch.setattr(batch, "_in_workers", lambda submissions, *rest, **more: (
        pytest.fail("a notebook was run") if submissions else iter(())))
    capsys.readouterr()
    assert _grade([folder], out, root, "--overrides", str(tmp_path / "overrides.toml")) == 0
    printed = capsys.readouterr().out
    assert _files(out / ".runs") == runs  # no kernel ran: every kept run's file is as it was
    alice = json.loads((out / "alice" / "result.json").read_text())
    bob = json.loads((out / "bob" / "result.json").read_text())
    runs_check = {c["name"]: c for c in automatic["alice"]["checks"]}["notebook_runs"]
    assert {c["name"]: c for c in alice["checks"]}["notebook_runs"]["points"] == 1.5
    assert alice["overrides"] == [{"check": "notebook_runs", "automatic_points": runs_check["points"],
                                   "points": 1.5, "comment": TOML.split('comment = "')[1].split('"')[0],
                                   "by": "J. Doe", "at": "2025-03-14T10:00:00+00:00"}]
    assert alice["score"] == pytest.approx(automatic["alice"]["score"] - runs_check["points"] + 1.5)
    assert alice["automatic_score"] == automatic["alice"]["score"]
    assert (bob["score"], bob["automatic_score"]) == (10, automatic["bob"]["score"])
    assert f"overridden; automatic {automatic['bob']['score']:g}" in printed

    # Every export and the summary use the final score; the report shows both and why.
    header = next(csv.reader(io.StringIO((out / "gradebook.csv").read_text())))
    for sid, result in (("alice", alice), ("bob", bob)):
        assert float(_row(out / "gradebook.csv", 0, sid)[header.index("total")]) == result["score"]
        assert float(_row(out / "canvas_gradebook.csv", 0, sid)[5]) == result["score"]
        assert float(_row(out / "moodle_grading_worksheet.csv", 1, sid)[4]) == result["score"]
        assert json.loads((out / sid / "results.json").read_text())["score"] == result["score"]
    assert _row(out / "gradebook.csv", 0, "alice")[header.index("notebook_runs")] == "1.5"
    summary = (out / "index.html").read_text()
    assert summary.count(">overridden</span>") == 2
    report = (out / "alice" / "report.html").read_text()
    assert f"Changed by your instructor</strong> from the grader's {runs_check['points']:g} to 1.5/2 points" in report
    assert "the method is right" in report and "J. Doe" in report
    assert "Score set to 10/" in (out / "bob" / "report.html").read_text()

    # Without the file, the grader's grades again; still nothing run.
    assert _grade([folder], out, root) == 0
    assert _files(out / ".runs") == runs
    for sid in ("alice", "bob"):
        again = json.loads((out / sid / "result.json").read_text())
        assert (again["score"], again["overrides"], again["automatic_score"]) == (automatic[sid]["score"], [], None)


@pytest.mark.parametrize("change, named", [(("student = \"bob\"", "student = \"zed\""), "'zed'"),
                                           (("check = \"total\"", "check = \"totals\""), "'totals'")])
def test_an_unknown_student_or_check_writes_nothing(tmp_path, mnist_sample_root, capsys, change, named):
    folder = tmp_path / "class"
    folder.mkdir()
    for name in ("alice", "bob"):
        (folder / f"{name}.ipynb").write_bytes(notebook("x = 1"))
    (tmp_path / "overrides.toml").write_text(TOML.replace(*change))
    out = tmp_path / "out"
    capsys.readouterr()
    assert _grade([folder], out, mnist_sample_root.root, "--overrides", str(tmp_path / "overrides.toml")) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("labgrader: ") and named in error and "\n" not in error
    assert not out.exists()
    assert [s.id for s in intake.collect([folder])] == ["alice", "bob"]  # it was a name, not a missing file
