"""The client's side of grading on Dask: the cluster, the batch's plugin, the tasks sent and what
they give, in ``labgrader grade``'s process. See :mod:`grader.cluster`.
"""
from __future__ import annotations

import contextlib
import logging
import os
import queue
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Iterator

import dask
import distributed

from grader.cluster.worker import (NAME, RESOURCE, Batch, Graded, GradingTimeout, Worker, grade_task, isolation_here,
                                   refusal)
from grader.results import Submission

ALLOWED_FAILURES = 2  # a submission whose worker dies is tried at most 3 times in all
ENV = "LABGRADER_SCHEDULER"  # a scheduler's address, or a scheduler file's path
# A killed worker's nanny starts a new one, ready to grade within seconds (its data checked; the
# kernels load in the background); a cluster with no worker able to grade for this long has none
# coming, and its tasks would wait in the scheduler for ever.
NO_WORKER_WAIT = 300.0
POLL = 2.0  # seconds between looks at the cluster while tasks run


class NoWorker(Exception):
    """No worker of the cluster can grade this batch (or its scheduler cannot be reached); the message
    says why, for each worker."""


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
    # A short name: kernels' sockets go in the workers' directories below it, at most 107 bytes a path.
    with dask.config.set(settings), tempfile.TemporaryDirectory(prefix="lgd-") as scratch:
        os.chmod(scratch, 0o711)  # the kernels' job uid passes through to its directories (worker._scratch)
        with distributed.LocalCluster(
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
        return [each for each in client.run(isolation_here, isolation).values() if each is not None]


def prepare(client: distributed.Client, batch: Batch) -> dict[str, str | None]:
    """Register ``batch``'s plugin on every worker (waiting for each one's checks) and say, by
    worker address, why each one takes no notebook (None: it takes them). Raises :class:`NoWorker`
    when none can grade."""
    client.register_plugin(Worker(batch), name=NAME)
    refused = client.run(refusal)
    if not any(reason is None for reason in refused.values()):
        raise NoWorker("no worker of the cluster can grade this batch: " + (
            "; ".join(f"{address}: {reason}" for address, reason in sorted(refused.items())) or "it has no worker"))
    return refused


def grade(client: distributed.Client, batch: Batch, submissions: list[Submission]
          ) -> Iterator[tuple[Submission, Graded | str]]:
    """Each submission with what its task gave: a :class:`Graded`, or why the grader could not grade
    it (its workers kept dying, it ran out of time, or no worker that can grade was left in the
    cluster for :data:`NO_WORKER_WAIT` seconds), as they complete."""
    waiting = deque(submissions)
    running: dict[distributed.Future, Submission] = {}
    ended: queue.SimpleQueue[distributed.Future] = queue.SimpleQueue()  # filled by Dask's callbacks
    watch = _Watch(client)

    def top_up() -> None:
        while waiting and len(running) < max(1, watch.capable()):
            submission = waiting.popleft()
            future = client.submit(grade_task, submission, batch.token, bool(waiting), resources={RESOURCE: 1},
                                   pure=False, key=f"grade-{submission.id}-{uuid.uuid4().hex[:8]}")
            running[future] = submission
            future.add_done_callback(ended.put)

    top_up()
    while running:
        try:
            future = ended.get(timeout=POLL)
        except queue.Empty:
            if (gone := watch.no_worker_for()) is None:
                continue
            # The scheduler would keep these tasks waiting for a worker for ever: they fail here.
            reason = (f"no worker able to grade was in the cluster for {gone:.0f} s (those that could "
                      "died, left or were refused, and none joined)")
            for future in running:
                future.cancel()
            yield from ((submission, reason) for submission in [*running.values(), *waiting])
            return
        yield running.pop(future), _outcome(future)
        top_up()


def _outcome(future: distributed.Future) -> Graded | str:
    try:
        return future.result()
    except distributed.KilledWorker:
        return (f"the worker grading it died on each of its {ALLOWED_FAILURES + 1} tries (or as many as the "
                "cluster's distributed.scheduler.allowed-failures allows): the notebook may use more memory "
                "than the worker has")
    except GradingTimeout as error:
        return str(error)
    except Exception as error:  # noqa: BLE001 - one task's failure is its submission's, not the class's
        return f"its task failed on the cluster ({type(error).__name__}: {error})"
    finally:
        future.release()


class _Watch:
    """How many of the cluster's workers can grade, and since when none could."""

    def __init__(self, client: distributed.Client):
        self._client = client
        self._last_seen = time.monotonic()

    def capable(self) -> int:
        count = sum(1 for info in self._client.scheduler_info()["workers"].values()
                    if info.get("resources", {}).get(RESOURCE))
        if count:
            self._last_seen = time.monotonic()
        return count

    def no_worker_for(self) -> float | None:
        """Seconds without a worker that can grade, once they exceed :data:`NO_WORKER_WAIT`."""
        gone = time.monotonic() - self._last_seen
        return gone if not self.capable() and gone > NO_WORKER_WAIT else None
