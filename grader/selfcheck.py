"""``labgrader.check()``: the grader's visible checks on a student's own kernel, shown inline in Jupyter.

A student calls ``import labgrader; labgrader.check()`` (or ``labgrader.check("train_epoch")``, one
part) in a cell of their notebook. The verdicts come from the grader's own code, run in the
student's kernel: :func:`grader.probe.make_plan` draws the inputs, the probe of
:mod:`grader.probe.inkernel` calls the student's functions on them (its ``probe_namespace``, the function the
grader's epilogue calls), :func:`grader.probe.parse` reads its answer, :func:`grader.expected.compute`
gives the reference's answers, :func:`grader.checks.run_checks` judges and :func:`grader.score.score`
applies the rubric. The page is rendered with the report's Jinja2 macros (``templates/_checks.html.j2``).
On the MNIST sample a first call takes 1.5 s (measured on a busy 2-core machine: 0.4 s importing
labgrader, the rest the probe, the reference and reading the saved model).

What differs from grading, and why:

- No sandbox and no guard: it is the student's machine, and their kernel goes on after the check.
  The grader's guard puts back a kernel it is about to stop (it clears every IPython callback and
  atexit handler); here a guard that undoes nothing takes its place, and the answer is handed over
  in-process as the JSON the channel would carry (no Unix socket: Windows has none in Python).
- The student's objects are not touched. The probe reads the notebook's names from a copy of its
  namespace in which everything it reads, and every global that the notebook's functions use, is
  a deep copy (one copy for all, so an optimizer still holds its network's parameters), and those
  functions are rebound to the copy. torch's, numpy's and Python's random states, torch's thread
  count and grad mode, and the profile function are put back afterwards; what the functions print
  is not shown. A global that cannot be copied stops the check before any of the student's code
  runs, and says which.
- Some checks need what only running the whole notebook gives, so they are listed as graded on
  submission and not judged here (:data:`ON_SUBMISSION`): whether every cell runs in a fresh kernel,
  and the figures (the grader records them as the notebook shows them). The saved model is read
  from the kernel's working directory as it is now.
- Hidden checks are counted, never shown: their verdicts are not in the page.
- Data: the dataset the notebook reads, ``./data`` (``data_root``): a labgrader-provisioned root
  as is, or the IDX files torchvision downloaded there, provisioned once into labgrader's cache;
  without either, labgrader's own (``labgrader data``). The spec is the committed or cached one for
  that data, derived once when there is none (17 s for full MNIST, measured on 2 cores).
"""
from __future__ import annotations

import contextlib
import copy
import dis
import io
import json
import random
import sys
import tempfile
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grader import checks, probe, report, resources
from grader.results import Execution, ScoredCheck
from grader.score import Rubric, load_rubric, score

__all__ = ["SelfCheck", "check", "run", "part_of", "PARTS", "ON_SUBMISSION"]

TEMPLATE = "selfcheck.html.j2"
# A check belongs to the first of these its name is or starts with ("train_epoch" before "train").
PARTS = ("data", "model", "train_epoch", "validate", "train", "saved_model", "figures", "notebook_runs")
# Parts whose evidence only the grader's run of the whole notebook has, and why, in the student's terms.
ON_SUBMISSION = {
    "notebook_runs": "it needs every cell run from a fresh kernel: use Kernel, Restart & Run All, or run "
                     "`labgrader check` on the saved notebook",
    "figures": "labgrader records the figures as it runs the whole notebook",
}
# What the probe reads from the notebook's namespace besides the datasets and loaders.
PROBED = ("net", "train_epoch", "validate", "train", "hist")
ISOLATION = "none: labgrader.check() in your own kernel"


@dataclass(frozen=True)
class SelfCheck:
    """What ``labgrader.check()`` shows: Jupyter renders it as HTML, a console as text."""

    part: str | None
    checks: tuple[ScoredCheck, ...]  # the part's visible checks, as scored
    hidden: int  # the part's hidden checks: counted, not shown
    later: tuple[tuple[str, tuple[str, ...]], ...]  # (why, titles) of the part's checks graded on submission only
    against: str  # the data and spec the checks used, in words
    problem: str | None = None  # why nothing was checked

    def _repr_html_(self) -> str:
        checked = self.checks
        return report.environment().get_template(TEMPLATE).render(
            s=self, passed=sum(c.status == "passed" for c in checked),
            points=sum(c.points for c in checked), max_points=sum(c.max_points for c in checked))

    def __repr__(self) -> str:
        lines = [f"labgrader self-check{f' of {self.part}' if self.part else ''}"]
        if self.problem:
            lines.append(self.problem)
        for c in self.checks:
            mark = {"passed": "PASS", "partial": "PART", "failed": "FAIL"}[c.status]
            lines.append(f"{mark}  {c.points:g}/{c.max_points:g}  {c.title}: {c.message}")
        lines += [f"graded on submission: {', '.join(titles)} ({why})" for why, titles in self.later]
        if self.hidden:
            lines.append(f"+ {self.hidden} hidden check(s), not shown")
        return "\n".join(lines)


