"""The batch never dies of one submission: files intake can't read are listed with the reason, a
model "file" that is not a file costs only the saved-model checks, comm messages count against the
output cap, and a worker that hangs or dies costs only the submission it had."""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import tempfile
import time
import zipfile
from pathlib import Path

import nbformat
import cloudpickle
import pytest
from nbformat import v4

from grader import batch, cluster, intake, pipeline
from grader.execute.client import GradingClient

REPO = Path(__file__).resolve().parent.parent
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # its functions run on workers


def _notebook(*sources: str) -> bytes:
    return nbformat.writes(v4.new_notebook(cells=[v4.new_code_cell(s) for s in sources])).encode()


def _zip_with_a_damaged_deflate_stream(name: str, content: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(name, content)
    damaged = bytearray(buffer.getvalue())
    start = 30 + len(name)  # the entry's data follows its 30-byte local header and its name
    damaged[start:start + 8] = b"\xff" * 8
    return bytes(damaged)


def test_a_class_with_files_intake_cannot_read_is_graded_and_exported(grading_config, tmp_path):
    folder = tmp_path / "class"
    folder.mkdir()
    (folder / "alice.ipynb").write_bytes(_notebook("x = 1"))
    (folder / "bob.ipynb").write_text("[" * 100_000 + "]" * 100_000)  # RecursionError in json.loads
    (folder / "carol.zip").write_bytes(_zip_with_a_damaged_deflate_stream("lab.ipynb", _notebook("x = 2")))
    (folder / "dave.ipynb").mkdir()
    (folder / "erin.py").write_text("x = 1")
    (tmp_path / "solution.ipynb").write_bytes(_notebook("x = 3"))
    (folder / "mallory.ipynb").symlink_to(tmp_path / "solution.ipynb")
    out = tmp_path / "out"
    results = {r.submission_id: r for r in batch.grade_all(
        intake.collect([folder]), grading_config(runs_dir=out / ".runs"), out, jobs=1, progress=False)}
    assert set(results) == {"alice", "bob", "carol.zip_lab", "dave", "erin.py", "mallory"}
    assert (results["alice"].status, results["alice"].execution_status) == ("graded", "completed")
    listed = {name: result for name, result in results.items() if name != "alice"}
    assert all(r.status == "error" and r.score == 0 and not r.checks for r in listed.values())
    assert "nested too deeply" in listed["bob"].reason
    assert "zlib.error" in listed["carol.zip_lab"].reason
    assert "a folder, not a notebook file" in listed["dave"].reason
    assert "not a notebook (a .py file)" in listed["erin.py"].reason
    assert "leading out of the folder" in listed["mallory"].reason
    with open(out / "gradebook.csv", newline="") as gradebook:
        rows = {row["submission_id"]: row for row in csv.DictReader(gradebook)}
    assert set(rows) == set(results)
    assert all(rows[name]["reason"] == result.reason for name, result in listed.items())
    junit = (out / "junit.xml").read_text()
    assert all(f'classname="{name}"' in junit for name in results)
    assert all((out / name / "result.json").is_file() and (out / name / "report.html").is_file()
               for name in results)


def test_a_model_file_that_is_a_folder_costs_only_the_saved_model_checks(grading_config, tmp_path):
    (tmp_path / "lab.ipynb").write_bytes(_notebook("import os\nos.mkdir('mnist_cnn.pt')"))
    [submission] = intake.collect([tmp_path / "lab.ipynb"])
    result = pipeline.grade(submission, grading_config())
    assert result.status == "graded" and result.execution_status == "completed"
    checks = {c.name: c for c in result.checks}
    assert checks["saved_model_loads"].message == (
        "mnist_cnn.pt was not read: it is a folder, not a file. Save the weights to a file with "
        "torch.save(net.state_dict(), 'mnist_cnn.pt').")
    assert checks["notebook_runs"].status == "passed"


# --- comm messages and the output cap ------------------------------------------------------------

def _message(msg_type: str, content: dict, buffers: tuple[bytes, ...] = ()) -> dict:
    return {"msg_type": msg_type, "header": {"msg_type": msg_type}, "parent_header": {"msg_id": "m"},
            "metadata": {}, "content": content, "buffers": list(buffers)}


def test_comm_messages_count_against_the_output_cap_and_are_not_kept():
    from nbclient.exceptions import CellExecutionComplete

    notebook = v4.new_notebook(cells=[v4.new_code_cell("")])
    cell = notebook.cells[0]
    killed: list[str] = []
    client = GradingClient(notebook, None, output_bytes=15_000, killer=killed.append)
    try:
        # What ipywidgets sends for an Output widget: nbclient would keep its state and route output to it.
        widget = {"_model_name": "OutputModel", "_model_module": "@jupyter-widgets/output",
                  "_model_module_version": "1.0.0", "msg_id": "m", "outputs": [], "filler": "x" * 3000}
        opened = {"comm_id": "w", "target_name": "jupyter.widget", "data": {"state": widget, "buffer_paths": []}}
        client.process_message(_message("comm_open", opened), cell, 0)
        assert 3000 < client.output_seen < 4000
        deep: dict = {"end": "y" * 1000}
        for _ in range(5000):  # deeper than a recursive count could go
            deep = {"a": deep}
        client.process_message(_message("comm_msg", {"comm_id": "w", "data": deep}), cell, 0)
        client.process_message(_message("comm_msg", {"comm_id": "w", "data": {"method": "custom"}},
                                        (b"\0" * 4000,)), cell, 0)
        assert 3000 + 6000 + 4000 < client.output_seen < 15_000
        assert client.widget_state == {} and client.comm_objects == {} and cell.outputs == []
        assert not killed
        with pytest.raises(CellExecutionComplete):
            client.process_message(_message("comm_msg", {"comm_id": "w", "data": {"method": "custom"}},
                                            (b"\0" * 4000,)), cell, 0)
        assert killed == ["output limit"] and client.output_truncated
        assert "output truncated" in cell.outputs[-1]["text"]
    finally:
        client.zmq_context.destroy(linger=0)


def test_a_comm_flood_stops_the_kernel_and_the_executor_keeps_none_of_it(tmp_path):
    flood = ("from comm import create_comm\n"
             "channel = create_comm(target_name='flood', data={})\n"
             "for i in range(200):  # 200 MB of widget state, each message under ZMQ's size cap\n"
             "    channel.send({'state': {f'key{i}': 'x' * 1_000_000}})")
    script = textwrap.dedent(f"""
        import json, resource
        from pathlib import Path
        from nbformat import v4
        from grader.execute import execute, Limits
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        nb = v4.new_notebook(cells=[v4.new_code_cell({flood!r}), v4.new_code_cell("print('after')")])
        ex = execute(nb, Path({str(tmp_path / 'work')!r}), Path({str(tmp_path / 'record')!r}),
                     limits=Limits(cell_timeout=60, output_bytes=2_000_000))
        print(json.dumps({{"grew_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before,
                          "status": ex.status, "cells": [c.status for c in ex.cells],
                          "saved": str(ex.executed_notebook)}}))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.splitlines()[-1])
    assert found["status"] == "output-limit" and found["cells"] == ["error", "not-run"], found
    assert found["grew_kb"] < 100 * 1024, found  # the executor kept nothing like 200 MB
    executed = nbformat.read(found["saved"], as_version=4)
    assert "widgets" not in executed.metadata
    assert Path(found["saved"]).stat().st_size < 100_000


# --- workers ----------------------------------------------------------------------------------------

def _grade_unless_told(submission, config, kernels):
    """Grades as a worker does, except for two submissions: one that hangs the grader (a read of a
    FIFO that nobody writes, as a planted one would) and one that kills its worker every time (as
    the out-of-memory killer would)."""
    if submission.id == "hangs":
        Path(submission.source).with_name("fifo").read_bytes()
    if submission.id == "dies":
        os.kill(os.getpid(), signal.SIGKILL)
    return pipeline.grade(submission, config, kernels=kernels)


def _run_a_batch(submissions, config) -> None:
    for _ in batch._in_workers(submissions, config, 1, grade=_grade_unless_told):
        pass


def _processes_mentioning(text: str) -> list[Path]:
    """Processes whose command line or environment names ``text``: the batch's dask workers (spawned
    with the test's TMPDIR) and their sandboxed kernels (bubblewrap's command line binds it). Not
    multiprocessing's resource tracker, which the first spawned worker starts for the life of this
    process, not the batch's."""
    found = []
    for process in Path("/proc").glob("[0-9]*"):
        try:
            seen = [(process / part).read_bytes() for part in ("cmdline", "environ")]
        except OSError:
            continue
        if any(text.encode() in part for part in seen) and b"multiprocessing.resource_tracker" not in seen[0]:
            found.append(process)
    return found


@pytest.mark.slow  # waits out the limit of the worker that hangs, and three deaths of a worker
def test_a_worker_that_hangs_or_dies_costs_only_its_submission(grading_config, tmp_path, monkeypatch):
    # The workers' TMPDIR, and where the local cluster's directory goes: the kernels' work dirs are
    # in their worker's directory, so their command lines name it.
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    # The limit a hung task waits out: 90 s in all, twice what a notebook of one line took to
    # grade on a fresh worker of a 2-core machine with a load average of 9.
    monkeypatch.setattr(batch, "GRADER_MARGIN", 70.0)
    os.mkfifo(tmp_path / "fifo")
    for name in ("alice", "dies", "hangs", "bob"):
        (tmp_path / f"{name}.ipynb").write_bytes(_notebook("x = 1"))
    base = grading_config(runs_dir=tmp_path / "out" / ".runs")
    limits = dataclasses.replace(base.rubric.limits, notebook_timeout=10, cell_timeout=5)
    config = dataclasses.replace(base, rubric=dataclasses.replace(base.rubric, limits=limits))
    submissions = intake.collect([tmp_path / f"{name}.ipynb" for name in ("alice", "dies", "hangs", "bob")])
    results = {r.submission_id: r for r in batch._in_workers(submissions, config, 2, grade=_grade_unless_told)}
    assert set(results) == {"alice", "dies", "hangs", "bob"}
    for name in ("alice", "bob"):
        assert (results[name].status, results[name].execution_status) == ("graded", "completed")
    assert results["dies"].status == "error"
    assert f"died on each of its {cluster.ALLOWED_FAILURES + 1} tries" in results["dies"].reason
    assert results["hangs"].status == "error"
    assert f"no result after {batch.time_limit(config):g} s" in results["hangs"].reason
    assert all("fault of the grader" in results[name].reason for name in ("dies", "hangs"))
    # Not kept as final: a rerun grades them again.
    layout = batch.Layout(tmp_path / "out")
    for submission in submissions[1:3]:
        batch.write_result(results[submission.id], layout)
        assert batch.is_current(layout.result(submission.id), submission, config) is None
    # No worker and no kernel is left, the killed ones' included (a kernel under bubblewrap dies
    # with its worker; a moment after).
    deadline = time.monotonic() + 30
    while _processes_mentioning(str(scratch)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _processes_mentioning(str(scratch)) == []


def test_workers_and_their_kernels_end_with_a_batch_that_is_killed(grading_config, tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the kernels' command lines name it
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "hangs.ipynb").write_bytes(_notebook("x = 1"))
    context = multiprocessing.get_context("spawn")
    killed = context.Process(target=_run_a_batch, args=(intake.collect([tmp_path / "hangs.ipynb"]),
                                                        grading_config(runs_dir=tmp_path / "runs")))
    killed.start()
    deadline = time.monotonic() + 300
    while not _processes_mentioning(str(tmp_path)):  # its worker has started a kernel
        assert killed.is_alive() and time.monotonic() < deadline, "the batch started no kernel"
        time.sleep(0.2)
    time.sleep(2)  # and the kernel is under way, whatever it does next
    killed.kill()  # SIGKILL: no chance to stop anything
    killed.join()
    deadline = time.monotonic() + 60
    while _processes_mentioning(str(tmp_path)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _processes_mentioning(str(tmp_path)) == []
