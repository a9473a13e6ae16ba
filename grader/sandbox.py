"""The sandbox stage: the command that starts one student's ipykernel, isolated.

Only the kernel is sandboxed; the executor (nbclient, in :mod:`grader.execute`) stays outside, where
the student's code cannot reach it. The kernelspec's argv is :func:`kernel_command`: it runs this
module as a small wrapper (:func:`main`), *outside* the sandbox and with the executor's rights, which

1. joins the kernel's resource box (:attr:`SandboxConfig.cgroup_procs`), or refuses to start;
2. gives the kernel a 0600 copy of the connection file jupyter_client wrote, in the IPC directory
   (the kernel has its own network namespace, so the channels are Unix sockets, ``transport="ipc"``);
3. sets the rlimits (address space, processes, file size, CPU, no core files), as root drops to
   the job's unprivileged uid (no groups, no capabilities), and dies with the grader;
4. replaces itself (``execv``: the kernel manager's pid and process group are the sandbox's) with
   :func:`build_argv`'s command.

Modes (:func:`choose_mode`):

* ``bubblewrap``, the same for root and ordinary users: ``bwrap`` with its own user namespace
  (``--unshare-user --disable-userns``: the kernel is uid 65534 inside and cannot make namespaces
  of its own; no capabilities), and new net/pid/ipc/uts/cgroup namespaces. Loopback is up inside,
  nothing else is reachable. The file system is a minimal view, nothing else of the host: ``/usr``
  (and the ``/bin``, ``/lib``... links or dirs), the few ``/etc`` files a Python process reads, a
  generated ``passwd``/``group`` naming only ``nobody``, the interpreter's installation and site
  packages (:func:`interpreter_paths`), all read-only; the work dir read-write at
  :data:`INNER_WORKDIR` with the dataset root read-only at ``./data``; the IPC dir at
  :data:`INNER_IPC_DIR`; the grader's channel dir read-only at :data:`INNER_CHANNEL_DIR`; private
  size-capped tmpfs ``/tmp`` and ``/dev/shm``; ``/dev`` and ``/proc`` of its own; the rest read-only.
  The ``grader``/``reference`` packages, wherever the interpreter's directories hold them, and the
  caller's hidden paths inside what is bound are covered by empty read-only tmpfs. As an ordinary
  user, bwrap runs as that user (the kernel has that uid's rights outside, though it sees none of
  that user's files but the interpreter's); as root, as the job's uid: bwrap started *as root* with
  ``--unshare-user`` maps the kernel to uid 0 outside (measured: it read a root-only file).
* ``subprocess`` (fallback when bubblewrap cannot start here): the same rlimits and uid drop, the
  work dir as cwd. No namespaces: the network and the file system are reachable;
  :attr:`Execution.isolation` says so, and why bubblewrap was not used.

bwrap opens every bind source with its caller's rights, so as root the job's uid must be able to
reach them; it cannot where an ancestor is closed to others (an interpreter under ``/root``, a work
dir under a 0700 temporary dir). ``--ro-bind-fd`` does not help: bwrap resolves the fd's path again
(measured: ``Can't find source path /proc/self/fd/3: Permission denied``). So as root the wrapper
first enters a mount namespace of its own where such a closed ancestor is an empty 0755 tmpfs with
only the sources bound back into it (:func:`_reach`); the host's mounts are untouched.

The configuration travels as base64 JSON in argv (never through the kernel's view).
"""
from __future__ import annotations

import base64
import ctypes
import dataclasses
import functools
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from grader import cgroups

INNER_WORKDIR = "/tmp/work"
INNER_IPC_DIR = "/run/kernel"
INNER_CHANNEL_DIR = "/run/labgrader"
BUBBLEWRAP = "bubblewrap"
SUBPROCESS = "subprocess"
KERNEL_NAME = "labgrader-sandbox"
NOBODY = 65534  # the kernel's uid and gid inside the sandbox's user namespace
HIDDEN_PACKAGES = ("grader", "reference")  # never importable inside, wherever they are installed
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
# What a Python process (and matplotlib, and a `!` shell command) reads in /etc; not the host's accounts.
_ETC = ("/etc/ld.so.cache", "/etc/localtime", "/etc/fonts", "/etc/alternatives")
_ACCOUNTS = {"/etc/passwd": b"nobody:x:65534:65534:nobody:/tmp:/usr/sbin/nologin\n",
             "/etc/group": b"nogroup:x:65534:\n"}


