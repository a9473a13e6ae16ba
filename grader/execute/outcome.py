"""What the executor observed, put into words: pure functions from observations to records.

:func:`cell_outcome` turns how one cell ended (:class:`CellEnding`: the reply, the timers, whether the
kernel was lost) into its :class:`CellRun` and what it means for the rest of the notebook. Nothing here
talks to a kernel, so every ending (a timeout the kernel ignored, an output flood, a watchdog kill) is
unit-tested without one.
"""
from __future__ import annotations

import re
import signal
from dataclasses import dataclass
from typing import Any

from grader.limits import Limits
from grader.results import CellRun

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")
_NETWORK = re.compile(
    r"Network is unreachable|Temporary failure in name resolution|Name or service not known|"
    r"nodename nor servname|No route to host|Failed to establish a new connection|"
    r"Could not resolve host|unable to resolve host address|URLError|gaierror|"
    r"Failed to connect to|Connection refused|NewConnectionError|MaxRetryError|"
    r"Could not fetch URL|No matching distribution found|ConnectionError", re.I)
_DOWNLOAD = re.compile(r"^\s*[!%]\s*(pip|wget|curl|conda|apt)|download\s*=\s*True|urlretrieve|"
                       r"requests\.get|urlopen", re.M)
_SIGNAL_WHY = {
    "SIGKILL": "killed (memory, process or time limit, or the out-of-memory killer)",
    "SIGXCPU": "CPU time limit reached",
    "SIGXFSZ": "file size limit reached",
    "SIGSEGV": "segmentation fault",
    "SIGABRT": "aborted",
    "SIGBUS": "bus error",
}


@dataclass(frozen=True)
class CellEnding:
    """How one cell ended, as the executor saw it: facts only, no verdict."""

    index: int
    head: str  # the cell's first line
    seconds: float
    images: int  # image outputs it displayed
    reply: dict[str, Any] | None  # the kernel's execute_reply, when one came
    timeout: int  # seconds the cell was given
    over_notebook: bool  # that was the rest of the notebook's time, less than a cell's limit
    output_truncated: bool  # the output cap was passed (the kernel is then stopped)
    timed_out: bool  # the cell reached its timeout and was interrupted
    killed_after_interrupt: bool  # ...and ignored the interrupt, so the kernel was killed
    died: bool  # the executor lost the kernel
    watchdog: bool  # the grader's watchdog killed it (the executor stopped hearing from it)
    exit_reason: str | None  # why the kernel's process ended, when it died


@dataclass(frozen=True)
class CellOutcome:
    """A cell's record, and what it decides for the notebook: its status and reason when it ends
    the run (``stops``: no later cell runs), and whether the kernel is gone (no probe can run)."""

    cell: CellRun
    status: str | None = None
    reason: str | None = None
    stops: bool = False
    kernel_lost: bool = False


def cell_outcome(ending: CellEnding, limits: Limits) -> CellOutcome:
    e = ending

    def record(status: str, error: str | None = None, traceback: str | None = None) -> CellRun:
        return CellRun(e.index, status, e.seconds, error, traceback, e.images, e.head)

    number = e.index + 1
    if e.output_truncated:
        why = f"the notebook printed more than {limits.output_bytes} bytes of output; the kernel was stopped"
        return CellOutcome(record("error", f"OutputLimitExceeded: {why}"), "output-limit",
                           f"cell {number}: {why}", stops=True, kernel_lost=True)
    if e.timed_out and (e.died or e.killed_after_interrupt):
        why = f"the cell ran longer than {e.timeout} s and did not stop when interrupted; the kernel was killed"
        return CellOutcome(record("timeout", f"CellTimeout: {why}"), "timeout", f"cell {number}: {why}",
                           stops=True, kernel_lost=True)
    if e.died:
        if e.watchdog:
            why = "the grader's watchdog killed the kernel (the executor stopped hearing from it)"
            cell, status = record("timeout", f"CellTimeout: {why}"), "timeout"
        else:
            why = e.exit_reason or "the kernel stopped answering"
            cell, status = record("kernel-died", f"KernelDied: {why}"), "kernel-died"
        return CellOutcome(cell, status, f"the kernel died during cell {number} ({e.head!r}): {why}",
                           stops=True, kernel_lost=True)
    if e.timed_out:
        limit = (f"the notebook time limit ({limits.notebook_timeout:g} s)" if e.over_notebook
                 else f"the cell time limit ({limits.cell_timeout:g} s)")
        cell = record("timeout", f"CellTimeout: the cell was interrupted at {limit}")
        if e.over_notebook:
            return CellOutcome(cell, "timeout", f"{limit} was reached in cell {number}", stops=True)
        return CellOutcome(cell)
    status = (e.reply or {}).get("content", {}).get("status")
    if status == "ok":
        return CellOutcome(record("ok"))
    if status == "error":
        return CellOutcome(record("error", *reply_error(e.reply)))
    return CellOutcome(record("error", f"NoReply: execute reply status {status!r}"))


def exit_reason(code: int | None) -> str:
    """Why a kernel's process ended, from its exit status (None: it has not ended)."""
    if code is None:
        return "the kernel stopped answering"
    sig = -code if code < 0 else code - 128 if code > 128 else None
    if sig is None:
        return f"the kernel process exited with code {code} (os._exit / exit from a thread?)"
    try:
        name = signal.Signals(sig).name
    except ValueError:
        name = f"signal {sig}"
    return f"{_SIGNAL_WHY.get(name, 'killed by a signal')} ({name})"


def reply_error(reply: dict[str, Any] | None) -> tuple[str, str | None]:
    """An error reply as ``("Name: value", traceback without colours)``."""
    content = (reply or {}).get("content", {})
    ename, evalue = content.get("ename", "Error"), content.get("evalue", "")
    traceback = "\n".join(content.get("traceback") or [])
    return f"{ename}: {evalue}", strip_ansi(traceback) or None


def network_blocked(nb, cells: dict[int, CellRun]) -> tuple[str, ...]:
    """The cells that failed reaching the network (the sandbox has none), as ``cell N: first line``:
    their output names a network error, or they failed downloading something."""
    def blocked(index: int) -> bool:
        run = cells[index]
        if _NETWORK.search(_cell_text(nb.cells[index]) + (run.error or "")):
            return True
        return run.status == "error" and bool(_DOWNLOAD.search(nb.cells[index].source))
    return tuple(f"cell {cells[i].number}: {cells[i].source_head}" for i in sorted(cells) if blocked(i))


def not_run(nb) -> tuple[CellRun, ...]:
    """Every code cell of ``nb``, not run."""
    return tuple(CellRun(index=i, status="not-run", source_head=first_line(c.source))
                 for i, c in enumerate(nb.cells) if c.cell_type == "code")


def first_line(source: str) -> str:
    for line in source.splitlines():
        if line.strip():
            return line.strip()[:120]
    return ""


def strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


def _cell_text(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream":
            parts.append(str(out.get("text", ""))[-20000:])
        elif out.get("output_type") == "error":
            parts.append(f"{out.get('ename')}: {out.get('evalue')}")
            parts.append(strip_ansi("\n".join(out.get("traceback", [])))[-20000:])
    return "\n".join(parts)
