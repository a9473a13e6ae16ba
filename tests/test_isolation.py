"""What a student's notebook can and cannot do inside the bubblewrap sandbox, as root and as an
ordinary user.

Each test runs real cells in a real sandboxed kernel and reads back what happened from the saved
notebook (written by the executor, outside the sandbox). Each runs twice (the ``account`` fixture):
with the grader as root (a job uid of its own per test) and as an ordinary user (made by
``test_sandbox_user.py`` when the tests run as root; the grader runs as that user, in a subprocess).
Nothing here contacts an address outside this machine: the network test listens on the host's own
127.0.0.1.
"""
from __future__ import annotations

import itertools
import json
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import nbformat
import pytest
from nbformat import v4

from grader import sandbox
from grader.execute import Limits, Sandboxing, execute
from test_sandbox_user import Account, ordinary_user, run_in_own_kernel, this_process  # noqa: F401

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(sandbox.bubblewrap_problem() is not None,
                                reason=f"bubblewrap sandbox unavailable: {sandbox.bubblewrap_problem()}")
_uids = itertools.count(62000 + (os.getpid() % 500) * 20)
FAST = Limits(cell_timeout=30, notebook_timeout=120)
# What the kernel may see at the top of its file system and in /etc, besides its interpreter's path.
TOP = {"bin", "sbin", "lib", "lib32", "lib64", "libx32", "usr", "etc", "dev", "proc", "tmp", "run"}
ETC = {"ld.so.cache", "localtime", "fonts", "alternatives", "passwd", "group"}


@pytest.fixture(params=["root", "user"])
def account(request, ordinary_user, tmp_path_factory) -> Account:
    if request.param == "user":
        return ordinary_user
    if os.geteuid() != 0:
        pytest.skip("the grader runs as root only when the tests do")
    return this_process(tmp_path_factory.getbasetemp())


@pytest.fixture
def place(account, tmp_path) -> Path:
    """A directory the account owns, for this test's work, record and data dirs."""
    return account.workspace(tmp_path)


def run(account: Account, place: Path, *sources: str, **kw):
    kw.setdefault("limits", FAST)
    kw.setdefault("uid", next(_uids))
    nb = v4.new_notebook(cells=[v4.new_code_cell(s) for s in sources])
    ex = account.call(execute, nb, place / "work", place / "record", **kw)
    return ex, nbformat.read(str(ex.executed_notebook), as_version=4)


def report(nb, index: int = 0) -> dict:
    """The JSON a probing cell printed last on stdout (what the kernel saw)."""
    text = "".join(o.get("text", "") for o in nb.cells[index].outputs
                   if o["output_type"] == "stream" and o.get("name") == "stdout")
    return json.loads(text.strip().splitlines()[-1])


def procs_of(uid: int) -> list[int]:
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if os.stat(f"/proc/{pid}").st_uid == uid:
                    out.append(int(pid))
            except OSError:
                pass
    return out