@dataclass(frozen=True)
class SandboxConfig:
    """Everything the wrapper needs to start one kernel; plain JSON-able values only."""

    workdir: str  # host path of the job's work dir (bound read-write)
    ipc_dir: str  # host path for the kernel's Unix sockets and connection file
    python: str = sys.executable  # the interpreter that has ipykernel
    mode: str = BUBBLEWRAP  # BUBBLEWRAP or SUBPROCESS
    data_root: str | None = None  # bound read-only at <workdir>/data
    datasets: tuple[str, ...] = ()  # only these folders of data_root, each at <workdir>/data/<name>
    hide: tuple[str, ...] = ()  # host paths to cover wherever they fall inside what is bound
    uid: int = 65534
    gid: int = 65534
    drop_uid: bool = True  # as root: switch to uid/gid (subprocess mode: needs a reachable python)
    memory_bytes: int = 6 << 30  # RLIMIT_AS (virtual address space per process)
    processes: int = 256  # RLIMIT_NPROC (processes + threads of the uid, host-wide)
    file_size_bytes: int = 256 << 20  # RLIMIT_FSIZE
    tmp_bytes: int = 512 << 20  # size of the tmpfs /tmp (and /dev/shm)
    cpu_seconds: int = 3600  # RLIMIT_CPU (soft; SIGKILL 5 s later)
    threads: int = 1  # OMP/MKL/OpenBLAS threads
    env: dict[str, str] = field(default_factory=dict)  # extra environment for the kernel
    channel_dir: str | None = None  # the grader's dir, bound read-only at INNER_CHANNEL_DIR
    cgroup_procs: tuple[str, ...] = ()  # files the wrapper writes its pid into before anything else
    preload: tuple[str, ...] = ()  # modules the kernel imports while it starts (see kernel_argv)

    def to_arg(self) -> str:
        return base64.urlsafe_b64encode(json.dumps(dataclasses.asdict(self)).encode()).decode()

    @classmethod
    def from_arg(cls, arg: str) -> "SandboxConfig":
        data = json.loads(base64.urlsafe_b64decode(arg.encode()))
        for name in ("hide", "cgroup_procs", "preload", "datasets"):
            data[name] = tuple(data.get(name, ()))
        return cls(**data)


@dataclass(frozen=True)
class Bind:
    """A host path the kernel sees at ``dest``."""

    source: str
    dest: str
    writable: bool = False


# --------------------------------------------------------------------------------------------
# What is available here
# --------------------------------------------------------------------------------------------

def tool(name: str) -> str | None:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/bin:/bin:/usr/sbin:/sbin")


# (sysctl under /proc/sys, the value that turns unprivileged user namespaces off, how to turn them on)
_USERNS_SWITCHES = (
    ("kernel/unprivileged_userns_clone", "0", "sysctl -w kernel.unprivileged_userns_clone=1"),
    ("user/max_user_namespaces", "0", "sysctl -w user.max_user_namespaces=15000"),
    ("kernel/apparmor_restrict_unprivileged_userns", "1",
     "sysctl -w kernel.apparmor_restrict_unprivileged_userns=0, or an AppArmor profile for bwrap"),
)


def userns_disabled() -> str | None:
    """One line naming the setting that disables unprivileged user namespaces here, or None."""
    for name, off, enable in _USERNS_SWITCHES:
        try:
            value = Path("/proc/sys", name).read_text().strip()
        except OSError:
            continue
        if value == off:
            return f"user namespaces are disabled ({name.replace('/', '.')} = {off}); enable them with `{enable}`"
    return None


@functools.lru_cache(maxsize=None)
def bubblewrap_problem() -> str | None:
    """None when the bubblewrap sandbox works here; otherwise why not, in one line (checked once,
    by running the sandbox's own namespaces and system view, as the uid a job would have)."""
    bwrap = tool("bwrap")
    if bwrap is None:
        return "bwrap not found (install the bubblewrap package)"
    argv = [bwrap, *_namespace_args(), *_system_args(), "--", "/bin/sh", "-c", "id -u"]
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=20, cwd="/", **_as_nobody())
    except (OSError, subprocess.SubprocessError) as e:
        return userns_disabled() or f"bubblewrap probe failed: {e}"
    if out.returncode == 0 and out.stdout.strip() == str(NOBODY):
        return None
    said = " ".join(out.stderr.split())[:300]
    if "Operation not permitted" in said or "No permissions" in said:
        return userns_disabled() or (f"user namespaces are blocked here (bwrap: {said}); allow "
                                     "unshare(CLONE_NEWUSER) in the container's seccomp/security policy")
    return userns_disabled() or f"bubblewrap probe failed (exit {out.returncode}): {said}"


