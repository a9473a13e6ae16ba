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
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import sys
import subprocess
import tempfile
import time
import traceback as _tb
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import nbformat

from grader import cgroups, sandbox
from grader.results import CellRun, Execution

if TYPE_CHECKING:
    from multiprocessing.sharedctypes import Synchronized

INTERRUPT_GRACE = 5.0  # seconds a timed-out cell gets to stop after the interrupt
STARTUP_TIMEOUT = 60.0  # seconds for the kernel to start and answer
WATCHDOG_SLACK = 20.0  # beyond the cell timeout + grace: the executor itself must be stuck
BWRAP_EXIT_WAIT = 5.0  # seconds bwrap gets to reap its killed sandbox and exit before it is killed too
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")
_NETWORK = re.compile(
    r"Network is unreachable|Temporary failure in name resolution|Name or service not known|"
    r"nodename nor servname|No route to host|Failed to establish a new connection|"
    r"Could not resolve host|unable to resolve host address|URLError|gaierror|"
    r"Failed to connect to|Connection refused|NewConnectionError|MaxRetryError|"
    r"Could not fetch URL|No matching distribution found|ConnectionError", re.I)


@dataclass(frozen=True)
class Limits:
    """Resource limits for one notebook. ``memory_bytes`` is *virtual* address space per process
    (RLIMIT_AS): importing torch + torchvision + matplotlib and a small CNN training peaks near
    3.4 GiB virtual (0.95 GiB resident) on this build, so 6 GiB leaves margin. Per process, it does
    not stop a notebook of many processes, nor files in tmpfs: where a resource box can be made
    (:mod:`grader.cgroups`), ``box_memory_bytes`` caps the resident memory of all the kernel's
    processes together, its tmpfs files included (``/tmp``, ``/dev/shm`` and a tmpfs work dir:
    3 x ``tmp_bytes`` at most), and ``processes`` its tasks. ``processes`` is also RLIMIT_NPROC,
    which counts threads too (an idle ipykernel has about 10; with torch about 15)."""

    cell_timeout: float = 300
    notebook_timeout: float = 1800
    memory_bytes: int = 6 << 30
    box_memory_bytes: int = 4 << 30
    processes: int = 256
    file_size_bytes: int = 256 << 20
    tmp_bytes: int = 512 << 20
    output_bytes: int = 2_000_000
    threads: int = 1
    cpu_seconds: int | None = None  # default: notebook_timeout + 60


class _Stop(Exception):
    """Internal: the run ends here (kernel dead, killed, or out of time)."""


def _strip(text: str | None) -> str | None:
    return None if text is None else _ANSI.sub("", text)


def _first_line(source: str) -> str:
    for line in source.splitlines():
        if line.strip():
            return line.strip()[:120]
    return ""


def _size(msg: dict[str, Any]) -> int:
    """Bytes a kernel message adds: its content's strings by length, anything else 8, and its binary
    buffers (widgets send data there). A loop, not recursion: the kernel can send content nested
    as deep as the JSON parser allows, which is deeper than the rest of the stack leaves room for."""
    total = sum(memoryview(buffer).nbytes for buffer in msg.get("buffers") or ())
    pending = [msg["content"]]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            total += len(item)
        elif isinstance(item, dict):
            total += sum(len(str(key)) for key in item)
            pending.extend(item.values())
        elif isinstance(item, (list, tuple)):
            pending.extend(item)
        else:
            total += 8
    return total


def _exit_reason(code: int | None) -> str:
    if code is None:
        return "the kernel stopped answering"
    sig = None
    if code < 0:
        sig = -code
    elif code > 128:
        sig = code - 128
    if sig is not None:
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        why = {
            "SIGKILL": "killed (memory, process or time limit, or the out-of-memory killer)",
            "SIGXCPU": "CPU time limit reached",
            "SIGXFSZ": "file size limit reached",
            "SIGSEGV": "segmentation fault",
            "SIGABRT": "aborted",
            "SIGBUS": "bus error",
        }.get(name, "killed by a signal")
        return f"{why} ({name})"
    return f"the kernel process exited with code {code} (os._exit / exit from a thread?)"


