"""A resource box per kernel: a cgroup capping memory (tmpfs included) and tasks, and giving every
kernel the same CPU weight.

Why rlimits are not enough: ``RLIMIT_AS`` is per process (a notebook with 256 processes may use 256
times it), tmpfs pages (the sandbox's ``/tmp`` and ``/dev/shm``) are in no process's address space,
and no rlimit shares the CPU between two workers' kernels. A cgroup counts a kernel's processes
together, tmpfs pages they write included (measured on cgroup v1, Linux 6.18: a boxed process writing
300 MiB into a tmpfs under a 200 MiB box was killed by the out-of-memory killer at 200 MiB, and the
box's ``oom_kill`` count said so), and siblings of equal weight get equal CPU however many threads
spin in one of them.

Where boxes are made: inside the grader's own cgroup of each hierarchy (``/proc/self/cgroup``), in a
``labgrader`` directory; never at a hierarchy's root, and no limit is written anywhere but in a box.

* cgroup v1, when memory, pids and cpu hierarchies are mounted: ``<own>/labgrader/<box>`` in each;
  ``memory.limit_in_bytes`` and ``memory.memsw.limit_in_bytes`` (the same value: swap counts, where
  the kernel accounts swap), ``pids.max``, ``cpu.shares``.
* cgroup v2, where the grader's cgroup is delegated to it (writable, memory, pids and cpu in its
  ``cgroup.controllers``): ``memory.max``, ``memory.swap.max`` = 0, ``pids.max``, ``cpu.weight``.
  v2 allows processes only in leaves, so before enabling controllers for its children the grader
  moves itself into a leaf ``labgrader-grader`` of its cgroup; processes it did not start are never
  moved, so a cgroup shared with them (a terminal's scope) makes v2 unavailable, with that reason.
  Start the grader in a cgroup of its own (``systemd-run --user --scope -p Delegate=yes ...``), and
  call :func:`problem` in the main process before starting workers (they then start in the leaf).
  Not measured on a v2 machine yet: the machines at hand mount v2 with no controllers (hybrid).

A box's directory is named ``<name>.<pid namespace>.<pid>.<random>`` after the process that made it.
On first use, boxes whose maker is gone (same pid namespace, pid not alive) are emptied and removed:
what a crashed grader left. Live graders' boxes, and anything this module did not name, are kept.

Failures are data: :func:`create` returns None and :func:`problem` says why in one line; callers keep
the rlimits. :func:`join` (in the sandbox wrapper, before it execs the sandbox) raises ``OSError``.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import os
import re
import secrets
import signal
import time
from dataclasses import dataclass
from typing import Iterable, Sequence

PARENT = "labgrader"
GRADER_LEAF = "labgrader-grader"  # v2: the grader's own leaf once its cgroup has children
CONTROLLERS = ("memory", "pids", "cpu")
DEFAULT_CPU_WEIGHT = 100  # cgroup v2's default weight; v1's cpu.shares 1024
_EMPTYING_SECONDS = 5.0  # how long kill/remove keep at it: a process of gigabytes takes a while to exit
_ACCESS = (errno.EACCES, errno.EPERM, errno.EROFS)


@dataclass(frozen=True)
class Usage:
    """A box's counters; read them before :meth:`Box.remove`, which deletes them."""

    memory_peak_bytes: int | None  # the highest charge, tmpfs included (None: the kernel keeps none)
    oom_kills: int  # processes the out-of-memory killer ended in the box
    pids_refused: int  # forks and new threads refused at the pids limit

    @property
    def oom_killed(self) -> bool:
        return self.oom_kills > 0