def _as_nobody() -> dict:
    """subprocess.run arguments that run a command with a job's rights (as root: uid 65534)."""
    return dict(user=NOBODY, group=NOBODY, extra_groups=[]) if os.geteuid() == 0 else {}


@functools.lru_cache(maxsize=None)
def disable_userns_args() -> tuple[str, ...]:
    """``--disable-userns`` where this bwrap has it (0.8 and later)."""
    bwrap = tool("bwrap")
    try:
        helps = subprocess.run([bwrap, "--help"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError, TypeError):
        return ()
    return ("--disable-userns",) if "--disable-userns" in helps else ()


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


def isolation_label(mode: str, why: str | None, *, job_uid: bool, work_dir: str) -> str:
    """What a run had, as :attr:`Execution.isolation` records it; starts with the mode's name.

    ``job_uid``: the kernel runs as a uid of its own outside; ``work_dir``: how its work dir is
    held (a size-capped tmpfs, or why not)."""
    if mode == SUBPROCESS:
        return "; ".join(["subprocess (weaker: no namespaces)", *([why] if why else []), work_dir])
    who = "separate job uid" if job_uid else "runs as your uid outside"
    return f"bubblewrap (user namespace; {who}; {work_dir})"


def work_dir_phrase(size: int | None, why: str = "") -> str:
    """How a kernel's work dir is held, for :func:`isolation_label`: a tmpfs of ``size`` bytes, or why not."""
    return f"work dir tmpfs {size / (1 << 20):g} MiB" if size is not None else f"work dir not size-capped: {why}"


def package_dirs() -> list[Path]:
    """Where the ``grader`` and ``reference`` packages are, and the checkout holding them."""
    import importlib.util

    dirs: list[Path] = []
    for name in HIDDEN_PACKAGES:
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
    return list(dict.fromkeys(dirs))


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
    paths.update(site_packages())
    return _outermost(sorted(paths))


def site_packages() -> list[str]:
    """The site-packages directories on this interpreter's path (their real paths too)."""
    found: set[str] = set()
    for p in sys.path:
        if os.path.basename(p) in ("site-packages", "dist-packages") and os.path.isdir(p):
            found.update((os.path.abspath(p), os.path.realpath(p)))
    return sorted(found)


def _outermost(paths: Sequence[str]) -> list[str]:
    """Drop paths inside another one of the list (outer ones first)."""
    out: list[str] = []
    for p in sorted(set(paths), key=lambda s: (s.count("/"), s)):
        if not any(_inside(p, q) for q in out):
            out.append(p)
    return out


def _inside(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def reachable_by_others(python: str) -> bool:
    """Whether a uid with no special rights can run ``python`` (used by the fallback as root)."""
    return not any(_blocked_ancestor(p) for p in {os.path.abspath(python), os.path.realpath(python)})


def _blocked_ancestor(path: str) -> str | None:
    """The outermost ancestor of ``path`` (not / and not path itself) others cannot traverse."""
    parts = Path(path).parts
    for i in range(2, len(parts)):
        anc = str(Path(*parts[:i]))
        try:
            if not os.stat(anc).st_mode & stat.S_IXOTH:
                return anc
        except OSError:
            continue
    return None


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


def _namespace_args() -> list[str]:
    return ["--unshare-user", *disable_userns_args(), "--uid", str(NOBODY), "--gid", str(NOBODY),
            "--cap-drop", "ALL", "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
            "--unshare-cgroup-try", "--hostname", "sandbox", "--die-with-parent", "--new-session"]


def _system_args() -> list[str]:
    """The system's programs and libraries, read-only, and a /dev and /proc of the sandbox's own."""
    a: list[str] = []
    for d in _SYSTEM_DIRS:
        if os.path.islink(d):  # merged /usr: /bin -> usr/bin
            a += ["--symlink", os.readlink(d), d]
    for d in _system_dirs():
        a += ["--ro-bind", d, d]
    for f in _ETC:
        if os.path.exists(f):
            a += ["--ro-bind", f, f]
    return a + ["--dev", "/dev", "--proc", "/proc"]


def _system_dirs() -> list[str]:
    return [d for d in _SYSTEM_DIRS if os.path.isdir(d) and not os.path.islink(d)]


def _private_args(config: SandboxConfig, files: Mapping[str, int]) -> list[str]:
    """Size-capped tmpfs /tmp and /dev/shm, and the generated account files (``files``: dest -> fd)."""
    size = str(config.tmp_bytes)
    a = ["--perms", "1777", "--size", size, "--tmpfs", "/tmp",
         "--perms", "1777", "--size", size, "--tmpfs", "/dev/shm", "--remount-ro", "/dev"]
    for dest, fd in files.items():
        a += ["--perms", "0644", "--ro-bind-data", str(fd), dest]
    return a


def binds(config: SandboxConfig) -> list[Bind]:
    """Everything the kernel sees of the host besides the system: interpreter, then the job's dirs."""
    system = _system_dirs()
    out = [Bind(p, p) for p in interpreter_paths(config.python)
           if not any(_inside(p, s) for s in system)]
    out.append(Bind(config.workdir, INNER_WORKDIR, writable=True))
    if config.data_root:
        data = INNER_WORKDIR + "/data"
        out += ([Bind(os.path.join(config.data_root, name), f"{data}/{name}") for name in config.datasets]
                or [Bind(config.data_root, data)])
    out.append(Bind(config.ipc_dir, INNER_IPC_DIR, writable=True))
    if config.channel_dir:
        out.append(Bind(config.channel_dir, INNER_CHANNEL_DIR))
    return out


def _bind_args(mounts: Sequence[Bind]) -> list[str]:
    a: list[str] = []
    for b in mounts:
        a += ["--bind" if b.writable else "--ro-bind", b.source, b.dest]
    return a


def hidden_paths(config: SandboxConfig) -> list[str]:
    """Host paths never to be seen: the caller's, the grader's own packages and checkout, and those
    packages wherever a site-packages dir holds them (an editable install leaves data there)."""
    found = [*config.hide, *map(str, package_dirs()),
             *(os.path.join(sp, name) for sp in site_packages() for name in HIDDEN_PACKAGES)]
    out = {p for h in found for p in (os.path.abspath(h), os.path.realpath(h))
           if os.path.lexists(p) and p != "/"}
    return sorted(out, key=lambda p: (p.count("/"), p))  # outer ones first


def _cover_args(config: SandboxConfig, mounts: Sequence[Bind]) -> list[str]:
    """Hidden paths that fall inside a bound dir, covered by an empty read-only tmpfs (or file).
    Not only the outermost: a venv inside the hidden checkout is bound, and its packages covered."""
    a: list[str] = []
    covered: list[str] = []
    for path in hidden_paths(config):
        for b in [*(Bind(d, d) for d in _system_dirs()), *mounts]:
            dest = b.dest + path[len(b.source.rstrip("/")):]
            if not _inside(path, b.source) or any(_inside(dest, c) for c in covered):
                continue
            if os.path.isdir(path) and not os.path.islink(path):
                a += ["--tmpfs", dest, "--remount-ro", dest]
            else:
                a += ["--ro-bind", "/dev/null", dest]
            covered.append(dest)
    return a


def build_argv(config: SandboxConfig, connection_file: str, files: Mapping[str, int] = {}) -> list[str]:
    """The bwrap command that runs the kernel; ``connection_file`` as the kernel sees it, ``files``
    as :func:`_private_args` takes them."""
    bwrap = tool("bwrap")
    if bwrap is None:
        raise RuntimeError("bwrap is needed for bubblewrap isolation")
    mounts = binds(config)
    return [bwrap, *_namespace_args(), *_system_args(), *_private_args(config, files),
            *_bind_args(mounts), *_cover_args(config, mounts),
            "--remount-ro", "/", "--chdir", INNER_WORKDIR, "--",
            *kernel_argv(config.python, connection_file, config.preload)]


# What ``python -m ipykernel_launcher`` does (the working directory first on sys.path), less
# ipykernel's debugger: importing debugpy is about a quarter of a kernel's start-up (0.2 s here), and
# no debugger attaches to a graded kernel. With debugpy unimportable, ipykernel itself reports
# debugging as unavailable.
_KERNEL_MAIN = ("import os, sys; sys.path[0] = os.getcwd(); sys.modules['debugpy'] = None; "
                "from ipykernel import kernelapp; kernelapp.launch_new_instance(exec_lines={exec_lines!r})")


def kernel_argv(python: str, connection_file: str, preload: tuple[str, ...] = ()) -> list[str]:
    """The kernel's own command. ``preload``: modules it imports as it starts, before it answers,
    so that a kernel started ahead has them loaded when its notebook comes (torch, torchvision and
    matplotlib are 3 s of the lab's first cell on a 2-core machine). They go in as ipykernel's
    ``exec_lines``, run once the shell exists (matplotlib's inline backend hooks into it, as it does
    when a cell imports pyplot) and before any cell: ``__import__`` inside an ``if`` statement binds
    no name and displays nothing, so the notebook's namespace is as a cold kernel's. A module that
    fails to import is logged to the kernel's stderr, and the notebook's own import meets the error."""
    lines = [f"if True: {'; '.join(f'__import__({m!r})' for m in preload)}"] if preload else []
    # No SQLite input history (``In`` and ``_ih`` stay, in memory): a graded kernel's history is
    # never read, its database lived in the notebook's size-capped /tmp, and once a cell had filled
    # that, IPython's history thread printed an error into the notebook's output.
    return [python, "-c", _KERNEL_MAIN.format(exec_lines=lines), "-f", connection_file,
            "--HistoryManager.enabled=False"]


# --------------------------------------------------------------------------------------------
# The wrapper: what runs outside the sandbox, with the executor's rights, before the kernel
# --------------------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_CLONE_NEWNS, _MS_NOSUID, _MS_NODEV, _MS_BIND, _MS_REC, _MS_PRIVATE, _MS_SLAVE = (
    0x20000, 0x2, 0x4, 0x1000, 0x4000, 0x40000, 0x80000)
_MNT_DETACH = 2
_PR_SET_PDEATHSIG = 1


def _libc_call(name: str, *args) -> None:
    if getattr(_libc, name)(*args) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{name}: {os.strerror(err)}")


def mount_tmpfs(path: Path, size: int, uid: int, gid: int) -> str | None:
    """Mount a size-capped tmpfs (mode 0700, owned by uid/gid) on ``path``; None, or why not.

    The mount is made in a mount namespace of this process's own (entered on first use, by the
    calling thread, so threads started earlier do not see it): it goes with the process, even one
    killed with SIGKILL (a batch's watchdog kills hung workers), instead of staying mounted on the
    host. Mounts made on the host later still appear in it."""
    options = f"size={size},mode=0700,uid={uid},gid={gid}".encode()
    try:
        _own_mount_namespace()
        _libc_call("mount", b"tmpfs", os.fsencode(path), b"tmpfs", _MS_NOSUID | _MS_NODEV, options)
    except OSError as e:
        return f"tmpfs mount failed: {e.strerror}"
    return None


@functools.lru_cache(maxsize=None)
def _own_mount_namespace() -> None:
    _libc_call("unshare", _CLONE_NEWNS)
    _libc_call("mount", b"none", b"/", None, _MS_REC | _MS_SLAVE, None)


def unmount(path: Path) -> None:
    """Detach what is mounted on ``path`` (gone once nothing uses it)."""
    _libc_call("umount2", os.fsencode(path), _MNT_DETACH)


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


def _apply_limits(config: SandboxConfig, drop: bool) -> None:
    """The rlimits, on this process (the kernel inherits them), never above the current hard limit."""
    import resource

    nproc = config.processes
    if not drop:  # RLIMIT_NPROC counts every task of our own uid: leave room for what runs already
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


def _drop_to(uid: int, gid: int) -> None:
    """As root: become uid/gid with no supplementary groups (and so no capabilities)."""
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)


