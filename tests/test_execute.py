"""The execute stage against real kernels (nbclient + ipykernel, sandboxed when bubblewrap works).

Each test builds a small notebook, runs it through :func:`grader.execute.execute` (or a kernel of
:class:`grader.execute.Kernels`, started ahead) and checks what the executor recorded, never what the
kernel claims.
"""
from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import queue
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import nbformat
import pytest
from nbformat import v4

from grader.execute import INTERRUPT_GRACE, Kernels, Limits, Sandboxing, execute
from grader.execute import processes
from grader.execute.client import connected

REPO = Path(__file__).resolve().parent.parent
FAST = Limits(cell_timeout=20, notebook_timeout=120)
PNG = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==")


def notebook(*sources: str) -> nbformat.NotebookNode:
    return v4.new_notebook(cells=[v4.new_code_cell(s) for s in sources])


def run(tmp_path: Path, *sources: str, **kw):
    kw.setdefault("limits", FAST)
    nb = kw.pop("nb", None) or notebook(*sources)
    return execute(nb, tmp_path / "work", tmp_path / "record", **kw)


def saved(ex) -> nbformat.NotebookNode:
    return nbformat.read(str(ex.executed_notebook), as_version=4)


def test_normal_notebook_is_recorded_cell_by_cell(tmp_path):
    nb = v4.new_notebook(cells=[
        v4.new_markdown_cell("# A lab"),
        v4.new_code_cell("x = 21\nprint('hello')"),
        v4.new_code_cell(f"from IPython.display import Image, display\n"
                         f"import base64\ndisplay(Image(data=base64.b64decode('{PNG}')))"),
        v4.new_code_cell(""),
        v4.new_code_cell("# answer\nx * 2"),
    ])
    ex = run(tmp_path, nb=nb)
    assert ex.status == "completed", ex.reason
    assert [c.index for c in ex.cells] == [1, 2, 3, 4]
    assert all(c.status == "ok" for c in ex.cells)
    assert ex.cells[0].source_head == "x = 21"
    assert ex.cells[1].images == 1
    assert ex.cells[3].source_head == "# answer"
    out = saved(ex)
    assert out.cells[1].outputs[0]["text"] == "hello\n"
    assert out.cells[4].outputs[0]["data"]["text/plain"] == "42"
    assert ex.executed_notebook == (tmp_path / "record" / "executed.ipynb").resolve()
    assert ex.reason is None and not ex.output_truncated and ex.network_blocked == ()


def test_failing_cell_is_recorded_and_later_cells_still_run(tmp_path):
    ex = run(tmp_path, "a = 1", "1 / 0", "b = a + 1\nprint(b)", "undefined_name")
    assert ex.status == "completed"
    assert [c.status for c in ex.cells] == ["ok", "error", "ok", "error"]
    assert ex.cells[1].error == "ZeroDivisionError: division by zero"
    assert "\x1b[" not in ex.cells[1].traceback and "----> 1 1 / 0" in ex.cells[1].traceback
    assert ex.cells[3].error == "NameError: name 'undefined_name' is not defined"
    assert saved(ex).cells[2].outputs[0]["text"] == "2\n"


def test_sys_exit_is_an_error_not_a_death(tmp_path):
    ex = run(tmp_path, "import sys; sys.exit(3)", "print('still here')")
    assert [c.status for c in ex.cells] == ["error", "ok"]
    assert ex.cells[0].error.startswith("SystemExit")


def test_stderr_and_warnings_are_not_failures(tmp_path):
    ex = run(tmp_path, "import sys, warnings\nprint('careful', file=sys.stderr)\n"
                       "warnings.warn('deprecated thing', DeprecationWarning)\n"
                       "warnings.warn('user warning')", "print('next')")
    assert [c.status for c in ex.cells] == ["ok", "ok"], ex.cells
    text = "".join(o.get("text", "") for o in saved(ex).cells[0].outputs)
    assert "careful" in text and "user warning" in text


def test_endless_loop_times_out_and_later_cells_run(tmp_path):
    limits = Limits(cell_timeout=2, notebook_timeout=60)
    t0 = time.monotonic()
    ex = run(tmp_path, "n = 0", "while True:\n    n += 1", "print('after', n > 0)", limits=limits)
    assert [c.status for c in ex.cells] == ["ok", "timeout", "ok"]
    assert "interrupted" in ex.cells[1].error
    assert 2 <= ex.cells[1].seconds < 2 + INTERRUPT_GRACE
    assert saved(ex).cells[2].outputs[0]["text"] == "after True\n"
    assert ex.status == "completed" and "timed out" in ex.reason
    assert time.monotonic() - t0 < 30