def _make_client_class():
    """Build the NotebookClient subclass lazily (keeps imports light for callers)."""
    import zmq
    import zmq.asyncio
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionComplete, DeadKernelError

    class GradingClient(NotebookClient):
        """NotebookClient that caps output, kills on ignored interrupts, and records timeouts."""

        def __init__(self, nb, km, *, output_bytes: int, killer, **kw):
            super().__init__(nb, km=km, **kw)
            self.output_cap = output_bytes
            self.output_seen = 0
            self.output_truncated = False
            self.timed_out = False
            self.killed_after_interrupt = False
            self._killer = killer
            # Bound what one message and the receive queue can cost this process.
            self.zmq_context = zmq.asyncio.Context()
            self.zmq_context.setsockopt(zmq.MAXMSGSIZE, output_bytes + (4 << 20))
            self.zmq_context.setsockopt(zmq.RCVHWM, 64)
            self.zmq_context.setsockopt(zmq.LINGER, 0)
            self.closing = False
            self.current_cell = None

        async def async_start_new_kernel_client(self):
            self.kc = self.km.client(context=self.zmq_context)
            self.kc.start_channels()
            # A message over MAXMSGSIZE makes ZMQ drop the connection (and silently reconnect):
            # watch for that, it means the kernel sent more output than the cap at once.
            self._monitor = self.kc.iopub_channel.socket.get_monitor_socket(zmq.EVENT_DISCONNECTED)
            self._monitor_task = asyncio.ensure_future(self._watch_disconnects())
            await self.kc.wait_for_ready(timeout=self.startup_timeout)
            self.kc.allow_stdin = False
            return self.kc

        async def _watch_disconnects(self):
            from zmq.utils.monitor import parse_monitor_message
            with contextlib.suppress(Exception, asyncio.CancelledError):
                while True:
                    event = parse_monitor_message(await self._monitor.recv_multipart())
                    if event["event"] != zmq.EVENT_DISCONNECTED:
                        continue
                    # A dying kernel disconnects too: only a kernel still alive a second later
                    # has had a message refused for its size.
                    for _ in range(10):
                        await asyncio.sleep(0.1)
                        if self.closing or not await self.km.is_alive():
                            break
                    else:
                        if self.current_cell is not None and not self.output_truncated:
                            self.output_seen = self.output_cap
                            self.truncate(self.current_cell)

        def stop_monitor(self):
            self.closing = True
            task = getattr(self, "_monitor_task", None)
            if task is not None:
                task.cancel()
            with contextlib.suppress(Exception):
                self.kc.iopub_channel.socket.disable_monitor()
            with contextlib.suppress(Exception):
                self._monitor.close(linger=0)

        async def async_execute_cell(self, cell, cell_index, **kw):
            self.current_cell = cell
            try:
                return await super().async_execute_cell(cell, cell_index, **kw)
            finally:
                self.current_cell = None

        # -- output cap -------------------------------------------------------------------
        def process_message(self, msg, cell, cell_index):
            msg_type = msg["msg_type"]
            if self.output_truncated:
                if msg_type == "status" and msg["content"].get("execution_state") == "idle":
                    raise CellExecutionComplete()
                return None
            # Every message counts but the kernel's busy/idle and its echo of the cell's own
            # source: comm (widget) messages too, which carry no output but cost as much.
            if msg_type not in ("status", "execute_input"):
                size = _size(msg)
                if self.output_seen + size > self.output_cap:
                    room = max(0, self.output_cap - self.output_seen)
                    text = msg["content"].get("text")
                    if msg_type == "stream" and room and isinstance(text, str):
                        msg["content"]["text"] = text[:room]
                        super().process_message(msg, cell, cell_index)
                    self.output_seen = self.output_cap
                    self.truncate(cell)
                    raise CellExecutionComplete()
                self.output_seen += size
            if msg_type.startswith("comm"):
                # Not passed on: nbclient would keep every widget's state for the notebook's
                # metadata (160 MB of it grew the grader by as much) and mimic a front end's
                # Output widget; the grader needs neither.
                return None
            return super().process_message(msg, cell, cell_index)

        def truncate(self, cell):
            self.output_truncated = True
            cell.outputs.append(nbformat.v4.new_output(
                "stream", name="stderr",
                text=f"\n[labgrader] output truncated: the notebook's output passed the "
                     f"{self.output_cap}-byte limit, so the rest was dropped and the kernel "
                     f"was stopped.\n"))
            self._killer("output limit")

        # -- timeouts -----------------------------------------------------------------------
        async def _async_handle_timeout(self, timeout, cell=None):
            """Interrupt; give the cell INTERRUPT_GRACE s to answer, else kill the kernel."""
            self.timed_out = True
            with contextlib.suppress(Exception):
                await self.km.interrupt_kernel()
            deadline = time.monotonic() + INTERRUPT_GRACE
            while (left := deadline - time.monotonic()) > 0:
                try:
                    msg = await self.kc.shell_channel.get_msg(timeout=min(left, 0.5))
                except Exception:
                    if not await self.kc.is_alive():
                        raise DeadKernelError("kernel died after the interrupt") from None
                    continue
                if msg.get("msg_type") == "execute_reply":
                    return msg
            self.killed_after_interrupt = True
            self._killer("ignored interrupt")
            raise DeadKernelError("kernel killed after ignoring the interrupt")

    return GradingClient


