"""Grade many submissions: on a Dask cluster (:mod:`grader.cluster`; by default a local one of
``jobs`` worker processes), with a progress bar, resumably, never stopped by one bad notebook.
Results are written by this (client) process as each arrives, atomically, so an interrupted batch
leaves only whole results behind and a re-run picks up where it stopped.

Notebooks run on the cluster's workers, never in this process, and nothing is shared with them but
what the tasks carry: this process writes every file, a submission's kept run included. What needs no
kernel is judged here without starting a cluster: unreadable submissions, and those whose run is kept
(a rubric change regrades a class without running a notebook). A kept run is kept only if made in a
sandbox a notebook would get now: this machine's for the local cluster, and for an existing cluster
one its workers give (asked once: the instructor's machine may sandbox differently). Each submission
must be done within :func:`time_limit` of reaching its worker's grading thread; one whose worker stops
it for that, or whose workers keep dying on it, gets an "error" result blaming the grader, which a
rerun grades again (only "graded" results are kept). When this process ends, however it ends, a local
cluster's workers end too (each exits when its parent's pipe closes), and their kernels with them. A
killed worker leaves its kernels' temporary directories behind, as a killed batch does.

Each submission's files are under ``<out>/<id>/`` and its kept run under ``<out>/.runs/<id>/``, beside
the class-wide files (:func:`class_files`): a batch refuses, before writing anything, submissions
whose ids are not each a distinct folder name (compared case-insensitively) that none of those
takes; :func:`grader.intake.collect` with ``reserved=class_files()`` gives such ids. Every result
written carries its student's LMS id and name and the instructor's overrides (``overrides``,
applied on top of the automatic grade whether it was graded now or kept: changing only the
overrides rewrites results and reports, and runs no notebook).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from grader import export, overrides, pipeline, report
from grader.results import GradeResult, Submission
from reference import atomic

RESULT_NAME = "result.json"
REPORT_NAME = "report.html"
FIRST_JOB_UID = 61000  # the first of the unprivileged uids workers take, one each: RLIMIT_NPROC counts per uid
WORKER_FILE = "worker.txt"  # in a kept run: who ran the notebook, for the results graded from it
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


def is_current(result_path: Path, submission: Submission, config: pipeline.Config,
               isolations: list[dict] | None = None) -> GradeResult | None:
    """The kept result, if nothing that decides it has changed since; ``isolations``: as for
    :func:`pipeline.load_run`."""
    try:
        result = GradeResult.from_json(json.loads(result_path.read_text()))
    except (OSError, ValueError, TypeError, KeyError):
        return None
    same = (result.notebook_sha256 == submission.sha256 and result.rubric_sha256 == config.rubric.sha256
            and result.spec_version == config.spec.version and result.status == ("error" if submission.error else "graded")
            and (submission.error is not None or pipeline.load_run(submission, config, isolations) is not None))
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
              decisions: overrides.Decisions | None = None, scheduler: str | None = None) -> list[GradeResult]:
    """Grade ``submissions`` (or keep their current results) and write every result, report and
    class-wide file under ``out``; ``decisions``: the instructor's overrides, as
    :func:`overrides.load` read them (checked against these submissions and this rubric).
    ``scheduler``: an existing cluster's (``tcp://HOST:PORT`` or a scheduler file); None: a local
    cluster of up to ``jobs`` workers. Raises :class:`cluster.NoWorker` when no worker can grade."""
    check_ids(submissions)
    layout = Layout(out)
    by_id = {submission.id: submission for submission in submissions}
    isolations = _isolations(config, scheduler)

    def final(result: GradeResult) -> GradeResult:
        """The automatic result as the student's, with the overrides on top."""
        submission = by_id[result.submission_id]
        result = dataclasses.replace(result, student_id=submission.student_id,
                                     student_name=submission.student_name)
        return overrides.apply(result, (decisions or {}).get(submission.id, ()))

    results: dict[str, GradeResult] = {}
    todo = []
    for submission in submissions:
        kept = is_current(layout.result(submission.id), submission, config, isolations)
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

    for done in _grade(todo, config, jobs, scheduler, isolations):
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


def _isolations(config: pipeline.Config, scheduler: str | None) -> list[dict] | None:
    """The sandboxes a notebook run now would have, for comparing kept runs' with: on an existing
    cluster its workers', asked once (this machine's may differ); None for the local cluster, whose
    workers sandbox as this machine does."""
    if scheduler is None:
        return None
    from grader import cluster

    return cluster.isolations(scheduler, config.isolation)


def _grade(submissions: list[Submission], config: pipeline.Config, jobs: int,
           scheduler: str | None, isolations: list[dict] | None) -> Iterable[GradeResult]:
    # What needs no kernel is judged here at once: unreadable submissions, and those whose run is
    # kept (a rubric change regrades a class without starting a worker or a notebook).
    to_run = []
    for submission in submissions:
        kept = None if submission.error is not None else pipeline.load_run(submission, config, isolations)
        if submission.error is not None or kept is not None:
            result = pipeline.grade(submission, config, kept=kept)
            yield result if kept is None else dataclasses.replace(result, worker=_ran_on(kept.directory))
        else:
            to_run.append(submission)
    if to_run:
        yield from _in_workers(to_run, config, jobs, scheduler)


def _in_workers(submissions: list[Submission], config: pipeline.Config, jobs: int, scheduler: str | None = None,
                grade: Callable[..., GradeResult] = pipeline.grade) -> Iterator[GradeResult]:
    """Grade ``submissions`` on the cluster (see :func:`grade_all`), keeping each run under
    ``config.runs_dir``; a result for each, as they come. ``grade``: what a worker calls, with
    ``pipeline.grade``'s signature (another only in tests)."""
    from grader import cluster

    work = cluster.Batch(config, time_limit(config), FIRST_JOB_UID, grade)
    with cluster.connect(scheduler, min(jobs, len(submissions))) as client:
        if address := cluster.dashboard(client):
            _say(f"dashboard: {address}")
        for worker, reason in sorted(cluster.prepare(client, work).items()):
            if reason is not None:
                _say(f"worker {worker} takes no notebook: {reason}")
        for submission, outcome in cluster.grade(client, work, submissions):
            if isinstance(outcome, str):
                # Built as intake's errors are; a rerun grades the notebook again, as for every "error".
                reason = (f"the grader failed on this notebook: {outcome}. This is a fault of the grader, "
                          "not of the notebook; it is graded again on the next run")
                yield pipeline.grade(dataclasses.replace(submission, error=reason), config)
                continue
            if outcome.run:
                _keep_run(config.runs_dir / submission.id, outcome.run, outcome.result.worker)
            yield outcome.result


def _keep_run(directory: Path, files: dict[str, bytes], worker: str | None) -> None:
    """Write a run a worker made as :func:`pipeline.run` would have here: ``key.json`` last, so that
    an interrupted write is never taken for a kept run."""
    if directory.exists():
        shutil.rmtree(directory)
    for name in sorted(files, key=lambda name: name == "key.json"):
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name == "key.json":
            atomic.write(path, files[name])
        else:
            path.write_bytes(files[name])
    (directory / WORKER_FILE).write_text(worker or "")


def _ran_on(directory: Path) -> str | None:
    """The worker that ran a kept run, as :func:`_keep_run` noted it (None for older runs)."""
    try:
        return (directory / WORKER_FILE).read_text() or None
    except OSError:
        return None


def _say(line: str) -> None:
    tqdm.write(line, file=sys.stderr)
