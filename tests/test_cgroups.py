"""Resource boxes on this machine's real cgroups: what a boxed process meets at each limit.

Where this process could make boxes (root, a writable cgroup file system) and :func:`problem` says it
cannot, the tests fail with its reason; elsewhere (an ordinary user without a delegated cgroup) they
are skipped with it. Every box made is removed, and checked to be gone, when its test ends.
"""
from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from grader import cgroups

ROOT = str(Path(__file__).resolve().parent.parent)
MiB = 1 << 20
# What the sandbox wrapper does: join the box, then exec. argv: code, procs files...
BOOT = ("import os, sys; sys.path.insert(0, %r); from grader.cgroups import join; "
        "join(sys.argv[2:]); os.execv(sys.executable, [sys.executable, '-c', sys.argv[1]])" % ROOT)


def _should_work() -> bool:
    """Root, and this process's own cgroups writable: nothing should stop a box here."""
    with open("/proc/self/mountinfo") as m, open("/proc/self/cgroup") as c:
        own = cgroups.locate(m.read(), c.read())
    return os.geteuid() == 0 and not isinstance(own, str) and all(os.access(d, os.W_OK) for d in own[1].values())


@pytest.fixture
def make_box():
    why = cgroups.problem()
    if why is not None:
        if _should_work():
            pytest.fail(f"running as root with writable cgroups, yet no resource box: {why}")
        pytest.skip(f"resource boxes cannot be made here: {why}")
    made: list[cgroups.Box] = []

    def make(name: str = "test", memory_bytes: int = 200 * MiB, pids: int = 20, cpu_weight: int = 100):
        box = cgroups.create(name, memory_bytes=memory_bytes, pids=pids, cpu_weight=cpu_weight)
        assert box is not None, cgroups.problem()
        made.append(box)
        return box

    yield make
    for box in made:
        box.remove()
    assert [d for box in made for d in box.dirs if os.path.exists(d)] == []


def run_boxed(box: cgroups.Box, code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BOOT, code, *box.procs_files],
                          capture_output=True, text=True, timeout=timeout)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def members(box: cgroups.Box) -> set[int]:
    return {int(p) for f in box.procs_files for p in Path(f).read_text().split()}


# --------------------------------------------------------------------------------------------

def test_a_memory_hog_is_killed_at_the_box_limit_and_the_box_says_so(make_box):
    box = make_box(memory_bytes=200 * MiB)
    out = run_boxed(box, "hoard = []\nwhile True:\n    hoard.append(b'x' * (50 << 20))")
    assert out.returncode == -9, out
    usage = box.usage()
    assert usage.oom_killed and usage.oom_kills >= 1
    assert usage.memory_peak_bytes is not None and usage.memory_peak_bytes <= box.memory_bytes
    assert "memory limit of 200 MiB" in box.limits_hit()


def test_an_honest_process_leaves_no_limit_hit(make_box):
    box = make_box()
    out = run_boxed(box, "print(sum(range(1000)))")
    assert (out.returncode, out.stdout.strip()) == (0, "499500"), out
    assert box.usage().oom_kills == 0 and box.limits_hit() is None


SPAWN_PROCESSES = """
import os, time
n = 0
try:
    for _ in range(100):
        if os.fork() == 0:
            null = os.open(os.devnull, os.O_RDWR)
            os.dup2(null, 1); os.dup2(null, 2)  # let the test's pipe close
            time.sleep(120); os._exit(0)
        n += 1
except OSError as e:
    print(n, e.errno)
"""
SPAWN_THREADS = """
import threading, time
n = 0
try:
    for _ in range(100):
        threading.Thread(target=time.sleep, args=(120,), daemon=True).start()
        n += 1
except RuntimeError as e:
    print(n, 'refused')
import os; os._exit(0)
"""


@pytest.mark.parametrize("code, refusal", [(SPAWN_PROCESSES, str(errno.EAGAIN)), (SPAWN_THREADS, "refused")],
                         ids=["processes", "threads"])
def test_b_spawning_stops_at_the_pids_limit(make_box, code, refusal):
    box = make_box(pids=20)
    out = run_boxed(box, code)
    assert out.returncode == 0, out
    started, said = out.stdout.split()
    assert int(started) < box.pids and said == refusal, out.stdout
    assert box.usage().pids_refused >= 1
    assert "limit of 20 processes and threads" in box.limits_hit()


@pytest.fixture
def tmpfs(tmp_path):
    point = tmp_path / "tmpfs"
    point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1g", "tmpfs", str(point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield point
    subprocess.run(["umount", "-l", str(point)], check=True)  # asked after make_box: unmounted before the box goes


def test_c_tmpfs_files_count_against_the_memory_limit(make_box, tmpfs):
    box = make_box(memory_bytes=200 * MiB)
    target = tmpfs / "big"
    code = (f"chunk = b'x' * (1 << 20)\nwith open({str(target)!r}, 'wb') as f:\n"
            "    for _ in range(400):\n        f.write(chunk); f.flush()")
    out = run_boxed(box, code)
    assert out.returncode != 0, "400 MiB written to a tmpfs from a 200 MiB box"
    written = target.stat().st_size
    usage = box.usage()
    assert written < box.memory_bytes
    # The process itself holds a few MiB: what the box was charged at its peak is the file's pages.
    assert usage.memory_peak_bytes is not None and usage.memory_peak_bytes >= written
    assert usage.oom_killed or "MemoryError" in out.stderr or "OSError" in out.stderr, out