def _kill_group(km, uid: int | None, sandboxed: bool) -> None:
    """SIGKILL the kernel. Under bwrap, the sandbox's first process, bwrap's child: the whole pid
    namespace goes with it, and bwrap outside reaps it and exits by itself. (Killed first, bwrap
    would leave that process to init, a zombie of the job's uid until init reaps it: 2 s on these
    machines, never in a container whose init is the grader.) Otherwise, or while bwrap has no child
    yet, the kernel's process group and, without a pid namespace, what runs as the job's uid."""
    proc = getattr(getattr(km, "provisioner", None), "process", None)
    if proc is None:
        return
    inside = children_by_parent().get(proc.pid, []) if sandboxed else []
    for pid in inside:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    if inside:
        return
    with contextlib.suppress(OSError):
        os.killpg(os.getpgid(proc.pid), signal.SIGKILL)
    with contextlib.suppress(OSError):
        proc.kill()
    if uid is not None and os.geteuid() == 0 and uid != 0:
        # Fallback mode: no pid namespace; anything left running as the job's uid goes too.
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                with contextlib.suppress(OSError):
                    if os.stat(f"/proc/{pid}").st_uid == uid:
                        os.kill(int(pid), signal.SIGKILL)


def children_by_parent() -> dict[int, list[int]]:
    """Every process's children, from /proc (the sandbox is Linux's too)."""
    children: dict[int, list[int]] = {}
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            parent = int(stat_file.read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(stat_file.parent.name))
    return children


async def _exited(km, seconds: float) -> None:
    """Wait (without blocking the loop) until the kernel's process has ended, at most ``seconds``."""
    proc = getattr(getattr(km, "provisioner", None), "process", None)
    deadline = time.monotonic() + seconds
    while proc is not None and proc.poll() is None and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


def _returncode(km) -> int | None:
    proc = getattr(getattr(km, "provisioner", None), "process", None)
    if proc is None:
        return None
    for _ in range(20):
        code = proc.poll()
        if code is not None:
            return code
        time.sleep(0.05)
    return None


def _reply_error(reply: dict | None) -> tuple[str | None, str | None]:
    content = (reply or {}).get("content", {})
    ename, evalue = content.get("ename", "Error"), content.get("evalue", "")
    tb = "\n".join(content.get("traceback") or [])
    return f"{ename}: {evalue}", _strip(tb) or None


