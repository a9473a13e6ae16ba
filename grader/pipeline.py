"""One submission from intake to a scored result.

:func:`run` does the expensive, rubric-independent part (sandbox -> execute -> probe) and keeps what
it produced in a run directory; :func:`judge` does the rest (checks -> score). The checks' verdicts
and what the report shows of the run depend on the run alone, so they are kept beside it too: a
changed rubric regrades from the run directory without executing anything, loading the dataset or
importing torch.
A run is reused only while its key matches: the notebook's hash, the spec, the grading code and the
execution settings.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import nbformat
import numpy as np

import grader
import reference
from grader import checks, execute, probe
from grader.results import CellRun, CheckResult, Execution, GradeResult, Submission
from grader.environment import import_names, package_versions
from grader.score import Rubric, score
from reference import atomic
from reference.provision import Provisioned
from reference.spec import Spec

if TYPE_CHECKING:
    from multiprocessing.sharedctypes import Synchronized

# expected, saved_model, reference.data and figures import torch or matplotlib (seconds per
# process): they are imported in the functions that compute a run's findings the first time, so a
# regrade from kept findings never loads them.

# A cached run is stale when anything that can change its verdicts changes: every module of the
# grader and reference packages (a new module counts from the day it is added), except these, which
# only present verdicts already made or start the work (figures.py has its own digest: a change to
# it redraws kept findings without running the notebook)...
_PRESENTATION = frozenset({"report.py", "export.py", "figures.py", "cli.py", "assign.py", "doctor.py", "overrides.py",
                           "resources.py", "selfcheck.py"})
# ...and the libraries that execute the notebook, compute the reference or read what came back.
_DEPENDENCIES = ("torch", "torchvision", "numpy", "nbclient", "nbformat", "ipykernel", "jupyter_client",
                 "pyzmq", "matplotlib", "mlxtend")


@dataclass(frozen=True)
class Config:
    provisioned: Provisioned
    spec: Spec
    rubric: Rubric
    runs_dir: Path  # where run directories are kept; outside every sandbox
    threads: int = 1
    fast_data: bool = True
    seed: int = 0  # seeds torch, numpy and random before the notebook runs
    isolation: str = "auto"
    uid: int = 65534
    hide: tuple[Path, ...] = ()  # besides what execute always hides: the grader, reference and checkout
    preload: bool = True  # kernels start warm: execute.PRELOAD imported before the first cell
    scratch: Path | None = None  # where kernels' directories go: execute.Sandboxing.scratch

    def sandboxing(self) -> execute.Sandboxing:
        limits = dataclasses.replace(self.rubric.limits, threads=self.threads)
        return execute.Sandboxing(data_root=self.provisioned.root, limits=limits,
                                  hide=(*self.hide, self.runs_dir), uid=self.uid, isolation=self.isolation,
                                  preload=execute.PRELOAD if self.preload else (), scratch=self.scratch,
                                  datasets=(self.provisioned.torchvision_class,))


@dataclass(frozen=True)
class Run:
    """What executing one notebook produced, as kept in its run directory: the probe's answer as
    the channel received it, and parsed (``answers`` is None when there is none to parse)."""

    directory: Path
    execution: Execution
    plan: probe.Plan
    answers: probe.Answers | None
    received: probe.Received = probe.Received()

    @property
    def integrity(self) -> tuple[str, ...]:
        """What the probe had to undo in the kernel, and what the grader saw on its channel."""
        kernel = self.answers.integrity if self.answers is not None else ()
        return kernel + self.received.findings(self.execution.probe_error)


@dataclass(frozen=True)
class Findings:
    """What a run shows before any rubric applies: every check's verdict, and for the report the
    figures (base64 PNGs) and the saved model's confusion matrix (None without a usable model)."""

    verdicts: list[CheckResult]
    figures: dict[str, str]
    confusion: list[list[int]] | None


def _digest(files: Iterable[Path], *texts: str) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    for text in texts:
        digest.update(text.encode() + b"\0")
    return digest.hexdigest()[:16]


def code_files(*packages: Path) -> list[Path]:
    """Every module below the package directories, presentation modules left out, in a fixed order."""
    return sorted((p for root in packages for p in root.rglob("*.py")
                   if not (p.parent == root and p.name in _PRESENTATION)), key=lambda p: p.as_posix())


