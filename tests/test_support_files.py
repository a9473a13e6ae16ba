"""What grading provides besides the lab: support files (copied read-only into every work dir, in
the run key), declared packages (installed by the set-up, recorded in each result, reported by
doctor), and the messages that tell a student what grading lacks from what they got wrong."""
from __future__ import annotations

import dataclasses
import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import nbformat
import pytest

from grader import checks, environment, pipeline, resources, score
from grader.results import CellRun, Execution, GradeResult, Submission

RUBRIC = """
[environment]
packages = ["torchinfo", "not-a-real-package-xyz"]
support_files = ["helper.py"]

[checks.notebook_runs]
points = 2
"""


def _rubric(tmp_path: Path, text: str = RUBRIC) -> score.Rubric:
    (tmp_path / "helper.py").write_text("VALUE = 41\n")
    (tmp_path / "rubric.toml").write_text(text)
    return score.load_rubric(tmp_path / "rubric.toml")


def test_support_files_are_read_relative_to_the_rubric_and_a_missing_one_is_named(tmp_path):
    rubric = _rubric(tmp_path)
    assert [(f.name, f.content) for f in rubric.environment.support_files] == [("helper.py", b"VALUE = 41\n")]
    assert rubric.environment.packages == ("torchinfo", "not-a-real-package-xyz")
    (tmp_path / "helper.py").unlink()
    with pytest.raises(score.RubricError, match=r"support file .*helper.py: not found"):
        score.load_rubric(tmp_path / "rubric.toml")
    with pytest.raises(score.RubricError, match="not a package name"):
        _rubric(tmp_path, RUBRIC.replace('"torchinfo"', '"torchinfo>=1.8"'))
    with pytest.raises(environment.SupportFileError, match="already has the name 'helper.py'"):
        rubric.environment.adding([tmp_path / "helper.py"])


def test_a_missing_support_file_on_the_command_line_is_one_line_and_exit_2(tmp_path):
    done = subprocess.run([sys.executable, "-m", "grader.cli", "check", str(resources.EXAMPLES_DIR / "correct.ipynb"),
                           "--support-file", str(tmp_path / "pytorchcv.py")], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0, done.stderr
    assert "pytorchcv.py: not found" in done.stderr


def test_support_files_go_in_read_only_and_their_content_is_in_the_run_key(tmp_path, grading_config):
    rubric = _rubric(tmp_path)
    config = grading_config(rubric=dataclasses.replace(grading_config().rubric, environment=rubric.environment))
    workdir = tmp_path / "work"
    workdir.mkdir()
    pipeline.put_support_files(config, workdir)
    assert (workdir / "helper.py").read_text() == "VALUE = 41\n"
    assert stat.S_IMODE(os.stat(workdir / "helper.py").st_mode) == 0o444
    submission = Submission(id="a", source="a.ipynb", notebook=b"{}", sha256="0" * 64)
    key = pipeline.run_key(submission, config)
    assert key["support_files"] == {"helper.py": rubric.environment.support_files[0].sha256}
    (tmp_path / "helper.py").write_text("VALUE = 42\n")
    changed = grading_config(rubric=dataclasses.replace(
        grading_config().rubric, environment=environment.Environment().adding([tmp_path / "helper.py"])))
    assert pipeline.run_key(submission, changed) != key  # a changed helper regrades
    assert key["packages"]["not-a-real-package-xyz"] is None and key["packages"]["torchinfo"]


def test_results_record_the_declared_packages_and_old_results_still_load():
    result = GradeResult(submission_id="a", source="a.ipynb", status="graded", score=1, max_score=2,
                         packages={"torchinfo": "1.8.0", "missing": None})
    assert GradeResult.from_json(json.loads(json.dumps(result.to_json()))) == result
    old = result.to_json()
    del old["packages"]
    assert GradeResult.from_json(old).packages == {}


def test_packages_and_doctor_report_the_declared_packages(tmp_path):
    _rubric(tmp_path)
    run = [sys.executable, "-m", "grader.cli"]
    listed = subprocess.run([*run, "packages", "--rubric", str(tmp_path / "rubric.toml")], capture_output=True,
                            text=True, timeout=120)
    assert listed.stdout.split() == ["torchinfo", "not-a-real-package-xyz"]
    doctor = subprocess.run([*run, "doctor", "--rubric", str(tmp_path / "rubric.toml")], capture_output=True,
                            text=True, timeout=300).stdout
    assert "ok  package torchinfo" in doctor and "import torchinfo" in doctor
    assert "NO  package not-a-real-package-xyz" in doctor and "not installed" in doctor


# --- what notebook_runs tells the student -----------------------------------------------------------

def _runs(sources: list[str], cells: list[CellRun], provided: checks.Provided,
          network: tuple[str, ...] = ()) -> checks.Verdict:
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source) for source in sources])
    execution = Execution(status="completed", cells=tuple(cells), isolation="none", seconds=0.0,
                          network_blocked=network)
    evidence = checks.Evidence(spec=SimpleNamespace(), execution=execution, saved_model=None, expected=None,
                               probe=None, notebook=notebook, provided=provided)
    return checks.CHECKS["notebook_runs"](evidence)


