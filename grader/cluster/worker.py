"""The worker's side of grading on Dask: what runs in every worker process of the cluster.

:class:`Worker`, the plugin a batch registers, checks the worker can sandbox and holds the batch's
data before it advertises :data:`RESOURCE`; :func:`grade_task` is the task, run on the plugin's one
grading thread within the batch's time limit. See :mod:`grader.cluster`.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import gc
import logging
import os
import shutil
import signal
import socket
import tempfile
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path

import distributed
from distributed import WorkerPlugin
from distributed.core import Status

from grader import execute, pipeline, sandbox
from grader.results import GradeResult, Submission

NAME = "labgrader"  # the plugin's name on every worker: a new batch's plugin replaces the last one's
RESOURCE = "labgrader"  # what only a worker able to grade advertises, and every task requires
JOB_UIDS = 1024  # uids a node's workers may take, from the batch's first

log = logging.getLogger("labgrader.cluster")


class GradingTimeout(Exception):
    """A task had no result within the batch's time limit; its worker stopped itself."""


@dataclass(frozen=True)
class Graded:
    """What a worker sends back for one submission: its result and the kept run's files (paths
    relative to the run directory), which the client writes in its own runs directory."""

    result: GradeResult
    run: dict[str, bytes]


@dataclass(frozen=True)
class Batch:
    """What every worker of a batch grades with: the client's configuration (its data's and runs'
    paths are the client's; each worker puts its own in), the time a task may take, the first job
    uid, and ``grade`` (``pipeline.grade``'s signature; another only in tests)."""

    config: pipeline.Config
    time_limit: float
    first_uid: int
    grade: Callable[..., GradeResult] = pipeline.grade
    token: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)


