"""Grading on a Dask cluster started by hand with the `dask scheduler` and `dask worker` commands on
127.0.0.1 gives what the embedded default gives, and leaves nothing behind on its workers' machine; a
worker killed mid-notebook costs no submission, a worker that cannot sandbox takes no notebook, and a
batch whose last worker is gone ends instead of waiting for one."""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import sys
import threading
import time
from pathlib import Path

import cloudpickle
import distributed
import nbformat
import pytest
from nbformat import v4

from grader import batch, cli, cluster, intake, pipeline, resources

pytestmark = pytest.mark.slow
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # its functions run on workers that can't import it

DASK = str(Path(sys.executable).with_name("dask"))
EXAMPLES = ("correct.ipynb", "mistake_no_saved_model.ipynb", "bad_syntax_error.ipynb")
TIMING = ("seconds", "graded_at", "worker")
# What a dask worker loads first, for the one that must look like a node without bubblewrap: the
# grader's own check then fails as it does where bwrap is missing.
NO_BUBBLEWRAP = ("from grader import sandbox\n"
                 "sandbox.bubblewrap_problem = lambda: 'bwrap not found (install the bubblewrap package)'\n")


@contextlib.contextmanager
def dask_cluster(tmp_path: Path, workers: int = 2, preloads: dict[int, Path] | None = None,
                 local_root: Path | None = None):
    """A scheduler and ``workers`` single-threaded workers, each by its own `dask` command, stopped
    with SIGTERM on leaving; the scheduler file's path. Each worker's local directory is
    ``<local_root>/<index>`` (``local_root``: ``tmp_path`` by default), and ``tmp_path/tmp`` its
    TMPDIR. ``preloads``: a module file for some workers to load first."""
    scheduler_file = tmp_path / "scheduler.json"
    (tmp_path / "tmp").mkdir()
    started = [subprocess.Popen([DASK, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                                 "--scheduler-file", str(scheduler_file)], stdout=subprocess.DEVNULL,
                                stderr=open(tmp_path / "scheduler.log", "w"))]
    try:
        deadline = time.monotonic() + 60
        while not scheduler_file.is_file():
            assert time.monotonic() < deadline and started[0].poll() is None, "the scheduler did not start"
            time.sleep(0.2)
        for index in range(workers):
            preload = ["--preload", str(preloads[index])] if preloads and index in preloads else []
            started.append(subprocess.Popen(
                [DASK, "worker", "--scheduler-file", str(scheduler_file), "--nthreads", "1", "--nworkers", "1",
                 "--host", "127.0.0.1", "--no-dashboard", "--name", f"w{index}",
                 "--local-directory", str((local_root or tmp_path) / str(index)), *preload],
                stdout=subprocess.DEVNULL, stderr=open(tmp_path / f"worker{index}.log", "w"),
                env={**os.environ, "TMPDIR": str(tmp_path / "tmp")}))
        with distributed.Client(scheduler_file=str(scheduler_file), set_as_default=False) as client:
            client.wait_for_workers(workers, timeout=120)
        yield scheduler_file
    finally:
        # The workers first, then the scheduler, as a cluster is taken down: a worker that sees its
        # scheduler close while it closes itself waits on it until its nanny kills it (8 s), and a
        # killed worker leaves its kernel's directory behind.
        for group in (started[1:], started[:1]):
            for process in group:
                process.send_signal(signal.SIGTERM)
            for process in group:
                try:
                    process.wait(60)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def _grade(paths: list[Path], out: Path, root: Path, *more: str) -> None:
    assert cli.main(["grade", *map(str, paths), "--out", str(out), "--root", str(root), "--quiet", *more]) == 0


def _results(out: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in out.glob("*/result.json")}


def _without_timing(result: dict) -> dict:
    cells = [{k: v for k, v in cell.items() if k != "seconds"} for cell in result["cells"]]
    return {**{k: v for k, v in result.items() if k not in TIMING}, "cells": cells}


def _report_without_timing(path: Path, result: dict) -> str:
    """The report, its times taken out: when it was graded, how long it and its cells took."""
    text = path.read_text().replace(result["graded_at"], "")
    text = re.sub(r"<dt>Time taken</dt><dd>[^<]*</dd>", "", text)
    return re.sub(r"after [0-9.]+ ?[a-z]*</span>", "</span>", text)


