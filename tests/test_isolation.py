"""What a student's notebook can and cannot do inside the bubblewrap sandbox.

Each test runs real cells in a real sandboxed kernel and reads back what happened from the saved
notebook (written by the executor, outside the sandbox). Nothing here contacts an address outside
this machine: the network test listens on the host's own 127.0.0.1.

Each test uses its own job uid, as concurrent jobs should (RLIMIT_NPROC counts per uid, host-wide).
"""
from __future__ import annotations

import itertools
import json
import os
import socket
import struct
import sys
import threading
import time
from pathlib import Path

import nbformat
import pytest
from nbformat import v4

from grader import sandbox
from grader.execute import Limits, execute

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(sandbox.bubblewrap_problem() is not None,
                                reason=f"bubblewrap sandbox unavailable: {sandbox.bubblewrap_problem()}")
_uids = itertools.count(62000 + (os.getpid() % 500) * 20)
FAST = Limits(cell_timeout=30, notebook_timeout=120)


def run(tmp_path: Path, *sources: str, **kw):
    kw.setdefault("limits", FAST)
    kw.setdefault("uid", next(_uids))
    nb = v4.new_notebook(cells=[v4.new_code_cell(s) for s in sources])
    ex = execute(nb, tmp_path / "work", tmp_path / "record", **kw)
    return ex, nbformat.read(str(ex.executed_notebook), as_version=4)


def report(nb, index: int = 0) -> dict:
    """The JSON a probing cell printed last (what the kernel saw)."""
    text = "".join(o.get("text", "") for o in nb.cells[index].outputs if o["output_type"] == "stream")
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


