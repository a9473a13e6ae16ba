"""Grade notebooks as tasks of Dask's ``distributed`` scheduler: on a local cluster of single-threaded
worker processes (the default, no set-up), or on an existing cluster (``docs/cluster.md``).

What crosses the network is small and self-contained, so no file system is shared: a task carries
one submission (its notebook's bytes, bounded by intake) and returns a :class:`Graded`: the result and
the kept run's files (the executed notebook, the probe's answer and inputs, the saved model, the
findings with the report's figures), which the client writes under ``<out>/.runs/<id>/`` as if it had
run the notebook itself. A worker grades in a runs directory of its own, inside its Dask local
directory (which Dask removes when the worker closes, and a later worker of the node when one was
killed), and keeps nothing.

A worker takes notebooks only once :class:`Worker` (a ``distributed.WorkerPlugin`` the client
registers for its batch) has found, at the worker's start, that it can sandbox them and that it
holds the batch's data (the same four files, by hash, provisioned offline where it can). Then, and
only then, it advertises the resource :data:`RESOURCE`, which every task requires: the scheduler
never places a task on a worker without it. One that cannot says why in one log line
(``labgrader: this worker takes no notebook: ...``), and :func:`prepare` tells the client. Each capable worker
loads torch, the dataset and matplotlib once, starts the next kernel while a notebook is judged (only
while a task waits for it), and runs its kernels as a job uid no other worker of its node holds.

Faults: a worker that dies mid-notebook (SIGKILL, the out-of-memory killer, a lost node) has its task
run again on another worker by the scheduler, at most ``distributed.scheduler.allowed-failures`` more
times (:data:`ALLOWED_FAILURES` on the local cluster); past that the submission gets an "error"
result saying so (``KilledWorker``), which the next run grades again, and the class goes on. A task
that has had no result within the batch's time limit is stopped by the worker itself: it kills its
kernels, fails the task with :class:`GradingTimeout` (the scheduler keeps the error, so nothing is
lost), and then kills its own process, since what hangs may be the grading thread itself; its nanny
starts a fresh one. The client sends one task per capable worker at a time: the scheduler counts a
worker's death against every task it holds, so a worker holds only the one it runs, and a notebook
that kills its workers costs no other notebook a try. Each task says whether more will follow, so
that a worker starts a kernel ahead only for a notebook that will come.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import logging
import os
import shutil
import signal
import socket
import tempfile
import threading
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path

import dask
import distributed
from distributed import WorkerPlugin

from grader import execute, pipeline, sandbox
from grader.results import GradeResult, Submission

NAME = "labgrader"  # the plugin's name on every worker: a new batch's plugin replaces the last one's
RESOURCE = "labgrader"  # what only a worker able to grade advertises, and every task requires
ALLOWED_FAILURES = 2  # a submission whose worker dies is tried at most 3 times in all
JOB_UIDS = 1024  # uids a node's workers may take, from the batch's first
ENV = "LABGRADER_SCHEDULER"  # a scheduler's address, or a scheduler file's path

log = logging.getLogger("labgrader.cluster")


class GradingTimeout(Exception):
    """A task had no result within the batch's time limit; its worker stopped itself."""


class NoWorker(Exception):
    """No worker of the cluster can grade this batch (or its scheduler cannot be reached); the message
    says why, for each worker."""


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
        await worker.set_resources(**{RESOURCE: 0})  # nothing for this batch until it is checked
        self.identity = f"{socket.gethostname()} ({worker.address})"
        self.refusal = await asyncio.to_thread(self._make_ready, worker)
        if self.refusal is not None:
            log.warning("labgrader: this worker takes no notebook: %s", self.refusal)
            return
        self._grading = ThreadPoolExecutor(1, thread_name_prefix="labgrader-grading")
        self._grading.submit(self._prepare)
        await worker.set_resources(**{RESOURCE: 1})

    def teardown(self, worker: distributed.Worker) -> None:
        if self._grading is not None:
            with contextlib.suppress(Exception):  # a hung grading thread: the process is ending anyway
                self._grading.submit(self._close).result(timeout=30)
            self._grading.shutdown(wait=False, cancel_futures=True)
        if self._config is not None:
            shutil.rmtree(self._config.runs_dir, ignore_errors=True)
        if self._slot is not None:
            os.close(self._slot)

    def _make_ready(self, worker: distributed.Worker) -> str | None:
        """None once this worker can grade the batch; else why not, in one line."""
        config = self.batch.config
        if _isolation(config.isolation) is None:
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
                                           threads=_threads(config.threads))
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


def _isolation(isolation: str) -> dict | None:
    """How this worker would sandbox a notebook (:func:`pipeline.isolation_available`), if that is
    as the batch demands: bubblewrap, unless ``isolation`` asks for the subprocess fallback."""
    here = pipeline.isolation_available(isolation)
    return here if here["mode"] == sandbox.BUBBLEWRAP or isolation == sandbox.SUBPROCESS else None


def _same_data(wanted) -> object:
    """This node's copy of the batch's dataset: where the client has it, if this node sees the same
    path with the same files (a local cluster), else provisioned offline here (torchvision's root in
    ``labgrader data``'s cache, or ``LABGRADER_DATA_DIR``). A string when it is not the same data."""
    from reference import provision

    dataset = {"MNIST": "mnist", "FashionMNIST": "fashion-mnist"}[wanted.torchvision_class]
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