@functools.cache
def engine_digest() -> str:
    import importlib.metadata
    import platform

    def version(name: str) -> str:
        try:
            return f"{name}=={importlib.metadata.version(name)}"
        except importlib.metadata.PackageNotFoundError:
            return f"{name} absent"

    packages = (Path(grader.__file__).parent, Path(reference.__file__).parent)
    return _digest(code_files(*packages), platform.python_version(), *map(version, _DEPENDENCIES))


@functools.cache
def figures_digest() -> str:
    """Kept findings hold drawn figures: a change to the drawing redraws them from the kept run,
    without running the notebook again (the run key leaves figures.py out for that reason)."""
    return _digest([Path(grader.__file__).parent / "figures.py"])


@functools.cache
def isolation_available(isolation: str) -> dict[str, Any]:
    """How strongly a notebook would be isolated here now. A run kept from a weaker sandbox (the
    subprocess fallback, no job uid, no resource box) is not reused once a stronger one works."""
    from grader import cgroups, sandbox

    try:
        mode = sandbox.choose_mode(isolation)[0]
    except Exception as error:  # noqa: BLE001 - demanded but unavailable: no run is made anyway
        mode = f"unavailable: {error}"
    return {"mode": mode, "root": os.geteuid() == 0, "resource_box": cgroups.problem() is None}


def run_key(submission: Submission, config: Config) -> dict[str, Any]:
    """What decides a run. Not the thread count: it changes only the last bits of the notebook's own
    training (the probe always runs single-threaded), and a regrade with other --jobs must not rerun."""
    return {"notebook_sha256": submission.sha256, "spec_version": config.spec.version,
            "engine": engine_digest(), "profile": config.provisioned.profile,
            "fast_data": config.fast_data, "seed": config.seed,
            "model_file": config.rubric.model_file, "limits": dataclasses.asdict(config.rubric.limits),
            "isolation": isolation_available(config.isolation),
            # What the notebook finds besides the lab's: a changed helper or package regrades it.
            "support_files": config.rubric.environment.digest(), "packages": declared_packages(config)}


def declared_packages(config: Config) -> dict[str, str | None]:
    """The rubric's declared packages with their installed versions (None: not installed)."""
    return dict(_versions(config.rubric.environment.packages))


@functools.cache
def _versions(packages: tuple[str, ...]) -> dict[str, str | None]:
    return package_versions(packages)


def put_support_files(config: Config, workdir: Path) -> None:
    """Copy the instructor's support files into a kernel's work dir before its first cell, read-only
    (0444): a notebook's own download or write of the same name fails instead of replacing the
    helper. (The executor hands what is there to the job uid, which could still chmod it: the probe
    never reads these files, so that changes only what the notebook itself runs.)"""
    for support in config.rubric.environment.support_files:
        target = workdir / support.name
        target.write_bytes(support.content)
        target.chmod(0o444)


@functools.cache
def _dataset(root: str, torchvision_class: str):
    from reference import data

    return data.read_split(root, torchvision_class, True), data.read_split(root, torchvision_class, False)


# Held while prepare() loads in the background; whatever needs what it loads waits here.
_loading = threading.Lock()


def dataset(config: Config):
    with _loading:
        return _dataset_of(config)


def _dataset_of(config: Config):
    return _dataset(str(config.provisioned.root), config.provisioned.torchvision_class)


def prepare(config: Config, notebooks: int | Synchronized | None = None) -> execute.Kernels:
    """Start the first notebook's kernel and wait until it answers, and, in the background meanwhile
    and while its cells run, load what judging needs: the dataset (torch with it), matplotlib for
    the figures and which modules the rubric's packages provide. Once per process, before its first
    notebook; a regrade of kept runs needs none of it. Later kernels start while the notebook before
    them is judged (:func:`run`).

    Nothing needs what it loads before the first notebook's cells have run (the probe's inputs are drawn
    from the dataset only then), so that notebook does not wait for them. ``notebooks``: how many
    will run, when known: by this process alone, or shared by a batch's workers (see
    :class:`execute.Kernels`)."""
    kernels = execute.Kernels(config.sandboxing(), notebooks)
    try:
        kernels.start_ahead()
        _start_loading(config)
        kernels.wait_ready()
    except BaseException:
        kernels.close()
        raise
    return kernels