def _inside(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def allowed_children(directory: str, interpreter: list[str]) -> set[str]:
    """What listing ``directory`` may show: the next step towards each interpreter path in it."""
    out = set()
    for p in interpreter:
        if p != directory and _inside(p, directory):
            out.add(p[len(directory.rstrip("/")) + 1:].split("/")[0])
    return out


@pytest.fixture
def visible_dir():
    """A scratch dir outside /tmp, readable by everyone: only the sandbox may hide it."""
    if not os.access("/var/tmp", os.W_OK):
        pytest.skip("/var/tmp not writable")
    d = Path(tempfile.mkdtemp(prefix="labgrader-test-", dir="/var/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


TRY = """
import errno, json, os
def attempt(fn):
    try:
        fn()
        return "ok"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
    except Exception as e:
        return type(e).__name__
def listing(p):
    try:
        return sorted(os.listdir(p))
    except OSError as e:
        return errno.errorcode[e.errno]
"""


def test_kernel_runs_unprivileged_with_a_clean_environment(account, place, monkeypatch):
    monkeypatch.setenv("LABGRADER_TEST_SECRET", "do-not-leak")
    ex, nb = run(account, place, TRY + (
        "import ctypes\nstatus = open('/proc/self/status').read()\n"
        "fields = dict(l.split(':\\t', 1) for l in status.splitlines() if ':\\t' in l)\n"
        "pid = os.fork()\n"  # unshare(CLONE_NEWUSER) needs a single-threaded process
        "if pid == 0:\n"
        "    os._exit(0 if ctypes.CDLL(None, use_errno=True).unshare(0x10000000) == 0 else ctypes.get_errno())\n"
        "userns = errno.errorcode.get(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), 'created')\n"
        "print(json.dumps({'uid': os.getuid(), 'euid': os.geteuid(), 'gid': os.getgid(),"
        " 'groups': os.getgroups(), 'capeff': fields['CapEff'].strip(),"
        " 'capbnd': fields['CapBnd'].strip(), 'nnp': fields['NoNewPrivs'].strip(), 'userns': userns,"
        " 'cwd': os.getcwd(), 'secret': os.environ.get('LABGRADER_TEST_SECRET'),"
        " 'pids': sorted(int(p) for p in os.listdir('/proc') if p.isdigit())}))"))
    assert ex.status == "completed", ex.reason
    who = "separate job uid" if account.is_root else "runs as your uid outside"
    assert ex.isolation.startswith(f"bubblewrap (user namespace; {who}; work dir "), ex.isolation
    r = report(nb)
    assert r["uid"] == r["euid"] == r["gid"] == sandbox.NOBODY and r["groups"] in ([], [sandbox.NOBODY])
    assert r["capeff"] == "0000000000000000" and r["capbnd"] == "0000000000000000"
    assert r["nnp"] == "1"
    if sandbox.disable_userns_args():
        assert r["userns"] in ("ENOSPC", "EPERM")  # no namespaces of its own to escape into
    assert r["cwd"] == sandbox.INNER_WORKDIR
    assert r["secret"] is None
    assert max(r["pids"]) < 100  # its own pid namespace: the host's processes are not there


def test_network_is_unreachable_even_on_host_loopback(account, place):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(5)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    accepted: list = []
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            accepted.append(conn)
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    cell = (TRY + f"import socket\n"
            f"print(json.dumps({{'tcp': attempt(lambda: socket.create_connection(('127.0.0.1', {port}), timeout=3)),"
            f" 'ifaces': [n for _, n in socket.if_nameindex()]}}))")
    try:
        ex, nb = run(account, place / "sandboxed", cell)
        r = report(nb)
        assert r["tcp"] == "ECONNREFUSED"  # the sandbox's own loopback: nothing listens there
        assert r["ifaces"] == ["lo"]
        assert accepted == []
        # Control: without namespaces the same cell does reach the host's server.
        ex2, nb2 = run(account, place / "fallback", cell, isolation="subprocess")
        assert ex2.isolation.startswith("subprocess (weaker")
        assert report(nb2)["tcp"] == "ok"
        time.sleep(0.3)
        assert len(accepted) == 1
    finally:
        stop.set()
        server.close()


def test_the_kernel_sees_only_the_system_its_interpreter_and_its_own_dirs(account, place, visible_dir):
    """Listing and reading what it can: nothing of the host beyond the system, the interpreter's
    directories and the job's own dirs; mountinfo names no other host path."""
    interpreter = account.call(sandbox.interpreter_paths)
    (place / "out" / "alice").mkdir(parents=True)
    (place / "out" / "alice" / "result.json").write_text('{"score": 23.5}')
    (place / "submissions").mkdir()
    (place / "submissions" / "bob.ipynb").write_text("bob's answers")
    (place / "other-work").mkdir()
    (place / "other-work" / "mnist_cnn.pt").write_text("another kernel's file")
    (visible_dir / "public.txt").write_text("anyone outside can read this")
    account.own(place)
    host_tmp = Path(tempfile.mkdtemp(prefix="labgrader-canary-", dir="/tmp"))
    host_tmp.chmod(0o755)
    (host_tmp / "canary").write_text("host /tmp")
    try:
        theirs = [place / "record", place / "out", place / "submissions", place / "other-work",
                  host_tmp, visible_dir]
        dirs = ["/", "/tmp", "/etc", "/run", "/work", str(REPO), "/root", "/home", "/var", "/srv", "/opt",
                "/mnt", "/media", "/boot", str(account.home), str(account.scratch), str(place),
                *map(str, theirs)]
        files = ["/etc/shadow", "/etc/hostname", "/etc/hosts", str(REPO / "pyproject.toml"),
                 str(place / "out" / "alice" / "result.json"), str(place / "submissions" / "bob.ipynb"),
                 str(place / "other-work" / "mnist_cnn.pt"), str(host_tmp / "canary"),
                 str(visible_dir / "public.txt")]
        cell = TRY + (f"dirs, files = {dirs!r}, {files!r}\n"
                      "mounts = [line.split()[3:5] for line in open('/proc/self/mountinfo')]\n"
                      "print(json.dumps({'dirs': {d: listing(d) for d in dirs},"
                      " 'files': {f: attempt(lambda f=f: open(f).read()) for f in files},"
                      " 'passwd': open('/etc/passwd').read(), 'mounts': mounts}))")
        ex, nb = run(account, place, cell)
    finally:
        shutil.rmtree(host_tmp)
    r = report(nb)
    for d, seen in r["dirs"].items():
        allowed = {"/": TOP, "/etc": ETC, "/run": {"kernel", "labgrader"}, "/tmp": {"work"}}.get(d, set())
        allowed = allowed | allowed_children(d, interpreter)
        if d == "/tmp":  # the kernel's own dot dirs (IPython's, matplotlib's) besides the work dir
            seen = [name for name in seen if not name.startswith(".")]
        if allowed:
            assert seen == "ENOENT" or set(seen) <= allowed, (d, seen)
        else:
            assert seen == "ENOENT", (d, seen)
    assert r["files"] == {f: "ENOENT" for f in files}
    assert r["passwd"] == "nobody:x:65534:65534:nobody:/tmp:/usr/sbin/nologin\n"
    inner = ["/usr", "/etc", "/dev", "/proc", sandbox.INNER_WORKDIR, sandbox.INNER_IPC_DIR,
             sandbox.INNER_CHANNEL_DIR, *interpreter]
    for root, point in r["mounts"]:  # root: the host path (in its file system) mounted at point
        assert point in ("/", "/tmp") or any(_inside(point, i) for i in inner), point
        if not any(_inside(root, i) for i in interpreter):
            assert not any(_inside(root, str(t)) for t in [*theirs, "/home", "/var", "/srv", account.home,
                                                            REPO]), (root, point)


def test_hidden_paths_inside_what_is_bound_are_covered_and_the_graders_packages_unimportable(account, place):
    data = place / "datasets"
    secret_dir = data / "other-submissions"
    secret_dir.mkdir(parents=True)
    (secret_dir / "alice.ipynb").write_text("alice's answers")
    (data / "public.txt").write_text("visible")
    secret_file = data / "spec.json"
    secret_file.write_text('{"expected": 42}')
    account.own(place)
    cell = TRY + (f"print(json.dumps({{'repo': listing({str(REPO)!r}), "
                  f"'reference': listing({str(REPO / 'reference')!r}), "
                  f"'grader': attempt(lambda: open({str(REPO / 'grader' / 'sandbox.py')!r}).read()), "
                  "'secret_dir': listing('data/other-submissions'), "
                  "'secret_file': attempt(lambda: print(open('data/spec.json').read(), end='')), "
                  "'public': open('data/public.txt').read(), "
                  "'import_grader': attempt(lambda: __import__('grader.sandbox')), "
                  "'import_reference': attempt(lambda: __import__('reference.model'))}))")
    ex, nb = run(account, place, cell, data_root=data, hide=[secret_dir, secret_file])
    r = report(nb)
    # At most the path to the venv's packages; nothing at all for a checkout under /tmp (a CI clone),
    # which lies under the kernel's own private /tmp.
    assert r["repo"] == "ENOENT" or set(r["repo"]) <= {".venv"}, r["repo"]
    assert r["reference"] == "ENOENT" and r["grader"] == "ENOENT"
    assert r["secret_dir"] == [] and r["secret_file"] in ("EACCES", "ok")  # "ok": read ""
    assert "expected" not in "".join(o.get("text", "") for o in nb.cells[0].outputs)
    assert r["public"] == "visible"  # the control: only what was hidden is gone
    assert r["import_grader"] == "ModuleNotFoundError"
    assert r["import_reference"] == "ModuleNotFoundError"


def test_writes_only_in_workdir_and_tmp(account, place):
    interpreter = account.call(sandbox.interpreter_paths)
    targets = {"etc": "/etc/evil", "usr": "/usr/lib/evil", "root_fs": "/evil", "dev": "/dev/evil",
               "channel": f"{sandbox.INNER_CHANNEL_DIR}/evil", "repo": str(REPO / "evil"),
               **{f"interpreter {p}": f"{p}/evil" for p in interpreter}}
    cell = TRY + ("def write(p):\n    return attempt(lambda: open(p, 'w').write('x'))\n"
                  f"targets = {targets!r}\n"
                  "print(json.dumps({'workdir': write('mine.txt'), 'tmp': write('/tmp/t.txt'),"
                  " 'shm': write('/dev/shm/s'), 'chmod_passwd': attempt(lambda: os.chmod('/etc/passwd', 0o777)),"
                  " **{key: write(path) for key, path in targets.items()}}))")
    ex, nb = run(account, place, cell)
    r = report(nb)
    assert r["workdir"] == "ok" and r["tmp"] == "ok" and r["shm"] == "ok"
    # A checkout under /tmp (a CI clone) is not there inside: the kernel's /tmp is its own tmpfs,
    # where bwrap made the directories above the bound venv, so a write there stays in the sandbox.
    private = {"repo"} if REPO.is_relative_to("/tmp") else set()
    for key in [*targets, "chmod_passwd"]:
        allowed = ("EROFS", "EACCES", "EPERM") + (("ok", "ENOENT") if key in private else ())
        assert r[key] in allowed, (key, r[key])
    assert (place / "work" / "mine.txt").read_text() == "x"
    assert not any(os.path.exists(path) for path in targets.values())


def test_tmp_size_cap_gives_enospc_and_file_size_cap_gives_efbig(account, place):
    limits = Limits(cell_timeout=30, tmp_bytes=4 << 20, file_size_bytes=1 << 20)
    cell = TRY + ("chunk = b'z' * (1 << 19)\n"
                  "def fill(path, n):\n    with open(path, 'wb') as f:\n"
                  "        for _ in range(n):\n            f.write(chunk); f.flush()\n"
                  "print(json.dumps({'tmp_small': attempt(lambda: fill('/tmp/a', 1)),"
                  " 'fsize': attempt(lambda: fill('big.bin', 4)),"
                  " 'tmp_full': attempt(lambda: [fill(f'/tmp/f{i}', 2) for i in range(10)]),"
                  " 'history': get_ipython().history_manager.enabled}))")
    ex, nb = run(account, place, cell, "print('alive')", limits=limits)
    r = report(nb)
    assert r["tmp_small"] == "ok"
    assert r["fsize"] == "EFBIG"
    assert r["tmp_full"] == "ENOSPC"
    assert (place / "work" / "big.bin").stat().st_size == 1 << 20
    assert [c.status for c in ex.cells] == ["ok", "ok"]
    # A full /tmp leaves the kernel's own output alone: it keeps no history database there.
    assert r["history"] is False
    assert [(o["name"], o["text"]) for o in nb.cells[1].outputs] == [("stdout", "alive\n")]


def test_a_kernels_own_work_dir_is_a_size_capped_tmpfs_as_root_and_says_so_otherwise(account, place):
    """As root, a kernel's own work dir is a tmpfs of ``tmp_bytes``: filling it gives ENOSPC, and it
    is unmounted and removed on close. An ordinary user cannot mount one, and the label says so."""
    limits = Limits(cell_timeout=30, notebook_timeout=120, tmp_bytes=4 << 20, file_size_bytes=64 << 20)
    cell = TRY + ("import sys\n"
                  "def fill():\n    with open('fill', 'wb') as f:\n"
                  "        for _ in range(16):\n            f.write(b'z' * (1 << 19)); f.flush()\n"
                  "print(json.dumps({'fill': attempt(fill),"
                  f" 'channel': open({sandbox.INNER_CHANNEL_DIR!r} + '/hello').read()}}))")
    sandboxing = Sandboxing(limits=limits, hide=(place / "record",), uid=next(_uids))
    ex, seen = account.call(run_in_own_kernel, sandboxing, v4.new_notebook(cells=[v4.new_code_cell(cell)]),
                            place / "record", {"hello": "from the grader"})
    r = report(nbformat.read(str(ex.executed_notebook), as_version=4))
    assert r["channel"] == "from the grader"  # the grader's channel dir, read-only (see the writes test)
    assert seen["inner_channel_dir"] == sandbox.INNER_CHANNEL_DIR
    assert seen["channel_mode"] == 0o755 and seen["channel_owner"] == account.uid
    if account.is_root:
        assert ex.isolation.startswith("bubblewrap (user namespace; separate job uid; work dir tmpfs 4 MiB); "
                                       "cgroup v")  # and its resource box
        assert r["fill"] == "ENOSPC" and seen["files"]["fill"] <= 4 << 20
        assert seen["mounted_while_open"]
    else:
        assert "; work dir not size-capped: needs root); no resource box (rlimits only)" in ex.isolation
        assert r["fill"] == "ok" and seen["files"]["fill"] == 8 << 20
    assert not seen["mounted_after"] and not seen["exists_after"]


def test_memory_limit_gives_memory_error_not_a_dead_grader(account, place):
    limits = Limits(cell_timeout=30, memory_bytes=2 << 30)
    ex, nb = run(account, place, "big = bytearray(3 << 30)", "print('alive')", limits=limits)
    assert [c.status for c in ex.cells] == ["error", "ok"]
    assert ex.cells[0].error.startswith("MemoryError")


@pytest.mark.slow
def test_fork_bomb_is_stopped_by_the_process_cap(account, place):
    uid = next(_uids)
    limits = Limits(cell_timeout=60, processes=40)
    bomb = ("import subprocess, sys, time, os\n"
            "code = 'import os\\nwhile True:\\n    try:\\n        os.fork()\\n    except OSError:\\n"
            "        pass\\n'\n"
            "p = subprocess.Popen([sys.executable, '-c', code])\n"
            "time.sleep(4)\n"
            "tasks = sum(len(os.listdir(f'/proc/{q}/task')) for q in os.listdir('/proc') if q.isdigit())\n"
            "print(tasks)")
    t0 = time.monotonic()
    ex, nb = run(account, place, bomb, "print('kernel still answers')", limits=limits, uid=uid)
    assert [c.status for c in ex.cells] == ["ok", "ok"], ex
    tasks = int(nb.cells[0].outputs[-1]["text"].strip().splitlines()[-1])
    assert tasks <= 40 + 2, tasks  # every process and thread of the job uid, capped
    assert nb.cells[1].outputs[0]["text"] == "kernel still answers\n"
    assert time.monotonic() - t0 < 60
    time.sleep(0.5)
    assert procs_of(account.job_uid(uid)) == []  # the pid namespace took the bomb with it


@pytest.mark.slow
def test_leftover_processes_die_with_the_kernel(account, place):
    uid = next(_uids)
    limits = Limits(cell_timeout=2, notebook_timeout=60)
    cell = ("import os, signal, subprocess, time\n"
            "subprocess.Popen(['sleep', '1000'], start_new_session=True)\n"
            "if os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        time.sleep(1000)\n"
            "    os._exit(0)\n"
            "signal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True:\n    pass")
    ex, nb = run(account, place, cell, limits=limits, uid=uid)
    assert ex.status == "timeout" and ex.cells[0].status == "timeout"
    time.sleep(0.5)
    assert procs_of(account.job_uid(uid)) == []


def test_student_cannot_touch_the_record_dir(account, place):
    record = place / "record"
    record.mkdir()
    (record / "executed.ipynb").write_text("old")
    (record / "grade.json").write_text('{"score": 0}')
    account.own(place)
    cell = TRY + (f"rec = {str(record)!r}\n"
                  "def forge():\n    open(rec + '/executed.ipynb', 'w').write('{\"forged\": true}')\n"
                  "print(json.dumps({'forge': attempt(forge), 'list': listing(rec),"
                  " 'chmod': attempt(lambda: os.chmod(rec, 0o777))}))")
    ex, nb = run(account, place, cell, "print('genuine')")
    r = report(nb)
    assert r["list"] == "ENOENT" and r["forge"] == "ENOENT" and r["chmod"] == "ENOENT"
    assert nb.cells[1].outputs[0]["text"] == "genuine\n"
    assert "forged" not in json.loads((record / "executed.ipynb").read_text())
    assert (record / "grade.json").read_text() == '{"score": 0}'


def _fake_mnist(root: Path, n: int = 64) -> Path:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix in ("train", "t10k"):
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            struct.pack(">IIII", 2051, n, 28, 28) + bytes((i * 7) % 256 for i in range(n * 784)))
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(
            struct.pack(">II", 2049, n) + bytes(i % 10 for i in range(n)))
    return root


@pytest.mark.slow
def test_dataset_root_is_read_only_at_data_and_torch_trains_within_limits(account, place):
    data = _fake_mnist(place / "datasets")
    account.own(place)
    cells = [
        "import torch, torchvision\nfrom torchvision import transforms\n"
        "ds = torchvision.datasets.MNIST('./data', train=True, download=True,"
        " transform=transforms.ToTensor())\nprint(len(ds), tuple(ds[0][0].shape))",
        "import torch.nn as nn\nloader = torch.utils.data.DataLoader(ds, batch_size=16, shuffle=True)\n"
        "model = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10))\n"
        "opt = torch.optim.SGD(model.parameters(), lr=0.1)\n"
        "for epoch in range(3):\n    for x, y in loader:\n        opt.zero_grad()\n"
        "        loss = nn.functional.cross_entropy(model(x), y)\n        loss.backward(); opt.step()\n"
        "torch.save(model.state_dict(), 'model.pt')\n"
        "st = open('/proc/self/status').read()\n"
        "print([l for l in st.splitlines() if l.startswith(('VmPeak', 'VmHWM', 'Threads'))])",
        TRY + "print(json.dumps({'write_data': attempt(lambda: open('data/x', 'w')),"
              " 'threads': torch.get_num_threads()}))",
    ]
    ex, nb = run(account, place, *cells, data_root=data)
    assert [c.status for c in ex.cells] == ["ok", "ok", "ok"], ex
    assert nb.cells[0].outputs[0]["text"] == "64 (1, 28, 28)\n"
    assert (place / "work" / "model.pt").stat().st_size > 0
    r = report(nb, 2)
    assert r["write_data"] in ("EROFS", "EACCES") and r["threads"] == 1
    assert not (data / "x").exists()


def test_a_batch_shows_only_its_own_dataset_read_only(account, place):
    data = _fake_mnist(place / "datasets")
    (data / "FashionMNIST" / "raw").mkdir(parents=True)  # provisioned too, for another batch
    account.own(place)
    cell = TRY + ("import torchvision\n"
                  "ds = torchvision.datasets.MNIST('./data', train=False)\n"
                  "print(json.dumps({'data': listing('data'), 'mnist': len(ds),"
                  " 'fashion': attempt(lambda: torchvision.datasets.FashionMNIST('./data')),"
                  " 'add': attempt(lambda: open('data/x', 'w')),"
                  " 'write': attempt(lambda: open('data/MNIST/x', 'w'))}))")
    ex, nb = run(account, place, cell, data_root=data, datasets=("MNIST",))
    r = report(nb)
    assert r["data"] == ["MNIST"] and r["mnist"] == 64
    assert r["fashion"] == "RuntimeError"  # torchvision's "Dataset not found", as on a machine without it
    assert r["add"] in ("EROFS", "EACCES") and r["write"] in ("EROFS", "EACCES")
    assert sorted(p.name for p in data.iterdir()) == ["FashionMNIST", "MNIST"]


def test_the_wrapper_joins_its_resource_box_first_or_does_not_start_the_kernel(tmp_path):
    """The wrapper writes its own pid (the kernel's, after exec) into each cgroup file it is given;
    one it cannot write stops it with a message, before it does anything else."""
    connection = tmp_path / "connection.json"
    connection.write_text(json.dumps({"transport": "ipc", "ip": str(tmp_path / "k")}))
    box = tmp_path / "cgroup.procs"
    box.write_text("")

    def wrapper(ipc: Path, *procs: Path) -> subprocess.Popen:
        ipc.mkdir()
        config = sandbox.SandboxConfig(workdir=str(tmp_path), ipc_dir=str(ipc), python="/bin/true",
                                       mode=sandbox.SUBPROCESS, drop_uid=False, cgroup_procs=tuple(map(str, procs)))
        argv = [a.replace("{connection_file}", str(connection)) for a in sandbox.kernel_command(config)]
        return subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)

    joined = wrapper(tmp_path / "ipc-joined", box)  # then it runs its "kernel": /bin/true
    assert joined.wait(60) == 0 and box.read_text() == str(joined.pid)
    assert (tmp_path / "ipc-joined" / "connection.json").is_file()
    refused = wrapper(tmp_path / "ipc-refused", tmp_path / "no-such-cgroup" / "cgroup.procs")
    assert refused.wait(60) == 1
    assert refused.stderr.read().startswith("labgrader sandbox: cannot join the resource box through ")
    assert list((tmp_path / "ipc-refused").iterdir()) == []
