"""Grade many submissions: parallel workers, a progress bar, resumable, never stopped by one bad
notebook. Results are written by this (parent) process as each arrives, atomically, so an
interrupted batch leaves only whole results behind and a re-run picks up where it stopped.

Notebooks run in worker processes, never in this one, so that nothing a submission makes the
grader do can hold up the rest: each submission must be done within :func:`time_limit` of reaching
its worker. Nothing in the grader should take that long, but a worker that does (stuck reading
something a student planted, or any other hang of the grader's own) is killed with its kernels.
Killed so or dead of its own (the out-of-memory killer), it costs only its submission: that gets an
"error" result blaming the grader, which a rerun grades again (only "graded" results are kept), and
a new worker takes its place. When this process ends, however it ends, its workers and their
kernels end too. A killed worker leaves its kernels' temporary directories behind, as a killed
batch does.

Each submission's files are under ``<out>/<id>/`` and its kept run under ``<out>/.runs/<id>/``, beside
the class-wide files (:func:`class_files`): a batch refuses, before writing anything, submissions
whose ids are not each a distinct folder name (compared case-insensitively) that none of those
takes; :func:`grader.intake.collect` with ``reserved=class_files()`` gives such ids. Every result
written carries its student's LMS id and name and the instructor's overrides (``overrides``,
applied on top of the automatic grade whether it was graded now or kept: changing only the
overrides rewrites results and reports, and runs no notebook).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import multiprocessing
import os
import signal
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path

from tqdm import tqdm

from grader import execute, export, overrides, pipeline, report
from grader.results import GradeResult, Submission
from reference import atomic

RESULT_NAME = "result.json"
REPORT_NAME = "report.html"
FIRST_JOB_UID = 61000  # one unprivileged uid per worker: RLIMIT_NPROC counts per uid
# Beyond the rubric's limits, what grading one notebook may take: starting its kernel (up to 60 s to
# launch and 60 s to answer), the executor's grace and watchdogs on the last cell (45 s), stopping
# the kernel (10 s), and judging (the reference's answers, the saved model, figures: seconds).
GRADER_MARGIN = 300.0


@dataclass(frozen=True)
class Layout:
    """Where a batch writes: ``<out>/<id>/result.json``, ``report.html``, Gradescope's
    ``results.json``; class-wide files at the top; kept runs under ``.runs``."""

    out: Path

    def result(self, submission_id: str) -> Path:
        return self.out / submission_id / RESULT_NAME

    def report(self, submission_id: str) -> Path:
        return self.out / submission_id / REPORT_NAME

    @property
    def runs(self) -> Path:
        return self.out / ".runs"

    @property
    def summary(self) -> Path:
        return self.out / "index.html"


@functools.cache
def class_files() -> frozenset[str]:
    """The names a batch writes at the top of ``--out``, which no submission id may take: the
    summary, the kept runs, and the exports, as :func:`export.write_exports` names them (it writes an
    empty class into a scratch folder to say so, so that a new export is reserved with no list here
    to keep up)."""
    layout = Layout(Path("."))
    with tempfile.TemporaryDirectory(prefix="labgrader-names-") as scratch:
        exported = export.write_exports([], Path(scratch), [])
    return frozenset({layout.summary.name, layout.runs.name, *(path.name for path in exported)})


def check_ids(submissions: list[Submission]) -> None:
    """Raise ValueError, naming them, unless the submissions' ids are distinct folder names (also
    to a case-insensitive file system) and none is a class-wide file's."""
    reserved = {name.casefold() for name in class_files()}
    seen: dict[str, str] = {}
    for submission in submissions:
        sid, key = submission.id, submission.id.casefold()
        problem = ("it is not one folder name" if sid in ("", ".", "..") or any(c in sid for c in "/\\\0")
                   else "a class-wide file has that name" if key in reserved
                   else f"{seen[key]!r} has it too" if key in seen else None)
        if problem:
            raise ValueError(f"submission id {sid!r} ({submission.source}) cannot be used: {problem}; "
                             "collect submissions with intake.collect(paths, reserved=batch.class_files())")
        seen[key] = sid


def is_current(result_path: Path, submission: Submission, config: pipeline.Config) -> GradeResult | None:
    """The kept result, if nothing that decides it has changed since."""
    try:
        result = GradeResult.from_json(json.loads(result_path.read_text()))
    except (OSError, ValueError, TypeError, KeyError):
        return None
    same = (result.notebook_sha256 == submission.sha256 and result.rubric_sha256 == config.rubric.sha256
            and result.spec_version == config.spec.version and result.status == ("error" if submission.error else "graded")
            and (submission.error is not None or pipeline.load_run(submission, config) is not None))
    return result if same else None


