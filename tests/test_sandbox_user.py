"""The sandbox as instructors run it: under their own account, not as root.

The isolation assertions themselves are in ``test_isolation.py``, which runs each of them both as
root and as the ordinary user made here (its ``account`` fixture). This module makes that user and
checks what is particular to it: ``labgrader grade`` end to end records the bubblewrap sandbox, and
where user namespaces are disabled the instructor is told which setting enables them.

As root, the tests make a throwaway user with ``useradd`` and remove it afterwards. That user must be
able to run the grader's interpreter: where it cannot (a venv whose base interpreter lives under the
0700 ``/root``, as on these machines), the tests build an overlay venv in a directory the user owns,
on a system interpreter of the same version, whose one ``.pth`` file adds this environment's
site-packages (only read; the repository is not changed). Run as an ordinary user, the tests use
that user and the current interpreter.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pickle
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import nbformat
import pytest
from nbformat import v4

from grader import sandbox
from grader.execute import Kernels, Sandboxing
from grader.results import Execution

REPO = Path(__file__).resolve().parent.parent
# Runs a pickled (function, args, kwargs) and pickles its result into the file named by argv[1].
_CALL = ("import pickle, sys\n"
         "function, args, kwargs = pickle.load(sys.stdin.buffer)\n"
         "result = function(*args, **kwargs)\n"
         "open(sys.argv[1], 'wb').write(pickle.dumps(result))\n")


@dataclass(frozen=True)
class Account:
    """Who runs the grader in a test: this process, or a user the test made (through a subprocess
    running as that user)."""

    name: str
    uid: int
    gid: int
    home: Path
    python: str  # the interpreter the grader runs with
    scratch: Path  # a directory the account owns: its workspaces (and the overlay venv)

    @property
    def is_root(self) -> bool:
        return self.uid == 0

    @property
    def is_this_process(self) -> bool:
        return self.uid == os.geteuid()

    def job_uid(self, uid: int) -> int:
        """The uid a kernel's processes have outside the sandbox (``uid``: the job uid asked for)."""
        return uid if self.is_root else self.uid

    def call(self, function: Callable, *args, **kwargs) -> Any:
        """``function(*args, **kwargs)`` as this account (an importable function; pickled both ways)."""
        if self.is_this_process:
            return function(*args, **kwargs)
        result = self.scratch / f"result-{secrets.token_hex(4)}.pickle"
        done = self.run([self.python, "-c", _CALL, str(result)], input=pickle.dumps((function, args, kwargs)))
        assert done.returncode == 0, f"as {self.name}: exit {done.returncode}: {done.stderr[-3000:]!r}"
        try:
            return pickle.loads(result.read_bytes())
        finally:
            result.unlink()

    def run(self, argv: list[str], input: bytes | None = None) -> subprocess.CompletedProcess:
        ids = {} if self.is_this_process else dict(user=self.uid, group=self.gid, extra_groups=[])
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(self.home), "LANG": "C.UTF-8",
               "PYTHONPATH": str(Path(__file__).resolve().parent),  # this module, for call()
               **{k: v for k, v in os.environ.items() if k.startswith("LABGRADER_TEST_")}}
        return subprocess.run(argv, input=input, capture_output=True, cwd=self.scratch, env=env,
                              timeout=900, **ids)

    def workspace(self, tmp_path: Path) -> Path:
        """A new directory the account owns, for one test's work, record and data dirs."""
        if self.is_this_process:
            return tmp_path
        return self.own(Path(tempfile.mkdtemp(prefix="ws-", dir=self.scratch)))

    def own(self, path: Path) -> Path:
        """Hand ``path`` (and what is in it) to the account."""
        if not self.is_this_process:
            for p in [path, *path.rglob("*")]:
                os.lchown(p, self.uid, self.gid)
        return path


