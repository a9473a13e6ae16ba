"""The run's exports: gradebook CSV, Gradescope results.json, JUnit XML, Canvas and Moodle gradebooks."""
from __future__ import annotations

import csv
import dataclasses
import html
import io
import json
import xml.etree.ElementTree as ET
from datetime import datetime
from pathlib import Path

import jsonschema
import pytest
from lxml import etree

import factories as f
from grader.export import canvas_csv, gradebook_csv, junit_xml, moodle_csv, write_exports

# Gradescope's results.json, written from its autograder specification
# (https://gradescope-autograders.readthedocs.io/en/latest/specs/, "Output format"): every key
# the spec documents, and no other.
VISIBILITY = {"enum": ["hidden", "after_due_date", "after_published", "visible"]}
FORMAT = {"enum": ["text", "html", "simple_format", "md", "ansi"]}
GRADESCOPE_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "additionalProperties": False,
    "anyOf": [{"required": ["score"]},
              {"required": ["tests"], "properties": {"tests": {"items": {"required": ["score"]}}}}],
    "properties": {
        "score": {"type": "number"},
        "execution_time": {"type": "number", "minimum": 0},
        "output": {"type": "string"},
        "output_format": FORMAT,
        "test_output_format": FORMAT,
        "test_name_format": FORMAT,
        "visibility": VISIBILITY,
        "stdout_visibility": VISIBILITY,
        "extra_data": {"type": "object"},
        "tests": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "score": {"type": "number"},
                    "max_score": {"type": "number", "minimum": 0},
                    "status": {"enum": ["passed", "failed"]},
                    "name": {"type": "string"},
                    "name_format": FORMAT,
                    "number": {"type": "string"},
                    "output": {"type": "string"},
                    "output_format": FORMAT,
                    "tags": {"type": "array", "items": {"type": "string"}},
                    "visibility": VISIBILITY,
                    "extra_data": {"type": "object"},
                },
            },
        },
        "leaderboard": {
            "type": "array",
            "items": {"type": "object", "required": ["name", "value"],
                      "properties": {"name": {"type": "string"},
                                     "value": {"type": ["number", "string"]},
                                     "order": {"enum": ["asc", "desc"]}}},
        },
    },
}
# What this project promises on top of the spec: every test has these, with these values.
LABGRADER_TEST = {
    "type": "object",
    "required": ["name", "score", "max_score", "status", "output", "visibility"],
    "properties": {"visibility": {"enum": ["visible", "hidden"]}},
}

