"""One notebook through one kernel: the grader's set-up code, every code cell in order, the probe,
and the executed notebook written where the kernel cannot see it.

Each cell's ending is observed here (reply, timers, whether the kernel was lost) and put into words
by :func:`grader.execute.outcome.cell_outcome`; everything around a cell (the notebook's deadline,
the watchdog, what is not run after the run stopped) is this module's.
"""
from __future__ import annotations

import asyncio
import json
import os
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import nbformat
from nbclient.exceptions import DeadKernelError

from grader import sandbox
from grader.execute import outcome
from grader.execute.client import INTERRUPT_GRACE, STARTUP_TIMEOUT, GradingClient
from grader.results import CellRun, Execution
from reference import atomic

if TYPE_CHECKING:
    from grader.execute.kernels import Kernel

WATCHDOG_SLACK = 20.0  # beyond the cell timeout + grace: the executor itself must be stuck


async def run_notebook(kernel: Kernel, nb, record_dir: Path, prelude: str,
                       epilogue: str | Callable[[], str], t0: float) -> Execution:
    """See :meth:`grader.execute.kernels.Kernel.run`; ``t0``: when the notebook's time started."""
    run = _NotebookRun(kernel, nbformat.from_dict(json.loads(json.dumps(nb))), t0)  # our own copy
    record_dir.mkdir(parents=True, exist_ok=True)
    try:
        await run.start(prelude)
        await run.cells()
        await run.probe(epilogue)
    except Exception as e:  # noqa: BLE001 - the machinery's failure becomes the notebook's reason
        run.failed(e)
    finally:
        await kernel.stop(run.client)
    return run.execution(record_dir)


