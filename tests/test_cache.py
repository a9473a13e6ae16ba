"""The run cache of grader/pipeline.py: a run is reused while its key matches, and only then.

One real grading of lab/examples/correct.ipynb (on the mnist-sample profile) fills a run directory
once for the module; each test works on its own copy of it. "Executed" is detected by replacing
``grader.execute.Kernel.run`` with a function that raises: the pipeline turns that into an error
result whose reason names it, so a test sees whether the cache was bypassed without running a
notebook.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from grader import environment, execute, intake, pipeline, resources, score
from reference import spec as spec_module

CORRECT = resources.EXAMPLES_DIR / "correct.ipynb"


class Executed(Exception):
    pass


def _refuse(*args, **kwargs):
    raise Executed("the cached run was not reused: the notebook was executed again")


@dataclasses.dataclass
class Graded:
    root: Path
    notebook: Path
    config: pipeline.Config
    result: object


@pytest.fixture(scope="module")
def graded_once(tmp_path_factory, mnist_sample_root) -> Graded:
    root = tmp_path_factory.mktemp("cache")
    notebook = root / "submissions" / "alice.ipynb"
    notebook.parent.mkdir()
    shutil.copy(CORRECT, notebook)
    config = pipeline.Config(provisioned=mnist_sample_root, spec=spec_module.load(mnist_sample_root.profile),
                             rubric=score.load_rubric(resources.RUBRIC_PATH), runs_dir=root / "runs")
    [submission] = intake.collect([notebook])
    result = pipeline.grade(submission, config)
    assert result.status == "graded", result.reason
    assert result.execution_status == "completed", result.reason
    assert result.score == result.max_score, [c for c in result.checks if c.status != "passed"]
    return Graded(root, notebook, config, result)


@pytest.fixture
def cached(graded_once, tmp_path) -> Graded:
    """A private copy of the graded run (and of the notebook), for one test to change."""
    runs = tmp_path / "runs"
    shutil.copytree(graded_once.root / "runs", runs)
    notebook = tmp_path / "submissions" / graded_once.notebook.name
    notebook.parent.mkdir()
    shutil.copy(graded_once.notebook, notebook)
    return Graded(tmp_path, notebook, dataclasses.replace(graded_once.config, runs_dir=runs), graded_once.result)


@pytest.fixture
def no_execution(monkeypatch):
    monkeypatch.setattr(execute.Kernel, "run", _refuse)


def _submission(graded: Graded):
    [submission] = intake.collect([graded.notebook])
    return submission


def _run_dir(graded: Graded) -> Path:
    return graded.config.runs_dir / _submission(graded).id


def _assert_executed_again(result) -> None:
    assert result.status == "error" and "Executed" in (result.reason or ""), result.reason


def test_grading_twice_reuses_the_run(cached, no_execution):
    executed = _run_dir(cached) / "executed.ipynb"
    before = executed.stat().st_mtime_ns
    key = (_run_dir(cached) / "key.json").read_text()
    assert pipeline.load_run(_submission(cached), cached.config) is not None
    again = pipeline.grade(_submission(cached), cached.config)
    assert again.status == "graded", again.reason
    assert again.score == cached.result.score and again.checks == cached.result.checks
    assert again.cells == cached.result.cells and again.figures == cached.result.figures
    assert again.confusion_matrix == cached.result.confusion_matrix
    assert executed.stat().st_mtime_ns == before
    assert (_run_dir(cached) / "key.json").read_text() == key


def test_reuse_false_executes(cached, no_execution):
    _assert_executed_again(pipeline.grade(_submission(cached), cached.config, reuse=False))


def _changed_rubric(tmp_path: Path, extra: str = "") -> Path:
    """The shipped rubric with data_sizes worth 5 points instead of 1 (and ``extra`` lines for it)."""
    text = resources.RUBRIC_PATH.read_text()
    section = "[checks.data_sizes]\ntitle = \"Training and test sets have the expected sizes\"\npoints = 1\n"
    assert section in text
    changed = tmp_path / "rubric.toml"
    changed.write_text(text.replace(section, section.replace("points = 1", "points = 5") + extra))
    return changed


def test_rubric_points_and_visibility_regrade_without_executing(cached, no_execution, tmp_path):
    rubric = score.load_rubric(_changed_rubric(tmp_path, "visibility = \"hidden\"\n"))
    assert rubric.sha256 != cached.config.rubric.sha256
    config = dataclasses.replace(cached.config, rubric=rubric)
    assert pipeline.run_key(_submission(cached), config) == pipeline.run_key(_submission(cached), cached.config)
    executed = _run_dir(cached) / "executed.ipynb"
    before = executed.stat().st_mtime_ns
    regraded = pipeline.grade(_submission(cached), config)
    assert regraded.status == "graded", regraded.reason
    assert regraded.score == cached.result.score + 4 and regraded.max_score == cached.result.max_score + 4
    [check] = [c for c in regraded.checks if c.name == "data_sizes"]
    assert (check.points, check.max_points, check.visibility) == (5, 5, "hidden")
    assert regraded.rubric_sha256 == rubric.sha256
    assert executed.stat().st_mtime_ns == before


def test_changed_notebook_bytes_invalidate_the_run(cached, no_execution):
    nb = json.loads(cached.notebook.read_text())
    nb["cells"][2]["source"] = "".join(nb["cells"][2]["source"]) + "\n# one more comment"
    cached.notebook.write_text(json.dumps(nb))
    submission = _submission(cached)
    assert submission.id == cached.result.submission_id  # same student, new bytes
    assert pipeline.load_run(submission, cached.config) is None
    _assert_executed_again(pipeline.grade(submission, cached.config))


def test_changed_spec_version_invalidates_the_run(cached, no_execution):
    spec = dataclasses.replace(cached.config.spec, version=cached.config.spec.version + "-changed")
    config = dataclasses.replace(cached.config, spec=spec)
    assert pipeline.load_run(_submission(cached), config) is None
    _assert_executed_again(pipeline.grade(_submission(cached), config))


def test_changed_engine_invalidates_the_run(cached, no_execution, monkeypatch):
    assert pipeline.load_run(_submission(cached), cached.config) is not None
    monkeypatch.setattr(pipeline, "engine_digest", lambda: "0123456789abcdef")
    assert pipeline.load_run(_submission(cached), cached.config) is None
    _assert_executed_again(pipeline.grade(_submission(cached), cached.config))


def test_engine_digest_covers_every_module_that_can_change_a_verdict():
    import grader
    import reference

    roots = (Path(grader.__file__).parent, Path(reference.__file__).parent)
    covered = {p.relative_to(roots[0].parent).as_posix() for p in pipeline.code_files(*roots)}
    for module in ("grader/pipeline.py", "grader/results.py", "grader/execute/run.py", "grader/execute/outcome.py",
                   "grader/limits.py", "grader/probe/inkernel.py", "grader/sandbox.py", "grader/checks.py",
                   "grader/saved_model.py", "reference/idx.py", "reference/provision.py", "reference/training.py"):
        assert module in covered
    assert "grader/report.py" not in covered and "grader/figures.py" not in covered


def test_a_change_to_any_module_or_a_new_one_changes_the_digest(tmp_path):
    import grader

    copy = tmp_path / "grader"
    shutil.copytree(Path(grader.__file__).parent, copy, ignore=shutil.ignore_patterns("__pycache__"))
    digest = lambda: pipeline._digest(pipeline.code_files(copy))  # noqa: E731
    before = digest()
    (copy / "results.py").write_text((copy / "results.py").read_text() + "\n# changed\n")
    changed = digest()
    (copy / "new_stage.py").write_text("X = 1\n")
    assert len({before, changed, digest()}) == 3
    (copy / "report.py").write_text("# presentation only\n")
    assert len({before, changed, digest()}) == 3  # unchanged by the report


def test_the_key_holds_the_libraries_and_the_sandbox_it_ran_in(cached, monkeypatch):
    import importlib.metadata

    key = pipeline.run_key(_submission(cached), cached.config)
    assert key["isolation"]["mode"] in ("bubblewrap", "subprocess")
    assert pipeline.load_run(_submission(cached), cached.config) is not None
    # The run was kept from this sandbox; a machine where another one is available runs it again.
    other = {**key["isolation"], "resource_box": not key["isolation"]["resource_box"]}
    monkeypatch.setattr(pipeline, "isolation_available", lambda isolation: other)
    assert pipeline.load_run(_submission(cached), cached.config) is None
    monkeypatch.undo()
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda name: "0.0-other" if name == "nbclient" else real(name))
    pipeline.engine_digest.cache_clear()
    try:
        assert pipeline.run_key(_submission(cached), cached.config)["engine"] != key["engine"]
    finally:
        monkeypatch.undo()
        pipeline.engine_digest.cache_clear()


@pytest.mark.parametrize("change", [
    {"fast_data": False}, {"seed": 1},
], ids=lambda change: next(iter(change)))
def test_changed_execution_settings_invalidate_the_run(cached, no_execution, change):
    config = dataclasses.replace(cached.config, **change)
    assert pipeline.load_run(_submission(cached), config) is None
    _assert_executed_again(pipeline.grade(_submission(cached), config))


def test_changed_limits_or_model_file_invalidate_the_run(cached, no_execution):
    rubric = cached.config.rubric
    for change in ({"limits": dataclasses.replace(rubric.limits, cell_timeout=60)}, {"model_file": "other.pt"}):
        rubric = dataclasses.replace(cached.config.rubric, **change)
        assert pipeline.load_run(_submission(cached), dataclasses.replace(cached.config, rubric=rubric)) is None


def test_other_thread_counts_reuse_the_run(cached, no_execution):
    # A regrade with another --jobs (so other threads per kernel) must not run the class again.
    config = dataclasses.replace(cached.config, threads=2)
    assert pipeline.load_run(_submission(cached), config) is not None


def test_interrupted_run_without_key_is_not_reused(cached, no_execution):
    (_run_dir(cached) / "key.json").unlink()
    assert pipeline.load_run(_submission(cached), cached.config) is None
    _assert_executed_again(pipeline.grade(_submission(cached), cached.config))


@pytest.mark.parametrize("damage", ["run.json", "plan.npz"])
def test_damaged_run_is_not_reused(cached, no_execution, damage):
    (_run_dir(cached) / damage).write_bytes(b"{not json")
    assert pipeline.load_run(_submission(cached), cached.config) is None
    _assert_executed_again(pipeline.grade(_submission(cached), cached.config))


def test_a_rerun_replaces_the_run_and_its_key(cached, monkeypatch):
    """A failed re-execution leaves no stale key behind: the old run cannot come back."""
    monkeypatch.setattr(execute.Kernel, "run", _refuse)
    config = dataclasses.replace(cached.config, seed=7)
    _assert_executed_again(pipeline.grade(_submission(cached), config))
    assert not (_run_dir(cached) / "key.json").exists()
    assert pipeline.load_run(_submission(cached), cached.config) is None


def test_a_rubric_change_regrades_from_kept_findings_without_torch(cached, tmp_path):
    """The whole `labgrader grade` command, in a fresh interpreter: kept check verdicts and figures
    are scored under the new rubric without executing, loading the dataset or importing torch."""
    out = tmp_path / "out"
    submission = _submission(cached)
    shutil.copytree(_run_dir(cached), out / ".runs" / submission.id)
    changed = _changed_rubric(tmp_path)
    program = (
        "import json, sys\n"
        "from grader import cli\n"
        f"code = cli.main(['grade', {str(cached.notebook)!r}, '--out', {str(out)!r}, '--rubric', {str(changed)!r},"
        f" '--dataset', 'mnist', '--root', {str(cached.config.provisioned.root)!r}, '--jobs', '1', '--quiet'])\n"
        "print(json.dumps({'code': code, 'loaded': sorted(m for m in ('torch', 'torchvision', 'matplotlib')"
        " if m in sys.modules)}))\n")
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    assert outcome == {"code": 0, "loaded": []}, done.stderr
    result = json.loads((out / submission.id / "result.json").read_text())
    assert result["status"] == "graded" and result["score"] == cached.result.score + 4
    assert [(c["name"], c["status"], c["message"]) for c in result["checks"]] == [
        (c.name, c.status, c.message) for c in cached.result.checks]
    assert result["figures"] == cached.result.figures
    assert result["confusion_matrix"] == cached.result.confusion_matrix


def test_damaged_findings_are_computed_again(cached, no_execution):
    findings = _run_dir(cached) / "findings.json"
    findings.write_text("{not json")
    again = pipeline.grade(_submission(cached), cached.config)
    assert again.status == "graded", again.reason
    assert again.checks == cached.result.checks and again.figures == cached.result.figures
    assert json.loads(findings.read_text())["figures"] == cached.result.figures


def test_findings_drawn_by_older_figure_code_are_drawn_again_without_running(cached, no_execution):
    """figures.py is not part of the run key: a change to the drawing redraws the kept run's
    figures and keeps its execution."""
    findings = _run_dir(cached) / "findings.json"
    kept = json.loads(findings.read_text())
    assert kept["drawn_by"] == pipeline.figures_digest()
    findings.write_text(json.dumps({**kept, "drawn_by": "older", "figures": {"weights": "AAAA"},
                                    "confusion": None}))
    again = pipeline.grade(_submission(cached), cached.config)
    assert again.status == "graded", again.reason
    assert again.figures == cached.result.figures and again.checks == cached.result.checks
    # the saved model's predictions on every test image, counted again
    _, (_, test_labels) = pipeline.dataset(cached.config)
    assert again.confusion_matrix == cached.result.confusion_matrix
    assert sum(map(sum, again.confusion_matrix)) == len(test_labels)
    assert json.loads(findings.read_text())["drawn_by"] == pipeline.figures_digest()


# Every input of the run key, changed one at a time: the kept run is no longer reused.
KEY_CHANGES = {
    "notebook_sha256": lambda submission, config: (dataclasses.replace(submission, sha256="0" * 64), config),
    "spec_version": lambda submission, config: (submission, dataclasses.replace(
        config, spec=dataclasses.replace(config.spec, version=config.spec.version + "-other"))),
    "profile": lambda submission, config: (submission, dataclasses.replace(
        config, provisioned=dataclasses.replace(config.provisioned, profile="fashion-mnist"))),
    "fast_data": lambda submission, config: (submission, dataclasses.replace(config, fast_data=not config.fast_data)),
    "seed": lambda submission, config: (submission, dataclasses.replace(config, seed=config.seed + 1)),
    "model_file": lambda submission, config: (submission, dataclasses.replace(
        config, rubric=dataclasses.replace(config.rubric, model_file="other.pt"))),
    "limits": lambda submission, config: (submission, dataclasses.replace(config, rubric=dataclasses.replace(
        config.rubric, limits=dataclasses.replace(config.rubric.limits, memory_bytes=1 << 30)))),
    "isolation": lambda submission, config: (submission, dataclasses.replace(config, isolation="subprocess")),
    "support_files": lambda submission, config: (submission, _with_environment(
        config, support_files=(environment.SupportFile("helper.py", b"VALUE = 1\n"),))),
    "packages": lambda submission, config: (submission, _with_environment(
        config, packages=(*config.rubric.environment.packages, "jinja2"))),
}


def _with_environment(config, **changes):
    environment = dataclasses.replace(config.rubric.environment, **changes)
    return dataclasses.replace(config, rubric=dataclasses.replace(config.rubric, environment=environment))


def test_the_key_names_every_input_changed_below(cached):
    assert set(pipeline.run_key(_submission(cached), cached.config)) == set(KEY_CHANGES) | {"engine"}


@pytest.mark.parametrize("field", sorted(KEY_CHANGES))
def test_changing_any_input_of_the_key_runs_the_notebook_again(field, cached):
    submission, config = KEY_CHANGES[field](_submission(cached), cached.config)
    assert pipeline.run_key(submission, config)[field] != pipeline.run_key(_submission(cached), cached.config)[field]
    assert pipeline.load_run(submission, config) is None
    assert pipeline.load_run(_submission(cached), cached.config) is not None