# The JUnit XML that CI servers (Jenkins, GitLab, GitHub actions) read, as the Ant task writes it:
# <testsuites> of <testsuite>s with their counts, each holding <testcase>s that may carry one
# <failure>, <error> or <skipped>. Written for these tests, after the Ant/Jenkins format.
JUNIT_XSD = b"""<?xml version="1.0" encoding="UTF-8"?>
<xs:schema xmlns:xs="http://www.w3.org/2001/XMLSchema">
  <xs:complexType name="problem">
    <xs:simpleContent>
      <xs:extension base="xs:string">
        <xs:attribute name="message" type="xs:string"/>
        <xs:attribute name="type" type="xs:string" use="required"/>
      </xs:extension>
    </xs:simpleContent>
  </xs:complexType>
  <xs:complexType name="testcase">
    <xs:choice minOccurs="0">
      <xs:element name="skipped" type="xs:string"/>
      <xs:element name="error" type="problem"/>
      <xs:element name="failure" type="problem"/>
    </xs:choice>
    <xs:attribute name="name" type="xs:string" use="required"/>
    <xs:attribute name="classname" type="xs:string" use="required"/>
    <xs:attribute name="time" type="xs:decimal" use="required"/>
  </xs:complexType>
  <xs:complexType name="testsuite">
    <xs:sequence>
      <xs:element name="properties" minOccurs="0">
        <xs:complexType>
          <xs:sequence>
            <xs:element name="property" minOccurs="0" maxOccurs="unbounded">
              <xs:complexType>
                <xs:attribute name="name" type="xs:string" use="required"/>
                <xs:attribute name="value" type="xs:string" use="required"/>
              </xs:complexType>
            </xs:element>
          </xs:sequence>
        </xs:complexType>
      </xs:element>
      <xs:element name="testcase" type="testcase" minOccurs="0" maxOccurs="unbounded"/>
      <xs:element name="system-out" type="xs:string" minOccurs="0"/>
      <xs:element name="system-err" type="xs:string" minOccurs="0"/>
    </xs:sequence>
    <xs:attribute name="name" type="xs:string" use="required"/>
    <xs:attribute name="package" type="xs:string"/>
    <xs:attribute name="id" type="xs:int"/>
    <xs:attribute name="hostname" type="xs:string"/>
    <xs:attribute name="timestamp">
      <xs:simpleType>
        <xs:restriction base="xs:dateTime">
          <xs:pattern value="[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}"/>
        </xs:restriction>
      </xs:simpleType>
    </xs:attribute>
    <xs:attribute name="tests" type="xs:nonNegativeInteger" use="required"/>
    <xs:attribute name="failures" type="xs:nonNegativeInteger" use="required"/>
    <xs:attribute name="errors" type="xs:nonNegativeInteger" use="required"/>
    <xs:attribute name="skipped" type="xs:nonNegativeInteger"/>
    <xs:attribute name="time" type="xs:decimal" use="required"/>
  </xs:complexType>
  <xs:element name="testsuites">
    <xs:complexType>
      <xs:sequence>
        <xs:element name="testsuite" type="testsuite" minOccurs="0" maxOccurs="unbounded"/>
      </xs:sequence>
      <xs:attribute name="name" type="xs:string"/>
      <xs:attribute name="tests" type="xs:nonNegativeInteger"/>
      <xs:attribute name="failures" type="xs:nonNegativeInteger"/>
      <xs:attribute name="errors" type="xs:nonNegativeInteger"/>
      <xs:attribute name="time" type="xs:decimal"/>
    </xs:complexType>
  </xs:element>
</xs:schema>
"""

HIDDEN_MARK = "HIDDEN"  # every hidden check's message in the factories carries it


@pytest.fixture(scope="module")
def cohort():
    return f.cohort() + [f.hostile()]