def check(part: str | None = None, *, dataset: str = "mnist", data_root: str | Path = "data",
          rubric: str | Path | None = None) -> None:
    """Show the visible checks' verdicts on this kernel as it is now (``part``: one part, such as
    ``"train_epoch"``, or one check by name). Nothing of the notebook's is changed."""
    from IPython import get_ipython
    from IPython.display import display

    shell = get_ipython()
    namespace = shell.user_ns if shell is not None else sys._getframe(1).f_globals
    display(run(namespace, part, dataset=dataset, data_root=data_root, rubric=rubric))


def part_of(name: str) -> str:
    return next((part for part in PARTS if name == part or name.startswith(part + "_")), name)


def run(namespace: dict[str, Any], part: str | None = None, *, dataset: str = "mnist",
        data_root: str | Path = "data", rubric: str | Path | None = None) -> SelfCheck:
    """The self-check of ``namespace`` (a notebook's globals), without displaying it."""
    try:
        loaded = load_rubric(Path(rubric) if rubric else resources.RUBRIC_PATH)
    except (OSError, ValueError) as error:  # an instructor's rubric that can't be read: one line
        return SelfCheck(part, (), 0, (), "", f"labgrader.check(): the rubric cannot be read: {error}")
    entries = [e for e in loaded.entries if part is None or part in (e.name, part_of(e.name))]
    if not entries:
        known = sorted({part_of(e.name) for e in loaded.entries})
        return SelfCheck(part, (), 0, (), "", f"labgrader.check({part!r}): no part or check has that name; "
                         f"the parts are {', '.join(known)}, and each check's name works too.")
    later = tuple((why, titles) for key, why in ON_SUBMISSION.items()
                  if (titles := tuple(e.title for e in entries if part_of(e.name) == key)))
    judged = [e for e in entries if part_of(e.name) not in ON_SUBMISSION]
    shown = {e.name for e in judged if e.visibility == "visible"}
    hidden = len(judged) - len(shown)
    try:
        provisioned, spec = _data(Path(data_root), dataset)
    except Exception as error:  # noqa: BLE001 - no data to check against: say why, show nothing
        return SelfCheck(part, (), hidden, later, "", f"labgrader.check() found no data to check against: {error}")
    against = f"the {provisioned.profile} data at {provisioned.root} (spec {spec.version}, {spec.source})"
    try:
        copied = _copied(namespace)
    except _Uncopyable as stopped:
        return SelfCheck(part, (), hidden, later, against, str(stopped))
    scored = score(_verdicts(copied, provisioned, spec, loaded), loaded)
    return SelfCheck(part, tuple(c for c in scored if c.name in shown), hidden, later, against)


def _data(root: Path, dataset: str):
    """The dataset the notebook reads at ``root`` (see the module doc) and its spec."""
    from reference import provision, spec

    try:
        provisioned = provision.read_profile(root, dataset)
    except FileNotFoundError:
        raw = root / provision.torchvision_class_of(dataset) / "raw"
        provisioned = provision.provision(dataset, data_dir=raw if raw.is_dir() else None)
    found = spec.committed(provisioned) or spec.cached(provisioned)
    if found is None:
        print(f"labgrader: no spec for this {provisioned.profile} data yet: deriving it by running the "
              "reference on it, once (it is kept for the next checks)")
        found = spec.derive(provisioned)
    return provisioned, found


def _verdicts(namespace: dict[str, Any], provisioned, spec, rubric: Rubric):
    """Every check's verdict on the notebook's (copied) namespace, computed as the grader does."""
    from reference import data

    from grader import expected, saved_model

    train = data.read_split(provisioned.root, provisioned.torchvision_class, True)
    test = data.read_split(provisioned.root, provisioned.torchvision_class, False)
    plan = probe.make_plan(train, test)
    with _kernel_kept():
        answers, probe_error = _probe(plan, namespace)
        reference_answers = expected.compute(plan, train, test)
        with tempfile.TemporaryDirectory(prefix="labgrader-check-") as kept:
            copy_of_model = Path(kept) / "model.pt"
            saved_model.keep(Path.cwd() / rubric.model_file, copy_of_model)
            inspected = saved_model.inspect(copy_of_model, *test, name=rubric.model_file)
    execution = Execution(status="completed", cells=(), isolation=ISOLATION, seconds=0.0, probe_error=probe_error)
    evidence = checks.Evidence(spec=spec, execution=execution, saved_model=inspected, expected=reference_answers,
                               probe=answers, notebook=None, plan=plan)
    return checks.run_checks(evidence)