def _start_loading(config: Config) -> None:
    _loading.acquire()
    try:
        # Not a daemon: a daemon thread still inside torch's C++ code when the interpreter exits can
        # abort the process (a worker left with no notebook died of SIGABRT, "terminate called
        # without an active exception"), so a process that exits early waits for the loading.
        threading.Thread(target=_load, args=(config,), name="labgrader-prepare").start()
    except BaseException:
        _loading.release()
        raise


def _load(config: Config) -> None:
    try:
        import torch  # noqa: F401

        from grader import figures  # noqa: F401

        _dataset_of(config)
        provided(config)  # the installed packages' modules: read once per process (0.5 s)
    except Exception:  # noqa: BLE001 - a head start only: the next caller of dataset() meets the error
        pass
    finally:
        _loading.release()


class GraderFault(Exception):
    """The notebook could not be run for a reason outside it (its kernel never started, the grader's
    own machinery failed): an error of the grader, reported as such and never kept as a run, so the
    next run grades the notebook again."""


def grade(submission: Submission, config: Config, reuse: bool = True, kept: Run | None = None,
          kernels: execute.Kernels | None = None) -> GradeResult:
    """Grade one submission, reusing its run when nothing that decides the run has changed.

    ``kept``: the run already loaded by a caller that had to look for it anyway. ``kernels``: the
    process's, from :func:`prepare`; without them a run prepares its own."""
    if submission.error is not None:
        return _error_result(submission, config, submission.error)
    started = time.monotonic()
    try:
        the_run = kept or (load_run(submission, config) if reuse else None) or run(submission, config, kernels)
        return judge(submission, the_run, config, started)
    except GraderFault as fault:
        return _error_result(submission, config, f"the grader could not run this notebook ({fault}); "
                             "this is a fault of the grading machine, not of the notebook, and it is "
                             "graded again on the next run")
    except Exception as error:  # one notebook that breaks the grader must not stop a class's batch
        return _error_result(submission, config, f"the grader failed on this notebook "
                             f"({type(error).__name__}: {error}); please report it")


def run(submission: Submission, config: Config, kernels: execute.Kernels | None = None) -> Run:
    if kernels is None:
        with prepare(config, notebooks=1) as own:
            return run(submission, config, own)
    directory = config.runs_dir / submission.id
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    probed: list[tuple[probe.Plan, probe.Channel]] = []

    def epilogue() -> str:
        # The probe's inputs are drawn once the cells have run: they were never there to read. They
        # go in through the grader's own directory, and the answer comes back on a socket there.
        plan = probe.make_plan(*dataset(config))
        channel = probe.Channel(kernel.channel_dir, plan.nonce, timeout=config.rubric.limits.cell_timeout + 10)
        probed.append((plan, channel))
        return probe.probe_code(plan, kernel.channel_dir, kernel.inner_channel_dir)

    with kernels.kernel() as kernel:
        notebook = nbformat.reads(submission.notebook.decode(), as_version=4)
        put_support_files(config, kernel.workdir)
        try:
            execution = kernel.run(notebook, directory, epilogue=epilogue,
                                   prelude=probe.prelude_code(config.seed, config.threads, config.fast_data))
        finally:
            received = probed[0][1].close() if probed else probe.Received()
        if execution.status == "not-run":  # no cell ran: nothing of it is the notebook's doing
            raise GraderFault(execution.reason)
        # No epilogue when the kernel died first: the reference still answers for the report.
        plan = probed[0][0] if probed else probe.make_plan(*dataset(config))
        from grader import saved_model  # torch: loaded by now, for the dataset

        saved_model.keep(kernel.workdir / config.rubric.model_file, directory / "model.pt")
    # Under bubblewrap the next kernel started when this one was handed out; in the fallback sandbox
    # only now, while this notebook is judged (see execute.Kernels.kernel).
    kernels.start_ahead()
    execution = dataclasses.replace(execution, workdir=None, fast_data=config.fast_data)
    the_run = Run(directory, execution, plan, _parsed(received, plan), received)
    _save_run(the_run, run_key(submission, config))
    return the_run


def _parsed(received: probe.Received, plan: probe.Plan) -> probe.Answers | None:
    return probe.parse(received.message, plan) if received.message is not None else None