def test_notebook_deadline_stops_the_run(tmp_path):
    limits = Limits(cell_timeout=30, notebook_timeout=4)
    ex = run(tmp_path, "import time; time.sleep(60)", "print('never')", limits=limits)
    assert ex.status == "timeout"
    assert [c.status for c in ex.cells] == ["timeout", "not-run"]
    assert "notebook time limit" in ex.reason


@pytest.mark.slow
def test_cell_ignoring_sigint_is_killed_by_the_outer_deadline(tmp_path):
    limits = Limits(cell_timeout=2, notebook_timeout=60)
    t0 = time.monotonic()
    ex = run(tmp_path, "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n"
                       "while True:\n    pass", "print('never')", limits=limits)
    elapsed = time.monotonic() - t0
    assert ex.status == "timeout"
    assert [c.status for c in ex.cells] == ["timeout", "not-run"]
    assert "did not stop when interrupted" in ex.cells[0].error
    assert elapsed < 2 + INTERRUPT_GRACE + 15, elapsed
    assert saved(ex).cells[1].get("outputs") == []


def test_os_exit_is_recorded_as_kernel_death_at_that_cell(tmp_path):
    ex = run(tmp_path, "print('one')", "import os\nos._exit(1)", "print('never')",
             epilogue="open('probe.json', 'w').write('{}')")
    assert ex.status == "kernel-died"
    assert [c.status for c in ex.cells] == ["ok", "kernel-died", "not-run"]
    assert "exited with code 1" in ex.cells[1].error
    assert "during cell 2 ('import os')" in ex.reason  # numbered from 1, as a student counts
    assert not (ex.workdir / "probe.json").exists() and ex.probe_error is None  # no epilogue after a death


def test_segfault_is_recorded_with_its_signal(tmp_path):
    ex = run(tmp_path, "import ctypes\nctypes.string_at(0)", "print('never')")
    assert [c.status for c in ex.cells] == ["kernel-died", "not-run"]
    assert "SIGSEGV" in ex.cells[0].error


