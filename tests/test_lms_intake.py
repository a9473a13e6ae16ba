"""LMS downloads in (issue 14, item 3): Canvas's and Moodle's bulk downloads and a folder per student
are recognised; each result carries the student's LMS id and name; one notebook per student, the
newest, is graded and the others are listed; the Canvas and Moodle gradebooks carry the LMS ids."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import zipfile
from pathlib import Path

from test_ids import grade_without_kernels, notebook

from grader import batch, intake

DAY = 86_400.0
# Canvas names a file lastfirst[_late]_USERID_SUBMISSIONID_name, with -1, -2... on a re-uploaded
# name; the "late_" in front is read too.
CANVAS = {
    "smithjohn_12345_67890_lab.ipynb": notebook("print('john, first try')"),
    "smithjohn_late_12345_67999_lab-1.ipynb": notebook("print('john, resubmitted late')"),
    "late_doejane_23456_70001_lab.ipynb": notebook("print('jane 0')"),
    "late_doejane_23456_70001_lab-2.ipynb": notebook("print('jane 2')"),
    "late_doejane_23456_70001_lab-1.ipynb": notebook("print('jane 1')"),
    "leebo_34567_70100_lab.py": b"print('bo sent a script')",
    "nguyenan_45678_70200_lab.ipynb": b'{"cells": [',  # cut short: graded, with its reason
}
# Moodle: a folder per participant, Full Name_PARTICIPANTID_assignsubmission_<plugin>_/.
JOHN = "John Smith_1234567_assignsubmission_file_"
ANNA = "Anna Müller_7654321_assignsubmission_file_"
MOODLE = {  # path -> (content, days before now it was last changed)
    f"{JOHN}/lab.ipynb": (notebook("print('john')"), 3),
    "John Smith_1234567_assignsubmission_onlinetext_/onlinetext.html": (b"<p>see my notebook</p>", 3),
    f"{ANNA}/lab_draft.ipynb": (notebook("print('anna draft')"), 5),
    f"{ANNA}/lab.ipynb": (notebook("print('anna final')"), 1),
}


def canvas_folder(root: Path) -> Path:
    folder = root / "canvas"
    folder.mkdir()
    for name, content in CANVAS.items():
        (folder / name).write_bytes(content)
    return folder


def moodle_folder(root: Path) -> Path:
    folder = root / "moodle"
    for name, (content, age) in MOODLE.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(content)
        os.utime(folder / name, (1.7e9 - age * DAY, 1.7e9 - age * DAY))
    return folder


def as_zip(path: Path, members: dict[str, tuple[bytes, float]]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, (content, age) in members.items():
            info = zipfile.ZipInfo(name, date_time=(2024, 5, 20 - int(age), 12, 0, 0))
            archive.writestr(info, content)
    return path


def by_file(submissions, files: dict[str, bytes]) -> dict[str, object]:
    """Submissions by the name of the file they came from, told by their content (a zip's members
    share its path as their source); the one file that is not a notebook is never read."""
    names = {hashlib.sha256(content).hexdigest(): name for name, content in files.items()}
    [unread] = [name for name in files if not name.endswith(".ipynb")]
    found = {names[s.sha256] if s.sha256 else unread: s for s in submissions}
    assert len(found) == len(files) == len(submissions)  # every file graded or listed, once
    return found


def _check_canvas(found: dict) -> None:
    john, john_old = found["smithjohn_late_12345_67999_lab-1.ipynb"], found["smithjohn_12345_67890_lab.ipynb"]
    assert (john.id, john.student_id, john.student_name, john.error) == ("smithjohn_12345", "12345", "smithjohn", None)
    assert john_old.notebook is None and john_old.superseded_by == "smithjohn_12345"
    assert john_old.error == ("an older resubmission of smithjohn (Canvas user 12345); graded: "
                              "smithjohn_late_12345_67999_lab-1.ipynb")
    assert (john_old.student_id, john_old.student_name) == ("12345", "smithjohn")
    jane = {name: s for name, s in found.items() if "doejane" in name}
    [graded] = [s for s in jane.values() if s.superseded_by is None]
    assert graded is jane["late_doejane_23456_70001_lab-2.ipynb"] and graded.id == "doejane_23456"
    assert all(s.superseded_by == "doejane_23456" and "graded: late_doejane_23456_70001_lab-2.ipynb" in s.error
               for s in jane.values() if s is not graded)
    bo = found["leebo_34567_70100_lab.py"]  # no notebook: the file stands for him, with its reason
    assert (bo.id, bo.student_id, bo.superseded_by) == ("leebo_34567", "34567", None)
    assert "not a notebook (a .py file)" in bo.error
    an = found["nguyenan_45678_70200_lab.ipynb"]
    assert (an.id, an.student_id, an.superseded_by) == ("nguyenan_45678", "45678", None)
    assert "invalid JSON" in an.error


def test_canvas_download_folder_and_zip(tmp_path):
    found = intake.collect([canvas_folder(tmp_path)])
    _check_canvas(by_file(found, CANVAS))
    zipped = as_zip(tmp_path / "submissions.zip", {name: (content, 0) for name, content in CANVAS.items()})
    in_zip = intake.collect([zipped])
    _check_canvas(by_file(in_zip, CANVAS))
    assert sorted(s.id for s in in_zip) == sorted(s.id for s in found)  # the same ids, zipped or not


def _check_moodle(found: dict) -> None:
    john, anna = found[f"{JOHN}/lab.ipynb"], found[f"{ANNA}/lab.ipynb"]
    assert (john.id, john.student_id, john.student_name, john.error) == (
        "John_Smith_1234567", "1234567", "John Smith", None)
    assert (anna.id, anna.student_id, anna.student_name, anna.error) == (
        "Anna_Müller_7654321", "7654321", "Anna Müller", None)
    draft = found[f"{ANNA}/lab_draft.ipynb"]
    assert draft.superseded_by == "Anna_Müller_7654321" and draft.notebook is None
    assert draft.error == ("an older resubmission of Anna Müller (Moodle participant 7654321); graded: "
                           f"{ANNA}/lab.ipynb")
    text = found["John Smith_1234567_assignsubmission_onlinetext_/onlinetext.html"]
    assert text.superseded_by == "John_Smith_1234567" and "not a notebook (a .html file)" in text.error
    assert text.student_id == "1234567"


def test_moodle_download_folder_and_zip(tmp_path):
    files = {name: content for name, (content, _) in MOODLE.items()}
    _check_moodle(by_file(intake.collect([moodle_folder(tmp_path)]), files))
    _check_moodle(by_file(intake.collect([as_zip(tmp_path / "moodle.zip", MOODLE)]), files))  # by entry dates


def test_a_folder_per_student_names_the_student_and_grades_each_notebook(tmp_path):
    folder = tmp_path / "class"
    for student, name, age in (("alice", "lab_old", 2), ("alice", "lab", 1), ("bob", "lab", 1), ("", "carol", 1)):
        path = folder / student / f"{name}.ipynb"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(notebook(f"print({name!r})"))
        os.utime(path, (1.7e9 - age * DAY, 1.7e9 - age * DAY))
    found = {s.id: s for s in intake.collect([folder])}
    assert set(found) == {"alice_lab", "alice_lab_old", "bob_lab", "carol"}
    assert (found["alice_lab"].student_name, found["alice_lab"].student_id) == ("alice", None)
    assert found["bob_lab"].error is None and found["bob_lab"].student_name == "bob"
    assert found["carol"].student_name is None  # a notebook at the top: no student folder
    # Nothing says alice's two notebooks are versions of one: both are graded, none is dropped.
    assert all(s.error is None and s.superseded_by is None for s in found.values())


def _csv(path: Path) -> list[list[str]]:
    return list(csv.reader(io.StringIO(path.read_text())))


def test_batch_gives_the_gradebooks_the_lms_ids(tmp_path, grading_config, monkeypatch):
    grade_without_kernels(monkeypatch)
    paths = [canvas_folder(tmp_path), moodle_folder(tmp_path)]
    submissions = intake.collect(paths, reserved=batch.class_files())
    out = tmp_path / "out"
    results = {r.submission_id: r for r in batch.grade_all(
        submissions, grading_config(runs_dir=out / ".runs"), out, jobs=1, progress=False)}
    kept = json.loads((out / "smithjohn_12345" / "result.json").read_text())
    assert (kept["student_id"], kept["student_name"], kept["status"]) == ("12345", "smithjohn", "graded")
    assert results["smithjohn_12345_67890_lab"].status == "error"  # listed, with why
    assert "an older resubmission of smithjohn" in results["smithjohn_12345_67890_lab"].reason
    assert "Student: <strong>Anna Müller (7654321)</strong>" in (out / "Anna_Müller_7654321" / "report.html").read_text()

    canvas = _csv(out / "canvas_gradebook.csv")
    with_id = {row[1]: row for row in canvas[2:] if row[1]}
    assert set(with_id) == {"12345", "23456", "34567", "45678", "1234567", "7654321"}  # once each
    assert with_id["12345"][0] == "smithjohn" and float(with_id["12345"][5]) == results["smithjohn_12345"].score
    assert with_id["34567"][5] == ""  # a .py file: not graded, so Canvas changes nothing
    assert with_id["7654321"][0] == "Anna Müller"
    assert sorted(row[0] for row in canvas[2:] if not row[1]) == sorted(
        s.id for s in submissions if s.superseded_by)  # the others: no LMS id, so never matched

    moodle = {row[0]: row for row in _csv(out / "moodle_grading_worksheet.csv")[1:]}
    assert float(moodle["Participant 7654321"][4]) == results["Anna_Müller_7654321"].score
    assert moodle["Participant 1234567"][1] == "John Smith"
    assert "Participant 67890" not in moodle and len([k for k in moodle if k]) == 6
