"""``labgrader``: provision data, derive the reference spec, grade a class, self-check, assign."""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from pathlib import Path

DATASETS = ("mnist", "fashion-mnist")


def run() -> None:
    """The ``labgrader`` command: :func:`main`, then an exit that spares the CPU Python's last garbage
    collections would spend walking every object torch, torchvision and matplotlib made (``check``
    spent 1.1 s exiting after its report was written). Frozen, they are left to the OS; atexit
    handlers and finalizers still run. Not in :func:`main`, which tests call in a process that goes
    on."""
    code = main()
    gc.freeze()
    sys.exit(code)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.command(args)
    except KeyboardInterrupt:
        print("\ninterrupted: finished results are kept; run the same command again to resume",
              file=sys.stderr)
        return 130
    except UserError as error:
        print(f"labgrader: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a path that can't be written or read: the OS's words are the reason
        print(f"labgrader: {error}", file=sys.stderr)
        return 1


class UserError(Exception):
    """A problem the user can fix; printed as one line, no traceback."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="labgrader", description=__doc__)
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    data = commands.add_parser("data", help="prepare a dataset root torchvision reads offline")
    _dataset_options(data)
    data.set_defaults(command=_data)

    ref = commands.add_parser("reference", help="run the reference and write the expected-behaviour spec")
    _dataset_options(ref)
    ref.add_argument("--out", type=Path, help="spec file to write (default: the one labgrader ships)")
    ref.set_defaults(command=_reference)

    grade = commands.add_parser("grade", help="grade notebooks, directories of them, or zip archives")
    grade.add_argument("paths", nargs="+", type=Path)
    grade.add_argument("--out", type=Path, default=Path("out"), help="where results and reports go")
    grade.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel workers of the local "
                       "cluster (default: cores; never more than the notebooks to run)")
    where = grade.add_mutually_exclusive_group()
    where.add_argument("--scheduler", metavar="tcp://HOST:PORT", help="grade on this Dask cluster instead of a "
                       "local one (also: LABGRADER_SCHEDULER, an address or a scheduler file); see docs/cluster.md")
    where.add_argument("--scheduler-file", type=Path, metavar="FILE", help="the cluster's scheduler file (as "
                       "`dask scheduler --scheduler-file` writes it)")
    grade.add_argument("--overrides", type=Path, metavar="FILE", help="the instructor's overrides (.toml or .csv: "
                       "student, check or total, points, comment, by, at), applied on top of the grades; "
                       "kept runs are not run again")
    _grading_options(grade)
    _support_option(grade)
    grade.set_defaults(command=_grade)

    check = commands.add_parser("check", help="check your own notebook; exit 0 only if the visible checks pass")
    check.add_argument("notebook", type=Path)
    check.add_argument("--out", type=Path, default=Path("labgrader-report"), help="where the report goes")
    check.add_argument("--min-score", type=float, help="pass when the score reaches this instead")
    _grading_options(check)
    _support_option(check)
    check.set_defaults(command=_check)

    assign = commands.add_parser("assign", help="make the student notebook from the instructor's")
    assign.add_argument("--instructor", type=Path, help="default: lab/instructor.ipynb")
    assign.add_argument("--student", type=Path, help="default: lab/student.ipynb")
    _grading_options(assign)
    assign.set_defaults(command=_assign)

    gradescope = commands.add_parser("gradescope", help="write the autograder zip of a Gradescope programming "
                                     "assignment; inside it, --run grades a submission")
    gradescope.add_argument("--out", type=Path, default=Path("autograder.zip"), help="the zip to write")
    gradescope.add_argument("--wheel", type=Path, help="the labgrader wheel to put in the zip (default: built "
                            "from this checkout)")
    gradescope.add_argument("--run", type=Path, metavar="ROOT", help="grade ROOT/submission into ROOT/results, "
                            "as Gradescope lays them out (what the zip's run_autograder does)")
    _grading_options(gradescope)
    gradescope.set_defaults(command=_gradescope)

    doctor = commands.add_parser("doctor", help="say which sandbox this machine gives student notebooks, and "
                                 "whether the rubric's packages are installed; exit 0 only if it is bubblewrap")
    doctor.add_argument("--rubric", type=Path, help="rubric TOML whose packages to look for (default: lab/rubric.toml)")
    doctor.set_defaults(command=_doctor)

    packages = commands.add_parser("packages", help="print the packages the rubric declares grading provides, one "
                                   "a line (what the set-up installs: labgrader packages | xargs pip install)")
    packages.add_argument("--rubric", type=Path, help="rubric TOML (default: lab/rubric.toml)")
    packages.set_defaults(command=_packages)
    return parser


def _dataset_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", choices=DATASETS, default="mnist")
    parser.add_argument("--root", type=Path, help="dataset root to prepare or use (default: a cache dir)")
    parser.add_argument("--data-dir", type=Path, help="a directory holding the four IDX files "
                        "(also: LABGRADER_DATA_DIR)")


def _grading_options(parser: argparse.ArgumentParser) -> None:
    _dataset_options(parser)
    parser.add_argument("--rubric", type=Path, help="rubric TOML (default: lab/rubric.toml)")
    parser.add_argument("--spec", type=Path, help="grade against this spec (made with `labgrader reference "
                        "--out`) instead of the committed or derived one; refused unless made from this data")
    parser.add_argument("--no-fast-data", dest="fast_data", action="store_false",
                        help="serve dataset items through torchvision's stock PIL path")
    parser.add_argument("--isolation", choices=("auto", "bubblewrap", "subprocess"), default="auto")
    parser.add_argument("--no-preload", dest="preload", action="store_false",
                        help="start each kernel cold, without torch, torchvision and matplotlib imported "
                        "ahead (each result says which it had)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per kernel (default: 1; "
                        "capped so that jobs x threads never exceeds the cores)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _support_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--support-file", dest="support_files", type=Path, action="append", default=[],
                        metavar="PATH", help="a file copied read-only into every notebook's folder before its first "
                        "cell (a helper the notebooks import); repeatable, added to the rubric's [environment]")


def _rubric(args: argparse.Namespace):
    """The rubric, with the command line's support files added; a bad one is a one-line error."""
    import dataclasses

    from grader import resources, score

    try:
        rubric = score.load_rubric(args.rubric or resources.RUBRIC_PATH)
        extra = getattr(args, "support_files", [])
        return dataclasses.replace(rubric, environment=rubric.environment.adding(
            extra, reserved=(rubric.model_file,))) if extra else rubric
    except (OSError, ValueError) as error:
        raise UserError(str(error)) from None


def _provision(args: argparse.Namespace):
    from reference import idx, provision

    try:
        return provision.provision(args.dataset, root=args.root, data_dir=args.data_dir)
    except (provision.DatasetUnavailable, idx.IdxError, ValueError) as error:
        raise UserError(str(error)) from None
    except OSError as error:  # an unwritable root, a full disk: the user's to fix, not a traceback
        raise UserError(f"cannot provision {args.dataset}: {error}") from None


def _describe(provisioned) -> str:
    sample = " (a SAMPLE of MNIST, not the full dataset)" if provisioned.is_sample else ""
    return (f"{provisioned.profile}{sample}: {provisioned.train_size} training / {provisioned.test_size} "
            f"test images at {provisioned.root} (from {provisioned.source})")


def _data(args: argparse.Namespace) -> int:
    from reference import provision

    provisioned = _provision(args)
    print(_describe(provisioned))
    others = [p.profile for p in provision.datasets_in(provisioned.root) if p != provisioned]
    if others:
        print(f"also provisioned in {provisioned.root}: {', '.join(others)}")
    return 0


def _reference(args: argparse.Namespace) -> int:
    from reference import spec

    provisioned = _provision(args)
    # Without --out: the committed spec of an offline profile, else the cache grading derives into.
    path = args.out or (spec.path_for(provisioned.profile) if spec.path_for(provisioned.profile).is_file()
                        else spec.cache_path(provisioned))
    try:
        previous = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError) as error:
        raise UserError(f"{path} exists and is not a spec ({error}); name another --out") from None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)  # fails now rather than after the training
        print(f"running the reference on {_describe(provisioned)}")
        content = spec.generate(provisioned)
        spec.write(content, path)
    except (OSError, ValueError) as error:
        raise UserError(f"cannot make {path}: {error}") from None
    content = json.loads(spec.dumps(content))  # as written: lists, not tuples
    if previous is None:
        change = "new"
    elif previous == content:
        change = "identical to the previous spec"
    elif not spec.differences(content, previous):
        change = "the same as the previous spec within the rounding another CPU explains"
    else:
        change = "CHANGED from the previous spec: " + "; ".join(spec.differences(content, previous)[:3])
    print(f"test accuracy {content['test_accuracy']:.4f}; passing threshold "
          f"{content['thresholds']['saved_model_min_accuracy']:.4f}")
    print(f"wrote {path} ({change})")
    return 0