@dataclass(frozen=True)
class Box:
    """One kernel's cgroup (one directory per hierarchy on v1, one in all on v2)."""

    version: int
    memory_dir: str
    pids_dir: str
    cpu_dir: str
    memory_bytes: int
    pids: int
    cpu_weight: int
    swap_capped: bool  # False where the kernel does not account swap: a box could spill into it

    @property
    def dirs(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((self.memory_dir, self.pids_dir, self.cpu_dir)))

    @property
    def procs_files(self) -> tuple[str, ...]:
        """What a process writes its pid into to enter the box (see :func:`join`)."""
        return tuple(os.path.join(d, "cgroup.procs") for d in self.dirs)

    def describe(self) -> str:
        cpu = f"cpu shares {_shares(self.cpu_weight)}" if self.version == 1 else f"cpu weight {self.cpu_weight}"
        swap = "" if self.swap_capped else " (swap not capped)"
        return f"cgroup v{self.version}: memory {_size(self.memory_bytes)}{swap}, pids {self.pids}, {cpu}"

    def usage(self) -> Usage:
        events = "memory.oom_control" if self.version == 1 else "memory.events"
        peak = "memory.max_usage_in_bytes" if self.version == 1 else "memory.peak"
        return Usage(memory_peak_bytes=_read_int(os.path.join(self.memory_dir, peak)),
                     oom_kills=_keyed(os.path.join(self.memory_dir, events)).get("oom_kill", 0),
                     pids_refused=_keyed(os.path.join(self.pids_dir, "pids.events")).get("max", 0))

    def limits_hit(self) -> str | None:
        """One line on the limits the box enforced, for a kernel's death or a cell's error; None if none."""
        u = self.usage()
        said = []
        if u.oom_killed:
            said.append(f"the notebook went over its memory limit of {_size(self.memory_bytes)}, tmpfs "
                        f"files included (the out-of-memory killer stopped {u.oom_kills} of its processes)")
        if u.pids_refused:
            said.append(f"the notebook reached its limit of {self.pids} processes and threads "
                        f"({u.pids_refused} refused)")
        return "; ".join(said) or None

    def kill_all(self) -> bool:
        """SIGKILL every process in the box until none is left; False if that could not be seen
        within a few seconds. Never raises."""
        return _empty(self.dirs, self.version)

    def remove(self) -> None:
        """Kill what is left and delete the box; idempotent, never raises."""
        _remove(self.dirs, self.version)


def problem() -> str | None:
    """None when boxes can be made here; else one line why (the last :func:`create` failure, or the
    set-up's, which is checked once per process)."""
    place = _place()
    return place if isinstance(place, str) else _last_failure


def create(name: str, *, memory_bytes: int, pids: int, cpu_weight: int = DEFAULT_CPU_WEIGHT) -> Box | None:
    """A new box, or None with :func:`problem` saying why. ``cpu_weight`` in v2 units (1-10000,
    default 100; on v1 ``cpu.shares`` = weight * 1024 / 100, as systemd maps them)."""
    global _last_failure
    place = _place()
    if isinstance(place, str):
        return None
    try:
        box = _make(place, name, memory_bytes, pids, cpu_weight)
    except OSError as e:
        _last_failure = f"cgroup v{place.version}: cannot make box {name!r}: {_why(e)}"
        return None
    _last_failure = None
    return box


def join(procs_files: Sequence[str]) -> None:
    """Move the calling process into a box (the sandbox wrapper does, before exec)."""
    pid = str(os.getpid())
    for path in procs_files:
        try:
            with open(path, "w") as f:
                f.write(pid)
        except OSError as e:
            raise OSError(e.errno, f"cannot join the resource box through {path}: {e.strerror}") from e


# --------------------------------------------------------------------------------------------
# Where the boxes go
# --------------------------------------------------------------------------------------------

_last_failure: str | None = None


@dataclass(frozen=True)
class _Place:
    """The ``labgrader`` parent directory of each controller (all three the same on v2)."""

    version: int
    memory: str
    pids: str
    cpu: str

    @property
    def parents(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((self.memory, self.pids, self.cpu)))


@dataclass(frozen=True)
class _Mount:
    fstype: str
    root: str  # the cgroup mounted there (not "/" inside a container's cgroup namespace, sometimes)
    point: str
    options: frozenset[str]


@functools.lru_cache(maxsize=None)
def _place() -> _Place | str:
    """Set up the parents, clear what crashed graders left, and prove a box can be made (once)."""
    try:
        with open("/proc/self/mountinfo") as m, open("/proc/self/cgroup") as c:
            own = locate(m.read(), c.read())
    except OSError as e:
        return f"cannot read this process's cgroups: {e}"
    if isinstance(own, str):
        return own
    version, dirs = own
    try:
        place = _prepare_v1(dirs) if version == 1 else _prepare_v2(dirs["memory"])
        if isinstance(place, str):
            return place
        for parent in place.parents:
            _sweep(parent, version)
        os.close(os.pidfd_open(os.getpid()))  # emptying a box relies on pidfds (Linux 5.3)
        _make(place, "probe", 64 << 20, 8, DEFAULT_CPU_WEIGHT).remove()
    except OSError as e:
        return f"cgroup v{version}: {_why(e)}"
    return place


