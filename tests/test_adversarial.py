"""The adversarial suite: a class whose notebooks attack the grader's host, its files and their
neighbours, graded the way an instructor grades one (the ``labgrader grade`` command, two workers).

One batch holds every attack of tests/adversarial/attacks.py and two copies of the correct example
(the honest neighbours); a baseline batch, without attackers, grades the plain notebooks the attacks
are built on. Whatever an attack does, as issue 12 requires:

* a root-owned canary file outside the sandbox is unchanged;
* the attacking notebook is graded and earns no more, on any check, than its plain twin;
* the batch finishes, with a result for every notebook;
* each honest neighbour gets exactly the score and per-check points it gets without the attackers;
* no process of the batch is left.

Attacks that measure a cap (disk, memory, processes) have a test of their own, and so does the one
that reads outside the sandbox; another test checks that every attack ran to its end, so that none of
the above passes because an attack failed early. The test's files live under /var/tmp, not /tmp: the
sandbox has always covered /tmp as a whole, so only a directory elsewhere shows what the sandbox hides
on purpose. A batch that hangs is killed at ``BATCH_LIMIT``; the results written by then are still
judged. Where a cap is missing, the attacks stop at their ceilings: about 2 GiB of disk and the
notebook memory limit plus 1 GiB of memory, held for a few seconds.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import html
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nbformat
import pytest

from adversarial import attacks
from grader import intake, resources, sandbox
from grader.execute import Limits
from grader.results import GradeResult

REPO = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(sandbox.bubblewrap_problem() is not None,
                                 reason=f"bubblewrap sandbox unavailable: {sandbox.bubblewrap_problem()}")]

JOBS = 2
BATCH_LIMIT = 420  # seconds; a healthy batch takes a fraction of this on two busy cores
# Tighter than the lab's rubric so that a stuck notebook costs the suite less; every notebook here
# finishes each cell well within them when nothing attacks it.
CELL_TIMEOUT, NOTEBOOK_TIMEOUT = 60, 240
# Where an attack stops if nothing stops it, so that a missing cap fails the test instead of filling
# the host: past any work dir and /tmp cap, past the memory a notebook is allowed, past any pids cap.
DISK_CEILING = 2 << 30
MEMORY_CEILING = Limits().memory_bytes + (1 << 30)
PIDS_CEILING = 4096
# The job uids are fixed in grader.batch; this test's batches get their own, so that their processes
# are told apart from those of other tests running at the same time.
RUNNER = ("import sys\nfrom grader import batch, cli\n"
          "batch.FIRST_JOB_UID = int(sys.argv[1])\n"
          "sys.exit(cli.main(sys.argv[2:]))\n")
PR_SET_CHILD_SUBREAPER = 36
TRIVIAL, HONEST = "trivial", "honest"  # the baseline's notebooks


@dataclass(frozen=True)
class Arena:
    """The test's directory outside /tmp and what it plants there."""

    base: Path
    canary: Path
    canary_state: tuple
    token: str  # in the honest notebooks' file names: their ids, paths and results carry it
    old_grade_token: str  # a hidden check's message in an old output directory's result.json
    rubric: Path
    data_root: Path
    first_uids: Iterator[int]


@dataclass(frozen=True)
class Batch:
    out: Path
    returncode: int | None  # None: killed at BATCH_LIMIT
    log: str
    ids: dict[str, str]  # notebook file stem -> submission id
    results: dict[str, GradeResult | None]  # by file stem; None: no result was written
    left: list[str]  # processes of the batch still alive after it

    def text(self, name: str, file: str) -> str:
        return (self.out / self.ids[name] / file).read_text(errors="replace")

    def executed(self, name: str) -> nbformat.NotebookNode:
        return nbformat.read(self.out / ".runs" / self.ids[name] / "executed.ipynb", as_version=4)


def _state(path: Path) -> tuple:
    info = os.lstat(path)
    return (hashlib.sha256(path.read_bytes()).hexdigest(), info.st_ino, info.st_mode, info.st_uid,
            info.st_gid, info.st_size, info.st_mtime_ns)


@pytest.fixture(scope="module")
def arena(mnist_sample_root) -> Iterator[Arena]:
    base = Path(tempfile.mkdtemp(prefix="labgrader-adversarial-",
                                 dir="/var/tmp" if os.access("/var/tmp", os.W_OK) else None))
    base.chmod(0o755)  # as an instructor's directories usually are: only the sandbox keeps students out
    canary = base / "canary.txt"
    canary.write_text(f"canary {secrets.token_hex(16)}\n")
    os.chown(canary, 0, 0)
    canary.chmod(0o644)
    old_grade_token = secrets.token_hex(8)
    old = base / "old-grades" / "bob" / "result.json"
    old.parent.mkdir(parents=True)
    old.write_text(json.dumps({"submission_id": "bob", "checks": [
        {"name": "validate_result", "visibility": "hidden", "message": f"hidden message {old_grade_token}"}]}))
    rubric = _sub_once(_sub_once(resources.RUBRIC_PATH.read_text(), "cell_timeout", CELL_TIMEOUT),
                       "notebook_timeout", NOTEBOOK_TIMEOUT)
    (base / "rubric.toml").write_text(rubric)
    first_uid = 73000 + (os.getpid() % 1000) * 8
    yield Arena(base, canary, _state(canary), secrets.token_hex(6), old_grade_token, base / "rubric.toml",
                mnist_sample_root.root, iter(range(first_uid, first_uid + 8, JOBS)))
    shutil.rmtree(base, ignore_errors=True)