class Worker(WorkerPlugin):
    """A Dask worker, made ready for one batch: the checks, the data, kernels and a grading thread.

    Every kernel of a worker is started, used and stopped on its one grading thread (their event loop
    is that thread's): the task's own thread only hands the submission over and keeps the time."""

    name = NAME

    def __init__(self, batch: Batch):
        self.batch = batch
        self.refusal: str | None = "not set up yet"
        self.identity = ""
        self._config: pipeline.Config | None = None
        self._grading: ThreadPoolExecutor | None = None
        self._kernels: execute.Kernels | None = None
        self._slot: int | None = None  # the job uid's lock file, held for the worker's life
        self._more = True  # another notebook will follow the one graded now (or the first one will come)

    async def setup(self, worker: distributed.Worker) -> None:
        # Paused while it checks itself, and resumed after. The scheduler looks again at tasks it had
        # no worker for when a worker joins or resumes, never when a worker's resources change: a
        # batch whose workers had all restarted (each joins before it advertises the resource) kept
        # its last tasks waiting beside two idle, able workers for ever.
        worker.status = Status.paused
        try:
            await worker.set_resources(**{RESOURCE: 0})  # nothing for this batch until it is checked
            self.identity = f"{socket.gethostname()} ({worker.address})"
            self.refusal = await asyncio.to_thread(self._make_ready, worker)
            if self.refusal is not None:
                log.warning("labgrader: this worker takes no notebook: %s", self.refusal)
                return
            self._grading = ThreadPoolExecutor(1, thread_name_prefix="labgrader-grading")
            self._grading.submit(self._prepare)
            await worker.set_resources(**{RESOURCE: 1})
        finally:
            worker.status = Status.running

    def teardown(self, worker: distributed.Worker) -> None:
        if self._grading is not None:
            with contextlib.suppress(Exception):  # a hung grading thread: the process is ending anyway
                self._grading.submit(self._close).result(timeout=30)
            self._grading.shutdown(wait=False, cancel_futures=True)
        if self._config is not None:
            shutil.rmtree(self._config.runs_dir, ignore_errors=True)
        if self._slot is not None:
            os.close(self._slot)
        if worker.status in (Status.closing, Status.closed):  # its process ends with it
            # Python's last collections at exit walk every object torch, torchvision and matplotlib
            # made: closing a local cluster of one worker took 2.1 s, 0.3 s with them frozen (left
            # to the OS; atexit handlers and finalizers still run).
            gc.freeze()

    def _make_ready(self, worker: distributed.Worker) -> str | None:
        """None once this worker can grade the batch; else why not, in one line."""
        config = self.batch.config
        here = isolation_here(config.isolation)
        if here is None:
            mode = pipeline.isolation_available(config.isolation)["mode"]
            return (f"it cannot sandbox notebooks with bubblewrap ({sandbox.bubblewrap_problem() or mode}); "
                    "install bubblewrap and allow user namespaces there (`labgrader doctor` says how)")
        try:
            provisioned = _same_data(config.provisioned)
        except Exception as error:  # noqa: BLE001 - any reason not to grade is this worker's refusal
            return f"it lacks the batch's data ({type(error).__name__}: {error})"
        if isinstance(provisioned, str):
            return provisioned
        uid, self._slot = _job_uid(self.batch.first_uid)
        # In the worker's own directory, not /tmp: Dask removes it however the worker ends (a worker
        # stopped by SIGTERM left an empty /tmp/labgrader-runs-* behind: its teardown never ran).
        runs = Path(tempfile.mkdtemp(prefix="labgrader-runs-", dir=worker.local_directory))
        self._config = dataclasses.replace(config, provisioned=provisioned, runs_dir=runs, uid=uid,
                                           threads=_threads(config.threads), scratch=_scratch(worker, here["mode"]))
        return None

    def _prepare(self) -> None:
        self._kernels = pipeline.prepare(self._config, notebooks=_Waiting(self))

    def _close(self) -> None:
        if self._kernels is not None:
            self._kernels.close()
            self._kernels = None

    def grade(self, submission: Submission, more: bool) -> Graded:
        """Grade ``submission`` on the grading thread, within the batch's time limit; ``more``: the
        client has notebooks left to send, so a kernel is started ahead for the next."""
        if self._grading is None:
            raise RuntimeError(f"this worker cannot grade: {self.refusal}")
        self._more = more
        started = self._grading.submit(self._grade_here, submission)
        try:
            return started.result(timeout=self.batch.time_limit)
        except FutureTimeout:
            self._stop_self()
            raise GradingTimeout(f"it had no result after {self.batch.time_limit:g} s, so the grader "
                                 f"stopped its worker, {self.identity}") from None

    def _grade_here(self, submission: Submission) -> Graded:
        # Counted again for each notebook: the node's other workers may have started since.
        config = dataclasses.replace(self._config, threads=_threads(self.batch.config.threads))
        result = self.batch.grade(submission, config, kernels=self._kernels)
        directory = config.runs_dir / submission.id
        try:
            files = {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*"))
                     if p.is_file() and not p.is_symlink()} if result.status == "graded" else {}
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        return Graded(dataclasses.replace(result, worker=self.identity), files)

    def _stop_self(self) -> None:
        """Kill this worker's kernels now, and the worker itself once the task's error has reached
        the scheduler (a few milliseconds' batching; given seconds): its nanny starts a new one."""
        children = set(_family(os.getpid())[1:])
        _kill(children)
        threading.Timer(3.0, _kill_family, (os.getpid(),)).start()


class _Waiting:
    """The count :class:`execute.Kernels` asks before starting a kernel ahead: one while another
    notebook will come (the first, before any task; then as the running task says). Read, never
    written: the client's queue is the count."""

    def __init__(self, plugin: Worker):
        self._plugin = plugin

    @property
    def value(self) -> int:
        return int(self._plugin._more)

    @value.setter
    def value(self, _: int) -> None:
        pass

    def get_lock(self) -> contextlib.nullcontext:
        return contextlib.nullcontext()


def isolation_here(isolation: str) -> dict | None:
    """How this worker would sandbox a notebook (:func:`pipeline.isolation_available`), if that is
    as the batch demands: bubblewrap, unless ``isolation`` asks for the subprocess fallback."""
    here = pipeline.isolation_available(isolation)
    return here if here["mode"] == sandbox.BUBBLEWRAP or isolation == sandbox.SUBPROCESS else None