def locate(mountinfo: str, proc_cgroup: str) -> tuple[int, dict[str, str]] | str:
    """(cgroup version, {controller: directory of this process's own cgroup}) from the texts of
    ``/proc/self/mountinfo`` and ``/proc/self/cgroup``; or why no version can be used."""
    mounts = [_parse_mount(line) for line in mountinfo.splitlines() if " - cgroup" in line]
    own: dict[str, str] = {}
    for line in proc_cgroup.splitlines():
        _, controllers, path = line.split(":", 2)
        for c in controllers.split(",") if controllers else [""]:
            own[c] = path
    v1 = {c: m for m in mounts if m.fstype == "cgroup" for c in CONTROLLERS if c in m.options}
    if v1:
        missing = [c for c in CONTROLLERS if c not in v1]
        if missing:
            return f"cgroup v1 has no {', '.join(missing)} hierarchy mounted"
        dirs = {c: _below(v1[c], own.get(c)) for c in CONTROLLERS}
    else:
        v2 = next((m for m in mounts if m.fstype == "cgroup2"), None)
        if v2 is None:
            return "no cgroup file system is mounted"
        dirs = dict.fromkeys(CONTROLLERS, _below(v2, own.get("")))
    unseen = [c for c, d in dirs.items() if d is None]
    if unseen:
        return f"this process's {', '.join(unseen)} cgroup is not under a mounted hierarchy"
    return (1 if v1 else 2), dirs


def _parse_mount(line: str) -> _Mount:
    # mountinfo: id parent dev root point options [optional...] - fstype source superoptions
    fields, _, tail = line.partition(" - ")
    f, t = fields.split(), tail.split()
    unescape = functools.partial(re.sub, r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)))
    return _Mount(fstype=t[0], root=unescape(f[3]), point=unescape(f[4]),
                  options=frozenset(t[2].split(",") if len(t) > 2 else ()))


def _below(mount: _Mount, path: str | None) -> str | None:
    if path is None or not (path == mount.root or path.startswith(mount.root.rstrip("/") + "/")):
        return None
    return os.path.join(mount.point, path[len(mount.root):].lstrip("/")).rstrip("/")


def _prepare_v1(dirs: dict[str, str]) -> _Place:
    for d in set(dirs.values()):
        os.makedirs(os.path.join(d, PARENT), exist_ok=True)
    return _Place(1, *(os.path.join(dirs[c], PARENT) for c in CONTROLLERS))


def _prepare_v2(own: str) -> _Place | str:
    base = os.path.dirname(own) if os.path.basename(own) == GRADER_LEAF else own
    available = set(_read(os.path.join(base, "cgroup.controllers")).split())
    missing = [c for c in CONTROLLERS if c not in available]
    if missing:
        return f"cgroup v2: {', '.join(missing)} not delegated to {base}"
    try:
        _enable_controllers(base)
    except OSError as e:
        if e.errno != errno.EBUSY:  # EBUSY: processes in base, which v2 forbids once children have controllers
            raise
        leaf = os.path.join(base, GRADER_LEAF)
        os.makedirs(leaf, exist_ok=True)
        join([os.path.join(leaf, "cgroup.procs")])
        try:
            _enable_controllers(base)
        except OSError as e2:
            if e2.errno != errno.EBUSY:
                raise
            return (f"cgroup v2: {base} holds processes the grader did not start; start the grader in a "
                    "cgroup of its own (systemd-run --user --scope -p Delegate=yes ...)")
    parent = os.path.join(base, PARENT)
    os.makedirs(parent, exist_ok=True)
    _enable_controllers(parent)
    return _Place(2, parent, parent, parent)


def _enable_controllers(cgroup: str) -> None:
    on = set(_read(os.path.join(cgroup, "cgroup.subtree_control")).split())
    wanted = " ".join(f"+{c}" for c in CONTROLLERS if c not in on)
    if wanted:
        _write(os.path.join(cgroup, "cgroup.subtree_control"), wanted)


def _sweep(parent: str, version: int) -> None:
    """Remove the boxes of makers no longer alive in this pid namespace."""
    ns = _pid_namespace()
    for entry in os.scandir(parent):
        parts = entry.name.rsplit(".", 3)
        if (entry.is_dir(follow_symlinks=False) and len(parts) == 4 and parts[1] == ns
                and parts[2].isdigit() and not os.path.exists(f"/proc/{parts[2]}")):
            _remove((entry.path,), version)


# --------------------------------------------------------------------------------------------
# One box
# --------------------------------------------------------------------------------------------