def _sub_once(text: str, key: str, value: int) -> str:
    changed, count = re.subn(rf"(?m)^{key}\s*=\s*\d+", f"{key} = {value}", text)
    assert count == 1, f"lab/rubric.toml has no single {key} to tighten"
    return changed


@pytest.fixture(scope="module")
def baseline(arena) -> Batch:
    """The plain notebooks, graded without any attacker: the honest neighbours' notebook (the correct
    example) and the trivial notebook, every attack's plain twin."""
    folder = arena.base / "plain"
    folder.mkdir()
    nbformat.write(attacks.honest_notebook(), str(folder / f"{HONEST}-{arena.token}.ipynb"))
    nbformat.write(attacks.trivial_notebook(), str(folder / f"{TRIVIAL}.ipynb"))
    graded = _grade(arena, folder, "plain")
    assert all(graded.results.values()), f"the baseline did not grade its notebooks:\n{graded.log[-3000:]}"
    return graded


@pytest.fixture(scope="module")
def attacked(arena, baseline) -> Batch:
    """The class: every attack, and the correct example twice, as honest neighbours."""
    folder = arena.base / "class"
    folder.mkdir()
    values = dict(canary=str(arena.canary), disk_ceiling=DISK_CEILING, memory_ceiling=MEMORY_CEILING,
                  pids_ceiling=PIDS_CEILING)
    for attack in attacks.ATTACKS:
        nbformat.write(attacks.notebook(attack, **values), str(folder / f"{attack.name}.ipynb"))
    for name in attacks.HONEST_NAMES:
        nbformat.write(attacks.honest_notebook(), str(folder / f"{name}-{arena.token}.ipynb"))
    return _grade(arena, folder, "class")


def _grade(arena: Arena, folder: Path, name: str) -> Batch:
    out = arena.base / f"out-{name}"
    first_uid = next(arena.first_uids)
    env = {k: v for k, v in os.environ.items() if k != "LABGRADER_DATA_DIR"}
    command = [sys.executable, "-c", RUNNER, str(first_uid), "grade", str(folder), "--out", str(out),
               "--jobs", str(JOBS), "--root", str(arena.data_root), "--rubric", str(arena.rubric), "--quiet"]
    ours_before = _descendants()
    with _subreaper():
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, start_new_session=True)
        try:
            log, _ = process.communicate(timeout=BATCH_LIMIT)
            returncode = process.returncode
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            log, _ = process.communicate()
            returncode = None
        left = _left(arena.base, range(first_uid, first_uid + JOBS), ours_before)
    ids = {Path(s.source).stem: s.id for s in intake.collect([folder])}
    results = {}
    for stem, submission_id in ids.items():
        path = out / submission_id / "result.json"
        results[stem] = GradeResult.from_json(json.loads(path.read_text())) if path.is_file() else None
    return Batch(out, returncode, log, ids, results, left)


