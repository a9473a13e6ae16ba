"""The execute stage: run one notebook cell by cell in a sandboxed kernel and record what happened.

The executor (nbclient's :class:`NotebookClient` driving an :class:`AsyncKernelManager`) runs here,
outside the sandbox; only the kernel is isolated (see :mod:`grader.sandbox`). Everything recorded
comes from the executor's own observation (replies, timings, the kernel process's exit status), and
the executed notebook is written by the executor into ``record_dir``, which the kernel cannot see.

Guarantees, whatever the notebook does:

* every code cell gets a :class:`CellRun` (``ok``/``error``/``timeout``/``kernel-died``/``not-run``);
* a cell longer than ``cell_timeout`` is interrupted, and killed (the kernel's whole process group,
  SIGKILL) when it ignores the interrupt for ``INTERRUPT_GRACE`` seconds; the notebook as a whole
  has ``notebook_timeout``; and a last watchdog kills the kernel if the executor itself is stuck;
* output is counted as it arrives; past ``output_bytes`` it is dropped, a note says so, and the
  kernel is stopped. ZMQ's per-message size cap and receive queue bound the executor's memory even
  against a kernel that sends huge messages on purpose;
* exceptions of the machinery never escape: they become an :class:`Execution` with a ``reason``.

The entry point: ``Kernels(sandboxing).kernel()`` gives a started :class:`Kernel`, whose
``run(notebook, record_dir, prelude=..., epilogue=...)`` returns the :class:`Execution`;
:func:`execute` does both for one notebook. Inside, by job:

* :mod:`~grader.execute.kernels`: the sandboxed kernel and the pool that starts kernels ahead;
* :mod:`~grader.execute.client`: nbclient's client with the output cap and the interrupt-then-kill;
* :mod:`~grader.execute.run`: one notebook through one kernel, cell by cell;
* :mod:`~grader.execute.outcome`: pure functions from what was observed to the records;
* :mod:`~grader.execute.processes`: finding and killing a kernel's processes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import nbformat

from grader.execute.client import INTERRUPT_GRACE
from grader.execute.kernels import PRELOAD, Kernel, Kernels, Sandboxing
from grader.execute.processes import children_by_parent
from grader.limits import Limits
from grader.results import Execution

__all__ = ["INTERRUPT_GRACE", "PRELOAD", "Execution", "Kernel", "Kernels", "Limits", "Sandboxing",
           "children_by_parent", "execute"]


def execute(
    notebook: nbformat.NotebookNode,
    workdir: Path,
    record_dir: Path,
    *,
    data_root: Path | None = None,
    limits: Limits = Limits(),
    prelude: str = "",
    epilogue: str = "",
    hide: Sequence[Path] = (),
    uid: int = 65534,
    isolation: str = "auto",
    datasets: Sequence[str] = (),
) -> Execution:
    """Run ``notebook`` in a kernel of its own, with ``workdir`` (kept) as its working directory.

    ``record_dir`` is hidden from the kernel; the rest is as :meth:`Kernel.run` and
    :class:`Sandboxing` say. A process that runs many notebooks uses :class:`Kernels`."""
    sandboxing = Sandboxing(data_root, limits, (*hide, Path(record_dir)), uid, isolation, datasets=tuple(datasets))
    with Kernels(sandboxing, notebooks=1, workdir=Path(workdir)) as kernels, kernels.kernel() as kernel:
        return kernel.run(notebook, record_dir, prelude=prelude, epilogue=epilogue)
