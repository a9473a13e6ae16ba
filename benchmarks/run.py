"""labgrader's speed figures on full Fashion-MNIST, each measured side by side in one run.

    .venv/bin/python benchmarks/run.py            # about 10 minutes on 2 cores
    .venv/bin/python benchmarks/run.py --quick    # fewer copies, about 3 minutes

Not a test: timings on a shared 2-core machine are noisy, so every figure is a ratio or a total
measured here, now, next to its baseline. See benchmarks/README.md for the method and the figures.

(a) ``labgrader grade`` of the lab's full notebook vs ``jupyter nbconvert --execute`` of the same
    notebook in a directory holding it and ``data`` -> the provisioned root;       target <= 0.25x
(b) batch throughput, ``--jobs 2`` vs ``--jobs 1`` on N copies, in rounds 1,2 and 2,1; target >= 1.8x
(c) regrading 20 graded submissions after a rubric change (``--rubric``);         target <= 5 s
(d) the grader's own time per submission outside the notebook's cells
    (result.seconds minus the cells' seconds);                                     target <= 1 s
(d') the same from the outside: what each further notebook adds to a --jobs 1 batch besides its
    cells ((b)'s --jobs 1 time less (a)'s, per further notebook);                 target <= 2 s
(e) the Dask path's cost per task on the loopback cluster: tasks that grade nothing, sent as a batch
    sends them, against the same function called here;                            target <= 50 ms
(f) a throughput model from (a)-(c) and (e): a class of 1,000 such notebooks on N workers,
    checked against (b)'s 1- and 2-worker batches' wall times;                    target: within 15%
and a breakdown of one grading, timed in this process.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import math
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
LABGRADER = str(BIN / "labgrader")
JUPYTER = str(BIN / "jupyter")
NOTEBOOK = REPO / "lab" / "examples" / "correct.ipynb"
FIGURES: list[dict] = []


def figure(name: str, value: float, unit: str, target: str, ok: bool, note: str = "") -> None:
    shown = f"{value:.2f}{unit}"
    line = f"{name}: {shown} (target {target}) {'PASS' if ok else 'MISS'}" + (f"  [{note}]" if note else "")
    print(line, flush=True)
    FIGURES.append({"name": name, "value": round(value, 3), "unit": unit, "target": target,
                    "pass": ok, "note": note})


def info(text: str) -> None:
    print(f"  {text}", flush=True)


def timed(argv: list[str], cpu: dict[str, float] | None = None, **kw) -> float:
    """The command's wall time; ``cpu``, when given, gets the whole machine's busy core-seconds
    meanwhile (kernels included, which a process's rusage does not see: bubblewrap's pid
    namespace reaps them)."""
    busy = machine_busy()
    started = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, **kw)
    seconds = time.monotonic() - started
    if cpu is not None:
        cpu["busy"] = machine_busy() - busy
    if done.returncode not in (0, 1):  # labgrader check/grade may exit 1 on a failing notebook
        sys.exit(f"{' '.join(argv[:3])}... failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return seconds


def machine_busy() -> float:
    """Core-seconds this machine has spent busy since boot: /proc/stat's first line, less idle and
    iowait."""
    user, nice, system, idle, iowait, *rest = map(int, Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9])
    return (user + nice + system + sum(rest)) / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------------------------
# Set-up


def fashion_root() -> Path:
    """The provisioned full Fashion-MNIST; a fresh root when the cached one isn't readable by the
    sandbox's unprivileged user (roots provisioned by older versions kept 0600 files)."""
    from reference import provision

    provisioned = provision.provision("fashion-mnist", allow_download=False)
    raw = provisioned.root / provisioned.torchvision_class / "raw"
    unreadable = [p.name for p in raw.iterdir() if not p.stat().st_mode & stat.S_IROTH]
    if unreadable:
        info(f"WARNING: {raw} has files others cannot read ({', '.join(sorted(unreadable))}): the sandboxed "
             "kernel would fail with PermissionError; provisioning a separate root for the benchmark")
        root = Path.home() / ".cache" / "labgrader" / "bench" / "fashion-mnist"
        provisioned = provision.provision("fashion-mnist", root=root, allow_download=False)
    assert provisioned.profile == "fashion-mnist" and provisioned.train_size == 60000, provisioned
    return provisioned.root