def _probe(plan: probe.Plan, namespace: dict[str, Any]) -> tuple[probe.Answers | None, str | None]:
    """The grader's probe on ``namespace``; its answer parsed as the grader parses it."""
    import torch

    from grader.probe import inkernel, source

    guard = _OwnKernel(torch)
    try:
        with tempfile.TemporaryDirectory(prefix="labgrader-check-") as inputs:
            payload = source.probe_payload(plan, Path(inputs), inputs)
            inkernel.probe_namespace(payload, guard, types.SimpleNamespace(records=[]), namespace)
    except Exception as error:  # noqa: BLE001 - the check says the probe failed, as in grading
        return None, f"{type(error).__name__}: {error}"
    return probe.parse(guard.message, plan), None


class _OwnKernel:
    """The probe's guard on the student's own kernel: it undoes nothing (the kernel goes on), and
    hands the answer over as the JSON the grader's channel would have decoded."""

    def __init__(self, torch):
        self.torch, self.message = torch, None

    def clean(self, when: str = "") -> list[str]:
        return []

    def torch_module(self):
        return self.torch, []

    def send(self, path: str, header: str, answers: dict) -> None:
        self.message = json.loads(json.dumps(answers))


@contextlib.contextmanager
def _kernel_kept():
    """Run with the kernel's global state put back afterwards: random states, torch's threads and
    grad mode, the profile function (the probe sets one), and nothing printed."""
    import numpy as np
    import torch

    threads, profile = torch.get_num_threads(), sys.getprofile()
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        with (torch.random.fork_rng(devices=[]), torch.enable_grad(), contextlib.redirect_stdout(io.StringIO()),
              contextlib.redirect_stderr(io.StringIO())):
            yield
    finally:
        torch.set_num_threads(threads)
        sys.setprofile(profile)
        random.setstate(python_state)
        np.random.set_state(numpy_state)


class _Uncopyable(Exception):
    """A global the check would use cannot be copied; the message names it."""


def _copied(namespace: dict[str, Any]) -> dict[str, Any]:
    """``namespace`` with what the probe reads, and every global the notebook's functions use, deep
    copied together, and those functions rebound to the copy."""
    copied = dict(namespace)
    memo: dict[int, Any] = {}
    for name in sorted(_reached(namespace)):
        value = namespace[name]
        if isinstance(value, (types.ModuleType, type, types.BuiltinFunctionType)):
            continue
        try:
            copied[name] = (_rebound(value, copied, memo) if _defined_in(value, namespace)
                            else copy.deepcopy(value, memo))
        except Exception as error:  # noqa: BLE001 - whatever copying raises, nothing of theirs runs
            raise _Uncopyable(f"labgrader.check() did not run your code: it works on copies of your objects, "
                              f"and {name} ({type(value).__name__}) cannot be copied ({type(error).__name__}: "
                              f"{error}).") from None
    return copied


def _defined_in(value: Any, namespace: dict[str, Any]) -> bool:
    return isinstance(value, types.FunctionType) and value.__globals__ is namespace


def _rebound(function: types.FunctionType, globals_: dict[str, Any], memo: dict[int, Any]) -> types.FunctionType:
    """``function`` reading its globals from ``globals_``, its default arguments copied."""
    clone = types.FunctionType(function.__code__, globals_, function.__name__,
                               copy.deepcopy(function.__defaults__, memo), function.__closure__)
    clone.__kwdefaults__ = copy.deepcopy(function.__kwdefaults__, memo)
    clone.__qualname__, clone.__doc__, clone.__module__ = function.__qualname__, function.__doc__, function.__module__
    clone.__annotations__ = dict(function.__annotations__)
    clone.__dict__.update(function.__dict__)
    return clone


def _reached(namespace: dict[str, Any]) -> set[str]:
    """The names the probe reads, and the globals the notebook's functions among them use, transitively."""
    reached: set[str] = set()
    pending = [*probe.DATASETS, *probe.LOADERS, *PROBED]
    while pending:
        name = pending.pop()
        if name in reached or name not in namespace:
            continue
        reached.add(name)
        if _defined_in(namespace[name], namespace):
            pending += _globals_used(namespace[name].__code__)
    return reached


def _globals_used(code: types.CodeType) -> set[str]:
    names = {i.argval for i in dis.get_instructions(code)
             if i.opname in ("LOAD_GLOBAL", "LOAD_NAME", "STORE_GLOBAL", "DELETE_GLOBAL")}
    for constant in code.co_consts:
        if isinstance(constant, types.CodeType):
            names |= _globals_used(constant)
    return names