@pytest.fixture(scope="module")
def out(cohort, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exports")
    write_exports(cohort, out, f.RUBRIC_CHECK_NAMES)
    return out


# --------------------------------------------------------------------------------------------
# gradebook.csv

def test_gradebook_has_a_row_per_submission_and_a_column_per_check(cohort, out):
    with open(out / "gradebook.csv", newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
        header = reader.fieldnames
    assert header[:4] == ["submission_id", "source", "status", "reason"]
    assert header[4:4 + len(f.RUBRIC_CHECK_NAMES)] == f.RUBRIC_CHECK_NAMES
    assert "total" in header and "max_score" in header
    assert [r["submission_id"] for r in rows] == [r.submission_id for r in cohort]
    for result, row in zip(cohort, rows):
        assert row["status"] == result.status
        if result.status == "graded":
            for c in result.checks:
                assert float(row[c.name]) == pytest.approx(c.points)
            assert float(row["total"]) == pytest.approx(result.score)
            assert float(row["total"]) == pytest.approx(sum(float(row[n])
                                                             for n in f.RUBRIC_CHECK_NAMES))
            assert float(row["max_score"]) == result.max_score
        else:
            assert row["reason"] == result.reason
            assert all(row[n] == "" for n in f.RUBRIC_CHECK_NAMES) and row["total"] == ""


def test_gradebook_defuses_spreadsheet_formulas():
    result = f.error("=HYPERLINK(\"http://evil\")", reason="-1+1")
    rows = list(csv.reader(io.StringIO(gradebook_csv([result], f.RUBRIC_CHECK_NAMES))))
    assert rows[1][0] == "'=HYPERLINK(\"http://evil\")"
    assert rows[1][3] == "'-1+1"


# --------------------------------------------------------------------------------------------
# Gradescope results.json

def test_gradescope_json_validates_and_adds_up(cohort, out):
    jsonschema.Draft202012Validator.check_schema(GRADESCOPE_SCHEMA)
    for result in cohort:
        data = json.loads((out / result.submission_id / "results.json").read_text("utf-8"))
        jsonschema.validate(data, GRADESCOPE_SCHEMA)
        for test in data["tests"]:
            jsonschema.validate(test, LABGRADER_TEST)
        if result.status == "graded":
            assert data["score"] == pytest.approx(result.score)
            assert data["score"] == pytest.approx(sum(t["score"] for t in data["tests"]))
            assert [t["name"] for t in data["tests"]] == [c.title for c in result.checks]
            for c, t in zip(result.checks, data["tests"]):
                assert t["status"] == ("passed" if c.status == "passed" else "failed")
                assert t["visibility"] == c.visibility
                assert t["max_score"] == c.max_points
                if c.visibility == "visible":
                    assert c.message in t["output"]
        else:
            assert data["score"] == 0 and data["tests"] == []
            assert result.reason in data["output"]


def test_gradescope_hidden_outputs_leak_nothing(cohort, out):
    for result in cohort:
        text = (out / result.submission_id / "results.json").read_text("utf-8")
        assert HIDDEN_MARK not in text and "seed" not in text
        for t in json.loads(text)["tests"]:
            if t["visibility"] == "hidden":
                assert t["output"].startswith("Hidden check: ")
                assert "Its details are not shown." in t["output"]


def test_gradescope_overall_output_says_what_went_wrong(out):
    bob = json.loads((out / "bob" / "results.json").read_text("utf-8"))
    assert "Score: 9/15" in bob["output"]
    assert "Cell 13 (error): RuntimeError: mat1 and mat2" in bob["output"]
    carol = json.loads((out / "carol" / "results.json").read_text("utf-8"))
    assert "timeout" in carol["output"] and "mnist-sample" in carol["output"]
    gap = json.loads((out / "hidden_gap" / "results.json").read_text("utf-8"))
    assert "All visible checks pass, but not all hidden checks do." in gap["output"]


# --------------------------------------------------------------------------------------------
# junit.xml

def test_junit_xml_validates_against_the_schema(out):
    schema = etree.XMLSchema(etree.fromstring(JUNIT_XSD))
    doc = etree.parse(str(out / "junit.xml"))
    assert schema.validate(doc), schema.error_log


def test_junit_structure_counts_and_messages(cohort, out):
    root = ET.parse(out / "junit.xml").getroot()
    assert root.tag == "testsuites"
    suites = root.findall("testsuite")
    assert len(suites) == 1  # one run
    suite = suites[0]
    cases = suite.findall("testcase")
    assert len(cases) == len(cohort) * len(f.RUBRIC_CHECK_NAMES)
    assert int(suite.get("tests")) == len(cases)
    assert int(suite.get("failures")) == len(suite.findall("testcase/failure"))
    assert int(suite.get("errors")) == len(suite.findall("testcase/error"))
    by_key = {(c.get("classname"), c.get("name")): c for c in cases}
    for result in cohort:
        for name in f.RUBRIC_CHECK_NAMES:
            case = by_key[(result.submission_id, name)]
            if result.status != "graded":
                assert case.find("error").get("message") == result.reason
                continue
            check = next(c for c in result.checks if c.name == name)
            failure = case.find("failure")
            if check.status == "passed":
                assert failure is None and case.find("error") is None
            elif check.visibility == "hidden":
                assert failure.get("type") == "hidden"
                assert failure.get("message").startswith("Hidden check: ")
                assert HIDDEN_MARK not in (failure.text or "")
            else:
                assert failure.get("type") == check.status
                assert check.message.splitlines()[0] in failure.get("message")
    bob_train = by_key[("bob", "train_epoch")].find("failure")
    assert "0/2 points: train_epoch() returned accuracy 88.67" in bob_train.get("message")
    assert "print once per epoch" in bob_train.text


def test_junit_survives_control_characters_and_markup():
    forward = dataclasses.replace(f.check("forward", 0.0),
                                  message="printed \x1b[31mred\x1b[0m and \x00 and <b>&amp;</b>")
    result = f.graded("ctrl", checks=(forward,), with_figures=False)
    text = junit_xml([result], ["forward"])
    failure = etree.fromstring(text.encode("utf-8")).find(".//failure")
    assert failure.get("message") == "0/1 points: printed \ufffd[31mred\ufffd[0m and \ufffd and <b>&amp;</b>"
    assert etree.XMLSchema(etree.fromstring(JUNIT_XSD)).validate(
        etree.fromstring(text.encode("utf-8")).getroottree())


# --------------------------------------------------------------------------------------------
# writing

def test_exports_are_written_atomically_and_refuse_escaping_ids(tmp_path: Path):
    written = write_exports([f.perfect(), f.error("dave")], tmp_path, f.RUBRIC_CHECK_NAMES)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in written) == [
        "canvas_gradebook.csv", "dave/results.json", "gradebook.csv", "junit.xml",
        "moodle_grading_worksheet.csv", "perfect/results.json"]
    leftovers = [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []
    for bad in ("../escape", "a/b", "..", ""):
        with pytest.raises(ValueError):
            write_exports([f.error(bad)], tmp_path / "x", f.RUBRIC_CHECK_NAMES)
    assert not (tmp_path / "x").exists() and not (tmp_path / "escape").exists()
    with pytest.raises(ValueError):
        write_exports([f.perfect("a"), f.error("a")], tmp_path / "y", f.RUBRIC_CHECK_NAMES)


# --------------------------------------------------------------------------------------------
# LMS gradebooks. Students as a Canvas or Moodle download names them; the cohort's last two
# students have no entry (intake found no LMS id for them).

STUDENTS = {"perfect": ("30871", "Lovelace, Ada"), "hidden_gap": ("30872", "Hopper, Grace"),
            "bob": ("30873", "Bob O'Brien, \"Bobby\""), "carol": ("30874", "=HYPERLINK(\"http://evil\")"),
            "dave": ("30875", "Dave Null"), "student00": ("30876", "Zero, Student"),
            "student01": ("30877", "One, Student"), "student02": ("30878", "Two, Student")}
TITLE = "Create your first PyTorch model"


def _rows(text: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(text)))


def test_canvas_gradebook_import_layout(cohort):
    rows = _rows(canvas_csv(cohort, TITLE, STUDENTS, assignment_id="4812"))
    # Canvas's gradebook export: five student columns, then "<assignment> (<id>)"; the second row
    # gives the points possible under the assignment column.
    assert rows[0] == ["Student", "ID", "SIS User ID", "SIS Login ID", "Section", f"{TITLE} (4812)"]
    assert rows[1][0].strip() == "Points Possible" and rows[1][1:5] == ["", "", "", ""]
    assert float(rows[1][5]) == max(r.max_score for r in cohort)
    body = rows[2:]
    assert len(body) == len(cohort)
    for result, row in zip(cohort, body):
        assert len(row) == 6
        lms_id, name = STUDENTS.get(result.submission_id, ("", result.submission_id))
        assert row[1] == lms_id
        assert row[0] == ("'" + name if name.startswith("=") else name)
        if result.status == "graded":
            assert float(row[5]) == pytest.approx(result.score)
        else:
            assert row[5] == ""  # Canvas leaves an empty cell's grade as it is
    # Without an assignment id, the column is the title alone: Canvas offers to create it.
    assert _rows(canvas_csv(cohort, TITLE))[0][5] == TITLE


def test_moodle_grading_worksheet_layout(cohort):
    rows = _rows(moodle_csv(cohort, STUDENTS))
    # The columns of the worksheet Moodle's assignment downloads; its importer reads Identifier
    # ("Participant <id>"), Grade, "Last modified (grade)" and the feedback plugin's column.
    assert rows[0] == ["Identifier", "Full name", "Email address", "Status", "Grade", "Maximum Grade",
                       "Grade can be changed", "Last modified (submission)", "Last modified (grade)",
                       "Feedback comments"]
    body = [dict(zip(rows[0], row)) for row in rows[1:]]
    assert len(body) == len(cohort)
    for result, row in zip(cohort, body):
        lms_id, _ = STUDENTS.get(result.submission_id, ("", result.submission_id))
        assert row["Identifier"] == (f"Participant {lms_id}" if lms_id else "")
        assert float(row["Maximum Grade"]) == result.max_score
        assert row["Last modified (grade)"] == result.graded_at
        datetime.fromisoformat(row["Last modified (grade)"])  # a date PHP's strtotime reads
        feedback = row["Feedback comments"]
        assert HIDDEN_MARK not in feedback
        if result.status == "graded":
            assert float(row["Grade"]) == pytest.approx(result.score)
            assert feedback.startswith(f"Score: {row['Grade']}/")
            for c in result.checks:
                if c.visibility == "hidden":
                    assert f"{c.title}: " in feedback and "(hidden check)" in feedback
                elif c.status != "passed":
                    assert html.escape(c.message) in feedback
        else:
            assert row["Grade"] == "" and row["Status"] == "Submitted for grading"
            assert html.escape(result.reason) in feedback
    carol = body[[r.submission_id for r in cohort].index("carol")]
    assert carol["Full name"] == "'=HYPERLINK(\"http://evil\")"  # defused, as in the gradebook


def test_moodle_feedback_is_escaped_html():
    text = moodle_csv([f.hostile()])
    feedback = _rows(text)[1][9]
    assert "<script>" not in feedback and "&lt;script&gt;" in feedback
    assert "<br>" in feedback  # one line per check, as Moodle's comment editor shows HTML


def test_lms_gradebooks_are_written_with_the_run(cohort, tmp_path: Path):
    write_exports(cohort, tmp_path, f.RUBRIC_CHECK_NAMES, title=TITLE, students=STUDENTS)
    with open(tmp_path / "canvas_gradebook.csv", newline="", encoding="utf-8") as fh:
        canvas = list(csv.reader(fh))
    with open(tmp_path / "moodle_grading_worksheet.csv", newline="", encoding="utf-8") as fh:
        moodle = list(csv.DictReader(fh))
    assert canvas[0][5] == TITLE
    assert [row[1] for row in canvas[2:]] == [STUDENTS.get(r.submission_id, ("", ""))[0] for r in cohort]
    assert [row["Identifier"] for row in moodle] == [
        f"Participant {STUDENTS[r.submission_id][0]}" if r.submission_id in STUDENTS else "" for r in cohort]


def test_a_submission_with_integrity_findings_is_flagged_in_every_export(tmp_path):
    finding = "IPython post_run_cell hook removed: forge_answers"
    flagged = dataclasses.replace(f.graded("mallory"), integrity=(finding,))
    honest = f.graded("alice")
    rows = {row["submission_id"]: row for row in csv.DictReader(io.StringIO(
        gradebook_csv([flagged, honest], f.RUBRIC_CHECK_NAMES)))}
    assert rows["mallory"]["flagged_for_review"] == finding and rows["alice"]["flagged_for_review"] == ""
    from grader.export import gradescope_json

    assert finding in gradescope_json(flagged)["output"] and "review" not in gradescope_json(honest)["output"]
    suite = etree.fromstring(junit_xml([flagged, honest], f.RUBRIC_CHECK_NAMES).encode()).find("testsuite")
    assert [(p.get("name"), p.get("value")) for p in suite.find("properties")] == [
        ("flagged_for_review mallory", finding)]
