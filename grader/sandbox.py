"""The sandbox stage: the command that starts one student's ipykernel, isolated.

Only the kernel is sandboxed; the executor (nbclient, in :mod:`grader.execute`) stays outside, where
the student's code cannot reach it. The kernelspec's argv is :func:`kernel_command`: it runs this
module as a small wrapper, *outside* the sandbox and with the executor's privileges, which

1. reads the connection file jupyter_client wrote and gives the job's uid a 0600 copy of it in the
   IPC directory (the only directory, with the work dir, that both sides see at the same path: the
   kernel lives in its own network namespace, so the channels are Unix sockets, ``transport="ipc"``);
2. replaces itself (``execv``, so the kernel manager's pid and process group are the sandbox's) with
   :func:`build_argv`'s command:

   * ``bubblewrap`` (as root): ``bwrap`` read-only view of ``/``, private ``/dev``, ``/proc``, a
     size-capped tmpfs ``/tmp`` and ``/dev/shm``, the caller's hidden paths (the repository, the
     ``grader``/``reference`` packages, specs, outputs, other submissions...) covered by empty tmpfs,
     the interpreter re-bound where it sits under a hidden or non-traversable directory, the work dir
     bound read-write at :data:`INNER_WORKDIR` with the dataset root read-only at ``./data``; new
     net/pid/ipc/uts namespaces, ``--die-with-parent``; then, inside, ``prlimit`` (address space,
     processes, file size, CPU, no core files) and ``setpriv`` to the job's unprivileged uid with no
     capabilities and ``no_new_privs``, and finally the kernel (:func:`kernel_argv`).
   * ``subprocess`` (fallback when not root or bubblewrap does not work here): the same rlimits set
     with :mod:`resource`, the uid dropped when running as root, the work dir as cwd. No namespaces:
     the network and the file system are reachable; :attr:`Execution.isolation` says so.

The configuration travels as base64 JSON in argv (never through the kernel's view).
"""
from __future__ import annotations

import base64
import dataclasses
import functools
import json
import os
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

INNER_WORKDIR = "/tmp/work"
BUBBLEWRAP = "bubblewrap"
SUBPROCESS = "subprocess"
ISOLATION_LABELS = {
    BUBBLEWRAP: "bubblewrap",
    SUBPROCESS: "subprocess (weaker: no namespaces)",
}
KERNEL_NAME = "labgrader-sandbox"


@dataclass(frozen=True)
class SandboxConfig:
    """Everything the wrapper needs to start one kernel; plain JSON-able values only."""

    workdir: str  # host path of the job's work dir (bound read-write)
    ipc_dir: str  # host path for the kernel's Unix sockets and connection file (same path inside)
    python: str = sys.executable  # the interpreter that has ipykernel
    mode: str = BUBBLEWRAP  # BUBBLEWRAP or SUBPROCESS
    data_root: str | None = None  # bound read-only at <workdir>/data
    hide: tuple[str, ...] = ()  # host paths to make empty/unreadable inside
    uid: int = 65534
    gid: int = 65534
    drop_uid: bool = True  # subprocess mode as root: switch to uid/gid (needs a reachable python)
    memory_bytes: int = 6 << 30  # RLIMIT_AS (virtual address space per process)
    processes: int = 256  # RLIMIT_NPROC (processes + threads of the uid, host-wide)
    file_size_bytes: int = 256 << 20  # RLIMIT_FSIZE
    tmp_bytes: int = 512 << 20  # size of the tmpfs /tmp (and /dev/shm)
    cpu_seconds: int = 3600  # RLIMIT_CPU (soft; SIGKILL 5 s later)
    threads: int = 1  # OMP/MKL/OpenBLAS threads
    env: dict[str, str] = field(default_factory=dict)  # extra environment for the kernel

    def to_arg(self) -> str:
        return base64.urlsafe_b64encode(json.dumps(dataclasses.asdict(self)).encode()).decode()

    @classmethod
    def from_arg(cls, arg: str) -> "SandboxConfig":
        data = json.loads(base64.urlsafe_b64decode(arg.encode()))
        data["hide"] = tuple(data.get("hide", ()))
        return cls(**data)


# --------------------------------------------------------------------------------------------
# What is available here
# --------------------------------------------------------------------------------------------

def _tool(name: str) -> str | None:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/bin:/bin:/usr/sbin:/sbin")