def _save_run(the_run: Run, key: dict[str, Any]) -> None:
    """The probe's answer is kept as the channel received it (``answers``: its JSON) and parsed
    again on loading: the schema's code is in the run key."""
    directory = the_run.directory
    np.savez(directory / "plan.npz", **the_run.plan.arrays)
    received = the_run.received.to_json()
    _write_json(directory / "run.json", {
        "execution": _execution_json(the_run.execution), "answers": received.pop("message"),
        "channel": received,
        "plan": {"seed": the_run.plan.seed, "nonce": the_run.plan.nonce,
                 "data_indices": the_run.plan.data_indices}})
    # Written last: a run without its key (an interrupted one) is never reused.
    _write_json(directory / "key.json", key)


def load_run(submission: Submission, config: Config, isolations: Iterable[dict[str, Any]] | None = None
             ) -> Run | None:
    """The kept run, if its key is the one a run made now would have. Its ``isolation`` is the sandbox
    it had where it ran (a cluster's worker wrote the key): it must be one of ``isolations``, those a
    run made now would have (None: this machine's, :func:`isolation_available`; a batch on a cluster
    passes its workers'), so that a client whose sandbox differs from its workers' reruns nothing."""
    directory = config.runs_dir / submission.id
    try:
        kept, wanted = json.loads((directory / "key.json").read_text()), run_key(submission, config)
        here = wanted.pop("isolation")
        available = [here] if isolations is None else list(isolations)
        if kept.pop("isolation", None) not in available or kept != wanted:
            return None
        saved = json.loads((directory / "run.json").read_text())
        with np.load(directory / "plan.npz", allow_pickle=False) as arrays:
            plan = probe.Plan(arrays={k: arrays[k] for k in arrays.files}, **saved["plan"])
        received = probe.Received.from_json({**saved["channel"], "message": saved["answers"]})
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # AttributeError: a key.json not an object
        return None
    return Run(directory, _execution_from_json(saved["execution"], directory), plan, _parsed(received, plan),
               received)


def judge(submission: Submission, the_run: Run, config: Config, started: float) -> GradeResult:
    """``started``: when grading this submission began (``time.monotonic()``), for its ``seconds``."""
    found = findings(the_run, config)
    scored = score(found.verdicts, config.rubric)
    history = _history(the_run)
    return GradeResult(
        submission_id=submission.id, source=submission.source, status="graded",
        score=round(sum(c.points for c in scored), 4), max_score=config.rubric.max_score,
        notebook_sha256=submission.sha256, checks=scored, cells=the_run.execution.cells,
        execution_status=the_run.execution.status, reason=the_run.execution.reason,
        output_truncated=the_run.execution.output_truncated,
        network_blocked=the_run.execution.network_blocked,
        isolation=the_run.execution.isolation, fast_data=the_run.execution.fast_data,
        preloaded=the_run.execution.preloaded,
        data_profile=config.provisioned.profile, spec_version=config.spec.version,
        spec_source=config.spec.source,
        rubric_sha256=config.rubric.sha256, seconds=round(time.monotonic() - started, 3),
        packages=declared_packages(config),
        graded_at=_now(), figures=found.figures, confusion_matrix=found.confusion,
        student_history=history, reference_history=config.spec.content["history"],
        integrity=the_run.integrity)


def _history(the_run: Run) -> dict[str, list[float]] | None:
    """The notebook's own ``hist``, as the probe found it, for the report."""
    history = the_run.answers.history if the_run.answers is not None else None
    if not isinstance(history, probe.HistoryAnswer):
        return None
    return {key: list(values) for key, values in history.values.items()}


