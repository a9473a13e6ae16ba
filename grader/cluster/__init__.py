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

Two modules, one per side: :mod:`~grader.cluster.worker` runs in every Dask worker (the plugin, the
task, the job uids, stopping itself), :mod:`~grader.cluster.client` in ``labgrader grade`` (the
cluster, the plugin's registration, sending the tasks and collecting what they give).
"""
from grader.cluster.client import (ALLOWED_FAILURES, ENV, NoWorker, connect, dashboard, grade, isolations, prepare,
                                   scheduler_from_env)
from grader.cluster.worker import Batch, Graded, GradingTimeout, Worker

__all__ = ["ALLOWED_FAILURES", "ENV", "Batch", "Graded", "GradingTimeout", "NoWorker", "Worker", "connect",
           "dashboard", "grade", "isolations", "prepare", "scheduler_from_env"]