class _NotebookRun:
    def __init__(self, kernel: Kernel, nb, t0: float):
        self.kernel, self.nb, self.t0 = kernel, nb, t0
        self.limits = kernel.limits
        self.killed: list[str] = []
        self.cell_runs: dict[int, CellRun] = {}
        self.status, self.reason = "completed", None
        self.probe_error: str | None = None
        self.kernel_alive = False
        self.stopped = False  # no later cell runs
        self._hand_over_workdir()
        self.client = GradingClient(
            nb, kernel.km, output_bytes=self.limits.output_bytes, killer=self.kill, allow_errors=True,
            interrupt_on_timeout=True, timeout=int(self.limits.cell_timeout),
            startup_timeout=STARTUP_TIMEOUT, iopub_timeout=4, raise_on_iopub_timeout=False,
            record_timing=False, coalesce_streams=True, kernel_name=sandbox.KERNEL_NAME,
            resources={"metadata": {"path": str(kernel.workdir)}})

    def kill(self, why: str) -> None:
        self.killed.append(why)
        self.kernel.kill()

    def _hand_over_workdir(self) -> None:
        """What the caller put in the workdir since the kernel started becomes the job uid's."""
        if self.kernel.root:
            uid = self.kernel.sandboxing.uid
            workdir = self.kernel.workdir
            for path in [workdir, *[p for p in workdir.rglob("*") if not p.is_symlink()]]:
                os.chown(path, uid, uid)

    async def start(self, prelude: str) -> None:
        try:
            await asyncio.wait_for(self.client.async_start_new_kernel_client(), STARTUP_TIMEOUT + 5)
        except Exception as e:
            raise RuntimeError(self.kernel.did_not_start(e)) from None
        self.kernel_alive = True
        if prelude.strip():
            reply = await self.client.run_trusted(prelude, self.limits.cell_timeout)
            if reply is None or reply["content"].get("status") != "ok":
                error = outcome.reply_error(reply)[0] if reply else "no reply"
                raise RuntimeError(f"the grader's set-up code failed in the kernel: {error}")

    async def cells(self) -> None:
        deadline = self.t0 + self.limits.notebook_timeout
        for index, cell in enumerate(self.nb.cells):
            if cell.cell_type == "code":
                head = outcome.first_line(cell.source)
                left = deadline - time.monotonic()
                self.cell_runs[index] = self._skipped(index, cell, head, left) or self._record(
                    outcome.cell_outcome(await self._observe(index, cell, head, left), self.limits))

    def _skipped(self, index: int, cell, head: str, left: float) -> CellRun | None:
        """The record of a cell that is not sent to the kernel: after the run stopped, an empty
        one, or one the notebook's time does not reach. None: the cell runs."""
        if self.stopped:
            return CellRun(index, "not-run", source_head=head)
        if not cell.source.strip():
            return CellRun(index, "ok", source_head=head)
        if left <= 1:
            self.status, self.stopped = "timeout", True
            self.reason = (f"the notebook time limit ({self.limits.notebook_timeout:g} s) was reached "
                           f"before cell {index + 1}")
            return CellRun(index, "not-run", source_head=head)
        return None

    def _record(self, result: outcome.CellOutcome) -> CellRun:
        if result.status is not None:
            self.status, self.reason = result.status, result.reason
        self.stopped = result.stops
        self.kernel_alive = self.kernel_alive and not result.kernel_lost
        return result.cell

    async def _observe(self, index: int, cell, head: str, left: float) -> outcome.CellEnding:
        """Run one cell, within its time and a watchdog's, and say how it ended."""
        client = self.client
        per_cell = min(self.limits.cell_timeout, left)
        client.timeout, client.timed_out = max(1, int(per_cell)), False
        replies: list[dict] = []
        client.on_cell_executed = lambda cell, cell_index, execute_reply: replies.append(execute_reply)
        started = time.monotonic()
        watchdog = asyncio.get_running_loop().call_later(
            per_cell + INTERRUPT_GRACE + WATCHDOG_SLACK, self.kill, "watchdog")
        died = False
        try:
            await asyncio.wait_for(
                client.async_execute_cell(cell, index, execution_count=client.code_cells_executed + 1),
                per_cell + INTERRUPT_GRACE + 2 * WATCHDOG_SLACK)
        except (DeadKernelError, asyncio.TimeoutError, asyncio.CancelledError) as e:
            if isinstance(e, asyncio.CancelledError) and not self.killed:
                raise
            died = True
        finally:
            watchdog.cancel()
        images = sum(1 for o in cell.get("outputs", [])
                     if o.get("output_type") in ("display_data", "execute_result")
                     and any(k.startswith("image/") for k in o.get("data", {})))
        by_watchdog = "watchdog" in self.killed
        return outcome.CellEnding(
            index=index, head=head, seconds=round(time.monotonic() - started, 3), images=images,
            reply=replies[-1] if replies else None, timeout=client.timeout,
            over_notebook=per_cell < self.limits.cell_timeout, output_truncated=client.output_truncated,
            timed_out=client.timed_out, killed_after_interrupt=client.killed_after_interrupt, died=died,
            watchdog=by_watchdog, exit_reason=self.kernel.exit_reason() if died and not by_watchdog else None)

    async def probe(self, epilogue: str | Callable[[], str]) -> None:
        """Run the grader's epilogue (the probe) if the kernel is still there."""
        if not self.kernel_alive:
            return
        code = epilogue
        if callable(epilogue):
            try:  # in a thread: it may wait for what the grader is still loading
                code = await asyncio.get_running_loop().run_in_executor(None, epilogue)
            except Exception as e:  # noqa: BLE001
                self.probe_error = f"the grader could not prepare its probe: {type(e).__name__}: {e}"
                return
        if not code.strip():
            return
        reply = await self.client.run_trusted(code, self.limits.cell_timeout)
        if reply is None:
            self.probe_error = "the grader's probe got no reply (timed out or the kernel died)"
        elif reply["content"].get("status") != "ok":
            error, trace = outcome.reply_error(reply)
            self.probe_error = error + ("\n" + trace if trace else "")

    def failed(self, error: Exception) -> None:
        self.status = "not-run" if not self.cell_runs else "kernel-died"
        if isinstance(error, RuntimeError):
            self.reason = str(error)
        else:
            self.reason = (f"{type(error).__name__}: {error}\n"
                           + "".join(traceback.format_exception(error)[-3:]))

    def execution(self, record_dir: Path) -> Execution:
        cells = {run.index: run for run in outcome.not_run(self.nb)} | self.cell_runs
        executed: Path | None = record_dir / "executed.ipynb"
        reason = self.reason
        try:
            atomic.write(executed, nbformat.writes(self.nb))
        except Exception as e:  # noqa: BLE001
            executed = None
            reason = (reason + "; " if reason else "") + f"could not save the executed notebook: {e}"
        if self.status == "completed" and reason is None:
            timeouts = [c.number for c in cells.values() if c.status == "timeout"]
            if timeouts:
                reason = "cells timed out and were interrupted: " + ", ".join(map(str, sorted(timeouts)))
        return Execution(
            status=self.status, cells=tuple(cells[i] for i in sorted(cells)), isolation=self.kernel.isolation,
            seconds=round(time.monotonic() - self.t0, 3), reason=reason,
            output_truncated=self.client.output_truncated, network_blocked=outcome.network_blocked(self.nb, cells),
            executed_notebook=executed, workdir=self.kernel.workdir, probe_error=self.probe_error,
            preloaded=self.kernel.sandboxing.preload)