def _make(place: _Place, name: str, memory_bytes: int, pids: int, cpu_weight: int) -> Box:
    label = re.sub(r"[^A-Za-z0-9_-]", "_", name)[:64] or "box"
    dirname = f"{label}.{_pid_namespace()}.{os.getpid()}.{secrets.token_hex(4)}"
    made: list[str] = []
    try:
        for parent in place.parents:
            os.mkdir(os.path.join(parent, dirname), 0o755)
            made.append(os.path.join(parent, dirname))
        box = Box(place.version, *(os.path.join(p, dirname) for p in (place.memory, place.pids, place.cpu)),
                  memory_bytes=memory_bytes, pids=pids, cpu_weight=cpu_weight,
                  swap_capped=os.path.exists(os.path.join(place.memory, dirname, _SWAP[place.version])))
        _set_limits(box)
        return box
    except BaseException:
        _remove(tuple(made), place.version)
        raise


_SWAP = {1: "memory.memsw.limit_in_bytes", 2: "memory.swap.max"}


def _set_limits(box: Box) -> None:
    if box.version == 1:
        writes = [(box.memory_dir, "memory.limit_in_bytes", box.memory_bytes),
                  (box.memory_dir, _SWAP[1], box.memory_bytes),  # memory + swap: no swap beyond memory
                  (box.cpu_dir, "cpu.shares", _shares(box.cpu_weight))]
    else:
        writes = [(box.memory_dir, "memory.max", box.memory_bytes), (box.memory_dir, _SWAP[2], 0),
                  (box.cpu_dir, "cpu.weight", box.cpu_weight)]
    writes.append((box.pids_dir, "pids.max", box.pids))
    for d, file, value in writes:
        if file != _SWAP[box.version] or box.swap_capped:
            _write(os.path.join(d, file), value)


def _empty(dirs: Sequence[str], version: int) -> bool:
    try:
        if version == 2 and dirs:
            with contextlib.suppress(OSError):  # cgroup.kill: Linux 5.14; the loop below does without
                _write(os.path.join(dirs[0], "cgroup.kill"), 1)
        deadline = time.monotonic() + _EMPTYING_SECONDS
        while _members(dirs):
            if time.monotonic() > deadline:
                return False
            _kill_members(dirs)
            time.sleep(0.01)
        return True
    except OSError:  # out of file descriptors, say: the caller learns the box may not be empty
        return False


def _kill_members(dirs: Sequence[str]) -> None:
    """SIGKILL the box's processes. Each pid is pinned by a pidfd before it is seen in the box a
    second time: a pid that an unrelated process took over in between is never signalled."""
    pinned: list[tuple[int, int]] = []
    try:
        for pid in _members(dirs):
            with contextlib.suppress(ProcessLookupError):
                pinned.append((pid, os.pidfd_open(pid)))
        still = _members(dirs)
        for pid, fd in pinned:
            if pid in still:
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
    finally:
        for _, fd in pinned:
            os.close(fd)


def _members(dirs: Iterable[str]) -> set[int]:
    pids: set[int] = set()
    for d in dirs:
        with contextlib.suppress(FileNotFoundError):
            pids.update(int(p) for p in _read(os.path.join(d, "cgroup.procs")).split())
    return pids


def _remove(dirs: Sequence[str], version: int) -> None:
    _empty(dirs, version)
    deadline = time.monotonic() + _EMPTYING_SECONDS
    for d in dirs:
        while True:
            try:
                os.rmdir(d)
                break
            except FileNotFoundError:
                break
            except OSError as e:  # EBUSY: a process still leaving; otherwise swept once we are gone
                if e.errno != errno.EBUSY or time.monotonic() > deadline:
                    break
                time.sleep(0.01)


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------

def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _write(path: str, value: object) -> None:
    with open(path, "w") as f:
        f.write(str(value))


def _read_int(path: str) -> int | None:
    try:
        return int(_read(path).split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _keyed(path: str) -> dict[str, int]:
    """A flat-keyed cgroup file (``memory.events``, ``memory.oom_control``, ``pids.events``)."""
    try:
        pairs = (line.split() for line in _read(path).splitlines())
        return {p[0]: int(p[1]) for p in pairs if len(p) == 2 and p[1].isdigit()}
    except OSError:
        return {}


@functools.lru_cache(maxsize=None)
def _pid_namespace() -> str:
    return re.sub(r"\D", "", os.readlink("/proc/self/ns/pid"))


def _shares(weight: int) -> int:
    return max(2, weight * 1024 // DEFAULT_CPU_WEIGHT)


def _size(n: int) -> str:
    return f"{n / (1 << 30):.3g} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.3g} MiB"


def _why(e: OSError) -> str:
    hint = " (boxes need root or a delegated cgroup)" if e.errno in _ACCESS else ""
    return f"{e}{hint}"
