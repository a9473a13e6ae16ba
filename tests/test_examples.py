"""Every bundled example gets exactly the score, failed checks, messages and warnings that
lab/examples/expected.toml gives it, graded together as a class would be (two workers)."""
from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import nbformat
import pytest

from grader import batch, intake, resources
from grader.results import GradeResult

EXPECTED = tomllib.loads((resources.EXAMPLES_DIR / "expected.toml").read_text())["examples"]
pytestmark = pytest.mark.slow


def _id(name: str) -> str:
    return intake._slug(name)


@pytest.fixture(scope="module")
def graded(mnist_sample_root, tmp_path_factory):
    from grader import pipeline, score
    from reference import spec

    out = tmp_path_factory.mktemp("class")
    config = pipeline.Config(provisioned=mnist_sample_root, spec=spec.load(mnist_sample_root.profile),
                             rubric=score.load_rubric(resources.RUBRIC_PATH), runs_dir=out / ".runs",
                             hide=(resources.EXAMPLES_DIR,))
    results = batch.grade_all(intake.collect([resources.EXAMPLES_DIR]), config, out, jobs=2, progress=False)
    return out, {r.submission_id: r for r in results}


def test_every_example_is_listed(graded):
    _, results = graded
    assert set(results) == {_id(name) for name in EXPECTED}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_gets_its_expected_grade(name, graded):
    out, results = graded
    want = EXPECTED[name]
    result: GradeResult = results[_id(name)]
    if "error" in want:
        assert result.status == "error" and want["error"] in result.reason
        assert not result.checks
        return
    assert result.status == "graded"
    assert result.execution_status == want.get("status", "completed")
    assert result.score == pytest.approx(want["score"], abs=1e-3)
    assert {c.name for c in result.checks if c.status != "passed"} == set(want.get("fails", []))
    by_name = {c.name: c for c in result.checks}
    for check, text in want.get("messages", {}).items():
        assert text in by_name[check].message, by_name[check].message
    warnings = {w.split(":")[0] for c in result.checks for w in c.warnings}
    assert warnings == set(want.get("warns", []))
    # Integrity findings flag a result for review: every hostile example that touched the kernel has
    # some, and no honest one has any.
    assert bool(result.integrity) == want.get("flagged", False), result.integrity
    # What the batch wrote is the same result, whole.
    written = GradeResult.from_json(json.loads((out / result.submission_id / "result.json").read_text()))
    assert written.score == result.score and written.checks == result.checks


def test_the_pickle_payload_never_ran(graded):
    assert not Path("/tmp/pwned").exists()


def test_reading_outside_found_nothing(graded):
    out, _ = graded
    executed = nbformat.read(out / ".runs" / "bad_reads_outside" / "executed.ipynb", as_version=4)
    printed = "".join(o.get("text", "") for cell in executed.cells for o in cell.get("outputs", []))
    for attempt in ("import reference", "import grader", "/etc/shadow"):
        assert f"blocked: {attempt}" in printed
    # Listing directories is allowed, but the checkout (specs, examples, other submissions) and the
    # output directory must not show up in what it could see.
    found = [line for line in printed.splitlines() if line.startswith("FOUND:")]
    for secret in ("reference", "grader", "examples", "specs", "rubric", ".runs", "result.json"):
        assert not any(secret in line for line in found), found


def test_forged_result_files_are_ignored(graded):
    out, results = graded
    forged = results["bad_forge_result"]
    assert forged.score == EXPECTED["bad_forge_result.ipynb"]["score"]
    written = json.loads((out / "bad_forge_result" / "result.json").read_text())
    assert written["score"] == forged.score and written["max_score"] == forged.max_score


def test_class_exports_are_written(graded):
    out, results = graded
    for name in ("index.html", "gradebook.csv", "junit.xml"):
        assert (out / name).stat().st_size > 0
    for submission_id in results:
        for name in ("result.json", "report.html", "results.json"):
            assert (out / submission_id / name).is_file()


def test_rerun_skips_everything_unchanged(graded, mnist_sample_root):
    out, results = graded
    before = {i: (out / i / "result.json").stat().st_mtime_ns for i in results}
    from grader import pipeline, score
    from reference import spec

    config = pipeline.Config(provisioned=mnist_sample_root, spec=spec.load(mnist_sample_root.profile),
                             rubric=score.load_rubric(resources.RUBRIC_PATH), runs_dir=out / ".runs")
    again = batch.grade_all(intake.collect([resources.EXAMPLES_DIR]), config, out, jobs=2, progress=False)
    assert {r.submission_id: r.score for r in again} == {i: r.score for i, r in results.items()}
    assert {i: (out / i / "result.json").stat().st_mtime_ns for i in results} == before


def _check(notebook: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "grader.cli", "check", str(notebook), "--out", str(out),
                           "--quiet", *extra], capture_output=True, text=True, timeout=600)


def test_check_passes_the_correct_notebook(tmp_path, mnist_sample_root):
    done = _check(resources.EXAMPLES_DIR / "correct.ipynb", tmp_path, "--root", str(mnist_sample_root.root))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "score 23.5/23.5" in done.stdout and (tmp_path / "correct" / "report.html").is_file()


def test_check_fails_a_broken_notebook_naming_the_check(tmp_path, mnist_sample_root):
    done = _check(resources.EXAMPLES_DIR / "mistake_logsoftmax_dim0.ipynb", tmp_path,
                  "--root", str(mnist_sample_root.root))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "FAIL  0/1  net outputs log-probabilities over the ten digits" in done.stdout
    assert "nn.LogSoftmax(dim=1)" in done.stdout
    # --min-score lets CI accept a partial score on purpose.
    done = _check(resources.EXAMPLES_DIR / "mistake_logsoftmax_dim0.ipynb", tmp_path,
                  "--root", str(mnist_sample_root.root), "--min-score", "20")
    assert done.returncode == 0, done.stdout + done.stderr