def _executor_peak_rss(tmp_path: Path, source: str, output_bytes: int = 2_000_000) -> dict:
    """Run execute() in a fresh process and report its own peak RSS (the executor's memory)."""
    script = textwrap.dedent(f"""
        import json, resource, sys
        from pathlib import Path
        from nbformat import v4
        sys.path.insert(0, {str(REPO)!r})
        from grader.execute import execute, Limits
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        nb = v4.new_notebook(cells=[v4.new_code_cell("print('start')"),
                                    v4.new_code_cell({source!r}), v4.new_code_cell("print(2)")])
        ex = execute(nb, Path({str(tmp_path / 'work')!r}), Path({str(tmp_path / 'record')!r}),
                     limits=Limits(cell_timeout=30, output_bytes={output_bytes}))
        print(json.dumps({{"before_kb": before,
                          "peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                          "status": ex.status, "truncated": ex.output_truncated,
                          "cells": [c.status for c in ex.cells], "reason": ex.reason,
                          "error": ex.cells[1].error, "saved": str(ex.executed_notebook)}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_gigabyte_of_output_is_capped_and_the_executor_stays_small(tmp_path):
    # 10**6 lines of 1000 characters: a gigabyte if nothing stopped it.
    r = _executor_peak_rss(tmp_path, "for i in range(10**6):\n    print('x' * 1000)")
    assert r["status"] == "output-limit" and r["truncated"], r
    assert r["cells"] == ["ok", "error", "not-run"]
    assert r["error"].startswith("OutputLimitExceeded")
    assert (r["peak_kb"] - r["before_kb"]) < 250 * 1024, r  # executor grew by < 250 MB
    nb = nbformat.read(r["saved"], as_version=4)
    text = "".join(o.get("text", "") for o in nb.cells[1].outputs)
    assert "output truncated" in text
    assert len(json.dumps(nb)) < 3_000_000
    assert Path(r["saved"]).stat().st_size < 3_000_000


def test_many_small_outputs_are_capped_with_a_note(tmp_path):
    limits = Limits(cell_timeout=20, output_bytes=50_000)
    ex = run(tmp_path, "import sys, time\nfor i in range(2000):\n    print(i, 'y' * 100)\n"
                       "    sys.stdout.flush(); time.sleep(0.001)", "print('never')", limits=limits)
    assert ex.status == "output-limit" and ex.output_truncated
    assert [c.status for c in ex.cells] == ["error", "not-run"]
    outs = saved(ex).cells[0].outputs
    text = "".join(o.get("text", "") for o in outs)
    assert "output truncated" in text and "50000-byte limit" in text
    assert len(text) < 50_000 + 1_000
    assert text.startswith("0 yyy")


def test_prelude_and_epilogue_run_and_are_not_cells(tmp_path):
    ex = run(tmp_path, "print(SEED)", "result = SEED * 2",
             prelude="SEED = 7",
             epilogue="import json\njson.dump({'result': result}, open('probe.json', 'w'))")
    assert ex.status == "completed" and [c.status for c in ex.cells] == ["ok", "ok"]
    assert len(ex.cells) == 2 and ex.probe_error is None
    assert json.loads((ex.workdir / "probe.json").read_text()) == {"result": 14}
    nb = saved(ex)
    assert len(nb.cells) == 2 and nb.cells[0].outputs[0]["text"] == "7\n"
    assert "SEED = 7" not in json.dumps(nb)


def test_failing_epilogue_sets_probe_error(tmp_path):
    ex = run(tmp_path, "x = 1", epilogue="student_function_that_is_missing()")
    assert ex.status == "completed"
    assert ex.probe_error.startswith("NameError: name 'student_function_that_is_missing'")
    assert list(ex.workdir.iterdir()) == []


def test_an_epilogue_function_is_called_once_the_cells_have_run(tmp_path):
    work = tmp_path / "work"

    def epilogue() -> str:
        (work / "inputs.txt").write_text("21")
        return "print(int(open('inputs.txt').read()) * 2)"

    ex = run(tmp_path, "import os\nprint(os.path.exists('inputs.txt'))", epilogue=epilogue)
    assert ex.status == "completed" and ex.probe_error is None
    assert saved(ex).cells[0].outputs[0]["text"] == "False\n"  # not there while the cells ran


def test_an_epilogue_function_that_fails_is_a_probe_error(tmp_path):
    def epilogue() -> str:
        raise OSError("no dataset")

    ex = run(tmp_path, "x = 1", epilogue=epilogue)
    assert ex.status == "completed" and [c.status for c in ex.cells] == ["ok"]
    assert ex.probe_error == "the grader could not prepare its probe: OSError: no dataset"


def test_failing_prelude_is_a_clear_reason(tmp_path):
    ex = run(tmp_path, "x = 1", prelude="raise RuntimeError('setup broke')")
    assert ex.status == "not-run"
    assert "set-up code failed" in ex.reason and "setup broke" in ex.reason
    assert [c.status for c in ex.cells] == ["not-run"]


def test_blocked_download_is_recorded(tmp_path):
    # Nothing here leaves the machine: inside the sandbox 127.0.0.1 is the sandbox's own loopback
    # with nothing listening; outside it (subprocess mode) the port is one we just found free.
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    ex = run(tmp_path, "print('ok')",
             f"!{sys.executable} -m pip download --no-deps --retries 0 --timeout 3 "
             f"--index-url http://127.0.0.1:{port}/simple -d /tmp/x some-package",
             f"import urllib.request\nurllib.request.urlopen('http://127.0.0.1:{port}/', timeout=3)",
             "print('fine')")
    assert [c.status for c in ex.cells] == ["ok", "ok", "error", "ok"]  # ! commands don't raise
    assert len(ex.network_blocked) == 2, ex.network_blocked
    assert ex.network_blocked[0].startswith("cell 2:") and ex.network_blocked[1].startswith("cell 3:")


def test_machinery_failure_becomes_a_reason(tmp_path):
    blocker = tmp_path / "record"
    blocker.write_text("a file where the record dir should be")
    ex = execute(notebook("print(1)"), tmp_path / "work", blocker, limits=FAST)
    assert ex.status == "not-run" and "could not run" in ex.reason


def test_fallback_subprocess_records_weaker_isolation(tmp_path):
    ex = run(tmp_path, "import os\nprint(os.getcwd())", "1/0", "print('after')",
             isolation="subprocess")
    assert ex.isolation.startswith("subprocess (weaker: no namespaces)")
    assert [c.status for c in ex.cells] == ["ok", "error", "ok"]
    assert saved(ex).cells[0].outputs[0]["text"].strip() == str((tmp_path / "work").resolve())


def _children() -> set[int]:
    """This process's live child processes (a kernel's wrapper is one)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, parent = stat.read_text().rsplit(")", 1)[1].split()[:2]
        except (OSError, ValueError):
            continue
        if parent == str(os.getpid()) and state != "Z":
            found.add(int(stat.parent.name))
    return found