def this_process(scratch: Path) -> Account:
    me = pwd.getpwuid(os.geteuid())
    return Account(me.pw_name, me.pw_uid, me.pw_gid, Path(me.pw_dir), sys.executable, scratch)


@pytest.fixture(scope="session")
def ordinary_user(tmp_path_factory) -> Iterator[Account]:
    """A user with no special rights: made for the session when the tests run as root."""
    if os.geteuid() != 0:
        yield this_process(tmp_path_factory.mktemp("ordinary"))
        return
    if shutil.which("useradd") is None:
        pytest.fail("the tests run as root and must make an ordinary user, but useradd is not "
                    "installed: install the passwd package, or run the tests as an ordinary user")
    name = f"lgsb{secrets.token_hex(3)}"
    subprocess.run(["useradd", "--create-home", "--user-group", "--shell", "/usr/sbin/nologin", name],
                   check=True, capture_output=True)
    entry = pwd.getpwnam(name)
    scratch = Path(tempfile.mkdtemp(prefix=f"{name}-"))
    os.chown(scratch, entry.pw_uid, entry.pw_gid)
    user = Account(name, entry.pw_uid, entry.pw_gid, Path(entry.pw_dir), sys.executable, scratch)
    try:
        yield dataclasses.replace(user, python=_python_for(user))
    finally:
        _kill_all(entry.pw_uid)
        subprocess.run(["userdel", "--remove", name], capture_output=True)
        shutil.rmtree(scratch, ignore_errors=True)


def _python_for(user: Account) -> str:
    """An interpreter the user can run that imports what this one does (see the module docstring)."""
    if sandbox.reachable_by_others(sys.executable):
        return sys.executable
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    base = next((p for p in (f"/usr/bin/python{version}", f"/usr/local/bin/python{version}")
                 if os.access(p, os.X_OK) and sandbox.reachable_by_others(p)), None)
    if base is None:
        pytest.fail(f"{sys.executable} cannot be run by an ordinary user (an ancestor directory is closed "
                    f"to others) and no python{version} is installed where it can be: install "
                    f"python{version} in /usr/bin, or make the venv from an interpreter outside /root")
    venv = user.scratch / "venv"
    made = user.run([base, "-m", "venv", "--without-pip", str(venv)])
    assert made.returncode == 0, f"could not make the overlay venv: {made.stderr!r}"
    overlay = venv / "lib" / f"python{version}" / "site-packages" / "labgrader-overlay.pth"
    overlay.write_text("import site; " + "; ".join(f"site.addsitedir({p!r})" for p in sandbox.site_packages()) + "\n")
    return str(venv / "bin" / "python")


def _kill_all(uid: int) -> None:
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if os.stat(f"/proc/{pid}").st_uid == uid:
                    os.kill(int(pid), signal.SIGKILL)
            except OSError:
                pass


def run_in_own_kernel(sandboxing: Sandboxing, notebook, record: Path,
                      channel_files: dict[str, str]) -> tuple[Execution, dict]:
    """Run ``notebook`` in a kernel of :class:`Kernels` (its own temporary work dir), with
    ``channel_files`` put in its channel dir first; also returns what was seen from outside."""
    with Kernels(sandboxing, notebooks=1) as kernels, kernels.kernel() as kernel:
        for name, text in channel_files.items():
            (kernel.channel_dir / name).write_text(text)
        ex = kernel.run(notebook, record)
        workdir = kernel.workdir
        seen = {"inner_channel_dir": kernel.inner_channel_dir,
                "channel_mode": kernel.channel_dir.stat().st_mode & 0o7777,
                "channel_owner": kernel.channel_dir.stat().st_uid,
                "mounted_while_open": _mounted(workdir),
                "files": {p.name: p.stat().st_size for p in workdir.iterdir() if p.is_file()}}
    return ex, {**seen, "mounted_after": _mounted(workdir), "exists_after": workdir.exists()}


def _mounted(path: Path) -> bool:
    return any(line.split()[4] == str(path) for line in open("/proc/self/mountinfo"))