@functools.lru_cache(maxsize=None)
def bubblewrap_problem() -> str | None:
    """None when the bubblewrap sandbox works here; otherwise why not (checked once, by a probe)."""
    if os.geteuid() != 0:
        return "not running as root (bubblewrap must start as root to drop to a job uid)"
    missing = [t for t in ("bwrap", "prlimit", "setpriv") if _tool(t) is None]
    if missing:
        return "missing " + ", ".join(missing)
    argv = [_tool("bwrap"), "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
            "--size", str(1 << 20), "--tmpfs", "/tmp", "--unshare-net", "--unshare-pid",
            "--unshare-ipc", "--die-with-parent", "--new-session", "--",
            _tool("setpriv"), "--reuid=65534", "--regid=65534", "--clear-groups",
            "--no-new-privs", "--bounding-set=-all", "--inh-caps=-all", "/bin/sh", "-c", "id -u"]
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as e:
        return f"bubblewrap probe failed: {e}"
    if out.returncode != 0 or out.stdout.strip() != "65534":
        return f"bubblewrap probe failed (exit {out.returncode}): {out.stderr.strip()[:300]}"
    return None


def choose_mode(isolation: str = "auto") -> tuple[str, str | None]:
    """(mode, why the weaker mode was chosen or None). ``isolation``: auto, bubblewrap, subprocess."""
    if isolation == SUBPROCESS:
        return SUBPROCESS, "subprocess isolation requested"
    problem = bubblewrap_problem()
    if problem is None:
        return BUBBLEWRAP, None
    if isolation == BUBBLEWRAP:
        raise RuntimeError(f"bubblewrap isolation requested but unavailable: {problem}")
    return SUBPROCESS, problem


def package_dirs() -> list[Path]:
    """Where the ``grader`` and ``reference`` packages are, and the checkout holding them."""
    import importlib.util

    dirs: list[Path] = []
    for name in ("grader", "reference"):
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        if spec is not None:
            for loc in spec.submodule_search_locations or ():
                dirs.append(Path(loc).resolve())
    here = Path(__file__).resolve().parent
    dirs.append(here)
    root = here.parent
    if (root / "pyproject.toml").is_file() and (root / "reference").exists():
        dirs.append(root)  # a source checkout: hide all of it (specs, tests, lab examples)
    out: list[Path] = []
    for d in dirs:
        if d not in out:
            out.append(d)
    return out


def interpreter_paths(python: str = sys.executable) -> list[str]:
    """Directories the kernel's interpreter needs to see (venv and base installation)."""
    paths: set[str] = set()
    for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix):
        paths.add(os.path.abspath(p))
        paths.add(os.path.realpath(p))
    py = os.path.abspath(python)
    for p in (py, os.path.realpath(py)):
        paths.add(os.path.dirname(p))
        paths.add(os.path.dirname(os.path.dirname(p)))
    # Packages a .pth file brings in from another environment; only package directories, never a
    # checkout that an editable install puts on sys.path (it must stay hidden).
    for p in sys.path:
        if os.path.basename(p) in ("site-packages", "dist-packages") and os.path.isdir(p):
            paths.update((os.path.abspath(p), os.path.realpath(p)))
    return _outermost(sorted(paths))


def _outermost(paths: Sequence[str]) -> list[str]:
    """Drop paths inside another one of the list (keeps order of the survivors)."""
    out: list[str] = []
    for p in sorted(set(paths), key=lambda s: (s.count("/"), s)):
        if not any(_inside(p, q) for q in out):
            out.append(p)
    return out