def test_a_kernel_started_ahead_runs_the_next_notebook_fresh(tmp_path):
    record = tmp_path / "record"
    before = _children()
    with Kernels(Sandboxing(limits=FAST, hide=(record,)), notebooks=2) as kernels:
        kernels.start_ahead()
        waiting = _children() - before
        assert len(waiting) == 1  # started before any notebook was given
        with kernels.kernel() as first:
            assert first.km.provisioner.process.pid in waiting
            ex = first.run(notebook("open('mine.txt', 'w').write('x')\nsecret = 42"), record / "first")
            first_workdir = first.workdir
        assert ex.status == "completed" and (first_workdir / "mine.txt").exists() is False
        kernels.start_ahead()
        with kernels.kernel() as second:
            assert second.workdir != first_workdir
            ex = second.run(notebook("import os\nprint(sorted(os.listdir('.')), 'secret' in globals())"),
                            record / "second")
        assert ex.status == "completed"
        assert saved(ex).cells[0].outputs[0]["text"] == "[] False\n"  # nothing of the first notebook
        kernels.start_ahead()  # both notebooks have run: no third kernel
        assert _children() == before
    assert _children() == before


def test_processes_sharing_a_count_start_no_kernel_ahead_past_the_last_notebook(tmp_path):
    record = tmp_path / "record"
    left = multiprocessing.get_context("spawn").Value("i", 1)
    before = _children()
    sandboxing = Sandboxing(limits=FAST, hide=(record,))
    with Kernels(sandboxing, notebooks=left) as first, Kernels(sandboxing, notebooks=left) as second:
        first.start_ahead()
        second.start_ahead()  # the one notebook left has its kernel already
        assert len(_children() - before) == 1 and left.value == 0
        with second.kernel() as kernel:  # yet whoever gets the notebook gets a kernel
            ex = kernel.run(notebook("print('fine')"), record)
    assert ex.status == "completed" and [c.status for c in ex.cells] == ["ok"]
    assert _children() == before


def test_a_kernel_that_died_while_waiting_is_replaced(tmp_path):
    record = tmp_path / "record"
    with Kernels(Sandboxing(limits=FAST, hide=(record,))) as kernels:
        kernels.start_ahead()
        waiting = kernels._ahead
        waiting.kill()
        waiting.km.provisioner.process.wait(10)
        with kernels.kernel() as kernel:
            assert kernel is not waiting
            ex = kernel.run(notebook("print('fine')"), record)
    assert ex.status == "completed" and [c.status for c in ex.cells] == ["ok"]


def test_a_kernel_waited_for_runs_its_notebook(tmp_path):
    record = tmp_path / "record"
    with Kernels(Sandboxing(limits=FAST, hide=(record,)), notebooks=1) as kernels:
        kernels.start_ahead()
        kernels.wait_ready()
        with kernels.kernel() as kernel:
            assert kernel.failure is None
            ex = kernel.run(notebook("print('fine')"), record)
    assert ex.status == "completed" and saved(ex).cells[0].outputs[0]["text"] == "fine\n"


def test_a_kernel_that_dies_before_it_answers_fails_its_notebook_with_the_reason(tmp_path):
    record = tmp_path / "record"
    with Kernels(Sandboxing(limits=FAST, hide=(record,)), notebooks=1) as kernels:
        kernels.start_ahead()
        kernel = kernels._ahead
        kernel.kill()
        kernels.wait_ready()
        assert kernel.failure.startswith("the kernel did not start")
        ex = kernel.run(notebook("print('never')"), record)
    assert ex.status == "not-run" and ex.reason == kernel.failure
    assert [c.status for c in ex.cells] == ["not-run"]


