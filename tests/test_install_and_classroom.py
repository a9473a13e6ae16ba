"""labgrader installed from its wheel into a fresh venv, used offline and as the classroom workflow.

The fresh venv takes torch and the other heavy dependencies from the test's own environment through
a .pth file (a second 5 GB torch install would add minutes and nothing to what is tested); labgrader
itself is installed non-editable from the wheel built here, so templates, rubric and specs must come
from inside the wheel.
"""
from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from grader import resources
from reference import spec

REPO = Path(__file__).resolve().parent.parent
WORKFLOW = resources.LAB_DIR / "classroom" / "labgrader.yml"
pytestmark = pytest.mark.slow


def _offline() -> list[str]:
    if shutil.which("unshare") and subprocess.run(["unshare", "-n", "true"]).returncode == 0:
        return ["unshare", "-n"]
    pytest.fail("`unshare -n` is needed to prove the commands work without a network (run as root)")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(REPO)],
                   check=True, timeout=600)
    [built] = out.glob("labgrader-*.whl")
    return built


def _fresh_venv(where: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", str(where)], check=True)
    [packages] = where.glob("lib/python*/site-packages")
    (packages / "dev-dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return where


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    home = tmp_path_factory.mktemp("home")
    venv = _fresh_venv(home / "venv")
    subprocess.run([str(venv / "bin/python"), "-m", "pip", "install", "-q", str(wheel)], check=True, timeout=600)
    env = {**os.environ, "LABGRADER_HOME": str(home / "labgrader")}
    env.pop("LABGRADER_DATA_DIR", None)
    return venv, env


def test_installed_commands_work_offline(installed, tmp_path):
    venv, env = installed
    run = lambda *args: subprocess.run(_offline() + [str(venv / "bin/labgrader"), *args], env=env, cwd=tmp_path,
                                       capture_output=True, text=True, timeout=900)
    helped = run("--help")
    assert helped.returncode == 0 and "grade" in helped.stdout
    data = run("data", "--dataset", "mnist")
    assert data.returncode == 0, data.stderr
    assert "mnist-sample (a SAMPLE of MNIST" in data.stdout
    made = run("reference", "--dataset", "mnist", "--out", str(tmp_path / "spec.json"))
    assert made.returncode == 0, made.stderr
    made_spec = json.loads((tmp_path / "spec.json").read_text())
    assert spec.differences(made_spec, json.loads(spec.path_for("mnist-sample").read_text())) == []
    # Nothing came from the checkout: the package, its templates and lab files are the wheel's.
    where = subprocess.run([str(venv / "bin/python"), "-c",
                            "import grader.resources as r; print(r.TEMPLATES_DIR); print(r.RUBRIC_PATH.is_file())"],
                           capture_output=True, text=True, cwd=tmp_path, env=env, check=True).stdout.split()
    assert str(venv) in where[0] and where[1] == "True"


def _workflow_steps() -> list[str]:
    workflow = yaml.safe_load(WORKFLOW.read_text())
    return [step["run"] for step in workflow["jobs"]["grade"]["steps"] if "run" in step]


@pytest.mark.parametrize("example, passes", [("correct.ipynb", True), ("mistake_history_keys.ipynb", False)])
def test_classroom_workflow_steps(example, passes, installed, wheel, tmp_path):
    venv, env = installed
    student_repo = tmp_path / "repo"
    student_repo.mkdir()
    shutil.copy(resources.EXAMPLES_DIR / example, student_repo / "lab.ipynb")
    _fresh_venv(student_repo / ".labgrader-venv")  # the workflow's first step reuses it
    workflow_env = yaml.safe_load(WORKFLOW.read_text())["env"]
    summary = tmp_path / "summary.md"
    env = {**env, **workflow_env, "LABGRADER": str(wheel), "PYTHON": sys.executable,
           "GITHUB_STEP_SUMMARY": str(summary)}
    *setup, check = _workflow_steps()
    for step in setup:
        done = subprocess.run(["bash", "-e", "-c", step], cwd=student_repo, env=env, capture_output=True,
                              text=True, timeout=900)
        assert done.returncode == 0, f"step failed: {step}\n{done.stdout}\n{done.stderr}"
    checked = subprocess.run(["bash", "-e", "-c", check], cwd=student_repo, env=env, capture_output=True,
                             text=True, timeout=900)
    assert (checked.returncode == 0) is passes, checked.stdout + checked.stderr
    assert (student_repo / "labgrader-report" / "lab" / "report.html").is_file()
    shown = summary.read_text()
    assert ("score 23.5/23.5" in shown) is passes
    if not passes:
        assert "FAIL" in shown and "train_history" not in shown  # titles, not internal names
    result = json.loads((student_repo / "labgrader-report" / "lab" / "result.json").read_text())
    assert result["status"] == "graded"
