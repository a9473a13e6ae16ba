"""labgrader installed from its wheel into a fresh venv, used offline and as the classroom workflow.

The fresh venv takes torch and the other heavy dependencies from the test's own environment through
a .pth file (a second 5 GB torch install would add minutes and nothing to what is tested); labgrader
itself is installed non-editable from the wheel built here, so templates, rubric and specs must come
from inside the wheel.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import site
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import pytest
import yaml

from grader import classroom, resources
from reference import spec
from test_classroom_reporter import REPORTER_SCHEMA, _classroom_points

REPO = Path(__file__).resolve().parent.parent
WORKFLOW = resources.LAB_DIR / "classroom" / "labgrader.yml"
JOB = "run-autograding-tests"  # GitHub Classroom's template names its grading job so
REPORTER = "classroom-resources/autograding-grading-reporter@"
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


def _workflow() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())


def _steps() -> list[dict]:
    return _workflow()["jobs"][JOB]["steps"]


def _cached_paths(home: Path) -> list[Path]:
    """What the workflow's cache steps restore and save, on a runner whose home is ``home``."""
    steps = _steps()
    restore, save = ([s["with"]["path"] for s in steps if s.get("uses", "").startswith(f"actions/cache/{a}@")]
                     for a in ("restore", "save"))
    assert len(restore) == len(save) == 1 and restore == save
    return [home / line.removeprefix("~/") for line in restore[0].split()]


@dataclass
class WorkflowRun:
    outputs: dict[str, subprocess.CompletedProcess[str]]  # by step name, for the steps that ran
    summary: str
    cache_key: str
    reported: dict | None  # what Classroom's reporter decoded, None when it did not run


def _run_workflow(repo: Path, env: dict[str, str]) -> WorkflowRun:
    """The workflow's `run` steps in order, as a runner runs them: bash -eo pipefail, a step after
    a failed one only when it says `if: always()`, each step with a GITHUB_OUTPUT file of its own
    whose lines become ``steps.<id>.outputs``. The `uses` steps are GitHub's own actions: the
    checkout is ``repo``, setup-python is this Python, and the cache is the runner's home kept
    between runs with only the cached paths in it (see the test); Classroom's reporter is
    :func:`_reporter`."""
    summary, github_env = repo / "summary.md", repo / "github-env.txt"
    env = {**env, "GITHUB_STEP_SUMMARY": str(summary), "GITHUB_ENV": str(github_env)}
    outputs: dict[str, subprocess.CompletedProcess[str]] = {}
    step_outputs: dict[str, dict[str, str]] = {}
    failed = False
    for number, step in enumerate(_steps()):
        if "run" not in step or (failed and step.get("if") != "always()"):
            continue
        output = repo / f"github-output-{number}.txt"
        # pip may ask the index about a dependency even when it is satisfied; the rest runs offline.
        offline = [] if step["name"] == "Install labgrader" else _offline()
        done = subprocess.run(offline + ["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", step["run"]],
                              cwd=repo, env={**env, "GITHUB_OUTPUT": str(output)}, capture_output=True, text=True,
                              timeout=900)
        outputs[step["name"]] = done
        failed = failed or done.returncode != 0
        if "id" in step and output.exists():
            step_outputs[step["id"]] = dict(line.split("=", 1) for line in output.read_text().splitlines())
        if github_env.exists():  # what a step appends there, the later steps see
            env.update(line.split("=", 1) for line in github_env.read_text().splitlines())
    keyed = outputs.get("Key the cache by what it holds")
    assert keyed is not None and keyed.returncode == 0, {name: done.stdout + done.stderr for name, done in outputs.items()}
    return WorkflowRun(outputs, summary.read_text() if summary.exists() else "", step_outputs["cache-key"]["key"],
                       _reporter(step_outputs))


def _reporter(step_outputs: dict[str, dict[str, str]]) -> dict | None:
    """What ``autograding-grading-reporter`` reads, as its src/main.js reads it: for each step id in
    its ``runners`` input, base64 JSON in the variable named after the id, upper-cased, plus
    ``_RESULTS``. The workflow must pass it the output ``result`` of the step that runs
    ``python -m grader.classroom`` (the name that module writes), and run it only when that step
    wrote one."""
    [reporter] = [step for step in _steps() if step.get("uses", "").startswith(REPORTER)]
    [grading] = [step for step in _steps() if "python -m grader.classroom" in step.get("run", "")]
    runner = grading["id"]
    assert reporter["with"] == {"runners": runner}
    expression = f"${{{{ steps.{runner}.outputs.result }}}}"
    assert reporter["env"] == {f"{runner.upper()}_RESULTS": expression}
    assert reporter["if"] == f"always() && steps.{runner}.outputs.result != ''"
    written = step_outputs.get(runner, {}).get("result", "")
    if not written:
        return None
    return json.loads(base64.b64decode(written, validate=True).decode("utf-8"))


def test_reporter_reads_what_grader_classroom_writes(tmp_path, monkeypatch):
    """The step id, output name and variable the workflow hands the reporter are those that
    ``python -m grader.classroom`` writes, decoded as the reporter decodes them."""
    import factories

    result = factories.with_failed_cell("lab")
    path = tmp_path / "result.json"
    path.write_text(json.dumps(result.for_students().to_json()))
    monkeypatch.setenv("GITHUB_OUTPUT", str(tmp_path / "github-output.txt"))
    assert classroom.main([str(path)]) == 0
    written = dict(line.split("=", 1) for line in (tmp_path / "github-output.txt").read_text().splitlines())
    [grading] = [step for step in _steps() if "python -m grader.classroom" in step.get("run", "")]
    document = _reporter({grading["id"]: written})
    jsonschema.validate(document, REPORTER_SCHEMA)
    assert _classroom_points([document]) == (pytest.approx(result.score), result.max_score)