class _Channel:
    """A channel that hands out the messages a kernel would have sent by now, then times out."""

    def __init__(self, messages):
        self.messages = messages

    async def get_msg(self, timeout=None):
        if not self.messages:
            raise queue.Empty
        return self.messages.pop(0)


class _IOPubLateClient:
    """A kernel client whose IOPub subscription missed the first request's messages: the kernel
    answers each kernel_info request on the shell, and IOPub brings every request's statuses but
    the first's, after a stale message of no request."""

    def __init__(self):
        self.shell, self.iopub = _Channel([]), _Channel([{"parent_header": {}, "msg_type": "stream"}])
        self.shell_channel, self.iopub_channel = self.shell, self.iopub
        self.requests, self.handled = [], None

    def kernel_info(self):
        request = f"request-{len(self.requests)}"
        self.requests.append(request)
        self.shell.messages.append({"parent_header": {"msg_id": request}, "msg_type": "kernel_info_reply"})
        if len(self.requests) > 1:
            self.iopub.messages += [{"parent_header": {"msg_id": request}, "msg_type": "status",
                                     "content": {"execution_state": state}} for state in ("busy", "idle")]
        return request

    def _handle_kernel_info_reply(self, reply):
        self.handled = reply

    async def is_alive(self):
        return True


def test_connecting_waits_for_its_own_requests_idle_and_asks_again_when_iopub_missed_it():
    client = _IOPubLateClient()
    asyncio.run(connected(client, timeout=10))
    assert client.requests == ["request-0", "request-1"]
    assert client.handled["parent_header"]["msg_id"] == "request-1"
    assert client.iopub.messages == []  # read up to that request's idle, which was the last


def test_connecting_to_a_kernel_that_never_answers_is_a_clear_error():
    client = _IOPubLateClient()
    client.kernel_info = lambda: "lost"  # nothing ever comes back
    with pytest.raises(RuntimeError, match=r"the kernel did not answer in 0\.1 s"):
        asyncio.run(connected(client, timeout=0.1))


def test_a_reaped_kernels_pid_is_never_signalled_again(monkeypatch):
    ended = subprocess.Popen(["true"])
    ended.wait()
    # Once reaped, its pid may be another process's: as if it were, with a group and a child.
    monkeypatch.setattr(os, "getpgid", lambda pid: 424242)
    monkeypatch.setattr(processes, "children_by_parent", lambda: {ended.pid: [434343]})
    signalled = []
    monkeypatch.setattr(os, "killpg", lambda *args: signalled.append(("killpg", *args)))
    monkeypatch.setattr(os, "kill", lambda *args: signalled.append(("kill", *args)))
    km = SimpleNamespace(provisioner=SimpleNamespace(process=ended))
    for sandboxed in (True, False):
        processes.kill_kernel(km, None, sandboxed)
    assert signalled == []


def test_closing_stops_a_kernel_started_ahead_and_removes_its_workdir(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    before = _children()
    kernels = Kernels(Sandboxing(limits=FAST, hide=(tmp_path / "record",)))
    kernels.start_ahead()
    assert len(_children() - before) == 1 and len(list(tmp_path.glob("labgrader-work-*"))) == 1
    kernels.close()
    assert _children() == before
    assert list(tmp_path.iterdir()) == []  # its workdir and its job files


def test_a_record_dir_the_kernel_could_see_is_refused(tmp_path):
    with Kernels(Sandboxing(limits=FAST), notebooks=1) as kernels, kernels.kernel() as kernel:
        with pytest.raises(ValueError, match="visible to the kernel"):
            kernel.run(notebook("print(1)"), tmp_path / "record")


def test_the_kernel_imports_from_its_workdir_and_loads_no_debugger(tmp_path):
    ex = run(tmp_path, "open('helper.py', 'w').write('VALUE = 3')", "import helper\nprint(helper.VALUE)",
             "import debugpy")
    assert [c.status for c in ex.cells] == ["ok", "ok", "error"]
    assert saved(ex).cells[1].outputs[0]["text"] == "3\n"  # as under python -m ipykernel_launcher
    assert ex.cells[2].error.startswith(("ModuleNotFoundError", "ImportError"))