def _threads(wanted: int, jobs: int) -> int:
    """One by default: the lab's model is tiny, and measured here 300 training steps took 0.93 s on
    one thread and 7.75 s on two on a busy 2-core machine. More only where cores would sit idle."""
    return max(1, min(wanted, (os.cpu_count() or 1) // jobs))


def _config(args: argparse.Namespace, out: Path, jobs: int = 1, runs_dir: Path | None = None):
    from grader import batch, pipeline

    if _scheduler(args) is None:  # on a cluster, each worker checks its own sandbox (grader.cluster)
        _require_isolation(args.isolation)
    rubric = _rubric(args)  # a missing support file stops at once, before the dataset is prepared
    provisioned = _provision(args)
    try:
        loaded_spec = _spec(args, provisioned)
    except (OSError, ValueError) as error:
        raise UserError(str(error)) from None
    hide = tuple(p.resolve() for p in getattr(args, "paths", ()))  # other students' submissions
    return pipeline.Config(provisioned=provisioned, spec=loaded_spec, rubric=rubric,
                           runs_dir=(runs_dir or batch.Layout(out).runs).resolve(), threads=_threads(args.threads, jobs),
                           fast_data=args.fast_data, isolation=args.isolation, hide=hide, preload=args.preload)


def _require_isolation(isolation: str) -> None:
    """``--isolation bubblewrap`` where the sandbox cannot start: stop before grading anything."""
    from grader import sandbox

    problem = sandbox.bubblewrap_problem() if isolation == sandbox.BUBBLEWRAP else None
    if problem is not None:
        raise UserError(f"--isolation bubblewrap: the sandbox cannot start here: {problem} "
                        "(`labgrader doctor` says more)")


def _doctor(args: argparse.Namespace) -> int:
    from grader import doctor, sandbox

    lines = doctor.diagnose(_rubric(args).environment.packages)
    width = max(len(line.name) for line in lines)
    for line in lines:
        print(f"{'ok' if line.ok else 'NO':<3} {line.name:<{width}}  {line.detail}")
    return 0 if sandbox.bubblewrap_problem() is None else 1


def _packages(args: argparse.Namespace) -> int:
    for package in _rubric(args).environment.packages:
        print(package)
    return 0


def _spec(args: argparse.Namespace, provisioned):
    """The pinned spec, else the committed one, else the one derived for this data (cached)."""
    import time

    from reference import spec

    if args.spec is not None:
        return spec.pinned(args.spec, provisioned)
    found = spec.committed(provisioned) or spec.cached(provisioned)
    if found is not None:
        return found
    why = ("the committed one was made from other files" if spec.path_for(provisioned.profile).is_file()
           else "none is committed")
    print(f"no spec for this {provisioned.profile} data ({why}): deriving it by running the reference "
          "on it, once; it is kept for the next runs", file=sys.stderr)
    started = time.monotonic()
    derived = spec.derive(provisioned)
    print(f"derived the spec in {time.monotonic() - started:.0f} s; kept at {spec.cache_path(provisioned)}",
          file=sys.stderr)
    return derived


def _scheduler(args: argparse.Namespace) -> str | None:
    """The cluster to grade on: --scheduler, --scheduler-file, else LABGRADER_SCHEDULER; None: a local one."""
    from grader import cluster

    if not hasattr(args, "scheduler"):  # a command that grades here only
        return None
    return args.scheduler or (str(args.scheduler_file) if args.scheduler_file else cluster.scheduler_from_env())


def _grade(args: argparse.Namespace) -> int:
    import dataclasses

    from grader import batch, cluster, intake, overrides

    if args.jobs < 1:
        raise UserError("--jobs must be at least 1")
    submissions = intake.collect(args.paths, reserved=batch.class_files())
    if not submissions:
        raise UserError(f"no notebooks found in {', '.join(map(str, args.paths))}")
    config = _config(args, args.out, args.jobs)
    try:  # all of it checked before anything is graded or written
        decisions = overrides.load(args.overrides, submissions, config.rubric) if args.overrides else {}
    except overrides.OverrideError as error:
        raise UserError(str(error)) from None
    scheduler = _scheduler(args)
    if scheduler is None:
        where = f"{args.jobs} worker(s) x {config.threads} thread(s)"
    else:  # each worker caps the threads by its own node's cores
        config = dataclasses.replace(config, threads=args.threads)
        where = f"the cluster at {scheduler}"
    print(f"grading {len(submissions)} submission(s) on {_describe(config.provisioned)}; {where}", file=sys.stderr)
    try:
        results = batch.grade_all(submissions, config, args.out, args.jobs, progress=not args.quiet,
                                  decisions=decisions, scheduler=scheduler)
    except cluster.NoWorker as error:
        raise UserError(str(error)) from None
    graded = [r for r in results if r.status == "graded"]
    width = max(len(r.submission_id) for r in results)
    for r in results:
        shown = f"{r.score:g}/{r.max_score:g}" if r.status == "graded" else f"error: {r.reason}"
        if r.overrides:
            shown += f" (overridden; automatic {r.automatic_score:g})"
        elif r.submission_id in decisions:
            shown += " (its overrides were not applied: it was not graded)"
        print(f"{r.submission_id:<{width}}  {shown}")
    mean = sum(r.score for r in graded) / len(graded) if graded else 0.0
    print(f"{len(graded)} graded, {len(results) - len(graded)} could not be graded; mean score {mean:.2f}; "
          f"class summary: {batch.Layout(args.out).summary}")
    return 0


def _check_runs_dir(out: Path) -> Path:
    import hashlib

    from reference import provision

    return provision.cache_home() / "check-runs" / hashlib.sha256(str(out.resolve()).encode()).hexdigest()[:16]


def _check(args: argparse.Namespace) -> int:
    from grader import batch, classroom, intake, pipeline

    submissions = intake.collect([args.notebook])
    if len(submissions) != 1:
        raise UserError(f"{args.notebook}: expected one notebook, found {len(submissions)}")
    # The kept run holds every verdict, hidden ones too: it stays in the user's cache, never in the
    # report folder that a student (or a Classroom artifact) can read.
    config = _config(args, args.out, runs_dir=_check_runs_dir(args.out))
    print(f"running {args.notebook} on {_describe(config.provisioned)} ...", file=sys.stderr)
    result = pipeline.grade(submissions[0], config)
    layout = batch.Layout(args.out)
    batch.write_result(result.for_students(), layout)
    if result.status == "error":
        print(f"could not grade {args.notebook}: {result.reason}")
        return 1
    for check in result.checks:
        if check.visibility == "visible":
            mark = {"passed": "PASS", "partial": "PART", "failed": "FAIL"}[check.status]
            print(f"{mark}  {check.points:g}/{check.max_points:g}  {check.title}")
            if check.status != "passed":
                print(f"      {check.message}")
            for warning in check.warnings:
                print(f"      warning: {warning}")
    hidden = [c for c in result.checks if c.visibility == "hidden"]
    if hidden:
        print(f"+ {len(hidden)} hidden check(s), scored by your instructor")
    print(f"score {result.score:g}/{result.max_score:g}; report: {layout.report(result.submission_id)}")
    return 0 if classroom.passes(result, args.min_score) else 1


def _assign(args: argparse.Namespace) -> int:
    import tempfile

    from grader import assign, intake, pipeline, resources

    instructor = args.instructor or resources.LAB_DIR / "instructor.ipynb"
    student = args.student or resources.LAB_DIR / "student.ipynb"

    def grade_fn(path: Path) -> tuple[float, float]:
        with tempfile.TemporaryDirectory() as out:
            result = pipeline.grade(intake.collect([path])[0], _config(args, Path(out)))
        return result.score, result.max_score

    try:
        assign.assign(instructor, student, grade_fn)
    except assign.AssignError as error:
        raise UserError(str(error)) from None
    print(f"wrote {student}")
    return 0


def _gradescope(args: argparse.Namespace) -> int:
    import tempfile

    from grader import gradescope, pipeline, resources, score

    if args.run is not None:
        # The kept run holds hidden checks' messages: it stays out of the results folder.
        with tempfile.TemporaryDirectory(prefix="labgrader-runs-") as runs:
            config = _config(args, args.run / "results", runs_dir=Path(runs))
            result = gradescope.run(args.run, lambda submission: pipeline.grade(submission, config))
        shown = f"{result.score:g}/{result.max_score:g}" if result.status == "graded" else f"error: {result.reason}"
        print(f"{result.submission_id}: {shown}")  # Gradescope shows stdout to instructors only
        for check in result.checks:
            print(f"  {check.status:<7} {check.points:g}/{check.max_points:g}  {check.name}")
        return 0
    provisioned = _provision(args)
    rubric = args.rubric or resources.RUBRIC_PATH
    try:
        score.load_rubric(rubric)
        loaded = _spec(args, provisioned)
        written = gradescope.build(args.out, provisioned=provisioned, dataset=args.dataset, spec=loaded,
                                   rubric=rubric, wheel=args.wheel)
    except (OSError, ValueError, gradescope.BuildError) as error:
        raise UserError(str(error)) from None
    print(f"wrote {written} ({written.stat().st_size / 1e6:.1f} MB; {_describe(provisioned)}, spec "
          f"{loaded.version}): upload it as the autograder of a Gradescope programming assignment "
          "(Ubuntu 22.04 or 24.04 base image)")
    return 0


if __name__ == "__main__":
    run()