def fashion_notebook(directory: Path, name: str = "lab.ipynb") -> Path:
    source = NOTEBOOK.read_text()
    assert "torchvision.datasets.MNIST(" in source
    path = directory / name
    path.write_text(source.replace("torchvision.datasets.MNIST(", "torchvision.datasets.FashionMNIST("))
    return path


def grade_argv(paths: list[Path], out: Path, root: Path, jobs: int, *extra: str) -> list[str]:
    return [LABGRADER, "grade", *map(str, paths), "--out", str(out), "--jobs", str(jobs),
            "--dataset", "fashion-mnist", "--root", str(root), "--quiet", *extra]


def results(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("*/result.json"))]


def check_graded(out: Path, expect: int) -> list[dict]:
    found = results(out)
    bad = [(r["submission_id"], r["status"], r.get("execution_status"), r.get("reason")) for r in found
           if r["status"] != "graded" or r.get("execution_status") != "completed"]
    if len(found) != expect or bad:
        sys.exit(f"grading did not complete: {len(found)}/{expect} results; {bad}")
    return found


# ---------------------------------------------------------------------------------------------
# The figures


@dataclasses.dataclass(frozen=True)
class Single:
    """(a)'s ``labgrader grade`` of one notebook: the command's wall time, and the part of it its
    worker spent grading the notebook (``result.seconds``: its cells and the grader's work on it)."""

    wall: float
    grading: float


