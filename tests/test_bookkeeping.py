"""Bookkeeping a class relies on: one number per cell everywhere, a figure that fails costs only
that figure, and nothing ``labgrader check`` writes holds a hidden check's message."""
from __future__ import annotations

import dataclasses
import tempfile
import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import factories as f
from grader import checks, cli, export, pipeline, resources, saved_model
from grader.report import render_report
from grader.results import CellRun, Execution

REPO = Path(__file__).resolve().parent.parent


def test_a_failed_cell_has_one_number_in_the_check_the_report_and_the_exports():
    # Cell 7 as Jupyter shows it: index 6, counting the markdown cells before it.
    failed = CellRun(index=6, status="error", error="ZeroDivisionError: division by zero",
                     source_head="1 / 0")
    cells = (CellRun(index=1, status="ok"), failed)
    execution = Execution(status="completed", cells=cells, isolation="bubblewrap", seconds=1.0)
    evidence = checks.Evidence(spec=None, execution=execution, saved_model=None, expected=None, probe=None,
                               notebook=None)
    message = checks.check_notebook_runs(evidence).message
    result = dataclasses.replace(f.graded("eve"), cells=cells)
    shown_in = {"check": message, "report": render_report(result),
                "gradescope": export.gradescope_json(result)["output"]}
    numbers = {where: set(re.findall(r"[Cc]ells? (\d+)", text)) for where, text in shown_in.items()}
    assert numbers == {"check": {"7"}, "report": {"7"}, "gradescope": {"7"}}, numbers


def test_a_narrow_hidden_layer_costs_no_figure_but_its_own_and_is_not_called_classes(tmp_path, mnist_sample_root):
    from reference import data

    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 8), nn.ReLU(), nn.Linear(8, 10), nn.LogSoftmax(dim=1))
    torch.save(net.state_dict(), tmp_path / "model.pt")
    test = data.read_split(str(mnist_sample_root.root), mnist_sample_root.torchvision_class, False)
    inspected = saved_model.inspect(tmp_path / "model.pt", *test, name="mnist_cnn.pt")
    assert inspected.status == "ok" and len(inspected.first_layer) == 8
    config = f_config(mnist_sample_root, tmp_path)
    the_run = pipeline.Run(tmp_path, Execution(status="completed", cells=(), isolation="bubblewrap", seconds=0.0),
                           plan=None, answers=None)
    drawn = pipeline._draw_figures(the_run, inspected, test, config)
    assert set(drawn) == {"learning_curves", "hidden_units", "misclassified"}
    html = render_report(dataclasses.replace(f.graded("narrow"), figures=drawn))
    assert "first hidden layer" in html and "one per class" not in html


def f_config(provisioned, tmp_path: Path) -> pipeline.Config:
    from grader import score
    from reference import spec

    return pipeline.Config(provisioned=provisioned, spec=spec.load(provisioned.profile),
                           rubric=score.load_rubric(resources.RUBRIC_PATH), runs_dir=tmp_path / "runs")


def test_a_figure_that_cannot_be_drawn_is_left_out_alone(tmp_path, mnist_sample_root, monkeypatch):
    from grader import figures
    from reference import data

    def broken(*args, **kwargs):
        raise ValueError("cannot draw")

    monkeypatch.setattr(figures, "learning_curves", broken)
    torch.manual_seed(0)
    torch.save(nn.Sequential(nn.Flatten(), nn.Linear(784, 10)).state_dict(), tmp_path / "model.pt")
    test = data.read_split(str(mnist_sample_root.root), mnist_sample_root.torchvision_class, False)
    inspected = saved_model.inspect(tmp_path / "model.pt", *test, name="mnist_cnn.pt")
    the_run = pipeline.Run(tmp_path, Execution(status="completed", cells=(), isolation="bubblewrap", seconds=0.0),
                           plan=None, answers=None)
    drawn = pipeline._draw_figures(the_run, inspected, test, f_config(mnist_sample_root, tmp_path))
    assert set(drawn) == {"weights", "misclassified"}


@pytest.mark.slow
def test_check_writes_no_hidden_message_where_a_student_can_read(tmp_path, mnist_sample_root, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out = tmp_path / "labgrader-report"
    notebook = tmp_path / "lab.ipynb"
    notebook.write_bytes((resources.EXAMPLES_DIR / "mistake_validate_train_mode.ipynb").read_bytes())
    code = cli.main(["check", str(notebook), "--out", str(out), "--root", str(mnist_sample_root.root)])
    assert code == 1  # a hidden check fails, and a visible one with it
    # What the grader knows: every verdict, kept in the user's cache, not in the report folder.
    [kept] = (tmp_path / "cache" / "labgrader" / "check-runs").glob("*/lab/findings.json")
    verdicts = {v["name"]: v["message"] for v in json.loads(kept.read_text())["verdicts"]}
    rubric = resources.RUBRIC_PATH.read_text()
    hidden = [name for name in verdicts if re.search(rf'\[checks\.{name}\][^\[]*visibility = "hidden"', rubric)]
    assert hidden, "the rubric has hidden checks"
    written = {p: p.read_text(errors="replace") for p in out.rglob("*") if p.is_file()}
    assert written and not any(".runs" in str(p) for p in written)
    for name in hidden:
        for path, text in written.items():
            assert verdicts[name] not in text, f"{name}'s message is in {path}"
    result = json.loads((out / "lab" / "result.json").read_text())
    assert {c["name"] for c in result["checks"] if c["visibility"] == "hidden"} == set(hidden)


def test_a_kernel_that_cannot_start_is_the_graders_error_and_graded_again_next_time(grading_config, monkeypatch):
    from grader import intake, sandbox

    [submission] = intake.collect([resources.EXAMPLES_DIR / "empty.ipynb"])
    config = grading_config()
    real = sandbox.kernel_command
    monkeypatch.setattr(sandbox, "kernel_command", lambda config: ["/bin/false"])
    failed = pipeline.grade(submission, config)
    assert failed.status == "error" and not failed.checks
    assert "the kernel did not start" in failed.reason and "fault of the grading machine" in failed.reason
    assert not (config.runs_dir / submission.id / "key.json").exists()  # nothing kept to be reused
    monkeypatch.setattr(sandbox, "kernel_command", real)
    again = pipeline.grade(submission, config)
    assert again.status == "graded" and again.score > 0


def test_a_long_temporary_directory_does_not_stop_the_kernel_or_the_probe(grading_config, monkeypatch, tmp_path):
    from grader import intake

    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    monkeypatch.setattr(tempfile, "tempdir", str(deep))
    [submission] = intake.collect([resources.EXAMPLES_DIR / "empty.ipynb"])
    result = pipeline.grade(submission, grading_config())
    assert result.status == "graded" and result.execution_status == "completed", result.reason
    assert not result.integrity  # the probe's answer came back