pytestmark = pytest.mark.skipif(sandbox.bubblewrap_problem() is not None,
                                reason=f"bubblewrap sandbox unavailable: {sandbox.bubblewrap_problem()}")


def test_labgrader_grade_as_an_ordinary_user_records_the_bubblewrap_sandbox(ordinary_user, tmp_path):
    user = ordinary_user
    space = user.workspace(tmp_path)
    cell = ("import json, os, socket\n"
            "print(json.dumps({'uid': os.getuid(), 'ifaces': [n for _, n in socket.if_nameindex()],"
            f" 'home': os.path.exists({str(user.home)!r})}}))")
    nbformat.write(v4.new_notebook(cells=[v4.new_code_cell(cell)]), space / "tiny.ipynb")
    user.own(space / "tiny.ipynb")
    done = user.run([user.python, "-m", "grader.cli", "grade", str(space / "tiny.ipynb"), "--out",
                     str(space / "out"), "--root", str(space / "data"), "--jobs", "1", "--quiet"])
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((space / "out" / "tiny" / "result.json").read_text())
    assert result["status"] == "graded" and result["execution_status"] == "completed"
    assert result["isolation"] == ("bubblewrap (user namespace; runs as your uid outside; "
                                   "work dir not size-capped: needs root); no resource box (rlimits only)")
    [executed] = (space / "out").rglob("executed.ipynb")
    seen = json.loads(nbformat.read(str(executed), as_version=4).cells[0].outputs[0]["text"])
    assert seen == {"uid": sandbox.NOBODY, "ifaces": ["lo"], "home": False}


def test_the_probe_as_an_ordinary_user_finds_the_sandbox_working(ordinary_user):
    assert ordinary_user.call(sandbox.bubblewrap_problem) is None


def test_where_user_namespaces_are_disabled_grading_says_which_setting_enables_them(tmp_path):
    """Inside a user namespace whose ``user.max_user_namespaces`` is 0 (what a hardened kernel or
    container sets), no sandbox can start: ``doctor`` names the setting, ``--isolation bubblewrap``
    refuses to grade in one line, and ``auto`` would record the weaker mode and why."""
    unshare = shutil.which("unshare")
    assert unshare is not None, "util-linux's unshare is needed to disable user namespaces for a test"
    notebook = tmp_path / "n.ipynb"
    nbformat.write(v4.new_notebook(cells=[v4.new_code_cell("x = 1")]), notebook)
    python = sys.executable
    script = (f"echo 0 > /proc/sys/user/max_user_namespaces || exit 99\n"
              f"{python} -m grader.cli doctor; echo \"doctor exit $?\"\n"
              f"{python} -m grader.cli grade {notebook} --out {tmp_path / 'out'} --isolation bubblewrap "
              f"--quiet 2>{tmp_path / 'stderr'}; echo \"grade exit $?\"\n")
    done = subprocess.run([unshare, "--user", "--map-root-user", "sh", "-c", script], capture_output=True,
                          text=True, cwd=REPO, timeout=300)
    lines = done.stdout.splitlines()
    setting = "user namespaces are disabled (user.max_user_namespaces = 0); enable them with `sysctl"
    assert "doctor exit 1" in lines and "grade exit 2" in lines, done
    [doctor_sandbox] = [line for line in lines if line.split()[1:2] == ["sandbox"]]
    assert doctor_sandbox.startswith("NO") and setting in doctor_sandbox
    [doctor_isolation] = [line for line in lines if line.split()[1:2] == ["isolation"]]
    assert doctor_isolation.split(None, 2)[2].startswith(f"subprocess (weaker: no namespaces); {setting}")
    [refusal] = (tmp_path / "stderr").read_text().splitlines()
    assert refusal.startswith("labgrader: --isolation bubblewrap: the sandbox cannot start here: " + setting)
    assert not (tmp_path / "out").exists()  # refused before anything was graded
