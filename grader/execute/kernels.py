"""Sandboxed kernels and the pool that starts them ahead: the kernel side of the execute stage.

A :class:`Kernel` is one sandboxed kernel (:mod:`grader.sandbox`) with its job directory (connection
files, the probe's channel), its resource box (:mod:`grader.cgroups`) and its work dir; it runs one
notebook (:func:`grader.execute.run.run_notebook`) and is then stopped and its files removed.
:class:`Kernels` hands them out, each started before its notebook is ready for it.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import nbformat
import zmq.asyncio

from grader import cgroups, sandbox
from grader.execute import outcome, processes
from grader.execute.client import STARTUP_TIMEOUT, connected
from grader.execute.run import run_notebook
from grader.limits import Limits
from grader.results import Execution

if TYPE_CHECKING:
    from multiprocessing.sharedctypes import Synchronized

    from grader.execute.client import GradingClient

# What the lab's notebooks import first, and what a kernel started ahead loads while it waits: 3.0 s
# of the lab's first cell on a 2-core machine, off each notebook's path.
PRELOAD = ("torch", "torchvision", "matplotlib.pyplot")
BWRAP_EXIT_WAIT = 5.0  # seconds bwrap gets to reap its killed sandbox and exit before it is killed too


@dataclass(frozen=True)
class Sandboxing:
    """How every kernel of a process is confined and started: the same for each notebook it runs.

    ``hide``: host paths the kernel must not see, besides the ``grader``/``reference`` packages and
    the checkout holding them. The bubblewrap sandbox shows nothing of the host but what the kernel
    needs, so these are covered where they fall inside what it binds (the dataset root, the
    interpreter's directories). It must cover where runs are recorded: a kernel started ahead does
    not know yet which notebook, and so which record directory, it will get.
    ``uid``: the job's unprivileged uid (one per concurrent job: RLIMIT_NPROC counts per uid).
    ``isolation``: ``auto`` (bubblewrap when it works here), ``bubblewrap`` or ``subprocess``.
    ``preload``: modules each kernel imports as it starts (:data:`PRELOAD`, or none for a cold
    kernel), before its notebook is handed to it: see :func:`grader.sandbox.kernel_argv`.
    ``scratch``: where kernels' work and job directories go (None: the temporary directory). A Dask
    worker gives its own directory, which Dask removes however the worker ends: a killed worker's
    kernels leave nothing behind once a worker starts again on that node.
    ``datasets``: the only folders of ``data_root`` a kernel sees, each at ``./data/<name>`` (none:
    all of it at ``./data``). A batch shows its own dataset only, so that a notebook reading another
    one fails alike wherever it is graded, whatever else that machine has provisioned.
    """

    data_root: Path | None = None
    limits: Limits = Limits()
    hide: tuple[Path, ...] = ()
    uid: int = 65534
    isolation: str = "auto"
    preload: tuple[str, ...] = ()
    scratch: Path | None = None
    datasets: tuple[str, ...] = ()


class Kernels:
    """A process's sandboxed kernels, each started before the notebook it will run is ready for it.

    A kernel takes about a second to start: an interpreter, ipykernel's imports and set-up, all in
    its own process. Started ahead, while this process loads the dataset or judges the previous
    notebook, that second is off the next notebook's path. Kernel managers' ZMQ sockets belong to
    the event loop that made them, so one loop serves all of the process's kernels.

    ``notebooks``: how many notebooks will run, when known: no kernel is started ahead past the
    last. Processes that run one batch between them share the count as a ``multiprocessing.Value``.
    ``workdir``: the kernels' working directory, kept; by default each kernel gets a new one,
    deleted with it.
    """

    def __init__(self, sandboxing: Sandboxing, notebooks: int | Synchronized | None = None, workdir: Path | None = None):
        self.sandboxing = sandboxing
        self._left = _OwnCount(notebooks) if isinstance(notebooks, int) else notebooks
        self._workdir = workdir
        self._loop = asyncio.new_event_loop()
        self._ahead: Kernel | None = None

    def start_ahead(self) -> None:
        """Start the next notebook's kernel now, unless one is waiting or no notebook is left."""
        if self._ahead is None and self._count_kernel():
            self._ahead = Kernel(self._loop, self.sandboxing, self._workdir)

    def wait_ready(self) -> None:
        """Wait until the kernel started ahead answers: for a process's first kernel, whose
        start-up nothing else can hide, so that it is paid once, with the process's own set-up."""
        if self._ahead is not None:
            self._ahead.wait_ready()

    @contextlib.contextmanager
    def kernel(self) -> Iterator[Kernel]:
        """The kernel started ahead, or a new one; stopped, and its files removed, on leaving."""
        kernel, self._ahead = self._ahead, None
        if kernel is not None and kernel.exited():  # it died waiting: no notebook should pay for that
            kernel.close()
            kernel = None
        if kernel is None:
            self._count_kernel()  # a notebook always gets its kernel, counted or not
            kernel = Kernel(self._loop, self.sandboxing, self._workdir)
        if kernel.mode == sandbox.BUBBLEWRAP and self._workdir is None:
            # The next notebook's kernel starts now and does its imports while this one's cells run
            # (measured: started only once this kernel stopped, a warm kernel made each further
            # notebook wait 4 s for its imports). Only where the two cannot reach each other: each in
            # a pid, IPC and network namespace and a work dir of its own. Without namespaces both
            # would run as the job's uid, each able to signal or trace the other.
            self.start_ahead()
        try:
            yield kernel
        finally:
            kernel.close()

    def _count_kernel(self) -> bool:
        """Count one more kernel started; False when every notebook has had one already."""
        if self._left is None:
            return True
        with self._left.get_lock():
            if self._left.value <= 0:
                return False
            self._left.value -= 1
            return True

    def close(self) -> None:
        if self._ahead is not None:
            self._ahead.close()
            self._ahead = None
        if not self._loop.is_closed():
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            self._loop.run_until_complete(self._loop.shutdown_default_executor())
            self._loop.close()

    def __enter__(self) -> Kernels:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class _OwnCount:
    """A count of notebooks left that only this process uses: ``multiprocessing.Value``'s interface
    without its shared memory."""

    def __init__(self, value: int):
        self.value = value

    def get_lock(self) -> contextlib.nullcontext:
        return contextlib.nullcontext()


class Kernel:
    """One sandboxed kernel, started at once and waiting for the one notebook :meth:`run` gives it.

    ``workdir``: its working directory, kept; None: a new temporary one, deleted by :meth:`close`
    (as root, a tmpfs of ``Limits.tmp_bytes``, unmounted by :meth:`close`: read what the notebook
    left there before closing). ``channel_dir``: a directory of the grader's that the kernel can read
    but never write, at ``inner_channel_dir`` as the kernel sees it. ``isolation``: what the kernel
    has, as the result records it (:func:`sandbox.isolation_label`).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, sandboxing: Sandboxing, workdir: Path | None):
        self.sandboxing = sandboxing
        self.limits = sandboxing.limits
        self._loop = loop
        # TemporaryDirectory, not mkdtemp + rmtree: its clean-up also removes what a notebook left
        # without write permission.
        self._own_workdir = None if workdir else tempfile.TemporaryDirectory(
            prefix="labgrader-work-", dir=sandboxing.scratch, ignore_cleanup_errors=True)
        self.workdir = Path(workdir or self._own_workdir.name).resolve()
        self.km = None
        self.sweep_uid: int | None = None
        self._job: Path | None = None
        self._log = None
        self._used = self._stopped = False
        self._tmpfs = False  # whether the workdir is a tmpfs of its own, unmounted by close()
        # The grader's read-only directory for the kernel: its host path, and the path the kernel sees.
        self.channel_dir: Path | None = None
        self.inner_channel_dir: str | None = None
        self.failure: str | None = None  # why it could not start; its notebook is then not run
        self.mode: str | None = None
        self.box: cgroups.Box | None = None
        try:
            self.mode, self._why = sandbox.choose_mode(sandboxing.isolation)
        except Exception as e:  # bubblewrap demanded but unavailable
            self.isolation, self.failure = "none", str(e)
            return
        self.root = os.geteuid() == 0  # and so the kernel runs as the job's uid
        if self.mode == sandbox.SUBPROCESS and self.root and not sandbox.reachable_by_others(sys.executable):
            self.root = False  # cannot drop to the job uid without namespaces: the label says so
            self._why += f"; runs as root: the interpreter is not reachable for uid {sandboxing.uid}"
        self.isolation = self._label("work dir not made")
        try:
            loop.run_until_complete(self._launch())
        except Exception as e:  # noqa: BLE001 - becomes the notebook's reason, never an escape
            self.failure = self.did_not_start(e)

    def _label(self, work_dir: str) -> str:
        return sandbox.isolation_label(self.mode, self._why, job_uid=self.root, work_dir=work_dir)

    def _hold_workdir(self) -> str:
        """Make the workdir; as root, one of its own is a size-capped tmpfs (the notebook's files in
        RAM, at most ``tmp_bytes`` of them). Says how it is held, for the isolation label."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() != 0:
            return sandbox.work_dir_phrase(None, "needs root")
        if self._own_workdir is None:
            return sandbox.work_dir_phrase(None, "kept for the caller")
        owner = self.sandboxing.uid if self.root else 0
        problem = sandbox.mount_tmpfs(self.workdir, self.limits.tmp_bytes, owner, owner)
        self._tmpfs = problem is None
        return sandbox.work_dir_phrase(self.limits.tmp_bytes if self._tmpfs else None, problem)

    async def _launch(self) -> None:
        from jupyter_client.kernelspec import KernelSpecManager
        from jupyter_client.manager import AsyncKernelManager

        s = self.sandboxing
        uid, gid = (s.uid, s.uid) if self.root else (os.getuid(), os.getgid())
        self.isolation = self._label(self._hold_workdir())
        # Where no box can be made (not root, no delegated cgroup) the rlimits stay, and the label says
        # so; `labgrader doctor` says why.
        self.box = cgroups.create("kernel", memory_bytes=self.limits.box_memory_bytes,
                                  pids=self.limits.processes, cpu_weight=cgroups.DEFAULT_CPU_WEIGHT)
        self.isolation += "; " + (self.box.describe() if self.box else "no resource box (rlimits only)")
        mounts = [self.workdir]
        if s.data_root is not None and self.mode == sandbox.BUBBLEWRAP:
            (self.workdir / "data").mkdir(exist_ok=True)  # mount points for the read-only data
            for name in s.datasets:
                (self.workdir / "data" / name).mkdir()
            if s.datasets:
                # Not a mount of its own, so not read-only: closed to writes instead (binding it
                # read-only from the work dir's host path is not possible where that path is one a
                # closed ancestor hides, as a root job's tmpfs work dir is).
                (self.workdir / "data").chmod(0o555)
            else:
                mounts.append(self.workdir / "data")
        if self.root:  # what the notebook finds in it later is handed over when it runs
            for p in mounts:
                os.chown(p, uid, gid)
        self._job = job = Path(tempfile.mkdtemp(prefix="lg-", dir=_job_parent(s.scratch)))
        os.chmod(job, 0o711)
        ipc = job / "ipc"
        ipc.mkdir(mode=0o700)
        if self.root:
            os.chown(ipc, uid, gid)
        self.channel_dir = job / "channel"  # the grader's: the job's uid can read it, never write
        self.channel_dir.mkdir()
        self.channel_dir.chmod(0o755)
        self.inner_channel_dir = (sandbox.INNER_CHANNEL_DIR if self.mode == sandbox.BUBBLEWRAP
                                  else str(self.channel_dir))
        config = sandbox.SandboxConfig(
            workdir=str(self.workdir), ipc_dir=str(ipc), mode=self.mode,
            data_root=str(Path(s.data_root).resolve()) if s.data_root is not None else None, datasets=s.datasets,
            hide=tuple(str(Path(h).resolve()) for h in s.hide), channel_dir=str(self.channel_dir),
            cgroup_procs=self.box.procs_files if self.box else (),
            uid=uid, gid=gid, drop_uid=self.root,
            memory_bytes=self.limits.memory_bytes, processes=self.limits.processes,
            file_size_bytes=self.limits.file_size_bytes, tmp_bytes=self.limits.tmp_bytes,
            cpu_seconds=int(self.limits.cpu_seconds or self.limits.notebook_timeout + 60),
            threads=self.limits.threads, preload=s.preload)
        specdir = job / "kernels" / sandbox.KERNEL_NAME
        specdir.mkdir(parents=True)
        (job / "kernels").chmod(0o700)
        (specdir / "kernel.json").write_text(json.dumps({
            "argv": sandbox.kernel_command(config), "display_name": "labgrader sandbox",
            "language": "python", "interrupt_mode": "message", "env": {}}))
        (job / "runtime").mkdir(mode=0o700)
        self._log = open(job / "kernel.log", "wb")  # the kernel's own stderr (size capped by RLIMIT_FSIZE)
        ksm = KernelSpecManager(kernel_dirs=[str(job / "kernels")], ensure_native_kernel=False)
        # A ZMQ context of ours: the manager destroys one it made itself with 100 ms of linger,
        # measured as half of each kernel's shutdown; :func:`_shutdown` destroys this one at once.
        self.km = AsyncKernelManager(kernel_name=sandbox.KERNEL_NAME, kernel_spec_manager=ksm,
                                     transport="ipc", ip=str(ipc / "k"), context=zmq.asyncio.Context(),
                                     connection_file=str(job / "runtime" / "connection.json"))
        # Without a pid namespace, processes the kernel left behind are found by uid; only a
        # dedicated job uid is swept (65534 may be shared with unrelated processes).
        job_uid = s.uid if self.root else None
        self.sweep_uid = job_uid if self.mode == sandbox.SUBPROCESS and job_uid not in (None, 0, 65534) else None
        await asyncio.wait_for(self.km.start_kernel(stdout=subprocess.DEVNULL, stderr=self._log,
                                                    stdin=subprocess.DEVNULL), STARTUP_TIMEOUT)

    def wait_ready(self) -> None:
        """Wait until the kernel answers a request; one that does not is failed, as if it had not
        started, and its notebook is given the reason."""
        if self.failure is None:
            try:
                self._loop.run_until_complete(self._answer())
            except Exception as e:  # noqa: BLE001 - becomes the notebook's reason, never an escape
                self.failure = self.did_not_start(e)

    async def _answer(self) -> None:
        client = self.km.client()
        client.start_channels()
        try:
            await connected(client, STARTUP_TIMEOUT)
        finally:
            client.stop_channels()

    def did_not_start(self, error: Exception) -> str:
        code = processes.returncode(self.km) if self.km is not None and self.km.has_kernel else None
        tail = ""
        if self._log is not None:
            self._log.flush()
            tail = (self._job / "kernel.log").read_bytes()[-1500:].decode("utf-8", "replace").strip()
        return (f"the kernel did not start ({type(error).__name__}: {error})"
                + (f"; {self.exit_reason()}" if code is not None else "")
                + (f"; its last words: {tail}" if tail else ""))

    def exit_reason(self) -> str:
        """Why the kernel's process ended, naming the resource box's limit when it was hit."""
        why = outcome.exit_reason(processes.returncode(self.km))
        hit = self.box.limits_hit() if self.box is not None else None
        return f"{hit} ({why})" if hit else why

    def kill(self) -> None:
        processes.kill_kernel(self.km, self.sweep_uid, self.mode == sandbox.BUBBLEWRAP)

    def exited(self) -> bool:
        """Whether the kernel's process has ended (it never started counts as not exited: the
        notebook is then given the reason)."""
        process = processes.kernel_process(self.km)
        return process is not None and process.poll() is not None

    def run(self, notebook: nbformat.NotebookNode, record_dir: Path, *, prelude: str = "",
            epilogue: str | Callable[[], str] = "") -> Execution:
        """Run ``notebook`` cell by cell, and write it, executed, into ``record_dir``, which
        ``Sandboxing.hide`` must cover.

        ``prelude`` runs before the first cell and ``epilogue`` after the last (unless the kernel
        died); neither is recorded as a cell nor saved. ``epilogue`` may be a function that returns
        the code: it is called only once the cells have run, so what it puts in the workdir is not
        there while they run."""
        t0 = time.monotonic()
        record_dir = Path(record_dir).resolve()
        if not any(record_dir.is_relative_to(Path(h).resolve()) for h in self.sandboxing.hide):
            raise ValueError(f"{record_dir} would be visible to the kernel: Sandboxing.hide must cover it")
        if self._used:
            raise RuntimeError("a kernel runs one notebook")
        self._used = True
        if self.failure is not None:
            return Execution(status="not-run", cells=outcome.not_run(notebook), isolation=self.isolation,
                             seconds=0.0, reason=self.failure, workdir=self.workdir)
        try:
            return self._loop.run_until_complete(
                run_notebook(self, notebook, record_dir, prelude, epilogue, t0))
        except BaseException as e:  # noqa: BLE001 - never let the machinery's errors escape
            if isinstance(e, KeyboardInterrupt):
                raise
            return Execution(status="not-run", cells=outcome.not_run(notebook), isolation=self.isolation,
                             seconds=time.monotonic() - t0, workdir=self.workdir,
                             reason=f"the grader could not run the notebook: {type(e).__name__}: {e}")
        finally:
            self._cancel_leftover_tasks()

    async def stop(self, client: GradingClient | None = None) -> None:
        if not self._stopped and self.km is not None:
            self._stopped = True
            await _shutdown(client, self.km, self.sweep_uid, self.mode == sandbox.BUBBLEWRAP)

    def close(self) -> None:
        """Stop the kernel if it still runs and remove its files (and its workdir, if its own)."""
        try:
            if not self._loop.is_closed():
                self._loop.run_until_complete(self.stop())
                self._cancel_leftover_tasks()
        finally:
            if self._log is not None:
                self._log.close()
            if self.box is not None:  # after the kernel: whatever it left running in the box goes too
                self.box.remove()
            if self._job is not None:
                shutil.rmtree(self._job, ignore_errors=True)
            if self._tmpfs:
                with contextlib.suppress(OSError):
                    sandbox.unmount(self.workdir)
            if self._own_workdir is not None:
                self._own_workdir.cleanup()

    def _cancel_leftover_tasks(self) -> None:
        # What asyncio.run does on leaving: tasks nbclient leaves behind are cancelled, not left
        # pending on the loop the next kernel uses.
        leftover = asyncio.all_tasks(self._loop)
        for task in leftover:
            task.cancel()
        if leftover:
            self._loop.run_until_complete(asyncio.gather(*leftover, return_exceptions=True))


# A Unix socket's path has at most 107 bytes, and a job directory holds the kernel's sockets and the
# probe's: "<parent>/lg-XXXXXXXX/channel/probe-<16 hex digits>.sock" adds 50 to its parent's path.
# A long TMPDIR (pytest's, a deep home directory) made the kernel or the probe fail to start.
_SOCKET_PATH_MAX = 107
_JOB_PATH_EXTRA = 50


def _job_parent(scratch: Path | None) -> str:
    """Where a kernel's job directory goes: ``scratch`` or the usual temporary directory, unless its
    path leaves the sockets inside too little room; then /tmp."""
    parent = str(scratch or tempfile.gettempdir())
    return parent if len(os.fsencode(parent)) + _JOB_PATH_EXTRA <= _SOCKET_PATH_MAX else "/tmp"


async def _shutdown(client: GradingClient | None, km, uid: int | None, sandboxed: bool) -> None:
    """Kill the kernel, reap it and release its sockets and files. ``client``: None for a kernel
    started ahead that never ran a notebook.

    Not jupyter_client's ``shutdown_kernel(now=True)``: it first sends the kernel an interrupt
    request on the control socket, which a killed kernel never reads, and that socket closes with
    100 ms of linger, so destroying the context waited 0.09 s for a message nobody would take."""
    if client is not None:
        client.stop()
    if sandboxed:  # the sandbox first, then bwrap has reaped it (see processes.kill_kernel)
        processes.kill_kernel(km, uid, sandboxed)
        await processes.exited(km, BWRAP_EXIT_WAIT)
    processes.kill_kernel(km, uid, sandboxed=False)  # whatever is left: bwrap itself, if it hung
    await processes.exited(km, BWRAP_EXIT_WAIT)
    with contextlib.suppress(Exception):
        if km.has_kernel:  # reaped by now: this closes its pipes and forgets it
            await asyncio.wait_for(km.provisioner.wait(), 1)
    with contextlib.suppress(Exception):
        await km.cleanup_resources()
    km.context.destroy(linger=0)
    if client is not None:
        with contextlib.suppress(Exception):
            client.zmq_context.destroy(linger=0)
