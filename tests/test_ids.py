"""Submission ids: unique and stable whatever the file names, never a class-wide file's name, and two
students' outputs never share a path (issue 16, item 1)."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import zipfile
from pathlib import Path

import nbformat
import pytest
from nbformat import v4

import factories as f
from grader import batch, cli, intake, pipeline
from grader.results import Submission

EXPORTS = ("gradebook.csv", "junit.xml", "canvas_gradebook.csv", "moodle_grading_worksheet.csv", "index.html")


def notebook(*sources: str) -> bytes:
    return nbformat.writes(v4.new_notebook(cells=[v4.new_code_cell(s) for s in sources])).encode()


def grade_without_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Grade as a batch does, except that a readable notebook gets a made-up graded result at once
    instead of running (what these tests look at is where each result goes). Its score comes from
    the notebook's hash, so that students' scores differ."""
    def grade(submissions, config, jobs, scheduler=None, isolations=None):
        for submission in submissions:
            if submission.error is not None:
                yield pipeline.grade(submission, config)
                continue
            fraction = int(submission.sha256[:2], 16) / 255
            yield f.graded(submission.id, {"train_epoch": fraction}, source=submission.source,
                           notebook_sha256=submission.sha256, rubric_sha256=config.rubric.sha256,
                           spec_version=config.spec.version, with_figures=False)

    monkeypatch.setattr(batch, "_grade", grade)


def assert_each_students_files_are_theirs(out: Path, submissions: list) -> None:
    """Every submission has its own folder, with its own result, report and Gradescope file; the
    class-wide files are all there, with a row per submission."""
    assert len({s.id.casefold() for s in submissions}) == len(submissions)
    for submission in submissions:
        folder = out / submission.id
        result = json.loads((folder / "result.json").read_text())
        assert (result["submission_id"], result["source"], result["notebook_sha256"]) == (
            submission.id, submission.source, submission.sha256)
        assert submission.source in (folder / "report.html").read_text()
        gradescope = json.loads((folder / "results.json").read_text())
        assert gradescope["score"] == (result["score"] if result["status"] == "graded" else 0)
    for name in EXPORTS:
        assert (out / name).is_file(), name
    rows = list(csv.DictReader(io.StringIO((out / "gradebook.csv").read_text())))
    assert [(r["submission_id"], r["source"]) for r in rows] == [(s.id, s.source) for s in submissions]
    summary = (out / "index.html").read_text()
    assert all(f'data-submission="{s.id}"' in summary for s in submissions)


# --- intake alone ------------------------------------------------------------------------------

def test_same_names_in_different_folders_carry_the_folder_not_a_count(tmp_path):
    for student, name in (("alice", "lab"), ("bob", "lab"), ("mallory", "lab-2"), ("carol", "lab")):
        (tmp_path / student).mkdir()
        (tmp_path / student / f"{name}.ipynb").write_bytes(notebook(f"print({student!r})"))
    three = [tmp_path / "alice" / "lab.ipynb", tmp_path / "bob" / "lab.ipynb", tmp_path / "mallory" / "lab-2.ipynb"]

    def ids(paths) -> dict[str, str]:
        return {Path(s.source).parent.name: s.id for s in intake.collect(paths)}

    assert ids(three) == {"alice": "alice_lab", "bob": "bob_lab", "mallory": "lab-2"}
    assert ids(three[::-1]) == ids(three)  # the order named changes nothing
    assert ids(three) == ids(three)  # nor running again
    with_carol = ids([*three, tmp_path / "carol" / "lab.ipynb"])
    assert with_carol == {**ids(three), "carol": "carol_lab"}  # adding a student renames no one
    # A class folder: the path below it, as before.
    whole = {s.student_name: s.id for s in intake.collect([tmp_path])}
    assert whole == {"alice": "alice_lab", "bob": "bob_lab", "mallory": "mallory_lab-2", "carol": "carol_lab"}