def _inside(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def reachable_by_others(python: str) -> bool:
    """Whether a uid with no special rights can run ``python`` (used by the fallback as root)."""
    for p in {os.path.abspath(python), os.path.realpath(python)}:
        if _blocked_ancestors(p):
            return False
    return True


def _blocked_ancestors(path: str) -> list[str]:
    """Ancestors of ``path`` (not / and not path itself) that others cannot traverse."""
    out = []
    parts = Path(path).parts
    for i in range(2, len(parts)):
        anc = str(Path(*parts[:i]))
        try:
            mode = os.stat(anc).st_mode
        except OSError:
            continue
        if not mode & stat.S_IXOTH:
            out.append(anc)
            break  # the outermost one: a tmpfs there hides what is below
    return out


# --------------------------------------------------------------------------------------------
# The commands
# --------------------------------------------------------------------------------------------

def kernel_command(config: SandboxConfig) -> list[str]:
    """The kernelspec argv: this module as a wrapper, run with the executor's interpreter."""
    root = str(Path(__file__).resolve().parent.parent)
    boot = (f"import sys; sys.path.insert(0, {root!r}); "
            "from grader.sandbox import main; sys.exit(main(sys.argv[1:]))")
    return [sys.executable, "-c", boot, "--config", config.to_arg(), "-f", "{connection_file}"]


def kernel_env(config: SandboxConfig, workdir: str, home: str) -> dict[str, str]:
    """A clean environment for the kernel: nothing of the grader's own environment leaks in."""
    bindir = os.path.dirname(os.path.abspath(config.python))
    t = str(config.threads)
    env = {
        "PATH": f"{bindir}:/usr/local/bin:/usr/bin:/bin",
        "HOME": home, "IPYTHONDIR": f"{home}/.ipython", "MPLCONFIGDIR": f"{home}/.matplotlib",
        "XDG_CACHE_HOME": f"{home}/.cache", "XDG_CONFIG_HOME": f"{home}/.config",
        "JUPYTER_RUNTIME_DIR": f"{home}/.jupyter-runtime", "JUPYTER_CONFIG_DIR": f"{home}/.jupyter",
        "TORCH_HOME": f"{home}/.torch", "TMPDIR": "/tmp" if config.mode == BUBBLEWRAP else home,
        "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "PYTHONNOUSERSITE": "1",
        "PYTHONDONTWRITEBYTECODE": "1", "PYDEVD_DISABLE_FILE_VALIDATION": "1",
        "OMP_NUM_THREADS": t, "MKL_NUM_THREADS": t, "OPENBLAS_NUM_THREADS": t,
        "NUMEXPR_NUM_THREADS": t, "VECLIB_MAXIMUM_THREADS": t,
        "LABGRADER_WORKDIR": workdir, "LABGRADER_ISOLATION": config.mode,
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
    }
    env.update(config.env)
    return env


def build_argv(config: SandboxConfig, connection_file: str) -> list[str]:
    """The command that runs the kernel (bubblewrap mode); ``connection_file`` is the job's copy."""
    bwrap, prlimit, setpriv = _tool("bwrap"), _tool("prlimit"), _tool("setpriv")
    if not (bwrap and prlimit and setpriv):
        raise RuntimeError("bwrap, prlimit and setpriv are needed for bubblewrap isolation")
    tmp = str(config.tmp_bytes)
    a: list[str] = [bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
                    "--perms", "1777", "--size", tmp, "--tmpfs", "/tmp",
                    "--perms", "1777", "--size", tmp, "--tmpfs", "/dev/shm"]
    covered: list[str] = ["/tmp"]  # where the original content is no longer visible

    def cover(path: str) -> None:
        if any(_inside(path, c) for c in covered):
            return
        if os.path.isdir(path) and not os.path.islink(path):
            a.extend(["--perms", "0755", "--tmpfs", path])
        else:
            a.extend(["--ro-bind", "/dev/null", path])
        covered.append(path)

    # 1. the caller's hidden paths (their real paths too: a symlink must not lead around them)
    hidden = []
    for h in list(config.hide) + [str(d) for d in package_dirs()]:
        for p in {os.path.abspath(h), os.path.realpath(h)}:
            if os.path.lexists(p) and p != "/":
                hidden.append(p)
    for p in _outermost(hidden):
        cover(p)
    # 2. the interpreter, and the IPC dir: make them reachable for the unprivileged uid
    needed = interpreter_paths(config.python)
    for p in needed + [config.ipc_dir]:
        for anc in _blocked_ancestors(p):
            cover(anc)
    def parents(path: str) -> None:
        # bwrap creates missing parents of a mount point with mode 0700: make them 0755 first
        base = max((c for c in covered if _inside(path, c)), key=len, default=None)
        if base is None:
            return
        parts = Path(path).parts
        for i in range(len(Path(base).parts) + 1, len(parts)):
            a.extend(["--perms", "0755", "--dir", str(Path(*parts[:i]))])

    rebound = []
    for p in needed:
        if any(_inside(p, c) for c in covered):
            parents(p)
            a.extend(["--ro-bind", p, p])
            rebound.append(p)
    # 3. hide installed grader/reference packages that the rebinding made visible again
    for d in package_dirs():
        d = str(d)
        if any(_inside(d, n) for n in rebound):
            a.extend(["--perms", "0755", "--tmpfs", d])
    # 4. the job's directories
    a.extend(["--bind", config.workdir, INNER_WORKDIR])
    if config.data_root:
        a.extend(["--ro-bind", config.data_root, INNER_WORKDIR + "/data"])
    parents(config.ipc_dir)
    a.extend(["--bind", config.ipc_dir, config.ipc_dir])
    a.extend(["--chdir", INNER_WORKDIR, "--unshare-net", "--unshare-pid", "--unshare-ipc",
              "--unshare-uts", "--hostname", "sandbox", "--die-with-parent", "--new-session", "--"])
    # 5. inside: limits, then the unprivileged uid, then the kernel
    a.extend([prlimit, f"--as={config.memory_bytes}", f"--nproc={config.processes}",
              f"--fsize={config.file_size_bytes}", f"--cpu={config.cpu_seconds}:{config.cpu_seconds + 5}",
              "--core=0", "--"])
    a.extend([setpriv, f"--reuid={config.uid}", f"--regid={config.gid}", "--clear-groups",
              "--no-new-privs", "--bounding-set=-all", "--inh-caps=-all"])
    a.extend(kernel_argv(config.python, connection_file))
    return a


# What ``python -m ipykernel_launcher`` does (the working directory first on sys.path), less
# ipykernel's debugger: importing debugpy is about a quarter of a kernel's start-up (0.2 s here), and
# no debugger attaches to a graded kernel. With debugpy unimportable, ipykernel itself reports
# debugging as unavailable.
_KERNEL_MAIN = ("import os, sys; sys.path[0] = os.getcwd(); sys.modules['debugpy'] = None; "
                "from ipykernel import kernelapp; kernelapp.launch_new_instance()")


def kernel_argv(python: str, connection_file: str) -> list[str]:
    return [python, "-c", _KERNEL_MAIN, "-f", connection_file]


def _count_uid_tasks(uid: int) -> int:
    n = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            if os.stat(f"/proc/{pid}").st_uid == uid:
                n += len(os.listdir(f"/proc/{pid}/task"))
        except OSError:
            pass
    return n


def _subprocess_exec(config: SandboxConfig, connection_file: str) -> None:
    """Fallback: rlimits (and a uid drop when root), then exec the kernel. Does not return."""
    import resource

    workdir = config.workdir
    home = os.path.join(workdir, ".home")
    os.makedirs(home, exist_ok=True)
    data_link = os.path.join(workdir, "data")
    if config.data_root and not os.path.lexists(data_link):
        os.symlink(config.data_root, data_link)
    root = os.geteuid() == 0 and config.drop_uid
    if root:
        os.chown(home, config.uid, config.gid)
    nproc = config.processes
    if not root:  # RLIMIT_NPROC counts every task of our own uid: leave room for what runs already
        nproc += _count_uid_tasks(os.getuid())
    limits = [(resource.RLIMIT_AS, config.memory_bytes, config.memory_bytes),
              (resource.RLIMIT_NPROC, nproc, nproc),
              (resource.RLIMIT_FSIZE, config.file_size_bytes, config.file_size_bytes),
              (resource.RLIMIT_CPU, config.cpu_seconds, config.cpu_seconds + 5),
              (resource.RLIMIT_CORE, 0, 0)]
    for res, soft, hard in limits:
        try:
            cur_soft, cur_hard = resource.getrlimit(res)
            if cur_hard != resource.RLIM_INFINITY:
                soft, hard = min(soft, cur_hard), min(hard, cur_hard)
            resource.setrlimit(res, (soft, hard))
        except (ValueError, OSError):
            pass
    env = kernel_env(config, workdir, home)
    os.chdir(workdir)
    if root:
        os.setgroups([])
        os.setgid(config.gid)
        os.setuid(config.uid)
    os.execve(config.python, kernel_argv(config.python, connection_file), env)


def main(argv: Sequence[str] | None = None) -> int:
    """The wrapper: ``--config <base64 json> -f <connection file>``."""
    import argparse

    parser = argparse.ArgumentParser(prog="grader.sandbox")
    parser.add_argument("--config", required=True)
    parser.add_argument("-f", dest="connection_file", required=True)
    args = parser.parse_args(argv)
    config = SandboxConfig.from_arg(args.config)

    # The job's 0600 copy of the connection file, readable by the job uid only.
    data = Path(args.connection_file).read_bytes()
    copy = os.path.join(config.ipc_dir, "connection.json")
    fd = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, data)
        if os.geteuid() == 0:
            os.fchown(fd, config.uid, config.gid)
    finally:
        os.close(fd)

    if config.mode == SUBPROCESS:
        _subprocess_exec(config, copy)
        return 1  # not reached
    argv_ = build_argv(config, copy)
    env = kernel_env(config, INNER_WORKDIR, "/tmp")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(argv_[0], argv_, env)
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main())
