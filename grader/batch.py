"""Grade many submissions: parallel workers, a progress bar, resumable, never stopped by one bad
notebook. Results are written by this (parent) process as each arrives, atomically, so an
interrupted batch leaves only whole results behind and a re-run picks up where it stopped.
"""
from __future__ import annotations

import json
import multiprocessing
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from grader import export, pipeline, report
from grader.results import GradeResult, Submission

RESULT_NAME = "result.json"
REPORT_NAME = "report.html"
FIRST_JOB_UID = 61000  # one unprivileged uid per worker: RLIMIT_NPROC counts per uid


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
    export.atomic_write_text(path, json.dumps(result.to_json(), indent=1))


def grade_all(submissions: list[Submission], config: pipeline.Config, out: Path, jobs: int,
              progress: bool = True, on_result: Callable[[GradeResult], None] | None = None) -> list[GradeResult]:
    layout = Layout(out)
    results: dict[str, GradeResult] = {}
    todo = []
    for submission in submissions:
        kept = is_current(layout.result(submission.id), submission, config)
        if kept is not None:
            results[submission.id] = kept
        else:
            todo.append(submission)
    bar = tqdm(total=len(submissions), initial=len(results), unit="notebook", disable=not progress,
               desc="grading")

    def finish(result: GradeResult) -> None:
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
    export.write_exports(ordered, out, config.rubric.names)
    return ordered


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
    if jobs <= 1 or len(to_run) <= 1:
        if to_run:
            with pipeline.prepare(config, notebooks=len(to_run)) as kernels:
                for submission in to_run:
                    yield pipeline.grade(submission, config, kernels=kernels)
        return
    # spawn, not fork: the parent has torch's thread pools running, which fork does not copy safely.
    context = multiprocessing.get_context("spawn")
    uids = context.Queue()
    for index in range(jobs):
        uids.put(FIRST_JOB_UID + index)
    left = context.Value("i", len(to_run))
    with ProcessPoolExecutor(max_workers=min(jobs, len(to_run)), mp_context=context,
                             initializer=_start_worker, initargs=(config, uids, left)) as pool:
        futures = [pool.submit(_grade_in_worker, s) for s in to_run]
        try:
            for future in as_completed(futures):
                yield future.result()
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise


_worker_config: pipeline.Config | None = None
_worker_kernels = None


def _start_worker(config: pipeline.Config, uids, left) -> None:
    global _worker_config, _worker_kernels
    import dataclasses
    from multiprocessing import util

    _worker_config = dataclasses.replace(config, uid=uids.get())
    # The workers share the count of notebooks left, so together they start no kernel ahead past
    # the last notebook. One can still be left waiting (another worker took the notebook it was
    # for); it is stopped when its worker exits (multiprocessing runs finalizers with an exit
    # priority then; atexit handlers don't run in pool workers).
    _worker_kernels = pipeline.prepare(_worker_config, notebooks=left)
    util.Finalize(_worker_kernels, _worker_kernels.close, exitpriority=10)


def _grade_in_worker(submission: Submission) -> GradeResult:
    return pipeline.grade(submission, _worker_config, kernels=_worker_kernels)