def _grade_task(submission: Submission, token: str, more: bool) -> Graded:
    """A task: grade ``submission`` with this worker's plugin, which must be the batch's."""
    plugin = distributed.get_worker().plugins.get(NAME)
    if plugin is None or plugin.batch.token != token:
        raise RuntimeError("this worker was made ready for another batch (two batches share the cluster?)")
    return plugin.grade(submission, more)


def _refusal(dask_worker: distributed.Worker) -> str | None:
    plugin = dask_worker.plugins.get(NAME)
    return "the labgrader plugin is missing" if plugin is None else plugin.refusal


# --- the client's side -----------------------------------------------------------------------------

def scheduler_from_env() -> str | None:
    return os.environ.get(ENV) or None


@contextlib.contextmanager
def connect(scheduler: str | None, workers: int) -> Iterator[distributed.Client]:
    """A client of the cluster at ``scheduler`` (``tcp://HOST:PORT``, or a scheduler file's path),
    or of a new local cluster of ``workers`` single-threaded processes, closed on leaving."""
    if scheduler is not None:
        target = {"address": scheduler} if "://" in scheduler else {"scheduler_file": scheduler}
        try:
            client = distributed.Client(**target, set_as_default=False)
        except OSError as error:  # refused, timed out (Dask's connect time-out): one line, not a traceback
            raise NoWorker(f"the cluster's scheduler at {scheduler} cannot be reached: {error}") from None
        with client:
            yield client
        return
    settings = {"distributed.scheduler.allowed-failures": ALLOWED_FAILURES,
                # Workers' memory is torch and one dataset; kernels have caps of their own.
                "distributed.worker.memory.terminate": False}
    with dask.config.set(settings), tempfile.TemporaryDirectory(prefix="labgrader-dask-") as scratch, \
            distributed.LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1", local_directory=scratch,
            # A free port, never another batch's; none without bokeh, which draws its pages.
            dashboard_address=":0", scheduler_kwargs={"dashboard": _has_dashboard()}, memory_limit=0,
            silence_logs=logging.ERROR) as local, distributed.Client(local, set_as_default=False) as client:
        yield client


def _has_dashboard() -> bool:
    try:
        import bokeh  # noqa: F401
    except ImportError:
        return False
    return True


def dashboard(client: distributed.Client) -> str | None:
    """The dashboard's address, when the scheduler serves one (its pages need bokeh here too)."""
    served = "dashboard" in client.scheduler_info().get("services", {})
    return client.dashboard_link if served and _has_dashboard() else None


def isolations(scheduler: str, isolation: str) -> list[dict]:
    """The sandboxes the cluster's workers that can grade would give a notebook now, against which a
    kept run's is compared (:func:`pipeline.load_run`): the client's own may differ. None of them when
    no worker has joined: then no kept run is reused, and the batch stops with :class:`NoWorker`."""
    with connect(scheduler, 0) as client:
        return [each for each in client.run(_isolation, isolation).values() if each is not None]


def prepare(client: distributed.Client, batch: Batch) -> dict[str, str | None]:
    """Register ``batch``'s plugin on every worker (waiting for each one's checks) and say, by
    worker address, why each one takes no notebook (None: it takes them). Raises :class:`NoWorker`
    when none can grade."""
    client.register_plugin(Worker(batch), name=NAME)
    refused = client.run(_refusal)
    if not any(reason is None for reason in refused.values()):
        raise NoWorker("no worker of the cluster can grade this batch: " + (
            "; ".join(f"{address}: {reason}" for address, reason in sorted(refused.items())) or "it has no worker"))
    return refused


def grade(client: distributed.Client, batch: Batch, submissions: list[Submission]
          ) -> Iterator[tuple[Submission, Graded | str]]:
    """Each submission with what its task gave: a :class:`Graded`, or why the grader could not grade
    it (its workers kept dying, or it ran out of time), as they complete."""
    queue = deque(submissions)
    done = distributed.as_completed(loop=client.loop)
    sent: dict[str, Submission] = {}

    def top_up() -> None:
        while queue and done.count() < max(1, _capable(client)):
            submission = queue.popleft()
            future = client.submit(_grade_task, submission, batch.token, bool(queue), resources={RESOURCE: 1},
                                   pure=False, key=f"grade-{submission.id}-{uuid.uuid4().hex[:8]}")
            sent[future.key] = submission
            done.add(future)

    top_up()
    for future in done:
        submission = sent.pop(future.key)
        try:
            yield submission, future.result()
        except distributed.KilledWorker:
            yield submission, (f"the worker grading it died on each of its {ALLOWED_FAILURES + 1} tries (or "
                               "as many as the cluster's distributed.scheduler.allowed-failures allows): "
                               "the notebook may use more memory than the worker has")
        except GradingTimeout as error:
            yield submission, str(error)
        except Exception as error:  # noqa: BLE001 - one task's failure is its submission's, not the class's
            yield submission, f"its task failed on the cluster ({type(error).__name__}: {error})"
        finally:
            future.release()
        top_up()


def _capable(client: distributed.Client) -> int:
    return sum(1 for info in client.scheduler_info()["workers"].values()
               if info.get("resources", {}).get(RESOURCE))