def vs_nbconvert(work: Path, root: Path) -> Single:
    """(a): one notebook, graded vs executed by plain nbconvert, in turn."""
    plain = work / "nbconvert"
    plain.mkdir()
    notebook = fashion_notebook(plain)
    (plain / "data").symlink_to(root)
    nbconvert = timed([JUPYTER, "nbconvert", "--to", "notebook", "--execute", "--output", "executed.ipynb",
                       "--ExecutePreprocessor.timeout=1800", str(notebook)], cwd=plain)
    executed = json.loads((plain / "executed.ipynb").read_text())
    errors = [o for c in executed["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
    if errors:
        sys.exit(f"nbconvert's run has errors: {errors[0].get('ename')}: {errors[0].get('evalue')}")
    graded_dir = work / "single"
    graded_dir.mkdir()
    out = work / "single-out"
    grade = timed(grade_argv([fashion_notebook(graded_dir)], out, root, 1))
    [result] = check_graded(out, 1)
    info(f"nbconvert --execute {nbconvert:.1f} s; labgrader grade --jobs 1 {grade:.1f} s "
         f"(score {result['score']:g}/{result['max_score']:g}, isolation {result['isolation']})")
    ratio = grade / nbconvert
    figure("a. grade / nbconvert --execute", ratio, "x", "<= 0.25x", ratio <= 0.25,
           f"{grade:.1f} s vs {nbconvert:.1f} s")
    cells = sum(c.get("seconds") or 0 for c in result["cells"])
    overhead = result["seconds"] - cells
    info(f"result.seconds {result['seconds']:.1f} s, cells {cells:.1f} s, CLI start-up and reports "
         f"{grade - result['seconds']:.1f} s")
    figure("d. grader overhead outside the cells", overhead, " s", "<= 1 s", overhead <= 1,
           f"result.seconds {result['seconds']:.1f} - cells {cells:.1f}")
    return Single(grade, result["seconds"])


@dataclasses.dataclass(frozen=True)
class Measured:
    """(b)'s batches with one ``--jobs`` value: their mean wall time, and the mean time a notebook
    took its worker (``result.seconds``)."""

    wall: float
    per_notebook: float


def batch_throughput(work: Path, root: Path, copies: int, rounds: int, single: Single | None
                     ) -> tuple[Path, dict[int, Measured]]:
    """(b): N copies, graded with --jobs 1 and with --jobs 2, each time into a fresh output directory.

    The shared host's speed drifts by several percent between commands minutes apart, so with
    ``rounds`` 2 the commands run as --jobs 1, 2, 2, 1 (and so on): a drift that grows steadily
    weighs on both sides alike, and the ratio is of the summed times.

    ``single``: (a)'s run of the same command on one notebook. The difference to --jobs 1 on N,
    per further notebook and less that notebook's cells, is (d) again, seen from the outside: what
    each notebook of a batch adds besides its own cells, with nothing left out as once per process.
    Returns the first --jobs 1 batch's output and what was measured with each --jobs value."""
    subs = work / "batch"
    subs.mkdir()
    for index in range(copies):
        fashion_notebook(subs, f"student{index:02d}.ipynb")
    order = [jobs for round_ in range(rounds) for jobs in ((1, 2) if round_ % 2 == 0 else (2, 1))]
    seconds, cells, busy = collections.defaultdict(list), collections.defaultdict(list), collections.defaultdict(list)
    grading = collections.defaultdict(list)
    for step, jobs in enumerate(order):
        out = work / f"batch-out-{step}-jobs{jobs}"
        cpu: dict[str, float] = {}
        seconds[jobs].append(timed(grade_argv([subs], out, root, jobs), cpu))
        busy[jobs].append(cpu["busy"])
        found = check_graded(out, copies)
        cells[jobs].append(sum(c.get("seconds") or 0 for r in found for c in r["cells"]))
        grading[jobs].append(sum(r["seconds"] for r in found))
        info(f"--jobs {jobs}: {seconds[jobs][-1]:.1f} s for {copies} ({copies / seconds[jobs][-1] * 60:.2f}/min), "
             f"cells {cells[jobs][-1] / copies:.1f} s per notebook, the machine busy {busy[jobs][-1]:.0f} core-s")
    total = {jobs: sum(seconds[jobs]) for jobs in (1, 2)}
    cpu_total = {jobs: sum(busy[jobs]) for jobs in (1, 2)}
    cells_total = {jobs: sum(cells[jobs]) for jobs in (1, 2)}
    if rounds > 1:
        info("ratio in each round: " + ", ".join(f"{one / two:.2f}x" for one, two in zip(seconds[1], seconds[2])))
    info(f"cells per notebook: {cells_total[1] / (copies * rounds):.1f} s with one kernel at a time, "
         f"{cells_total[2] / (copies * rounds):.1f} s with two side by side ({cells_total[2] / cells_total[1] - 1:+.0%}: "
         "the other worker's kernel and grading share the cores)")
    cores = os.cpu_count() or 1
    info(f"the machine's busy CPU: --jobs 2 {cpu_total[2] / cpu_total[1] - 1:+.0%} against --jobs 1; --jobs 2 kept "
         f"{cpu_total[2] / (cores * total[2]):.0%} of {cores} cores busy; with its CPU spread perfectly, the best "
         f"ratio would be {total[1] / (cpu_total[2] / min(cores, 2)):.2f}x")
    ratio = total[1] / total[2]
    figure(f"b. throughput --jobs 2 / --jobs 1 ({copies} notebooks, {rounds} round{'s' * (rounds > 1)})", ratio, "x",
           ">= 1.8x", ratio >= 1.8)
    if single is not None and copies > 1:
        one_batch = total[1] / rounds
        added = (one_batch - single.wall) / (copies - 1) - cells_total[1] / (copies * rounds)
        figure("d'. what each further notebook of a --jobs 1 batch adds besides its cells", added, " s",
               "<= 2 s", added <= 2, f"({one_batch:.1f} s for {copies} - {single.wall:.1f} s for 1) / {copies - 1}"
               f" - {cells_total[1] / (copies * rounds):.1f} s of cells")
    return work / "batch-out-0-jobs1", {jobs: Measured(total[jobs] / rounds, sum(grading[jobs]) / (copies * rounds))
                                        for jobs in (1, 2)}


def regrade(work: Path, root: Path, graded_out: Path, count: int) -> float:
    """(c): 20 graded submissions (runs cloned from one real run of the same bytes: the run key
    doesn't involve the id), then the same grade command with a rubric whose points changed.
    Returns the in-process regrade's time per submission: what the client spends on each result
    (judging from kept findings, writing the result and its report), start-up excluded."""
    subs = work / "regrade"
    subs.mkdir()
    out = work / "regrade-out"
    [source_run] = [p for p in (graded_out / ".runs").iterdir()][:1]
    for index in range(count):
        name = f"r{index:02d}"
        fashion_notebook(subs, f"{name}.ipynb")
        shutil.copytree(source_run, out / ".runs" / name)
    seconds = {}
    rubric = (REPO / "lab" / "rubric.toml").read_text()
    changed = work / "rubric-changed.toml"
    old = "[checks.data_sizes]\ntitle = \"Training and test sets have the expected sizes\"\npoints = 1\n"
    assert old in rubric
    changed.write_text(rubric.replace(old, old.replace("points = 1", "points = 3")))
    for jobs in (1, 2):
        out_j = work / f"regrade-out-{jobs}"
        shutil.copytree(out, out_j)
        first = timed(grade_argv([subs], out_j, root, jobs))  # 20 results from the kept runs
        before = {r["submission_id"]: r["score"] for r in check_graded(out_j, count)}
        seconds[jobs] = timed(grade_argv([subs], out_j, root, jobs, "--rubric", str(changed)))
        after = check_graded(out_j, count)
        assert all(r["score"] == before[r["submission_id"]] + 2 for r in after), "the rubric change did not apply"
        assert all(not any((out_j / ".runs" / r["submission_id"]).glob("*.tmp")) for r in after)
        info(f"--jobs {jobs}: first grading from kept runs {first:.1f} s, regrade after the rubric change "
             f"{seconds[jobs]:.1f} s (command wall time, interpreter start-up included)")
    in_process = regrade_in_process(subs, work / "regrade-out-1", root, changed)
    info(f"in-process batch.grade_all(jobs=1) after another rubric change: {in_process:.2f} s for {count}")
    figure(f"c. regrade {count} after a rubric change (labgrader grade --jobs 1)", seconds[1], " s", "<= 5 s",
           seconds[1] <= 5, f"--jobs 2: {seconds[2]:.1f} s; without start-up: {in_process:.2f} s")
    return in_process / count


def regrade_in_process(subs: Path, out: Path, root: Path, rubric_path: Path) -> float:
    from grader import batch, intake, pipeline, score
    from reference import provision, spec

    text = rubric_path.read_text().replace("points = 3", "points = 4", 1)
    again = rubric_path.with_name("rubric-changed-again.toml")
    again.write_text(text)
    provisioned = provision.read_profile(root, "fashion-mnist")
    config = pipeline.Config(provisioned=provisioned, spec=spec.load(provisioned.profile),
                             rubric=score.load_rubric(again), runs_dir=(out / ".runs").resolve(),
                             hide=(subs.resolve(),))
    submissions = intake.collect([subs])
    pipeline.dataset(config)  # the CLI loads the test set too; count it as start-up, not regrading
    started = time.monotonic()
    batch.grade_all(submissions, config, out, jobs=1, progress=False)
    return time.monotonic() - started


def _no_grading(submission, config, kernels=None):
    """What a worker calls for each task of (e): ``pipeline.grade``'s signature, and no notebook."""
    from grader import pipeline

    return pipeline.grade(dataclasses.replace(submission, error="not graded: a scheduling benchmark"), config)


def _loaded(config) -> None:
    """Wait on a worker until what its plugin loads in the background (torch, the dataset) is loaded."""
    from grader import pipeline

    pipeline.dataset(config)


def scheduling_overhead(work: Path, root: Path, tasks: int) -> float:
    """(e): seconds per task that the Dask path adds: ``tasks`` submissions whose grading does nothing,
    through the same path as a batch's (``cluster.connect``'s local cluster of one worker, the
    plugin, ``cluster.grade`` with one task in flight per worker: each task a round trip from the
    client through the scheduler to the worker's grading thread and back), against calling the same
    function here. Measured once the worker is ready: its start-up is once per batch."""
    from grader import batch, cluster, pipeline, score
    from grader.results import Submission
    from reference import provision, spec

    provisioned = provision.read_profile(root, "fashion-mnist")
    config = pipeline.Config(provisioned=provisioned, spec=spec.load(provisioned.profile),
                             rubric=score.load_rubric(REPO / "lab" / "rubric.toml"), runs_dir=work / "overhead-runs")
    submissions = [Submission(id=f"t{index}", source="none", notebook=b"{}", sha256="0" * 64)
                   for index in range(tasks + 3)]
    warm, timed_ones = submissions[:3], submissions[3:]
    _no_grading(warm[0], config)
    started = time.monotonic()
    for submission in timed_ones:
        _no_grading(submission, config)
    here = time.monotonic() - started
    job = cluster.Batch(config, batch.time_limit(config), batch.FIRST_JOB_UID, _no_grading)
    with cluster.connect(None, 1) as client:
        cluster.prepare(client, job)
        client.run(_loaded, config)  # nothing loads in the background while tasks are timed
        list(cluster.grade(client, job, warm))  # the first waits for the worker's first kernel
        started = time.monotonic()
        done = list(cluster.grade(client, job, timed_ones))
        there = time.monotonic() - started
    failed = [outcome for _, outcome in done if isinstance(outcome, str)]
    if len(done) != tasks or failed:
        sys.exit(f"the scheduling benchmark's tasks failed: {len(done)}/{tasks}; {failed[:1]}")
    per_task = (there - here) / tasks
    info(f"{tasks} tasks on the loopback cluster {there:.2f} s, the same calls here {here:.2f} s")
    figure("e. scheduling overhead per task (loopback cluster, one worker)", per_task * 1000, " ms", "<= 50 ms",
           per_task <= 0.05, f"{there / tasks * 1000:.1f} ms vs {here / tasks * 1000:.1f} ms")
    return per_task


def throughput_model(single: Single, per_task: float, per_result: float, measured: dict[int, Measured],
                     copies: int) -> None:
    """(f): how long a class of M notebooks takes on N workers:

        T(N, M) = S + max(ceil(M / N) * (g + o), M * w)

    g: a notebook's time in its worker in (b)'s batches (``result.seconds``): with one worker (a
    spare core for its side work), and with two on two cores, every core busy, as on a cluster whose
    nodes run a worker per core (used for N >= 2); S: the rest of (a)'s command on one notebook, paid
    once per batch (start-up, the cluster and the worker's preparation, the class-wide files); o:
    (e)'s cost per task (one task in flight per worker: a round trip between notebooks); w: the
    client's work per result ((c) in process), which one client does for the whole class. Checked
    against (b)'s wall times: that checks S, o, w and the rounds, not g, which (b) gave."""
    once = single.wall - single.grading

    def predict(workers: int, notebooks: int) -> float:
        grading = measured[min(workers, 2)].per_notebook
        return once + max(math.ceil(notebooks / workers) * (grading + per_task), notebooks * per_result)

    info(f"model: S {once:.1f} s once, g {measured[1].per_notebook:.1f} s per notebook with one worker and "
         f"{measured[2].per_notebook:.1f} s with every core busy, o {per_task * 1000:.1f} ms per task, "
         f"w {per_result * 1000:.0f} ms per result on the client")
    errors = {}
    for workers, batches in sorted(measured.items()):
        errors[workers] = predict(workers, copies) / batches.wall - 1
        info(f"{copies} notebooks on {workers} worker(s): the model says {predict(workers, copies):.1f} s, "
             f"(b) measured {batches.wall:.1f} s ({errors[workers]:+.1%})")
    for workers in (1, 2, 8, 64, 256):
        info(f"1,000 notebooks on {workers:3d} worker(s): {predict(workers, 1000) / 60:7.1f} min")
    worst = max(errors.values(), key=abs)
    figure("f. throughput model's worst error against (b)", worst * 100, "%", "within 15%", abs(worst) <= 0.15,
           ", ".join(f"{workers} worker(s) {error:+.1%}" for workers, error in sorted(errors.items())))


def start_up(root: Path, runs: Path) -> dict[str, float]:
    """Once-per-process costs, timed in a fresh interpreter (this one has imported everything)."""
    program = (
        "import json, time\n"
        "started = time.monotonic()\n"
        "from grader import batch, cli, pipeline, resources, score\n"
        "from reference import provision, spec\n"
        "imported = time.monotonic()\n"
        f"provisioned = provision.read_profile({str(root)!r}, 'fashion-mnist')\n"
        "config = pipeline.Config(provisioned=provisioned, spec=spec.load(provisioned.profile),\n"
        f"                         rubric=score.load_rubric(resources.RUBRIC_PATH), runs_dir={str(runs)!r})\n"
        "configured = time.monotonic()\n"
        "kernels = pipeline.prepare(config, notebooks=1)\n"
        "pipeline.dataset(config)  # waits for what prepare loads in the background\n"
        "prepared = time.monotonic()\n"
        "kernels.close()\n"
        "print(json.dumps([imported - started, configured - imported, prepared - configured]))\n")
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=True)
    imports, config, prepare = json.loads(done.stdout)
    return {"grader process: import the grader (no torch)": imports,
            "grader process: profile, spec and rubric": config,
            "grader process: pipeline.prepare (the first kernel starts and answers; torch, dataset, "
            "matplotlib load meanwhile and while the first cells run)": prepare}


def breakdown(work: Path, root: Path) -> None:
    """Where one grading's time goes, timed here by wrapping the stages (threads=1, as the CLI gives)."""
    spent: dict[str, float] = collections.defaultdict(float)
    spent.update(start_up(root, work / "start-up-runs"))
    from grader import checks, execute, expected, intake, pipeline, probe, saved_model, score
    from grader.execute import kernels
    from grader.execute.client import GradingClient
    from reference import provision, spec

    def wrap(module, name, label):
        original = getattr(module, name)

        @functools.wraps(original)
        def timed_call(*args, **kwargs):
            t0 = time.monotonic()
            try:
                return original(*args, **kwargs)
            finally:
                spent[label] += time.monotonic() - t0
        setattr(module, name, timed_call)
        return original

    def wrap_async(owner, name, label):
        original = getattr(owner, name)

        async def timed_call(*args, **kwargs):
            t0 = time.monotonic()
            try:
                return await original(*args, **kwargs)
            finally:
                spent[label] += time.monotonic() - t0
        setattr(owner, name, timed_call)
        return original

    grader_code = []
    run_code = GradingClient.run_trusted

    async def timed_run_code(client, code, timeout):
        t0 = time.monotonic()
        try:
            return await run_code(client, code, timeout)
        finally:
            label = ("kernel: prelude (seeds, threads, import hooks)" if not grader_code
                     else "kernel: probe (epilogue)")
            grader_code.append(label)
            spent[label] += time.monotonic() - t0

    restore = [
        (GradingClient, "run_trusted", run_code),
        (kernels, "_shutdown", wrap_async(kernels, "_shutdown", "kernel: shutdown")),
        (execute.Kernel, "run", wrap(execute.Kernel, "run", "Kernel.run in all")),
        (pipeline, "dataset", wrap(pipeline, "dataset", "grader: load the dataset tensors")),
        (probe, "make_plan", wrap(probe, "make_plan", "grader: probe plan")),
        (saved_model, "inspect", wrap(saved_model, "inspect", "grader: saved_model.inspect")),
        (expected, "compute", wrap(expected, "compute", "grader: expected.compute")),
        (checks, "run_checks", wrap(checks, "run_checks", "grader: checks")),
        (pipeline, "_draw_figures", wrap(pipeline, "_draw_figures", "grader: figures (matplotlib)")),
        (pipeline, "_save_run", wrap(pipeline, "_save_run", "grader: save the run")),
    ]
    GradingClient.run_trusted = timed_run_code
    try:
        provisioned = provision.read_profile(root, "fashion-mnist")
        directory = work / "breakdown"
        directory.mkdir()
        config = pipeline.Config(provisioned=provisioned, spec=spec.load(provisioned.profile),
                                 rubric=score.load_rubric(REPO / "lab" / "rubric.toml"),
                                 runs_dir=directory / "runs", threads=1)
        [submission] = intake.collect([fashion_notebook(directory)])
        # As batch does before the first notebook (timed in start_up()): a kernel starts and answers,
        # and torch, the dataset and matplotlib load in the background.
        with pipeline.prepare(config, notebooks=1) as kernels:
            t0 = time.monotonic()
            result = pipeline.grade(submission, config, kernels=kernels)
            total = time.monotonic() - t0
    finally:
        for owner, name, original in restore:
            setattr(owner, name, original)
    cells = sum(c.seconds or 0 for c in result.cells)
    kernel_parts = sum(v for k, v in spent.items() if k.startswith("kernel:"))
    spent["kernel: connecting to it, the rest"] = spent.pop("Kernel.run in all") - cells - kernel_parts
    spent["notebook cells"] = cells
    grader_parts = sum(v for k, v in spent.items() if not k.startswith("grader process"))
    spent["grader: other (nbformat, hashing, the probe's channel)"] = total - grader_parts
    print(f"breakdown of one pipeline.grade ({total:.1f} s, score {result.score:g}/{result.max_score:g}; "
          f"before it, once per process):")
    for label, seconds in sorted(spent.items(), key=lambda kv: (not kv[0].startswith("grader process"), -kv[1])):
        print(f"  {label:58s} {seconds:6.2f} s")
    slow = sorted(result.cells, key=lambda c: -(c.seconds or 0))[:4]
    print("  slowest cells: " + ", ".join(f"#{c.index} {c.seconds:.2f} s ({c.source_head[:30]!r})" for c in slow))
    info(f"overhead outside the cells in this run: {total - cells:.2f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 copies for (b), 10 for (c)")
    parser.add_argument("--copies", type=int, help="notebooks for the batch figure (default 8; 2 with --quick)")
    parser.add_argument("--rounds", type=int, help="rounds of (b), alternating --jobs 1, 2 and 2, 1 "
                                                   "(default 2; 1 with --quick)")
    parser.add_argument("--regrade", type=int, help="submissions to regrade (default 20; 10 with --quick)")
    parser.add_argument("--tasks", type=int, help="trivial tasks for (e) (default 200; 50 with --quick)")
    parser.add_argument("--skip", default="", help="comma-separated figures to skip: a,b,c,e,breakdown "
                                                   "(f needs a, b, c and e)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = parser.parse_args()
    copies = args.copies or (2 if args.quick else 8)
    count = args.regrade or (10 if args.quick else 20)
    rounds = args.rounds or (1 if args.quick else 2)
    tasks = args.tasks or (50 if args.quick else 200)
    skip = set(filter(None, args.skip.split(",")))
    sys.path.insert(0, str(REPO))
    started = time.monotonic()
    print(f"labgrader benchmarks, {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores, "
          f"{'quick' if args.quick else 'full'} mode", flush=True)
    root = fashion_root()
    info(f"data: {root}")
    work = Path(tempfile.mkdtemp(prefix="labgrader-bench-"))
    try:
        single = vs_nbconvert(work, root) if "a" not in skip else None
        graded_out = measured = per_result = per_task = None
        if "b" not in skip:
            graded_out, measured = batch_throughput(work, root, copies, rounds, single)
        if "c" not in skip:
            if graded_out is None:
                one = work / "c-seed"
                one.mkdir()
                graded_out = work / "c-seed-out"
                timed(grade_argv([fashion_notebook(one)], graded_out, root, 1))
            per_result = regrade(work, root, graded_out, count)
        if "e" not in skip:
            per_task = scheduling_overhead(work, root, tasks)
        if None not in (single, measured, per_result, per_task):
            throughput_model(single, per_task, per_result, measured, copies)
        if "breakdown" not in skip:
            breakdown(work, root)
    finally:
        if args.keep:
            info(f"scratch kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(f"done in {time.monotonic() - started:.0f} s", flush=True)
    if args.json:
        args.json.write_text(json.dumps(FIGURES, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
