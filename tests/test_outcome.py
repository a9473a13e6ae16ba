"""The executor's pure part: how a cell ended becomes its record and what it decides for the notebook.

Every ending the real-kernel tests in test_execute.py provoke (an error, an interrupt the cell obeyed
or ignored, a dead kernel, the watchdog, an output flood, the notebook's time running out) is here as
data, so each message and each consequence is pinned without starting a kernel.
"""
from __future__ import annotations

import signal

import pytest
from nbformat import v4

from grader.execute import outcome
from grader.execute.outcome import CellEnding, cell_outcome
from grader.limits import Limits
from grader.results import CellRun

LIMITS = Limits(cell_timeout=60, notebook_timeout=600, output_bytes=1000)


def ending(**facts) -> CellEnding:
    ok = {"content": {"status": "ok"}}
    base = dict(index=2, head="train(net)", seconds=1.5, images=1, reply=ok, timeout=60, over_notebook=False,
                output_truncated=False, timed_out=False, killed_after_interrupt=False, died=False,
                watchdog=False, exit_reason=None)
    return CellEnding(**(base | facts))


def test_an_ok_reply_is_an_ok_cell_that_decides_nothing():
    result = cell_outcome(ending(), LIMITS)
    assert (result.cell.status, result.cell.number, result.cell.images, result.cell.seconds) == ("ok", 3, 1, 1.5)
    assert (result.status, result.reason, result.stops, result.kernel_lost) == (None, None, False, False)


def test_an_error_reply_keeps_the_error_and_a_colourless_traceback():
    reply = {"content": {"status": "error", "ename": "NameError", "evalue": "name 'net' is not defined",
                         "traceback": ["\x1b[31mNameError\x1b[0m: name 'net' is not defined"]}}
    result = cell_outcome(ending(reply=reply), LIMITS)
    assert result.cell.status == "error"
    assert result.cell.error == "NameError: name 'net' is not defined"
    assert result.cell.traceback == "NameError: name 'net' is not defined"
    assert not result.stops and not result.kernel_lost  # later cells still run


def test_no_reply_at_all_is_an_error_naming_that():
    result = cell_outcome(ending(reply=None), LIMITS)
    assert result.cell.status == "error" and result.cell.error == "NoReply: execute reply status None"


def test_an_interrupted_cell_times_out_alone_and_the_run_goes_on():
    result = cell_outcome(ending(timed_out=True, reply={"content": {"status": "error"}}), LIMITS)
    assert result.cell.status == "timeout"
    assert result.cell.error == "CellTimeout: the cell was interrupted at the cell time limit (60 s)"
    assert (result.status, result.stops, result.kernel_lost) == (None, False, False)


def test_an_interrupt_at_the_notebooks_deadline_stops_the_run_with_the_kernel_alive():
    result = cell_outcome(ending(timed_out=True, over_notebook=True, timeout=12), LIMITS)
    assert result.cell.error == "CellTimeout: the cell was interrupted at the notebook time limit (600 s)"
    assert result.status == "timeout" and result.reason == "the notebook time limit (600 s) was reached in cell 3"
    assert result.stops and not result.kernel_lost  # the probe still runs


@pytest.mark.parametrize("how", [{"died": True}, {"killed_after_interrupt": True}])
def test_an_ignored_interrupt_kills_the_kernel_and_says_so(how):
    result = cell_outcome(ending(timed_out=True, timeout=60, **how), LIMITS)
    assert result.cell.status == "timeout"
    assert "ran longer than 60 s and did not stop when interrupted" in result.cell.error
    assert result.status == "timeout" and result.reason.startswith("cell 3: ")
    assert result.stops and result.kernel_lost


def test_a_dead_kernel_names_why_its_process_ended():
    why = outcome.exit_reason(-signal.SIGKILL)
    result = cell_outcome(ending(died=True, exit_reason=why), LIMITS)
    assert result.cell.status == "kernel-died" and result.cell.error == f"KernelDied: {why}"
    assert result.status == "kernel-died"
    assert result.reason == f"the kernel died during cell 3 ('train(net)'): {why}"
    assert result.stops and result.kernel_lost


def test_the_watchdog_is_blamed_as_a_timeout_not_as_the_students_crash():
    result = cell_outcome(ending(died=True, watchdog=True), LIMITS)
    assert result.cell.status == "timeout" and "watchdog" in result.cell.error
    assert result.status == "timeout" and result.kernel_lost


def test_an_output_flood_wins_over_everything_else_it_caused():
    result = cell_outcome(ending(output_truncated=True, died=True, timed_out=True), LIMITS)
    assert result.cell.status == "error" and result.cell.error.startswith("OutputLimitExceeded:")
    assert "more than 1000 bytes" in result.reason
    assert result.status == "output-limit" and result.stops and result.kernel_lost


@pytest.mark.parametrize("code, words", [
    (-signal.SIGKILL, "killed (memory, process or time limit"),
    (128 + signal.SIGXCPU, "CPU time limit reached (SIGXCPU)"),
    (-signal.SIGSEGV, "segmentation fault"),
    (3, "exited with code 3"),
    (None, "stopped answering"),
])
def test_exit_reasons(code, words):
    assert words in outcome.exit_reason(code)


def test_network_blocked_names_cells_by_their_jupyter_number():
    nb = v4.new_notebook(cells=[v4.new_markdown_cell("# Lab"), v4.new_code_cell("!wget http://x/helper.py"),
                                v4.new_code_cell("x = 1"), v4.new_code_cell("urlopen('http://x')")])
    nb.cells[3].outputs = [v4.new_output("error", ename="URLError", evalue="<urlopen error [Errno 101] "
                                         "Network is unreachable>", traceback=[])]
    cells = {run.index: run for run in outcome.not_run(nb)}
    cells[1] = CellRun(1, "error", error="NameError: x", source_head="!wget http://x/helper.py")
    cells[2] = CellRun(2, "ok", source_head="x = 1")
    assert outcome.network_blocked(nb, cells) == ("cell 2: !wget http://x/helper.py",
                                                  "cell 4: urlopen('http://x')")