def _cell_text(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream":
            parts.append(str(out.get("text", ""))[-20000:])
        elif out.get("output_type") == "error":
            parts.append(f"{out.get('ename')}: {out.get('evalue')}")
            parts.append(_strip("\n".join(out.get("traceback", [])))[-20000:])
    return "\n".join(parts)


def _atomic_write(nb, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".executed-", suffix=".ipynb")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            nbformat.write(nb, f)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@dataclass(frozen=True)
class Sandboxing:
    """How every kernel of a process is confined: the same for each notebook it runs.

    ``hide``: host paths the kernel must not see, besides the ``grader``/``reference`` packages and
    the checkout holding them. The bubblewrap sandbox shows nothing of the host but what the kernel
    needs, so these are covered where they fall inside what it binds (the dataset root, the
    interpreter's directories). It must cover where runs are recorded: a kernel started ahead does
    not know yet which notebook, and so which record directory, it will get.
    ``uid``: the job's unprivileged uid (one per concurrent job: RLIMIT_NPROC counts per uid).
    ``isolation``: ``auto`` (bubblewrap when it works here), ``bubblewrap`` or ``subprocess``.
    """

    data_root: Path | None = None
    limits: Limits = Limits()
    hide: tuple[Path, ...] = ()
    uid: int = 65534
    isolation: str = "auto"


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
) -> Execution:
    """Run ``notebook`` in a kernel of its own, with ``workdir`` (kept) as its working directory.

    ``record_dir`` is hidden from the kernel; the rest is as :meth:`Kernel.run` and
    :class:`Sandboxing` say. A process that runs many notebooks uses :class:`Kernels`."""
    sandboxing = Sandboxing(data_root, limits, (*hide, Path(record_dir)), uid, isolation)
    with Kernels(sandboxing, notebooks=1, workdir=Path(workdir)) as kernels, kernels.kernel() as kernel:
        return kernel.run(notebook, record_dir, prelude=prelude, epilogue=epilogue)


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
            prefix="labgrader-work-", ignore_cleanup_errors=True)
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
            (self.workdir / "data").mkdir(exist_ok=True)  # mount point for the read-only dataset
            mounts.append(self.workdir / "data")
        if self.root:  # what the notebook finds in it later is handed over when it runs
            for p in mounts:
                os.chown(p, uid, gid)
        self._job = job = Path(tempfile.mkdtemp(prefix="lg-", dir=_job_parent()))
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
            data_root=str(Path(s.data_root).resolve()) if s.data_root is not None else None,
            hide=tuple(str(Path(h).resolve()) for h in s.hide), channel_dir=str(self.channel_dir),
            cgroup_procs=self.box.procs_files if self.box else (),
            uid=uid, gid=gid, drop_uid=self.root,
            memory_bytes=self.limits.memory_bytes, processes=self.limits.processes,
            file_size_bytes=self.limits.file_size_bytes, tmp_bytes=self.limits.tmp_bytes,
            cpu_seconds=int(self.limits.cpu_seconds or self.limits.notebook_timeout + 60),
            threads=self.limits.threads)
        specdir = job / "kernels" / sandbox.KERNEL_NAME
        specdir.mkdir(parents=True)
        (job / "kernels").chmod(0o700)
        (specdir / "kernel.json").write_text(json.dumps({
            "argv": sandbox.kernel_command(config), "display_name": "labgrader sandbox",
            "language": "python", "interrupt_mode": "message", "env": {}}))
        (job / "runtime").mkdir(mode=0o700)
        self._log = open(job / "kernel.log", "wb")  # the kernel's own stderr (size capped by RLIMIT_FSIZE)
        ksm = KernelSpecManager(kernel_dirs=[str(job / "kernels")], ensure_native_kernel=False)
        self.km = AsyncKernelManager(kernel_name=sandbox.KERNEL_NAME, kernel_spec_manager=ksm,
                                     transport="ipc", ip=str(ipc / "k"),
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
            await client.wait_for_ready(timeout=STARTUP_TIMEOUT)
        finally:
            client.stop_channels()

    def did_not_start(self, error: Exception) -> str:
        code = _returncode(self.km) if self.km is not None and self.km.has_kernel else None
        tail = ""
        if self._log is not None:
            self._log.flush()
            tail = (self._job / "kernel.log").read_bytes()[-1500:].decode("utf-8", "replace").strip()
        return (f"the kernel did not start ({type(error).__name__}: {error})"
                + (f"; {self.exit_reason()}" if code is not None else "")
                + (f"; its last words: {tail}" if tail else ""))

    def exit_reason(self) -> str:
        """Why the kernel's process ended, naming the resource box's limit when it was hit."""
        why = _exit_reason(_returncode(self.km))
        hit = self.box.limits_hit() if self.box is not None else None
        return f"{hit} ({why})" if hit else why

    def kill(self) -> None:
        _kill_group(self.km, self.sweep_uid, self.mode == sandbox.BUBBLEWRAP)

    def exited(self) -> bool:
        """Whether the kernel's process has ended (it never started counts as not exited: the
        notebook is then given the reason)."""
        process = getattr(getattr(self.km, "provisioner", None), "process", None)
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
            return Execution(status="not-run", cells=_not_run(notebook), isolation=self.isolation,
                             seconds=0.0, reason=self.failure, workdir=self.workdir)
        try:
            return self._loop.run_until_complete(
                _run(self, notebook, record_dir, prelude, epilogue, t0))
        except BaseException as e:  # noqa: BLE001 - never let the machinery's errors escape
            if isinstance(e, KeyboardInterrupt):
                raise
            return Execution(status="not-run", cells=_not_run(notebook), isolation=self.isolation,
                             seconds=time.monotonic() - t0, workdir=self.workdir,
                             reason=f"the grader could not run the notebook: {type(e).__name__}: {e}")
        finally:
            self._cancel_leftover_tasks()

    async def stop(self, client=None) -> None:
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


def _job_parent() -> str:
    """Where a kernel's job directory goes: the usual temporary directory, unless its path leaves the
    sockets inside too little room; then /tmp."""
    parent = tempfile.gettempdir()
    return parent if len(os.fsencode(parent)) + _JOB_PATH_EXTRA <= _SOCKET_PATH_MAX else "/tmp"


def _not_run(nb) -> tuple[CellRun, ...]:
    return tuple(CellRun(index=i, status="not-run", source_head=_first_line(c.source))
                 for i, c in enumerate(nb.cells) if c.cell_type == "code")


async def _run(kernel: Kernel, nb, record_dir: Path, prelude: str, epilogue: str | Callable[[], str],
               t0: float) -> Execution:
    from nbclient.exceptions import DeadKernelError

    nb = nbformat.from_dict(json.loads(json.dumps(nb)))  # our own copy
    km, limits, workdir = kernel.km, kernel.limits, kernel.workdir
    record_dir.mkdir(parents=True, exist_ok=True)
    if kernel.root:  # what the caller put in the workdir since the kernel started
        uid = kernel.sandboxing.uid
        for p in [workdir, *[q for q in workdir.rglob("*") if not q.is_symlink()]]:
            os.chown(p, uid, uid)
    killed: list[str] = []

    def killer(why: str) -> None:
        killed.append(why)
        kernel.kill()

    client = _make_client_class()(
        nb, km, output_bytes=limits.output_bytes, killer=killer, allow_errors=True,
        interrupt_on_timeout=True, timeout=int(limits.cell_timeout), startup_timeout=STARTUP_TIMEOUT,
        iopub_timeout=4, raise_on_iopub_timeout=False, record_timing=False, coalesce_streams=True,
        kernel_name=sandbox.KERNEL_NAME, resources={"metadata": {"path": str(workdir)}})

    cells: dict[int, CellRun] = {}
    status, reason = "completed", None
    probe_error = None
    kernel_alive = False
    deadline = t0 + limits.notebook_timeout
    try:
        try:
            await asyncio.wait_for(client.async_start_new_kernel_client(), STARTUP_TIMEOUT + 5)
        except Exception as e:
            raise RuntimeError(kernel.did_not_start(e))
        kernel_alive = True

        if prelude.strip():
            reply = await _run_code(client, prelude, limits.cell_timeout, killer)
            if reply is None or reply["content"].get("status") != "ok":
                err = _reply_error(reply)[0] if reply else "no reply"
                raise RuntimeError(f"the grader's set-up code failed in the kernel: {err}")

        stop_at: int | None = None
        for index, cell in enumerate(nb.cells):
            if cell.cell_type != "code":
                continue
            head = _first_line(cell.source)
            if stop_at is not None:
                cells[index] = CellRun(index, "not-run", source_head=head)
                continue
            if not cell.source.strip():
                cells[index] = CellRun(index, "ok", source_head=head)
                continue
            left = deadline - time.monotonic()
            if left <= 1:
                status, reason = "timeout", (f"the notebook time limit ({limits.notebook_timeout:g} s)"
                                             f" was reached before cell {index + 1}")
                stop_at = index
                cells[index] = CellRun(index, "not-run", source_head=head)
                continue
            per_cell = min(limits.cell_timeout, left)
            client.timeout = max(1, int(per_cell))
            client.timed_out = False
            replies: list[dict] = []
            client.on_cell_executed = lambda cell, cell_index, execute_reply: replies.append(execute_reply)
            c0 = time.monotonic()
            loop = asyncio.get_running_loop()
            watchdog = loop.call_later(per_cell + INTERRUPT_GRACE + WATCHDOG_SLACK,
                                       killer, "watchdog")
            died = None
            try:
                await asyncio.wait_for(
                    client.async_execute_cell(cell, index, execution_count=client.code_cells_executed + 1),
                    per_cell + INTERRUPT_GRACE + 2 * WATCHDOG_SLACK)
            except (DeadKernelError, asyncio.TimeoutError, asyncio.CancelledError) as e:
                if isinstance(e, asyncio.CancelledError) and not killed:
                    raise
                died = e
            finally:
                watchdog.cancel()
            secs = round(time.monotonic() - c0, 3)
            images = sum(1 for o in cell.get("outputs", [])
                         if o.get("output_type") in ("display_data", "execute_result")
                         and any(k.startswith("image/") for k in o.get("data", {})))
            if client.output_truncated:
                msg = (f"OutputLimitExceeded: the notebook printed more than "
                       f"{limits.output_bytes} bytes of output; the kernel was stopped")
                cells[index] = CellRun(index, "error", secs, msg, None, images, head)
                status, reason = "output-limit", f"cell {index + 1}: {msg.split(': ', 1)[1]}"
                stop_at, kernel_alive = index, False
                killer("output limit")
            elif client.timed_out and (died is not None or client.killed_after_interrupt):
                msg = (f"CellTimeout: the cell ran longer than {client.timeout} s and did not stop "
                       f"when interrupted; the kernel was killed")
                cells[index] = CellRun(index, "timeout", secs, msg, None, images, head)
                status, reason = "timeout", f"cell {index + 1}: {msg.split(': ', 1)[1]}"
                stop_at, kernel_alive = index, False
            elif died is not None:
                if "watchdog" in killed:
                    why = "the grader's watchdog killed the kernel (the executor stopped hearing from it)"
                    cells[index] = CellRun(index, "timeout", secs, f"CellTimeout: {why}", None, images, head)
                    status = "timeout"
                else:
                    why = kernel.exit_reason()
                    cells[index] = CellRun(index, "kernel-died", secs, f"KernelDied: {why}", None,
                                           images, head)
                    status = "kernel-died"
                reason = f"the kernel died during cell {index + 1} ({head!r}): {why}"
                stop_at, kernel_alive = index, False
            elif client.timed_out:
                over_nb = per_cell < limits.cell_timeout
                limit = f"the notebook time limit ({limits.notebook_timeout:g} s)" if over_nb else \
                    f"the cell time limit ({limits.cell_timeout:g} s)"
                cells[index] = CellRun(index, "timeout", secs,
                                       f"CellTimeout: the cell was interrupted at {limit}", None,
                                       images, head)
                if over_nb:
                    status, reason, stop_at = "timeout", f"{limit} was reached in cell {index + 1}", index
            else:
                reply = replies[-1] if replies else None
                st = (reply or {}).get("content", {}).get("status")
                if st == "ok":
                    cells[index] = CellRun(index, "ok", secs, None, None, images, head)
                elif st == "error":
                    err, tb = _reply_error(reply)
                    cells[index] = CellRun(index, "error", secs, err, tb, images, head)
                else:
                    cells[index] = CellRun(index, "error", secs, f"NoReply: execute reply status {st!r}",
                                           None, images, head)
        code = ""
        if kernel_alive and callable(epilogue):
            try:  # in a thread: it may wait for what the grader is still loading
                code = await asyncio.get_running_loop().run_in_executor(None, epilogue)
            except Exception as e:  # noqa: BLE001
                probe_error = f"the grader could not prepare its probe: {type(e).__name__}: {e}"
        elif kernel_alive:
            code = epilogue
        if code.strip():
            reply = await _run_code(client, code, limits.cell_timeout, killer)
            if reply is None:
                probe_error = "the grader's probe got no reply (timed out or the kernel died)"
            elif reply["content"].get("status") != "ok":
                err, tb = _reply_error(reply)
                probe_error = err + ("\n" + tb if tb else "")
    except _Stop:
        pass
    except Exception as e:  # noqa: BLE001
        status = "not-run" if not cells else "kernel-died"
        reason = str(e) if isinstance(e, RuntimeError) else f"{type(e).__name__}: {e}"
        if not isinstance(e, RuntimeError):
            reason += "\n" + "".join(_tb.format_exception(e)[-3:])
    finally:
        await kernel.stop(client)

    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "code" and index not in cells:
            cells[index] = CellRun(index, "not-run", source_head=_first_line(cell.source))

    network = tuple(f"cell {i + 1}: {cells[i].source_head}" for i in sorted(cells)
                    if _NETWORK.search(_cell_text(nb.cells[i]) + (cells[i].error or ""))
                    or (cells[i].status != "ok" and _looks_like_download(nb.cells[i].source)
                        and cells[i].status == "error"))
    executed = record_dir / "executed.ipynb"
    try:
        _atomic_write(nb, executed)
    except Exception as e:  # noqa: BLE001
        executed = None
        reason = (reason + "; " if reason else "") + f"could not save the executed notebook: {e}"
    if status == "completed" and reason is None:
        timeouts = [i for i, c in cells.items() if c.status == "timeout"]
        if timeouts:
            reason = "cells timed out and were interrupted: " + ", ".join(str(i + 1) for i in timeouts)
    return Execution(
        status=status, cells=tuple(cells[i] for i in sorted(cells)), isolation=kernel.isolation,
        seconds=round(time.monotonic() - t0, 3), reason=reason,
        output_truncated=client.output_truncated, network_blocked=network,
        executed_notebook=executed, workdir=workdir,
        probe_error=probe_error)


def _looks_like_download(source: str) -> bool:
    return bool(re.search(r"^\s*[!%]\s*(pip|wget|curl|conda|apt)|download\s*=\s*True|urlretrieve|"
                          r"requests\.get|urlopen", source, re.M))


async def _run_code(client, code: str, timeout: float, killer) -> dict | None:
    """Run trusted grader code (not a cell); return its execute_reply or None (timeout/death)."""
    kc = client.kc
    msg_id = kc.execute(code, silent=False, store_history=False, allow_stdin=False,
                        stop_on_error=False)
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        try:
            msg = await kc.shell_channel.get_msg(timeout=min(left, 1.0))
        except Exception:
            if not await kc.is_alive():
                return None
            continue
        if msg.get("parent_header", {}).get("msg_id") == msg_id:
            return msg
    killer("grader code timed out")
    return None


async def _shutdown(client, km, uid, sandboxed: bool) -> None:
    """``client``: None for a kernel started ahead that never ran a notebook."""
    if client is not None:
        with contextlib.suppress(Exception):
            client.stop_monitor()
        with contextlib.suppress(Exception):
            if client.kc is not None:
                client.kc.stop_channels()
    if sandboxed:  # the sandbox first, then bwrap has reaped it (see _kill_group)
        _kill_group(km, uid, sandboxed)
        await _exited(km, BWRAP_EXIT_WAIT)
    try:
        if km.has_kernel:
            await asyncio.wait_for(km.shutdown_kernel(now=True), 10)
    except Exception:  # noqa: BLE001
        pass
    _kill_group(km, uid, sandboxed=False)  # whatever is left
    with contextlib.suppress(Exception):
        await km.cleanup_resources()
    if client is not None:
        with contextlib.suppress(Exception):
            client.zmq_context.destroy(linger=0)