def _zip(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, content in members:
            archive.writestr(name, content)
    return buffer.getvalue()


def test_names_that_make_the_same_id_inside_a_zip_stay_apart(tmp_path):
    members = [("x y.ipynb", notebook("a = 1")), ("x_y-2.ipynb", notebook("a = 2")), ("x_y.ipynb", notebook("a = 3")),
               ("X_Y.ipynb", notebook("a = 4"))]  # the same folder name on a case-insensitive disk
    (tmp_path / "one.zip").write_bytes(_zip(members))
    (tmp_path / "other.zip").write_bytes(_zip(members[::-1]))
    found = {s.sha256: s.id for s in intake.collect([tmp_path / "one.zip"])}
    assert len(found) == 4 and len({i.casefold() for i in found.values()}) == 4
    assert found[hashlib.sha256(members[1][1]).hexdigest()] == "x_y-2"  # no other takes it: as it is
    again = {s.sha256: s.id for s in intake.collect([tmp_path / "other.zip"])}
    assert again == found  # the members' order inside the archive changes nothing


def test_ids_never_take_a_class_wide_files_name(tmp_path):
    names = ["index.html", "gradebook.csv", "JUNIT.xml", "canvas_gradebook.csv", "moodle_grading_worksheet.csv"]
    for name in names:
        (tmp_path / f"{name}.ipynb").write_bytes(notebook("x = 1"))
    reserved = batch.class_files()
    assert {"index.html", "gradebook.csv", "junit.xml", "canvas_gradebook.csv", "moodle_grading_worksheet.csv",
            ".runs"} <= reserved
    found = intake.collect([tmp_path], reserved=reserved)
    assert len(found) == len(names)
    assert not {s.id.casefold() for s in found} & {name.casefold() for name in reserved}


def test_a_batch_refuses_ids_that_would_share_a_folder_before_writing(tmp_path, grading_config):
    [missing] = intake.collect([tmp_path / "missing.ipynb"])
    for clash in ([missing, Submission(id="MISSING", source="elsewhere", error="x")],
                  [Submission(id="index.html", source="index.html.ipynb", error="x")],
                  [Submission(id="..", source="up", error="x")]):
        with pytest.raises(ValueError, match="cannot be used"):
            batch.grade_all(clash, grading_config(), tmp_path / "out", jobs=1, progress=False)
    assert not (tmp_path / "out").exists()


# --- a batch ---------------------------------------------------------------------------------

def test_the_issues_class_keeps_every_students_files_and_every_export(tmp_path, grading_config, monkeypatch):
    grade_without_kernels(monkeypatch)
    for student, name in (("alice", "lab"), ("bob", "lab"), ("mallory", "lab-2")):
        (tmp_path / student).mkdir()
        (tmp_path / student / f"{name}.ipynb").write_bytes(notebook(f"print({student!r})"))
    (tmp_path / "class.zip").write_bytes(_zip([("x y.ipynb", notebook("a = 1")), ("x_y-2.ipynb", notebook("a = 2")),
                                               ("x_y.ipynb", notebook("a = 3"))]))
    (tmp_path / "lms").mkdir()
    for name in ("index.html", "gradebook.csv", "junit.xml", "canvas_gradebook.csv"):
        (tmp_path / "lms" / f"{name}.ipynb").write_bytes(notebook(f"name = {name!r}"))
    paths = [tmp_path / "alice" / "lab.ipynb", tmp_path / "bob" / "lab.ipynb", tmp_path / "mallory" / "lab-2.ipynb",
             tmp_path / "class.zip", tmp_path / "lms"]
    submissions = intake.collect(paths, reserved=batch.class_files())
    assert len(submissions) == 10
    out = tmp_path / "out"
    for _ in range(2):  # and again into the same folder, as a rerun does
        results = batch.grade_all(submissions, grading_config(runs_dir=out / ".runs"), out, jobs=1, progress=False)
        assert [r.submission_id for r in results] == [s.id for s in submissions]
        assert_each_students_files_are_theirs(out, submissions)
    top = {p.name for p in out.iterdir()}
    assert top - {s.id for s in submissions} <= batch.class_files()  # what else is there is reserved


def test_grade_command_reruns_into_the_same_folder(tmp_path, mnist_sample_root, monkeypatch):
    grade_without_kernels(monkeypatch)
    folder = tmp_path / "class"
    folder.mkdir()
    for name in ("index.html", "Gradebook.csv", "alice"):
        (folder / f"{name}.ipynb").write_bytes(notebook(f"print({name!r})"))
    out = tmp_path / "out"
    command = ["grade", str(folder), "--out", str(out), "--root", str(mnist_sample_root.root), "--jobs", "1",
               "--quiet"]
    assert cli.main(command) == 0
    assert cli.main(command) == 0  # no FileExistsError: no student's folder is a class-wide file
    submissions = intake.collect([folder], reserved=batch.class_files())
    assert_each_students_files_are_theirs(out, submissions)


def test_real_notebooks_of_the_same_name_keep_their_own_runs(tmp_path, grading_config):
    """The issue's class, graded for real: each kept run holds its own student's notebook."""
    for student, name in (("alice", "lab"), ("bob", "lab"), ("mallory", "lab-2")):
        (tmp_path / student).mkdir()
        (tmp_path / student / f"{name}.ipynb").write_bytes(notebook(f"print('this is {student}')"))
    submissions = intake.collect([tmp_path / "alice" / "lab.ipynb", tmp_path / "bob" / "lab.ipynb",
                                  tmp_path / "mallory" / "lab-2.ipynb"], reserved=batch.class_files())
    out = tmp_path / "out"
    results = batch.grade_all(submissions, grading_config(runs_dir=out / ".runs"), out, jobs=2, progress=False)
    assert [(r.status, r.execution_status) for r in results] == [("graded", "completed")] * 3
    assert_each_students_files_are_theirs(out, submissions)
    for submission in submissions:
        executed = nbformat.read(out / ".runs" / submission.id / "executed.ipynb", as_version=4)
        student = Path(submission.source).parent.name
        assert executed.cells[0].outputs[0]["text"] == f"this is {student}\n"