def findings(the_run: Run, config: Config) -> Findings:
    """Every check's verdict, before any rubric applies, and what the report shows of the run.

    All of it depends only on what decides the run (its key holds the spec and the checks' code)
    and on how figures are drawn, so it is computed once and kept in the run directory, which
    :func:`run` empties on a rerun."""
    kept = the_run.directory / "findings.json"
    try:
        saved = json.loads(kept.read_text())
        verdicts = [CheckResult(**{**v, "warnings": tuple(v["warnings"])}) for v in saved["verdicts"]]
        if saved["drawn_by"] == figures_digest() and set(config.rubric.names) <= {v.name for v in verdicts}:
            return Findings(verdicts, saved["figures"], saved["confusion"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    import torch

    from grader import expected, saved_model

    # The grader's own torch work gets the kernels' thread count, so workers x threads stays within
    # the cores, as for the kernels. Set in the thread doing the work: torch's count is per thread.
    torch.set_num_threads(config.threads)
    train, test = dataset(config)
    inspected = saved_model.inspect(the_run.directory / "model.pt", *test, name=config.rubric.model_file)
    notebook_path = the_run.directory / "executed.ipynb"
    notebook = nbformat.read(notebook_path, as_version=4) if notebook_path.is_file() else None
    evidence = checks.Evidence(spec=config.spec, execution=the_run.execution, saved_model=inspected,
                               expected=expected.compute(the_run.plan, train, test), probe=the_run.answers,
                               notebook=notebook, plan=the_run.plan, unanswered=the_run.received.problem,
                               provided=provided(config))
    found = Findings(checks.run_checks(evidence), _draw_figures(the_run, inspected, test, config),
                     inspected.confusion)
    _write_json(kept, {"verdicts": [dataclasses.asdict(v) for v in found.verdicts], "figures": found.figures,
                       "confusion": found.confusion, "drawn_by": figures_digest()})
    return found


def provided(config: Config) -> checks.Provided:
    """What grading gave the notebook besides its own cells, for the checks' messages."""
    from reference import provision

    packages = config.rubric.environment.packages
    return checks.Provided(
        datasets=tuple(p.torchvision_class for p in provision.datasets_in(config.provisioned.root)),
        graded_dataset=config.provisioned.torchvision_class,
        support_files=tuple(f.name for f in config.rubric.environment.support_files),
        packages=tuple(declared_packages(config).items()),
        modules=tuple((module, package) for package in packages for module in import_names(package)))


def _draw_figures(the_run: Run, inspected, test, config: Config) -> dict[str, str]:
    """The report's figures. Each is drawn on its own: one that cannot be drawn is left out of the
    report, and costs nothing else (figures never count towards the score)."""
    from grader import figures

    drawers = {"learning_curves": lambda: figures.learning_curves(_history(the_run), config.spec.content["history"])}
    if inspected.first_layer is not None:
        rows = np.array(inspected.first_layer)
        if inspected.architecture.count("Linear(") == 1:  # the lab's model: one row per class
            drawers["weights"] = lambda: figures.weight_images(rows, [str(digit) for digit in range(10)])
        else:
            drawers["hidden_units"] = lambda: figures.weight_images(
                rows, [f"unit {unit + 1}" for unit in range(len(rows))])
        if inspected.misclassified:
            index = [m["index"] for m in inspected.misclassified]
            drawers["misclassified"] = lambda: figures.misclassified(
                test[0][index].squeeze(1).numpy(), [m["label"] for m in inspected.misclassified],
                [m["predicted"] for m in inspected.misclassified])
    drawn = {}
    for key, draw in drawers.items():
        try:
            drawn[key] = draw()
        except Exception:  # noqa: BLE001 - a figure is illustration: losing it must not lose the grade
            continue
    return drawn


def _error_result(submission: Submission, config: Config, reason: str) -> GradeResult:
    return GradeResult(submission_id=submission.id, source=submission.source, status="error", score=0.0,
                       max_score=config.rubric.max_score, notebook_sha256=submission.sha256, reason=reason,
                       data_profile=config.provisioned.profile, spec_version=config.spec.version,
                       spec_source=config.spec.source,
                       rubric_sha256=config.rubric.sha256, graded_at=_now())


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _execution_json(execution: Execution) -> dict[str, Any]:
    raw = dataclasses.asdict(execution)
    for key in ("executed_notebook", "workdir"):
        raw[key] = None
    return raw


def _execution_from_json(raw: dict[str, Any], directory: Path) -> Execution:
    fields = {**raw, "cells": tuple(CellRun(**c) for c in raw["cells"]),
              "network_blocked": tuple(raw.get("network_blocked", ())),
              "preloaded": tuple(raw.get("preloaded", ())),
              "executed_notebook": directory / "executed.ipynb"}
    return Execution(**fields)


def _write_json(path: Path, content: Any) -> None:
    atomic.write(path, json.dumps(content))