def _die_with(parent: int) -> None:
    """Be killed when the grader that started this wrapper dies, or exit if it has already: else a
    grader killed while its kernel starts leaves that kernel running, orphaned (seen: bwrap's own
    --die-with-parent then watches init). Kept across exec, reset by a uid change: call it last."""
    _libc_call("prctl", _PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


def _reach(mounts: Sequence[Bind]) -> None:
    """As root: make each source the job uid cannot traverse reachable at its own path, in a mount
    namespace of this process's own (the host's mounts are untouched): the closed ancestor is
    covered by a 0755 tmpfs and the sources are bound back into it, from fds opened before."""
    blocked = {b.source: _blocked_ancestor(b.source) for b in mounts}
    blocked = {source: ancestor for source, ancestor in blocked.items() if ancestor is not None}
    if not blocked:
        return
    _libc_call("unshare", _CLONE_NEWNS)
    _libc_call("mount", b"none", b"/", None, _MS_REC | _MS_PRIVATE, None)  # nothing leaks back out
    # Opened in the new namespace: a bind mount's source must be a mount of the caller's namespace.
    fds = {source: os.open(source, os.O_PATH) for source in sorted(blocked, key=lambda p: p.count("/"))}
    for ancestor in _outermost(list(blocked.values())):
        _libc_call("mount", b"tmpfs", os.fsencode(ancestor), b"tmpfs", _MS_NOSUID | _MS_NODEV, b"mode=0755")
    umask = os.umask(0o022)
    try:
        for source, fd in fds.items():
            _mount_point(source, os.path.isdir(f"/proc/self/fd/{fd}"))
            _libc_call("mount", f"/proc/self/fd/{fd}".encode(), os.fsencode(source), None,
                       _MS_BIND | _MS_REC, None)
            os.close(fd)
    finally:
        os.umask(umask)


def _mount_point(path: str, directory: bool) -> None:
    if directory:
        os.makedirs(path, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        open(path, "a").close()


def _data_fd(data: bytes) -> int:
    """A pipe holding ``data`` for bwrap's ``--ro-bind-data`` (the account files are tiny)."""
    read, write = os.pipe()
    os.write(write, data)
    os.close(write)
    os.set_inheritable(read, True)
    return read


def _write_connection_file(config: SandboxConfig, source: str) -> str:
    """The kernel's 0600 copy of the connection file, readable by the job uid only; under bwrap its
    sockets are named by the path the kernel sees. Returns that copy's path as the kernel sees it."""
    info = json.loads(Path(source).read_bytes())
    if config.mode == BUBBLEWRAP and info.get("transport") == "ipc":
        info["ip"] = os.path.join(INNER_IPC_DIR, os.path.basename(info["ip"]))
    copy = os.path.join(config.ipc_dir, "connection.json")
    fd = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, json.dumps(info).encode())
        if os.geteuid() == 0:
            os.fchown(fd, config.uid, config.gid)
    finally:
        os.close(fd)
    return os.path.join(INNER_IPC_DIR, "connection.json") if config.mode == BUBBLEWRAP else copy


def _subprocess_exec(config: SandboxConfig, connection_file: str, drop: bool, parent: int) -> None:
    """Fallback: the work dir as cwd and home, then exec the kernel. Does not return."""
    workdir = config.workdir
    home = os.path.join(workdir, ".home")
    os.makedirs(home, exist_ok=True)
    data_link = os.path.join(workdir, "data")
    if config.data_root and not os.path.lexists(data_link):
        if config.datasets:
            os.mkdir(data_link)
            for name in config.datasets:
                os.symlink(os.path.join(config.data_root, name), os.path.join(data_link, name))
            os.chmod(data_link, 0o555)
        else:
            os.symlink(config.data_root, data_link)
    if drop:
        os.chown(home, config.uid, config.gid)
    env = kernel_env(config, workdir, home)
    os.chdir(workdir)
    if drop:
        _drop_to(config.uid, config.gid)
    _die_with(parent)
    os.execve(config.python, kernel_argv(config.python, connection_file, config.preload), env)


def _bubblewrap_exec(config: SandboxConfig, connection_file: str, drop: bool, parent: int) -> None:
    """bwrap, as the job uid when root (sources it cannot reach made reachable first). Does not return."""
    if drop:
        _reach(binds(config))
    files = {dest: _data_fd(data) for dest, data in _ACCOUNTS.items()}
    argv = build_argv(config, connection_file, files)
    if drop:
        _drop_to(config.uid, config.gid)
    _die_with(parent)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(argv[0], argv, kernel_env(config, INNER_WORKDIR, "/tmp"))


def main(argv: Sequence[str] | None = None) -> int:
    """The wrapper: ``--config <base64 json> -f <connection file>``."""
    import argparse

    parser = argparse.ArgumentParser(prog="grader.sandbox")
    parser.add_argument("--config", required=True)
    parser.add_argument("-f", dest="connection_file", required=True)
    args = parser.parse_args(argv)
    config = SandboxConfig.from_arg(args.config)
    parent = os.getppid()

    try:  # first: the kernel and all it starts are in the box from their first instruction
        cgroups.join(config.cgroup_procs)
    except OSError as e:  # and never run outside it
        print(f"labgrader sandbox: {e.strerror or e}", file=sys.stderr)
        return 1
    connection_file = _write_connection_file(config, args.connection_file)
    drop = os.geteuid() == 0 and config.drop_uid
    _apply_limits(config, drop)
    if config.mode == SUBPROCESS:
        _subprocess_exec(config, connection_file, drop, parent)
    else:
        _bubblewrap_exec(config, connection_file, drop, parent)
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main())