def write_result(result: GradeResult, layout: Layout) -> None:
    # result.json comes last: a resumed batch keeps a submission that has one, so the report must
    # already be there when it appears.
    path = layout.result(result.submission_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    report.write_report(result, layout.report(result.submission_id))
    atomic.write(path, json.dumps(result.to_json(), indent=1))


def grade_all(submissions: list[Submission], config: pipeline.Config, out: Path, jobs: int,
              progress: bool = True, on_result: Callable[[GradeResult], None] | None = None,
              decisions: overrides.Decisions | None = None) -> list[GradeResult]:
    """Grade ``submissions`` (or keep their current results) and write every result, report and
    class-wide file under ``out``; ``decisions``: the instructor's overrides, as
    :func:`overrides.load` read them (checked against these submissions and this rubric)."""
    check_ids(submissions)
    layout = Layout(out)
    by_id = {submission.id: submission for submission in submissions}

    def final(result: GradeResult) -> GradeResult:
        """The automatic result as the student's, with the overrides on top."""
        submission = by_id[result.submission_id]
        result = dataclasses.replace(result, student_id=submission.student_id,
                                     student_name=submission.student_name)
        return overrides.apply(result, (decisions or {}).get(submission.id, ()))

    results: dict[str, GradeResult] = {}
    todo = []
    for submission in submissions:
        kept = is_current(layout.result(submission.id), submission, config)
        if kept is None:
            todo.append(submission)
            continue
        results[submission.id] = final(kept)
        if results[submission.id] != kept:  # other overrides, or the student's LMS name, than last time
            write_result(results[submission.id], layout)
    bar = tqdm(total=len(submissions), initial=len(results), unit="notebook", disable=not progress,
               desc="grading")

    def finish(result: GradeResult) -> None:
        result = final(result)
        write_result(result, layout)
        results[result.submission_id] = result
        bar.update(1)
        if on_result:
            on_result(result)

    for done in _grade(todo, config, jobs):
        finish(done)
    bar.close()
    ordered = [results[s.id] for s in submissions]
    report.write_summary(ordered, {r.submission_id: f"{r.submission_id}/{REPORT_NAME}" for r in ordered},
                         layout.summary)
    export.write_exports(ordered, out, config.rubric.names, students=_students(submissions))
    return ordered


def _students(submissions: list[Submission]) -> export.Students:
    """Who each submission is, for the LMS gradebooks: only the one graded for a student carries
    their LMS id, so that the LMS sees one row per student."""
    return {s.id: (s.student_id or "", s.student_name) for s in submissions
            if s.student_name is not None and s.superseded_by is None}


def time_limit(config: pipeline.Config) -> float:
    """Seconds a worker may spend on one submission: the notebook's time limit, a cell's for each
    of the grader's set-up and probe code, and :data:`GRADER_MARGIN`."""
    limits = config.rubric.limits
    return limits.notebook_timeout + 2 * limits.cell_timeout + GRADER_MARGIN


def _grade(submissions: list[Submission], config: pipeline.Config, jobs: int) -> Iterable[GradeResult]:
    # What needs no kernel is judged here at once: unreadable submissions, and those whose run is
    # kept (a rubric change regrades a class without starting a worker or a notebook).
    to_run = []
    for submission in submissions:
        kept = None if submission.error is not None else pipeline.load_run(submission, config)
        if submission.error is not None or kept is not None:
            yield pipeline.grade(submission, config, kept=kept)
        else:
            to_run.append(submission)
    yield from _in_workers(to_run, config, jobs)


def _in_workers(submissions: list[Submission], config: pipeline.Config, jobs: int,
                grade: Callable[..., GradeResult] = pipeline.grade) -> Iterator[GradeResult]:
    """Grade ``submissions`` in up to ``jobs`` worker processes; a result for each, as they come.
    ``grade(submission, config, kernels=...)`` does the work in a worker: a module-level function,
    sent to it by name."""
    # spawn, not fork: the parent may have torch's thread pools running, which fork does not copy safely.
    context = multiprocessing.get_context("spawn")
    left = context.Value("i", len(submissions))  # see pipeline.prepare
    queue = deque(submissions)
    limit = time_limit(config)
    workers = [_Worker(context, dataclasses.replace(config, uid=FIRST_JOB_UID + index), left, grade)
               for index in range(min(jobs, len(submissions)))]
    try:
        for worker in workers:
            worker.give(queue.popleft())
        while busy := [w for w in workers if w.submission is not None]:
            wait([w.conn for w in busy] + [w.process.sentinel for w in busy],
                 timeout=max(0.0, min(w.given_at for w in busy) + limit - time.monotonic()))
            for index, worker in enumerate(workers):
                result = worker.outcome(limit) if worker.submission is not None else None
                if result is None:
                    continue
                yield result
                if queue:
                    if not worker.process.is_alive():
                        workers[index] = worker = _Worker(context, worker.config, left, grade)
                    worker.give(queue.popleft())
    finally:
        for worker in workers:
            worker.stop()
        # An idle worker exits in seconds; one still busy (a batch cut short) gets a minute.
        deadline = time.monotonic() + 60
        for worker in workers:
            worker.close(deadline)


class _Worker:
    """A worker process, and the submission it is grading (None while it waits for one)."""

    def __init__(self, context, config: pipeline.Config, left, grade: Callable[..., GradeResult]):
        self.config = config
        self.conn, theirs = context.Pipe()
        self.process = context.Process(target=_serve, args=(config, left, theirs, grade),
                                       name=f"labgrader-worker-{config.uid}")
        self.process.start()
        theirs.close()
        self.submission: Submission | None = None
        self.given_at = 0.0

    def give(self, submission: Submission) -> None:
        """Hand it ``submission``: a worker reads as soon as it starts and whenever it is idle, so
        this returns once the submission is sent (or at once, if the worker has died)."""
        with contextlib.suppress(OSError):  # a dead worker is found out by outcome()
            self.conn.send(submission)
        self.submission, self.given_at = submission, time.monotonic()

    def outcome(self, limit: float) -> GradeResult | None:
        """The result for its submission: the worker's, or an error one if the worker died or has
        had it ``limit`` seconds; None while it is still at work."""
        submission = self.submission
        if self.conn.poll():
            try:
                result = self.conn.recv()
            except (EOFError, OSError):  # it died: nothing came but the end
                self.process.join(5)
            else:
                self.submission = None
                return result
        alive = self.process.is_alive()
        if alive and time.monotonic() - self.given_at < limit:
            return None
        why = (f"it had no result after {limit:g} s, so the grader stopped its worker" if alive
               else f"the grader's worker process died ({_death(self.process.exitcode)})")
        self.kill()
        self.submission = None
        # Built as intake's errors are; a rerun grades the notebook again, as for every "error".
        reason = (f"the grader failed on this notebook: {why}. This is a fault of the grader, not of "
                  "the notebook; it is graded again on the next run")
        return pipeline.grade(dataclasses.replace(submission, error=reason), self.config)

    def kill(self) -> None:
        """SIGKILL the worker and the kernels it started."""
        if self.process.is_alive():  # not reaped yet, so the pid is still its own
            _kill_family(self.process.pid)
        self.process.join()

    def stop(self) -> None:
        """Tell it to exit once idle (a few bytes: this never waits)."""
        with contextlib.suppress(OSError):
            self.conn.send(None)

    def close(self, deadline: float) -> None:
        """Wait for it to stop its kernels and exit; kill it if it has not by ``deadline``."""
        self.process.join(max(0.0, deadline - time.monotonic()))
        if self.process.is_alive():
            self.kill()
        self.conn.close()


def _death(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        with contextlib.suppress(ValueError):
            name = signal.Signals(-exitcode).name
            return f"killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
    return f"exit code {exitcode}"


def _kill_family(pid: int) -> None:
    """SIGKILL ``pid``'s descendants, then ``pid``. The descendants are stopped first, and the tree
    looked at again until nothing new appears, so that none escapes by forking meanwhile."""
    stopped: set[int] = set()
    while new := set(_family(pid)[1:]) - stopped:
        for member in new:
            with contextlib.suppress(OSError):
                os.kill(member, signal.SIGSTOP)
        stopped |= new
    for member in [*stopped, pid]:
        with contextlib.suppress(OSError):
            os.kill(member, signal.SIGKILL)


def _family(pid: int) -> list[int]:
    """``pid`` and its descendants."""
    children = execute.children_by_parent()
    family = [pid]
    for member in family:  # grows while it is walked: breadth first
        family.extend(children.get(member, ()))
    return family


def _serve(config: pipeline.Config, left, conn, grade: Callable[..., GradeResult]) -> None:
    """A worker's life: each submission the parent sends graded with kernels prepared once (see
    :func:`pipeline.prepare`), until it sends None. A kernel still waiting for a notebook is stopped
    on the way out."""
    _die_with_parent()
    with contextlib.suppress(KeyboardInterrupt, EOFError):
        submission = conn.recv()  # first: the parent's send of a large notebook waits for this
        with pipeline.prepare(config, notebooks=left) as kernels:
            while submission is not None:
                conn.send(grade(submission, config, kernels=kernels))
                submission = conn.recv()


def _die_with_parent() -> None:
    """End this worker and its kernels the moment the batch's process ends, however it ends
    (SIGKILL included). A worker left grading on its own would race a rerun over the same run
    directories. Its kernels are killed here, not left to their parent-death signal: so left, they
    outlived a worker killed while they started 5 times in 12 (one ran on, orphaned, for nine
    minutes, until killed by hand)."""
    parent = multiprocessing.parent_process()

    def watch() -> None:
        wait([parent.sentinel])
        _kill_family(os.getpid())

    threading.Thread(target=watch, name="labgrader-parent-watch", daemon=True).start()
