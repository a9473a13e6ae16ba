"""Workers that fit the machine: what a grading process sets up before its first notebook, the
thread count each kernel gets, and the kernels they start ahead."""
from __future__ import annotations

import json
import multiprocessing
import time
from pathlib import Path

import nbformat
import torch
from nbformat import v4

from grader import batch, cli, intake, pipeline


def test_prepare_loads_the_dataset_once_in_the_background(grading_config):
    config = grading_config()
    pipeline._dataset.cache_clear()
    with pipeline.prepare(config, notebooks=1):
        train, test = pipeline.dataset(config)  # waits for what prepare is loading
    assert (len(train[0]), len(test[0])) == (config.provisioned.train_size, config.provisioned.test_size)
    info = pipeline._dataset.cache_info()
    assert (info.misses, info.hits) == (1, 1)  # loaded by prepare, not again by its caller


def test_the_graders_own_torch_work_gets_the_kernels_thread_count(grading_config, tmp_path):
    nbformat.write(v4.new_notebook(cells=[v4.new_code_cell("x = 1")]), tmp_path / "tiny.ipynb")
    [submission] = intake.collect([tmp_path / "tiny.ipynb"])
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        result = pipeline.grade(submission, grading_config(threads=1))
        assert result.status == "graded" and result.execution_status == "completed"
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_threads_per_kernel_times_jobs_never_exceeds_the_cores(monkeypatch):
    monkeypatch.setattr(cli.os, "cpu_count", lambda: 4)
    assert cli._threads(1, jobs=4) == 1
    assert cli._threads(8, jobs=1) == 4
    assert cli._threads(8, jobs=2) == 2
    assert cli._threads(3, jobs=3) == 1
    assert cli._threads(2, jobs=8) == 1  # never zero, even when the jobs alone fill the cores


def test_workers_run_each_notebook_in_a_kernel_started_ahead_and_leave_none_behind(
        grading_config, tmp_path, monkeypatch):
    scratch = tmp_path / "scratch"  # the workers' temporary files: kernels' workdirs and job files
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))  # read by the spawned workers
    submissions = tmp_path / "submissions"
    submissions.mkdir()
    for index in range(3):
        cell = f"import os\nprint(sorted(os.listdir('.')))\nopen('left-by-{index}', 'w').close()"
        nbformat.write(v4.new_notebook(cells=[v4.new_code_cell(cell)]), submissions / f"s{index}.ipynb")
    config = grading_config(runs_dir=tmp_path / "out" / ".runs")
    results = batch.grade_all(intake.collect([submissions]), config, tmp_path / "out", jobs=2, progress=False)
    assert [(r.status, r.execution_status) for r in results] == [("graded", "completed")] * 3
    for result in results:  # each in a workdir of its own: no file another notebook left, and the
        executed = nbformat.read(tmp_path / "out" / ".runs" / result.submission_id / "executed.ipynb", 4)
        seen = executed.cells[0].outputs[0]["text"]
        assert "left-by" not in seen and ".labgrader" not in seen  # probe's inputs come after the cells
        kept = json.loads((tmp_path / "out" / ".runs" / result.submission_id / "run.json").read_text())
        assert kept["answers"] is not None and kept["execution"]["probe_error"] is None  # the probe ran
    # No worker and no kernel was left: any kernel still waiting when its worker exited was stopped,
    # its files removed.
    assert list(scratch.iterdir()) == []
    assert not [p for p in Path("/proc").glob("[0-9]*") if _mentions(p, str(scratch))]


def _load_slowly_and_mark(config, marker: Path) -> None:
    def slow_load(_config):
        time.sleep(1)
        marker.write_text("loaded")

    pipeline._dataset_of = slow_load
    pipeline._start_loading(config)  # and return at once: the process exits while it loads


def test_a_process_that_exits_while_prepare_loads_waits_for_the_loading(grading_config, tmp_path):
    # A worker can exit before its background loading ends (another worker took its notebook).
    worker = multiprocessing.get_context("spawn").Process(
        target=_load_slowly_and_mark, args=(grading_config(), tmp_path / "marker"))
    worker.start()
    worker.join(60)
    assert worker.exitcode == 0
    assert (tmp_path / "marker").read_text() == "loaded"  # not cut off halfway by the exit


def _mentions(process: Path, text: str) -> bool:
    """Whether a process's command line (a sandboxed kernel's binds the workers' TMPDIR) or
    environment (a dask worker's, spawned with it) names ``text``; never multiprocessing's resource
    tracker, which the first spawned worker starts for the life of this process, not the batch's."""
    try:
        seen = [(process / part).read_bytes() for part in ("cmdline", "environ")]
    except OSError:
        return False
    return any(text.encode() in part for part in seen) and b"multiprocessing.resource_tracker" not in seen[0]