def test_a_cluster_started_by_hand_grades_as_the_embedded_default(tmp_path, mnist_sample_root, monkeypatch):
    folder = tmp_path / "class"
    folder.mkdir()
    for name in EXAMPLES:
        shutil.copy(resources.EXAMPLES_DIR / name, folder / name)
    embedded, remote = tmp_path / "embedded", tmp_path / "remote"
    _grade([folder], embedded, mnist_sample_root.root, "--jobs", "2")
    with dask_cluster(tmp_path) as scheduler_file:
        _grade([folder], remote, mnist_sample_root.root, "--scheduler-file", str(scheduler_file))
        with distributed.Client(scheduler_file=str(scheduler_file), set_as_default=False) as client:
            workers = set(client.run(os.getpid).values())
            theirs = {tuple(sorted(i.items())) for i in client.run(pipeline.isolation_available, "auto").values()}
        # The kept runs hold the sandbox they ran in, a worker's: a client whose own sandbox differs
        # (here: the subprocess fallback, as on a machine without bubblewrap) grades nothing again on
        # that cluster.
        written = {p: p.stat().st_mtime_ns for p in remote.glob("*/result.json")}
        other = {"mode": "subprocess", "root": False, "resource_box": False}
        assert tuple(sorted(other.items())) not in theirs
        monkeypatch.setattr(pipeline, "isolation_available", lambda isolation: other)
        _grade([folder], remote, mnist_sample_root.root, "--scheduler-file", str(scheduler_file))
        assert {p: p.stat().st_mtime_ns for p in remote.glob("*/result.json")} == written
        monkeypatch.undo()
    # Stopped with SIGTERM, the workers left no process (a sandboxed kernel ends a moment after its
    # worker), no held job uid, no runs directory.
    deadline = time.monotonic() + 30
    while _mentioning(str(tmp_path)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _mentioning(str(tmp_path)) == [] and not workers & _holding_job_uids()
    assert not list(tmp_path.glob("[0-9]/**/labgrader-runs-*")) and not list((tmp_path / "tmp").iterdir())
    here, there = _results(embedded), _results(remote)
    assert sorted(here) == sorted(there) == sorted(Path(name).stem for name in EXAMPLES)
    assert {sid: _without_timing(r) for sid, r in here.items()} == {sid: _without_timing(r) for sid, r in there.items()}
    assert all(r["status"] == "graded" and r["worker"] for r in there.values())
    assert len({r["worker"] for r in there.values()} | {r["worker"] for r in here.values()}) >= 2
    for sid in here:
        assert (_report_without_timing(embedded / sid / batch.REPORT_NAME, here[sid])
                == _report_without_timing(remote / sid / batch.REPORT_NAME, there[sid]))
        # The kept run came back whole: a rerun grades nothing again.
        assert sorted(p.name for p in (remote / ".runs" / sid).iterdir()) == sorted(
            p.name for p in (embedded / ".runs" / sid).iterdir())
    exported = sorted(p.name for p in embedded.iterdir() if p.is_file() and p.name != "index.html")
    assert exported and exported == sorted(p.name for p in remote.iterdir() if p.is_file() and p.name != "index.html")
    for name in exported:
        assert _export_without_timing(embedded / name) == _export_without_timing(remote / name), name


def _mentioning(text: str) -> list[int]:
    """Processes whose command line names ``text``."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            if text.encode() in cmdline.read_bytes():
                found.append(int(cmdline.parent.name))
    return found


def _holding_job_uids() -> set[int]:
    """Processes holding a job uid's lock (/proc/locks names each lock's holder and file's inode)."""
    inodes = {path.stat().st_ino for path in cluster.worker._slot_dir().glob("*")}
    holders = set()
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if "FLOCK" in fields and int(fields[-3].rsplit(":", 1)[1]) in inodes:
            holders.add(int(fields[-4]))
    return holders


def _export_without_timing(path: Path) -> str:
    """An export, its times taken out: when each submission was graded, and JUnit's durations."""
    text = re.sub(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\+00:00)?", "", path.read_text())
    return re.sub(r'time="[0-9.]+"', "", text)


def _long_notebooks(folder: Path, count: int) -> list[Path]:
    """The lab's correct notebook with a pause first: long enough to be killed in the middle of."""
    source = json.loads((resources.EXAMPLES_DIR / "correct.ipynb").read_text())
    source["cells"].insert(0, {"cell_type": "code", "metadata": {}, "execution_count": None, "outputs": [],
                               "source": "import time\ntime.sleep(8)"})
    folder.mkdir()
    for index in range(count):
        (folder / f"student{index}.ipynb").write_text(json.dumps(source))
    return [folder / f"student{index}.ipynb" for index in range(count)]


def _executing(dask_worker) -> int:
    return len(dask_worker.state.executing)


def test_a_worker_killed_mid_notebook_costs_no_submission(tmp_path, mnist_sample_root):
    paths = _long_notebooks(tmp_path / "class", 3)
    out = tmp_path / "out"
    # Workers' directories with paths short enough for their kernels' sockets, so every directory of
    # a kernel is in its worker's: the killed worker's are removed when its nanny starts a new one.
    local_root = Path(tempfile.mkdtemp(prefix="lgw-"))
    try:
        _grade_while_killing_a_worker(tmp_path, paths, out, mnist_sample_root.root, local_root)
        left = [p for p in local_root.rglob("*") if p.name.startswith(("lg-", "labgrader-"))]
        assert not left and not list((tmp_path / "tmp").iterdir()), left
    finally:
        shutil.rmtree(local_root, ignore_errors=True)
    results = _results(out)
    assert sorted(results) == ["student0", "student1", "student2"]
    assert all(r["status"] == "graded" and r["score"] == r["max_score"] for r in results.values())
    assert len((out / "gradebook.csv").read_text().splitlines()) == 1 + 3  # each submission once


def _grade_while_killing_a_worker(tmp_path: Path, paths: list[Path], out: Path, root: Path, local_root: Path) -> None:
    """Grade ``paths`` on two hand-started workers, one of them SIGKILLed inside a notebook; no
    result comes from the killed one."""
    with dask_cluster(tmp_path, local_root=local_root) as scheduler_file:
        grading = threading.Thread(target=_grade, args=(paths, out, root, "--scheduler-file", str(scheduler_file)))
        grading.start()
        with distributed.Client(scheduler_file=str(scheduler_file), set_as_default=False) as client:
            deadline = time.monotonic() + 300
            while not (busy := [w for w, n in client.run(_executing).items() if n]):
                assert time.monotonic() < deadline and grading.is_alive(), "no worker started a notebook"
                time.sleep(0.5)
            time.sleep(4)  # inside the notebook's first cell
            victim = busy[0]
            os.kill(client.run(os.getpid, workers=[victim])[victim], signal.SIGKILL)
        grading.join(900)
        assert not grading.is_alive()
    assert victim not in {r["worker"].split("(")[1].rstrip(")") for r in _results(out).values()}


def test_a_worker_without_bubblewrap_takes_no_notebook(tmp_path, mnist_sample_root, capsys):
    folder = tmp_path / "class"
    folder.mkdir()
    for name in EXAMPLES[:2]:
        shutil.copy(resources.EXAMPLES_DIR / name, folder / name)
    preload = tmp_path / "no_bubblewrap.py"
    preload.write_text(NO_BUBBLEWRAP)
    out = tmp_path / "out"
    with dask_cluster(tmp_path, preloads={1: preload}) as scheduler_file:
        with distributed.Client(scheduler_file=str(scheduler_file), set_as_default=False) as client:
            names = {info["name"]: address for address, info in client.scheduler_info()["workers"].items()}
        _grade([folder], out, mnist_sample_root.root, "--scheduler-file", str(scheduler_file))
    said = capsys.readouterr().err
    assert f"worker {names['w1']} takes no notebook: it cannot sandbox notebooks with bubblewrap (bwrap not found" in said
    results = _results(out)
    assert sorted(results) == sorted(Path(name).stem for name in EXAMPLES[:2])
    assert all(r["status"] == "graded" and r["worker"].endswith(f"({names['w0']})") for r in results.values())
    assert "labgrader: this worker takes no notebook: it cannot sandbox" in (tmp_path / "worker1.log").read_text()


def test_a_batch_whose_last_worker_is_gone_fails_what_is_left_instead_of_waiting(
        tmp_path, grading_config, monkeypatch):
    monkeypatch.setattr(cluster.client, "NO_WORKER_WAIT", 10.0)
    for name in ("alice", "bob", "carol"):
        (tmp_path / f"{name}.ipynb").write_text(nbformat.writes(v4.new_notebook(cells=[v4.new_code_cell("x = 1")])))
    submissions = intake.collect([tmp_path / f"{name}.ipynb" for name in ("alice", "bob", "carol")])
    config = grading_config(runs_dir=tmp_path / "runs")
    with dask_cluster(tmp_path, workers=1) as scheduler_file:
        graded = batch._in_workers(submissions, config, 1, str(scheduler_file))
        first = next(graded)
        with distributed.Client(scheduler_file=str(scheduler_file), set_as_default=False) as client:
            [nanny] = client.run(os.getppid).values()  # the `dask worker` command: no new worker comes
            os.kill(nanny, signal.SIGTERM)
            deadline = time.monotonic() + 60
            while client.scheduler_info()["workers"]:
                assert time.monotonic() < deadline, "the worker did not leave"
                time.sleep(0.2)
        waited = time.monotonic()
        rest = {result.submission_id: result for result in graded}
        waited = time.monotonic() - waited
    assert (first.submission_id, first.status, first.execution_status) == ("alice", "graded", "completed")
    assert sorted(rest) == ["bob", "carol"]
    assert all(r.status == "error" and "no worker able to grade was in the cluster for" in r.reason
               and "fault of the grader" in r.reason for r in rest.values())
    assert waited < batch.time_limit(config)  # not a task's time limit waited out, nor for ever