def _student_repo(where: Path, notebook: str) -> Path:
    """A fresh checkout of a student's repository, holding their notebook as lab.ipynb."""
    where.mkdir()
    shutil.copy(resources.EXAMPLES_DIR / notebook, where / "lab.ipynb")
    _fresh_venv(where / ".labgrader-venv")  # the install step reuses it: torch comes through its .pth
    return where


def test_classroom_workflow_on_full_mnist(installed, wheel, tmp_path):
    """Two pushes to a student's repository, on a runner whose cache is restored between them, and
    one to another course's repository that pins a spec.

    The data comes through LABGRADER_DATA_DIR (IDX files in MNIST's layout, 60000/10000, written
    here) instead of torchvision's download, and TORCH_INDEX_URL is emptied because the CPU wheel
    index can't be reached offline; every step after the install runs without a network
    (`unshare -n`). Neither the download nor the CPU wheels are exercised here."""
    from test_full_mnist import write_mnist_like

    venv, env = installed
    home = tmp_path / "runner-home"
    home.mkdir()
    env = {key: value for key, value in env.items() if key not in ("LABGRADER_HOME", "XDG_CACHE_HOME")}
    env.update(_workflow()["env"])
    env.update(HOME=str(home), LABGRADER=str(wheel), PYTHON=sys.executable, TORCH_INDEX_URL="",
               LABGRADER_DATA_DIR=str(write_mnist_like(tmp_path / "mnist-files", seed=0)))
    cached = _cached_paths(home)

    def push(name: str, notebook: str, pinned: Path | None = None) -> tuple[Path, WorkflowRun]:
        repo = _student_repo(tmp_path / name, notebook)
        more = {}
        if pinned is not None:  # another course: a spec in its template repository, nothing cached yet
            shutil.copy(pinned, repo / "labgrader-spec.json")
            more["LABGRADER_SPEC"] = "labgrader-spec.json"
            shutil.rmtree(home / ".cache" / "labgrader")
        done = _run_workflow(repo, {**env, **more})
        # The next run starts on a fresh runner with only what the cache saved.
        for path in (home / ".cache" / "labgrader").iterdir():
            if path not in cached:
                shutil.rmtree(path)
        return repo, done

    # First push: MNIST provisioned, the spec derived, a correct notebook passes with full points.
    repo, first = push("first", "correct.ipynb")
    check = first.outputs["Check the notebook"]
    assert check.returncode == 0, check.stdout + check.stderr
    assert "deriving it by running the reference" in check.stdout
    assert all(path.is_dir() and any(path.iterdir()) for path in cached)  # the data and the spec are cached
    [spec_file] = (home / ".cache/labgrader/specs").glob("mnist-*.json")
    result = json.loads((repo / "labgrader-report" / "lab" / "result.json").read_text())
    assert (result["status"], result["data_profile"], result["spec_source"]) == (
        "graded", "mnist", f"derived ({spec_file})")
    full_marks = f"{result['max_score']:g}/{result['max_score']:g}"
    assert result["score"] == result["max_score"]
    assert f"### labgrader: {full_marks} points" in first.summary and "PASS" in first.summary
    assert (repo / "labgrader-report" / "lab" / "report.html").is_file()
    # Classroom gets labgrader's points, one test per check.
    jsonschema.validate(first.reported, REPORTER_SCHEMA)
    assert first.reported["status"] == "pass" and len(first.reported["tests"]) == len(result["checks"])
    assert _classroom_points([first.reported]) == (pytest.approx(result["score"]), result["max_score"])

    # Second push, cache restored: nothing derived again; a failing check fails the run.
    repo, second = push("second", "mistake_history_keys.ipynb")
    check = second.outputs["Check the notebook"]
    assert check.returncode == 1, check.stdout + check.stderr
    assert "deriv" not in check.stdout
    assert "### labgrader: " in second.summary and full_marks not in second.summary
    assert "FAIL" in second.summary and "train_history" not in second.summary  # titles, not internal names
    assert second.cache_key == first.cache_key  # nothing new to save
    assert set(second.outputs) == {"Install labgrader", "Provision MNIST", "Check the notebook",
                                   "Points for GitHub Classroom", "Key the cache by what it holds"}
    # The reporter fails the run too, and gives Classroom the points the result holds.
    kept = json.loads((repo / "labgrader-report" / "lab" / "result.json").read_text())
    assert second.reported["status"] == "fail"
    assert _classroom_points([second.reported]) == (pytest.approx(kept["score"]), kept["max_score"])
    assert kept["score"] < kept["max_score"]
    [history] = [t for t in second.reported["tests"] if t["name"].startswith("train returns the history")]
    assert history["status"] == "fail" and "train_loss" in history["message"]

    # Another course pinned a spec in its repository, made from other data: refused, and said so.
    repo, third = push("third", "correct.ipynb", pinned=spec.path_for("mnist-sample"))
    check = third.outputs["Check the notebook"]
    assert check.returncode == 2
    assert not (home / ".cache" / "labgrader" / "specs").exists()  # nothing derived: the cache key still works
    assert "labgrader: labgrader-spec.json was not made from the mnist data" in check.stdout
    assert "### labgrader: no score points" in third.summary and "made on the mnist-sample profile" in third.summary
    # No result to report: the points step says nothing, and the reporter does not run.
    assert third.outputs["Points for GitHub Classroom"].returncode == 0 and third.reported is None