@pytest.fixture
def visible_dir():
    """A scratch dir outside /tmp (which the sandbox replaces wholesale): hiding must be explicit."""
    import shutil
    import tempfile

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
"""


def test_kernel_runs_unprivileged_with_a_clean_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("LABGRADER_TEST_SECRET", "do-not-leak")
    ex, nb = run(tmp_path, "import os, json\nstatus = open('/proc/self/status').read()\n"
                           "fields = dict(l.split(':\\t', 1) for l in status.splitlines() if ':\\t' in l)\n"
                           "print(json.dumps({'uid': os.getuid(), 'euid': os.geteuid(), 'gid': os.getgid(),"
                           " 'groups': os.getgroups(), 'capeff': fields['CapEff'].strip(),"
                           " 'capbnd': fields['CapBnd'].strip(), 'nnp': fields['NoNewPrivs'].strip(),"
                           " 'cwd': os.getcwd(), 'secret': os.environ.get('LABGRADER_TEST_SECRET'),"
                           " 'pids': sorted(int(p) for p in os.listdir('/proc') if p.isdigit())}))")
    assert ex.isolation == "bubblewrap" and ex.status == "completed", ex.reason
    r = report(nb)
    assert r["uid"] != 0 and r["euid"] != 0 and r["gid"] != 0 and r["groups"] == []
    assert r["capeff"] == "0000000000000000" and r["capbnd"] == "0000000000000000"
    assert r["nnp"] == "1"
    assert r["cwd"] == sandbox.INNER_WORKDIR
    assert r["secret"] is None
    assert max(r["pids"]) < 100  # its own pid namespace: the host's processes are not there


def test_network_is_unreachable_even_on_host_loopback(tmp_path):
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
        ex, nb = run(tmp_path / "sandboxed", cell)
        r = report(nb)
        assert r["tcp"] == "ECONNREFUSED"  # the sandbox's own loopback: nothing listens there
        assert r["ifaces"] == ["lo"]
        assert accepted == []
        # Control: without namespaces the same cell does reach the host's server.
        ex2, nb2 = run(tmp_path / "fallback", cell, isolation="subprocess")
        assert ex2.isolation.startswith("subprocess (weaker")
        assert report(nb2)["tcp"] == "ok"
        time.sleep(0.3)
        assert len(accepted) == 1
    finally:
        stop.set()
        server.close()


def test_repository_and_hidden_paths_are_unreadable(tmp_path, visible_dir):
    secret_dir = visible_dir / "other-submissions"
    secret_dir.mkdir()
    (secret_dir / "alice.ipynb").write_text("alice's answers")
    secret_file = visible_dir / "spec.json"
    (visible_dir / "public.txt").write_text("visible")
    secret_file.write_text('{"expected": 42}')
    cell = (TRY + "def listing(p):\n    try:\n        return sorted(os.listdir(p))\n"
            "    except OSError as e:\n        return errno.errorcode[e.errno]\n"
            f"print(json.dumps({{'repo': listing({str(REPO)!r}), "
            f"'reference': listing({str(REPO / 'reference')!r}), "
            f"'grader': attempt(lambda: open({str(REPO / 'grader' / 'sandbox.py')!r}).read()), "
            f"'pyproject': attempt(lambda: open({str(REPO / 'pyproject.toml')!r}).read()), "
            f"'secret_dir': listing({str(secret_dir)!r}), "
            f"'secret_file': attempt(lambda: print(open({str(secret_file)!r}).read(), end='')), "
            f"'public': open({str(visible_dir / 'public.txt')!r}).read(), "
            f"'root_home': listing('/root'), "
            "'import_grader': attempt(lambda: __import__('grader.sandbox')), "
            "'import_reference': attempt(lambda: __import__('reference.model'))}))")
    ex, nb = run(tmp_path, cell, hide=[secret_dir, secret_file])
    r = report(nb)
    assert set(r["repo"]) <= {".venv"}, r["repo"]  # the checkout is an empty tmpfs (+ the venv)
    assert r["reference"] in ([], "ENOENT")
    assert r["grader"] == "ENOENT" and r["pyproject"] == "ENOENT"
    assert r["secret_dir"] == [] and r["secret_file"] in ("EACCES", "ok")  # "ok": read ""
    assert "expected" not in "".join(o.get("text", "") for o in nb.cells[0].outputs)
    assert r["public"] == "visible"  # the control: only what was hidden is gone
    assert ".pyenv" in r["root_home"] or r["root_home"] == []  # only what the interpreter needs
    assert r["import_grader"] == "ModuleNotFoundError"
    assert r["import_reference"] == "ModuleNotFoundError"


def test_writes_only_in_workdir_and_tmp(tmp_path):
    cell = TRY + ("def write(p):\n    return attempt(lambda: open(p, 'w').write('x'))\n"
                  "print(json.dumps({'workdir': write('mine.txt'), 'tmp': write('/tmp/t.txt'),"
                  " 'shm': write('/dev/shm/s'), 'etc': write('/etc/evil'),"
                  " 'usr': write('/usr/lib/evil'), 'var_tmp': write('/var/tmp/evil'),"
                  f" 'venv': write({str(Path(sys.prefix) / 'evil')!r}),"
                  f" 'repo': write({str(REPO / 'evil')!r}),"
                  " 'chmod_etc': attempt(lambda: os.chmod('/etc/passwd', 0o777))}))")
    ex, nb = run(tmp_path, cell)
    r = report(nb)
    assert r["workdir"] == "ok" and r["tmp"] == "ok" and r["shm"] == "ok"
    for key in ("etc", "usr", "var_tmp", "venv", "repo", "chmod_etc"):
        assert r[key] in ("EROFS", "EACCES", "EPERM"), (key, r[key])
    assert (tmp_path / "work" / "mine.txt").read_text() == "x"
    assert not (REPO / "evil").exists() and not Path("/etc/evil").exists()


def test_tmp_size_cap_gives_enospc_and_file_size_cap_gives_efbig(tmp_path):
    limits = Limits(cell_timeout=30, tmp_bytes=4 << 20, file_size_bytes=1 << 20)
    cell = TRY + ("chunk = b'z' * (1 << 19)\n"
                  "def fill(path, n):\n    with open(path, 'wb') as f:\n"
                  "        for _ in range(n):\n            f.write(chunk); f.flush()\n"
                  "print(json.dumps({'tmp_small': attempt(lambda: fill('/tmp/a', 1)),"
                  " 'fsize': attempt(lambda: fill('big.bin', 4)),"
                  " 'tmp_full': attempt(lambda: [fill(f'/tmp/f{i}', 2) for i in range(10)])}))")
    ex, nb = run(tmp_path, cell, "print('alive')", limits=limits)
    r = report(nb)
    assert r["tmp_small"] == "ok"
    assert r["fsize"] == "EFBIG"
    assert r["tmp_full"] == "ENOSPC"
    assert (tmp_path / "work" / "big.bin").stat().st_size == 1 << 20
    assert [c.status for c in ex.cells] == ["ok", "ok"]


def test_memory_limit_gives_memory_error_not_a_dead_grader(tmp_path):
    limits = Limits(cell_timeout=30, memory_bytes=2 << 30)
    ex, nb = run(tmp_path, "big = bytearray(3 << 30)", "print('alive')", limits=limits)
    assert [c.status for c in ex.cells] == ["error", "ok"]
    assert ex.cells[0].error.startswith("MemoryError")


@pytest.mark.slow
def test_fork_bomb_is_stopped_by_the_process_cap(tmp_path):
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
    ex, nb = run(tmp_path, bomb, "print('kernel still answers')", limits=limits, uid=uid)
    assert [c.status for c in ex.cells] == ["ok", "ok"], ex
    tasks = int(nb.cells[0].outputs[-1]["text"].strip().splitlines()[-1])
    assert tasks <= 40 + 2, tasks  # every process and thread of the job uid, capped
    assert nb.cells[1].outputs[0]["text"] == "kernel still answers\n"
    assert time.monotonic() - t0 < 60
    time.sleep(0.5)
    assert procs_of(uid) == []  # the pid namespace took the bomb with it


@pytest.mark.slow
def test_leftover_processes_die_with_the_kernel(tmp_path):
    uid = next(_uids)
    limits = Limits(cell_timeout=2, notebook_timeout=60)
    cell = ("import os, signal, subprocess, time\n"
            "subprocess.Popen(['sleep', '1000'], start_new_session=True)\n"
            "if os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        time.sleep(1000)\n"
            "    os._exit(0)\n"
            "signal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True:\n    pass")
    ex, nb = run(tmp_path, cell, limits=limits, uid=uid)
    assert ex.status == "timeout" and ex.cells[0].status == "timeout"
    time.sleep(0.5)
    assert procs_of(uid) == []


def test_student_cannot_touch_the_record_dir(tmp_path, visible_dir):
    record = visible_dir / "record"
    record.mkdir()
    (record / "executed.ipynb").write_text("old")
    (record / "grade.json").write_text('{"score": 0}')
    cell = TRY + (f"rec = {str(record)!r}\n"
                  "def forge():\n    open(rec + '/executed.ipynb', 'w').write('{\"forged\": true}')\n"
                  "def listing():\n    return os.listdir(rec)\n"
                  "print(json.dumps({'forge': attempt(forge), 'list': listing(),"
                  " 'chmod': attempt(lambda: os.chmod(rec, 0o777))}))")
    ex = execute(v4.new_notebook(cells=[v4.new_code_cell(cell), v4.new_code_cell("print('genuine')")]),
                 tmp_path / "work", record, limits=FAST, uid=next(_uids))
    nb = nbformat.read(str(ex.executed_notebook), as_version=4)
    r = report(nb)
    assert r["list"] == []  # an empty tmpfs hides it
    assert r["forge"] in ("EACCES", "EROFS", "EPERM")
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
def test_dataset_root_is_read_only_at_data_and_torch_trains_within_limits(tmp_path):
    data = _fake_mnist(tmp_path / "datasets")
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
    ex, nb = run(tmp_path, *cells, data_root=data)
    assert [c.status for c in ex.cells] == ["ok", "ok", "ok"], ex
    assert nb.cells[0].outputs[0]["text"] == "64 (1, 28, 28)\n"
    assert (tmp_path / "work" / "model.pt").stat().st_size > 0
    r = report(nb, 2)
    assert r["write_data"] in ("EROFS", "EACCES") and r["threads"] == 1
    assert not (data / "x").exists()