def test_a_blocked_download_of_a_provided_file_is_not_the_students_error():
    sources = ['import urllib.request\nurllib.request.urlretrieve("https://x.org/pytorchcv.py", "pytorchcv.py")',
               "import pytorchcv"]
    cells = [CellRun(0, "error", error="URLError: <urlopen error [Errno -3] Temporary failure>"), CellRun(1, "ok")]
    network = ("cell 1: import urllib.request",)
    verdict = _runs(sources, cells, checks.Provided(support_files=("pytorchcv.py",)), network)
    assert verdict.fraction == 1.0
    assert "pytorchcv.py is provided by the instructor; the download is not needed (cell 1" in verdict.message
    assert "without network access, so downloads" not in verdict.message
    unprovided = _runs(sources, cells, checks.Provided(), network)  # not provided: the student's error
    assert unprovided.fraction == 0.5 and "Grading runs without network access" in unprovided.message


def test_a_missing_module_names_its_package_and_who_can_add_it():
    sources = ["from torchinfo import summary", "summary(net)"]
    cells = [CellRun(0, "error", error="ModuleNotFoundError: No module named 'torchinfo'"),
             CellRun(1, "error", error="NameError: name 'summary' is not defined")]
    undeclared = _runs(sources, cells, checks.Provided()).message
    assert "Cell 1 imports torchinfo, which the grading environment does not provide" in undeclared
    assert "rubric's [environment] packages" in undeclared
    declared = _runs(sources, cells, checks.Provided(packages=(("torchinfo", None),),
                                                     modules=(("torchinfo", "torchinfo"),))).message
    assert "the grading machine lacks it" in declared and "pip install torchinfo" in declared


def test_another_dataset_than_provided_is_said_in_one_sentence():
    sources = ['data_train = torchvision.datasets.FashionMNIST("./data", download=True, train=True)', "len(data_train)"]
    cells = [CellRun(0, "error", error="OSError: [Errno 30] Read-only file system: './data/FashionMNIST'"),
             CellRun(1, "error", error="NameError: name 'data_train' is not defined")]
    message = _runs(sources, cells, checks.Provided(datasets=("MNIST",))).message
    assert message.count("This notebook loads FashionMNIST, but this batch provides MNIST under ./data;") == 1
    both = _runs(sources, cells, checks.Provided(datasets=("MNIST", "FashionMNIST"))).message
    assert "This notebook loads" not in both  # provided: its failure is something else


@pytest.mark.slow
def test_the_notebook_imports_a_support_file_and_cannot_overwrite_it(tmp_path, grading_config):
    from grader import intake

    rubric = _rubric(tmp_path)
    config = grading_config(rubric=dataclasses.replace(grading_config().rubric, environment=rubric.environment))
    notebook = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("import helper\nprint('value', helper.VALUE)"),
        nbformat.v4.new_code_cell("try:\n    open('helper.py', 'a').write('VALUE = 0')\nexcept OSError as e:\n"
                                  "    print('refused', type(e).__name__)")])
    path = tmp_path / "uses_helper.ipynb"
    nbformat.write(notebook, path)
    [submission] = intake.collect([path])
    the_run = pipeline.run(submission, config)
    executed = nbformat.read(the_run.directory / "executed.ipynb", as_version=4)
    printed = "".join(o.get("text", "") for cell in executed.cells for o in cell.outputs)
    assert "value 41" in printed and "refused PermissionError" in printed
