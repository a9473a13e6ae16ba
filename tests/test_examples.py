"""Every bundled example gets exactly the score, failed checks, messages and warnings that
lab/examples/expected.toml gives it, graded together as a class would be (two workers), with the
support files expected.toml's [environment] names (what `./dev.sh demo` passes with --support-file)."""
from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import nbformat
import pytest

from grader import batch, intake, resources
from grader.results import GradeResult

DECLARED = tomllib.loads((resources.EXAMPLES_DIR / "expected.toml").read_text())
EXPECTED = DECLARED["examples"]
SUPPORT_FILES = [resources.EXAMPLES_DIR / path for path in DECLARED["environment"]["support_files"]]
pytestmark = pytest.mark.slow


def _id(name: str) -> str:
    return intake._slug(name)


def _config(provisioned, out: Path, **changes):
    import dataclasses

    from grader import pipeline, score
    from reference import spec

    rubric = score.load_rubric(resources.RUBRIC_PATH)
    rubric = dataclasses.replace(rubric, environment=rubric.environment.adding(SUPPORT_FILES))
    return pipeline.Config(provisioned=provisioned, spec=spec.load(provisioned.profile), rubric=rubric,
                           runs_dir=out / ".runs", **changes)


@pytest.fixture(scope="module")
def graded(mnist_sample_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("class")
    config = _config(mnist_sample_root, out, hide=(resources.EXAMPLES_DIR,))
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
    config = _config(mnist_sample_root, out)
    again = batch.grade_all(intake.collect([resources.EXAMPLES_DIR]), config, out, jobs=2, progress=False)
    assert {r.submission_id: r.score for r in again} == {i: r.score for i, r in results.items()}
    assert {i: (out / i / "result.json").stat().st_mtime_ns for i in results} == before


def _check(notebook: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "grader.cli", "check", str(notebook), "--out", str(out),
                           "--quiet", *extra], capture_output=True, text=True, timeout=600)


def test_check_passes_the_correct_notebook(tmp_path, mnist_sample_root):
    done = _check(resources.EXAMPLES_DIR / "correct.ipynb", tmp_path, "--root", str(mnist_sample_root.root))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "score 24.5/24.5" in done.stdout and (tmp_path / "correct" / "report.html").is_file()


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


def _code(name: str) -> dict[int, str]:
    """An example's code cells by the number messages give them (Jupyter's position, from 1)."""
    notebook = nbformat.read(resources.EXAMPLES_DIR / name, as_version=4)
    return {index + 1: cell.source for index, cell in enumerate(notebook.cells) if cell.cell_type == "code"}


def _message(results, name: str, check: str) -> str:
    return next(c.message for c in results[_id(name)].checks if c.name == check)


def test_the_course_versions_messages_are_true_of_it(graded):
    """It loses points for exactly what it lacks, and what each message says of it is so."""
    _, results = graded
    code = _code("course_pytorchcv.ipynb")
    runs = _message(results, "course_pytorchcv.ipynb", "notebook_runs")
    [download] = [number for number, source in code.items() if source.startswith("!wget")]
    assert f"cell {download}:" in runs and "pytorchcv.py" in code[download]
    assert "pytorchcv.py" in [path.name for path in SUPPORT_FILES]
    assert not any("torch.save" in source for source in code.values())  # "No mnist_cnn.pt was saved"
    assert not any("imshow" in source and "data_train" in source for source in code.values())  # no sample figure
    # data_sizes passes on data the helper put in builtins: the notebook never assigns it itself
    assert not any(line.startswith("data_train") for source in code.values() for line in source.splitlines())
    assert results[_id("course_pytorchcv.ipynb")].packages == {"torchinfo": importlib.metadata.version("torchinfo")}


def test_the_other_dataset_sentence_is_true(graded, mnist_sample_root):
    from reference import provision

    _, results = graded
    code = _code("mistake_fashion_mnist.ipynb")
    assert any("FashionMNIST(" in source for source in code.values())
    assert [p.torchvision_class for p in provision.datasets_in(mnist_sample_root.root)] == ["MNIST"]
    # ./data holds the batch's dataset only, read-only: torchvision cannot make a folder for another.
    assert "Permission denied: './data/FashionMNIST" in _message(results, "mistake_fashion_mnist.ipynb",
                                                                  "notebook_runs")


def test_the_train_on_test_message_is_true(graded, mnist_sample_root):
    _, results = graded
    code = _code("mistake_train_on_test.ipynb")
    assert any("train_loader = torch.utils.data.DataLoader(data_test" in source for source in code.values())
    message = _message(results, "mistake_train_on_test.ipynb", "data_loaders")
    assert f"({mnist_sample_root.test_size} items" in message


def test_the_ignored_loss_message_is_true(graded):
    _, results = graded
    [train_epoch] = [s for s in _code("mistake_ignores_loss_fn.ipynb").values() if s.startswith("def train_epoch")]
    assert "loss_fn(" not in train_epoch  # "it called that loss_fn 0 times"
    [train] = [s for s in _code("mistake_ignores_loss_fn.ipynb").values() if s.startswith("def train(")]
    assert "loss_fn=loss_fn" in train  # train passes it on: the message blames train_epoch, not train
    assert "Pass loss_fn on" not in _message(results, "mistake_ignores_loss_fn.ipynb", "train_uses_arguments")