def test_d_remove_leaves_no_directory_and_no_process(make_box):
    box = make_box(pids=20)
    run_boxed(box, SPAWN_PROCESSES)  # leaves sleeping children behind in the box
    left = members(box)
    assert left and all(alive(p) for p in left)
    box.remove()
    assert [d for d in box.dirs if os.path.exists(d)] == []
    assert [p for p in left if alive(p)] == []
    box.remove()  # again: nothing to do, nothing raised


def test_e_equal_weights_and_the_limits_are_written_where_the_kernel_reads_them(make_box):
    first, second = make_box("first", 300 * MiB, 30, 100), make_box("second", 300 * MiB, 30, 100)
    files = ({"memory.limit_in_bytes": 300 * MiB, "memory.memsw.limit_in_bytes": 300 * MiB, "pids.max": 30,
              "cpu.shares": 1024}  # systemd's mapping: weight 100 is 1024 shares
             if first.version == 1 else
             {"memory.max": 300 * MiB, "memory.swap.max": 0, "pids.max": 30, "cpu.weight": 100})
    for box in (first, second):
        dirs = {"memory": box.memory_dir, "pids": box.pids_dir, "cpu": box.cpu_dir}
        for file, value in files.items():
            path = Path(dirs[file.split(".")[0]], file)
            if "swap" in file and not box.swap_capped:
                assert not path.exists()
                continue
            assert int(path.read_text()) == value, path
    assert first.describe() == second.describe()
    assert first.procs_files != second.procs_files


def test_a_crashed_graders_boxes_are_removed_by_the_next_one_and_live_ones_kept(make_box):
    live = make_box("live")
    ns = os.readlink("/proc/self/ns/pid").strip("pid:[]")
    gone = subprocess.Popen(["true"])
    gone.wait()
    name = f"crashed.{ns}.{gone.pid}.00000000"
    stale = [os.path.join(os.path.dirname(d), name) for d in live.dirs]
    for d in stale:
        os.mkdir(d)
    sleeper = subprocess.Popen([sys.executable, "-c", BOOT, "import time; print('in', flush=True); time.sleep(120)",
                                *(os.path.join(d, "cgroup.procs") for d in stale)], stdout=subprocess.PIPE, text=True)
    try:
        assert sleeper.stdout.readline() == "in\n"  # it joined the crashed grader's box
        # a fresh grader process: its first use sweeps
        out = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, %r); "
                              "from grader.cgroups import problem; print(problem())" % ROOT],
                             capture_output=True, text=True, timeout=60)
        assert out.stdout.strip() == "None", out
        assert sleeper.wait(timeout=30) == -9
        assert [d for d in stale if os.path.exists(d)] == []
        assert all(os.path.isdir(d) for d in live.dirs)
    finally:
        sleeper.kill()
        sleeper.wait()
        for d in stale:
            if os.path.exists(d):
                os.rmdir(d)


def test_join_says_which_file_it_could_not_write(tmp_path):
    missing = str(tmp_path / "gone" / "cgroup.procs")
    with pytest.raises(OSError, match="cannot join the resource box through .*gone/cgroup.procs"):
        cgroups.join([missing])


def test_an_ordinary_user_gets_a_one_line_reason_and_no_box():
    code = ("import sys; sys.path.insert(0, %r); from grader import cgroups; "
            "print(cgroups.create('x', memory_bytes=64 << 20, pids=8, cpu_weight=100)); "
            "print(cgroups.problem())" % ROOT)
    as_user: list[str] = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("setpriv is not installed: cannot run as an ordinary user")
        as_user = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    out = subprocess.run([*as_user, sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, cwd="/")
    assert out.returncode == 0, out
    box, why = out.stdout.splitlines()
    if box != "None":
        pytest.skip(f"this machine delegates a cgroup to ordinary users ({box})")
    assert "root or a delegated cgroup" in why, why


# --------------------------------------------------------------------------------------------
# Finding one's own cgroups (pure: the texts of /proc/self/mountinfo and /proc/self/cgroup)
# --------------------------------------------------------------------------------------------

V1_MOUNTS = """\
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:1 - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""


def test_locate_v1_inside_own_cgroups_with_comounted_cpu():
    own = "4:memory:/process_api/abc\n8:pids:/\n1:cpu,cpuacct:/jobs\n0::/\n"
    assert cgroups.locate(V1_MOUNTS, own) == (1, {
        "memory": "/sys/fs/cgroup/memory/process_api/abc", "pids": "/sys/fs/cgroup/pids",
        "cpu": "/sys/fs/cgroup/cpu,cpuacct/jobs"})


def test_locate_v2_in_a_container_whose_mount_root_is_its_own_cgroup():
    mounts = r"50 40 0:40 /system.slice/grader\040x.scope /sys/fs/cgroup rw - cgroup2 cgroup2 rw" + "\n"
    own = "0::/system.slice/grader x.scope/labgrader-grader\n"
    assert cgroups.locate(mounts, own) == (2, dict.fromkeys(
        cgroups.CONTROLLERS, "/sys/fs/cgroup/labgrader-grader"))


def test_locate_names_what_is_missing():
    no_pids = "".join(line + "\n" for line in V1_MOUNTS.splitlines() if "pids" not in line)
    assert cgroups.locate(no_pids, "4:memory:/\n1:cpu,cpuacct:/\n") == "cgroup v1 has no pids hierarchy mounted"
    assert cgroups.locate("", "0::/\n") == "no cgroup file system is mounted"
    outside = "50 40 0:40 /a /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"
    assert "not under a mounted hierarchy" in cgroups.locate(outside, "0::/b\n")
