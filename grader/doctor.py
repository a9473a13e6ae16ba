"""``labgrader doctor``: what this machine allows the sandbox, and the isolation grading would record.

Each line is checked here, now, by doing the thing (starting bubblewrap as a job would, mounting a
tmpfs, asking :mod:`grader.cgroups` for a box's place, finding each declared package's modules), not
by guessing from versions.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from grader import cgroups, environment, sandbox
from grader.limits import Limits

_TMPFS_PROBE_BYTES = 1 << 20


@dataclass(frozen=True)
class Line:
    name: str
    ok: bool
    detail: str


def diagnose(packages: tuple[str, ...] = ()) -> list[Line]:
    """``packages``: the rubric's declared packages, each reported importable or not."""
    tmpfs = _tmpfs()
    return [_bwrap(), _user_namespaces(), _sandbox(), _account(), _cgroups(), tmpfs, _isolation(tmpfs),
            *map(_package, packages)]


def _package(name: str) -> Line:
    """A declared package is importable when it is installed and each module it gives can be found
    by the interpreter the kernels run (this one: the sandbox shows its packages)."""
    version = environment.package_versions([name])[name]
    modules = environment.import_names(name)
    missing = [module for module in modules if importlib.util.find_spec(module) is None]
    if version is None or missing:
        return Line(f"package {name}", False, f"declared in the rubric but not importable here "
                    f"({'not installed' if version is None else 'no module ' + ', '.join(missing)}): "
                    f"run ./dev.sh, or pip install {name}")
    return Line(f"package {name}", True, f"{version}: import {', '.join(modules)}")


def _bwrap() -> Line:
    path = sandbox.tool("bwrap")
    if path is None:
        return Line("bwrap", False, "not found: install the bubblewrap package")
    try:
        version = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        version = f"version unknown ({e})"
    nested = "" if sandbox.disable_userns_args() else "; no --disable-userns (before 0.8): kernels may nest namespaces"
    return Line("bwrap", True, f"{path}: {version}{nested}")


def _user_namespaces() -> Line:
    disabled = sandbox.userns_disabled()
    return Line("user namespaces", disabled is None, disabled or "not disabled by a sysctl")


def _sandbox() -> Line:
    problem = sandbox.bubblewrap_problem()
    return Line("sandbox", problem is None, problem or "bubblewrap starts a kernel's namespaces here")


def _account() -> Line:
    if os.geteuid() == 0:
        return Line("user", True, "root: each worker's kernel runs as an unprivileged uid of its own")
    return Line("user", False, f"ordinary user (uid {os.getuid()}): kernels run as your uid outside the "
                "sandbox, with no separate job uids")


def _cgroups() -> Line:
    problem = cgroups.problem()
    return Line("cgroups", problem is None, problem or "a memory/pids/CPU box per kernel can be made")


def _tmpfs() -> Line:
    if os.geteuid() != 0:
        return Line("work dir tmpfs", False, sandbox.work_dir_phrase(None, "needs root"))
    with tempfile.TemporaryDirectory(prefix="labgrader-doctor-") as d:
        problem = sandbox.mount_tmpfs(Path(d), _TMPFS_PROBE_BYTES, 0, 0)
        if problem is None:
            sandbox.unmount(Path(d))
    size = Limits().tmp_bytes
    return Line("work dir tmpfs", problem is None, sandbox.work_dir_phrase(None if problem else size, problem))


def _isolation(tmpfs: Line) -> Line:
    """What ``labgrader grade`` (``--isolation auto``) would record for a notebook's kernel."""
    mode, why = sandbox.choose_mode("auto")
    label = sandbox.isolation_label(mode, why, job_uid=os.geteuid() == 0, work_dir=tmpfs.detail)
    return Line("isolation", mode == sandbox.BUBBLEWRAP, label)