def _same_data(wanted) -> object:
    """This node's copy of the batch's dataset: where the client has it, if this node sees the same
    path with the same files (a local cluster), else provisioned offline here (torchvision's root in
    ``labgrader data``'s cache, or ``LABGRADER_DATA_DIR``). A string when it is not the same data."""
    from reference import provision

    dataset = wanted.dataset
    with contextlib.suppress(OSError, ValueError):
        there = provision.read_profile(wanted.root, dataset)
        if there.sha256 == wanted.sha256:
            return there
    found = provision.provision(dataset, allow_download=False)
    if found.sha256 != wanted.sha256:
        return (f"its {dataset} data is {found.profile} from {found.source}, not the batch's {wanted.profile} "
                f"(other files); provision the batch's files there with `labgrader data --dataset {dataset} "
                "--data-dir DIR`")
    return found


def _scratch(worker: distributed.Worker, mode: str) -> Path | None:
    """The worker's own directory for its kernels' directories, where their job uid can reach them:
    Dask removes it however the worker ends (a SIGKILLed worker's kernels left their work and job
    directories in TMPDIR), once a worker starts again on the node. Bubblewrap binds them in
    wherever they are; the fallback's kernel reaches them through the host's directories."""
    scratch = Path(worker.local_directory)
    with contextlib.suppress(OSError):
        scratch.chmod(0o711)  # Dask makes it 0700; a job uid only passes through, listing nothing
    reachable = mode == sandbox.BUBBLEWRAP or sandbox.reachable_by_others(str(scratch / "kernel"))
    return scratch if reachable else None


def _threads(wanted: int) -> int:
    """Threads per kernel so that kernels x threads stay within this worker's share of its node's
    cores (it runs one kernel at a time): its cores (its CPU affinity, which a batch system sets) over
    the job uids held there, one per worker."""
    cores = len(os.sched_getaffinity(0))
    return max(1, min(wanted, cores // max(1, len(_held_slots()))))


def _slot_dir() -> Path:
    # Node-wide, whatever TMPDIR a worker was given: workers of one node must see the same locks.
    return Path("/tmp/labgrader-job-uids")


def _held_slots() -> list[Path]:
    """The uid lock files some live process of this node holds."""
    held = []
    for path in _slot_dir().glob("*"):
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            held.append(path)
        finally:
            os.close(fd)
    return held


def _job_uid(first: int) -> tuple[int, int | None]:
    """A job uid that no other worker of this node holds, with the lock that holds it (released by the
    kernel when this process ends, however it ends); ``first`` and no lock where none can be taken
    (an unprivileged worker: its kernels run as its own uid whatever this says)."""
    directory = _slot_dir()
    try:
        directory.mkdir(exist_ok=True)
        os.chmod(directory, 0o1777)
    except OSError:
        pass
    for uid in range(first, first + JOB_UIDS):
        try:
            fd = os.open(directory / str(uid), os.O_RDWR | os.O_CREAT, 0o666)
        except OSError:
            return first, None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        return uid, fd
    return first, None


def _family(pid: int) -> list[int]:
    """``pid`` and its descendants."""
    children = execute.children_by_parent()
    family = [pid]
    for member in family:  # grows while it is walked: breadth first
        family.extend(children.get(member, ()))
    return family


def _kill(pids: set[int]) -> None:
    """SIGSTOP ``pids``' families until nothing new appears (none escapes by forking), then SIGKILL."""
    stopped: set[int] = set()
    while new := {m for pid in pids for m in _family(pid)} - stopped - {os.getpid()}:
        for member in new:
            with contextlib.suppress(OSError):
                os.kill(member, signal.SIGSTOP)
        stopped |= new
    for member in stopped:
        with contextlib.suppress(OSError):
            os.kill(member, signal.SIGKILL)


def _kill_family(pid: int) -> None:
    """SIGKILL ``pid``'s descendants, then ``pid``."""
    _kill(set(_family(pid)[1:]))
    os.kill(pid, signal.SIGKILL)


def grade_task(submission: Submission, token: str, more: bool) -> Graded:
    """A task: grade ``submission`` with this worker's plugin, which must be the batch's."""
    plugin = distributed.get_worker().plugins.get(NAME)
    if plugin is None or plugin.batch.token != token:
        raise RuntimeError("this worker was made ready for another batch (two batches share the cluster?)")
    return plugin.grade(submission, more)


def refusal(dask_worker: distributed.Worker) -> str | None:
    plugin = dask_worker.plugins.get(NAME)
    return "the labgrader plugin is missing" if plugin is None else plugin.refusal