@contextlib.contextmanager
def _subreaper() -> Iterator[None]:
    """Make this process the reaper of the batch's orphans: whatever escapes its parent (a double
    fork, a daemon) is then a descendant of this test, and can be found after the batch."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    try:
        yield
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state) of every process."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
                found[int(entry)] = (int(fields[1]), fields[0])
    return found


def _descendants() -> set[int]:
    table = _processes()
    mine = set()
    for pid in table:
        ancestor = pid
        while ancestor in table and ancestor not in (0, 1):
            ancestor = table[ancestor][0]
            if ancestor == os.getpid():
                mine.add(pid)
                break
    return mine


def _left(base: Path, uids: range, ours_before: set[int]) -> list[str]:
    """The batch's processes still alive once it has returned: descendants of this test that were
    not there before, processes of its job uids, and any whose command line or working directory
    names the test's directory. Those dying already get a few seconds; what is left is then
    recorded, killed and reaped."""
    for _ in range(20):
        table = _processes()
        alive = set()
        for pid, (_, state) in table.items():
            if state == "Z" or pid == os.getpid():
                continue
            with contextlib.suppress(OSError):
                if (os.stat(f"/proc/{pid}").st_uid in uids or str(base) in _cmdline(pid)
                        or os.readlink(f"/proc/{pid}/cwd").startswith(str(base))):
                    alive.add(pid)
        alive |= {pid for pid in _descendants() - ours_before if table.get(pid, (0, "Z"))[1] != "Z"}
        if not alive:
            break
        time.sleep(0.5)
    left = []
    for pid in sorted(alive):
        with contextlib.suppress(OSError):
            left.append(f"{pid} uid {os.stat(f'/proc/{pid}').st_uid}: {_cmdline(pid)[:200]}")
            os.kill(pid, signal.SIGKILL)
    for pid in _descendants() - ours_before:  # orphans handed to this process: reap them
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)
    return left


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")


def _points(result: GradeResult) -> dict[str, float]:
    return {check.name: check.points for check in result.checks}


def _stem(batch: Batch, prefix: str) -> str:
    return next(stem for stem in batch.ids if stem.startswith(prefix))


# --- what every attack must leave alone --------------------------------------------------------

def test_the_batch_finishes_with_a_result_for_every_notebook(attacked):
    ending = "hung and was killed" if attacked.returncode is None else f"exited with {attacked.returncode}"
    assert attacked.returncode == 0, f"the batch {ending}:\n{attacked.log[-3000:]}"
    missing = [stem for stem, result in attacked.results.items() if result is None]
    assert not missing, f"no result for {missing}"


def test_the_canary_outside_the_sandbox_is_unchanged(arena, attacked):
    assert _state(arena.canary) == arena.canary_state, arena.canary.read_text()[:300]


def test_no_process_of_the_batch_is_left(attacked):
    assert attacked.left == []


@pytest.mark.parametrize("honest", attacks.HONEST_NAMES)
def test_an_honest_neighbour_scores_as_it_does_without_attackers(honest, baseline, attacked):
    alone = baseline.results[_stem(baseline, HONEST)]
    beside = attacked.results[_stem(attacked, honest)]
    assert beside is not None, "the honest notebook got no result"
    assert (beside.status, beside.score, _points(beside)) == (alone.status, alone.score, _points(alone)), \
        [(c.name, c.message) for c in beside.checks if c.points != _points(alone)[c.name]]


@pytest.mark.parametrize("attack", attacks.ATTACKS, ids=lambda attack: attack.name)
def test_an_attack_earns_no_more_than_its_plain_twin(attack, baseline, attacked):
    result, plain = attacked.results[attack.name], baseline.results[TRIVIAL]
    assert result is not None, "the attacking notebook got no result"
    assert result.status == "graded", result.reason
    plain_points = _points(plain)
    more = {name: (points, plain_points.get(name, 0.0)) for name, points in _points(result).items()
            if points > plain_points.get(name, 0.0)}
    assert result.score <= plain.score and not more, more


@pytest.mark.parametrize("attack", attacks.ATTACKS, ids=lambda attack: attack.name)
def test_every_attack_ran_to_its_end(attack, attacked):
    """What keeps the tests above from passing for nothing: each attack did what it set out to do.
    Its cell ends normally, but for two ways of ending that are the attack's own: the memory taker's
    kernel may be killed, and the reader raises what it found (which the next test judges)."""
    result = attacked.results[attack.name]
    assert result is not None, "the attacking notebook got no result"
    cell = result.cells[-1]
    killed = attack.name == "04-exhaust-memory" and cell.status == "kernel-died"
    raised = attack.name == "12-read-outside" and str(cell.error).startswith(f"RuntimeError: {attacks.READER_FOUND}")
    assert cell.status == "ok" or killed or raised, f"{cell.status}: {cell.error}"


# --- what particular attacks must not get ------------------------------------------------------

def test_reading_outside_the_sandbox_finds_nothing_of_others(arena, baseline, attacked):
    reader = "12-read-outside"
    shown = attacked.text(reader, "result.json") + html.unescape(attacked.text(reader, "report.html"))
    description = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["description"]
    secrets_ = {"another student's name": arena.token, "an old result's hidden message": arena.old_grade_token,
                "the checkout's pyproject.toml": description}
    honest = baseline.results[_stem(baseline, HONEST)]
    secrets_.update({f"the honest student's hidden message of {c.name}": c.message for c in honest.checks
                     if c.visibility == "hidden" and len(c.message) >= 30})
    leaked = [what for what, text in secrets_.items() if text in shown]
    [read] = attacks.reports(attacked.executed(reader))  # what it read; none at all means it never looked
    assert not leaked, f"the reader's own result shows {leaked}; it read {read}"


def test_filling_the_disk_stops_at_a_cap_in_the_work_dir_and_tmp(attacked):
    [filled] = attacks.reports(attacked.executed("03-fill-disk"))
    for place in (".", "/tmp"):
        written, why = filled[place]
        assert why in ("ENOSPC", "EDQUOT"), f"{place}: {written} bytes written, then {why}"


def test_taking_memory_stops_at_the_notebooks_memory_limit(attacked):
    held = [report["held"] for report in attacks.reports(attacked.executed("04-exhaust-memory"))]
    assert max(held, default=0) < MEMORY_CEILING, f"its processes held {held} bytes at once"


def test_starting_threads_and_processes_stops_at_a_cap(attacked):
    [started] = attacks.reports(attacked.executed("05-exhaust-pids"))
    for kind in ("threads", "processes"):
        count, why = started[kind]
        assert why != "ceiling", f"{count} {kind} started and nothing refused more"
