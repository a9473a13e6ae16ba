"""The probe as a typed boundary: what the in-kernel code sends is exactly the schema the grader parses,
a malformed or incomplete answer costs only its own section, the channel takes one answer and never
waits or reads without bound, tampering in the kernel is undone and reported, and nothing the
notebook plants in its working directory reaches the grader.

Most tests run the kernel's side in a plain Python process (the code the grader sends, unchanged,
with the reference implementation's functions as the "notebook"), so they need no Jupyter kernel.
"""
from __future__ import annotations

import base64
import copy
import json
import os
import socket
import stat
import subprocess
import sys
import threading
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from grader import checks, expected, probe
from grader.probe import channel as channel_module
from grader.results import CheckResult, Execution

REPO = Path(__file__).resolve().parent.parent
PROBE_CHECKS = {"data_sizes", "data_samples", "data_loaders", "model_output_shape", "model_log_probs", "train_epoch_signature",
                "train_epoch_result", "train_epoch_updates", "train_epoch_train_mode", "validate_result",
                "validate_no_side_effects", "train_history", "train_uses_arguments"}

# The "notebook": the lab done with the reference's own functions, on the test's small dataset.
NOTEBOOK = """
import torch
from torch.utils.data import DataLoader, TensorDataset
from reference import model
from reference.training import train, train_epoch, validate

class Digits(torch.utils.data.Dataset):
    def __init__(self, pair):
        self.x, self.y = pair
    def __len__(self):
        return len(self.x)
    def __getitem__(self, index):
        return self.x[index], int(self.y[index])

_train, _test = torch.load({train!r}), torch.load({test!r})
data_train, data_test = Digits(_train), Digits(_test)
train_loader = DataLoader(TensorDataset(*_train), batch_size=64, shuffle=True)
test_loader = DataLoader(data_test, batch_size=64)
net = model.make_model(seed=0)
hist = train(net, train_loader, test_loader, epochs=2)
"""
# What a notebook may do to the interpreter between its cells and the probe.
TAMPERING = """
import builtins, gc, signal, sys, threading
from torch.overrides import TorchFunctionMode

_len, _import = builtins.len, builtins.__import__
builtins.len = lambda thing: 60000 if thing is data_train else _len(thing)
builtins.__import__ = lambda name, *args, **kwargs: None if name == "torch" else _import(name, *args, **kwargs)
torch.Tensor.tolist = lambda self: [0.0]
_call = torch.nn.Module.__call__
torch.nn.Module.__call__ = lambda self, *args, **kwargs: _call(self, *args, **kwargs) * 0
sys.settrace(lambda *args: None)
threading.Thread(target=threading.Event().wait, args=(600,), name="spy", daemon=True).start()
signal.signal(signal.SIGALRM, lambda *args: None)
signal.setitimer(signal.ITIMER_REAL, 600)
gc.callbacks.append(lambda *args: None)
torch.nn.modules.module.register_module_forward_hook(lambda module, inputs, output: output * 0)

class Meddler(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {{}}))

Meddler().__enter__()
"""


def _pools(seed: int) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return ((torch.rand(600, 1, 28, 28, generator=generator), torch.randint(10, (600,), generator=generator)),
            (torch.rand(300, 1, 28, 28, generator=generator), torch.randint(10, (300,), generator=generator)))


@pytest.fixture(scope="module")
def kernel_side(tmp_path_factory):
    """One plain Python process runs the prelude, the notebook, the probe; then tampers with the
    interpreter and is probed again. Returns (train, test, {"honest"|"tampered": (plan, Received)})."""
    directory = tmp_path_factory.mktemp("probe")
    train, test = _pools(1)
    torch.save(train, directory / "train.pt")
    torch.save(test, directory / "test.pt")
    plans = {name: probe.make_plan(train, test, seed=seed) for name, seed in (("honest", 3), ("tampered", 4))}
    script = (probe.prelude_code(0, 1, False)
              + NOTEBOOK.format(train=str(directory / "train.pt"), test=str(directory / "test.pt"))
              + probe.probe_code(plans["honest"], str(directory))
              + TAMPERING.format() + probe.probe_code(plans["tampered"], str(directory)))
    (directory / "kernel.py").write_text(script)
    channels = {name: probe.Channel(directory, plan.nonce, timeout=600) for name, plan in plans.items()}
    done = subprocess.run([sys.executable, str(directory / "kernel.py")], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    received = {name: channel.close() for name, channel in channels.items()}
    assert done.returncode == 0, done.stderr[-3000:]
    return train, test, {name: (plans[name], received[name]) for name in plans}


def _evidence(train, test, plan, answers) -> checks.Evidence:
    dataset = {"train_size": len(train[0]), "test_size": len(test[0]), "sample_shape": [1, 28, 28],
               "sample_dtype": "float32", "min_intensity": 0.0, "max_intensity": 1.0}
    return checks.Evidence(spec=SimpleNamespace(dataset=dataset),
                           execution=Execution(status="completed", cells=(), isolation="none", seconds=0.0),
                           saved_model=None, expected=expected.compute(plan, train, test), probe=answers,
                           notebook=None, plan=plan)


def _verdicts(train, test, plan, answers) -> dict[str, CheckResult]:
    return {result.name: result for result in checks.run_checks(_evidence(train, test, plan, answers))
            if result.name in PROBE_CHECKS}


LEAF_TYPES = {"str": str, "int": int, "float": float, "bool": bool, "np.ndarray": np.ndarray}


def _assert_typed(record) -> None:
    """Every field of a parsed record holds what its annotation names, records within it too."""
    for field in fields(record):
        value = getattr(record, field.name)
        for item in (value if isinstance(value, tuple) else (value,)):
            if hasattr(item, "__dataclass_fields__"):
                _assert_typed(item)
            elif item is not None and not isinstance(item, (tuple, dict)):
                kinds = tuple(kind for name, kind in LEAF_TYPES.items() if name in str(field.type))
                assert isinstance(item, kinds), (type(record).__name__, field.name, item)


def test_the_kernel_code_sends_exactly_the_schema(kernel_side):
    train, test, runs = kernel_side
    plan, received = runs["honest"]
    assert (received.answers, received.ignored, received.problem) == (1, 0, None)
    answers = probe.parse(received.message, plan)
    # parse accepts a section only when its fields are exactly the schema's, each of its type
    assert not [f.name for f in fields(answers) if isinstance(getattr(answers, f.name), probe.Problem)], answers
    _assert_typed(answers)
    assert set(received.message) == {field.name for field in fields(answers)}
    assert answers.figures == ()  # no IPython here: nothing shown, nothing recorded
    # the reference's own functions, probed on the grader's inputs, earn every probe check
    verdicts = _verdicts(train, test, plan, answers)
    assert {name for name, verdict in verdicts.items() if verdict.fraction != 1.0} == set(), verdicts
    assert all(not verdict.warnings for verdict in verdicts.values()), verdicts


def test_an_honest_kernel_has_no_integrity_findings(kernel_side):
    _, _, runs = kernel_side
    plan, received = runs["honest"]
    assert probe.parse(received.message, plan).integrity == ()
    assert received.findings(None) == ()


def test_tampering_is_undone_before_probing_and_reported(kernel_side):
    train, test, runs = kernel_side
    plan, received = runs["tampered"]
    answers = probe.parse(received.message, plan)
    findings = "\n".join(answers.integrity)
    for expected_finding in ("builtins.len replaced", "builtins.__import__ replaced", "torch.Tensor.tolist replaced",
                             "torch.nn.Module.__call__ replaced", "sys trace function set",
                             "signal handler for SIGALRM replaced", "a SIGALRM timer was running", "gc callback added",
                             "torch global forward hooks registered", "torch function mode active: Meddler",
                             "thread(s) the notebook started were running during the probe: spy"):
        assert expected_finding in findings, findings
    # measured on the real functions: the data's true length, the real output, real training
    assert answers.data_train.length == len(train[0])
    verdicts = _verdicts(train, test, plan, answers)
    assert {name for name, verdict in verdicts.items() if verdict.fraction != 1.0} == set(), verdicts


def _raw(kernel_side) -> tuple[probe.Plan, dict]:
    _, _, runs = kernel_side
    plan, received = runs["honest"]
    return plan, copy.deepcopy(received.message)


@pytest.mark.parametrize("damage, section, says", [
    (lambda raw: raw["train_epoch"]["ok"].pop("steps"), "train_epoch", "missing field(s) steps"),
    (lambda raw: raw["model"]["ok"].update(extra=1), "model", "unexpected field(s) extra"),
    (lambda raw: raw["data_train"]["ok"].update(length="4000"), "data_train", ".length: expected an integer, got text"),
    (lambda raw: raw["validate"]["ok"]["params"]["bias"].update(shape=[11]), "validate", "with 80 bytes, not 88"),
    (lambda raw: raw["train"]["ok"]["forwards"].append([1, 0]), "train", "expected true or false, got an integer"),
    (lambda raw: raw["history"].update(raised={}), "history", "one of ok, absent or raised"),
    (lambda raw: raw.pop("figures"), "figures", "the probe sent no answer for it"),
], ids=["missing", "extra", "mistyped", "array-size", "nested-type", "two-kinds", "section-missing"])
def test_a_malformed_field_is_its_sections_problem_alone(kernel_side, damage, section, says):
    plan, raw = _raw(kernel_side)
    damage(raw)
    answers = probe.parse(raw, plan)
    problem = getattr(answers, section)
    assert isinstance(problem, probe.Problem) and problem.kind == "malformed" and says in problem.message, problem
    others = [f.name for f in fields(answers) if f.name not in (section, "integrity")]
    assert not any(isinstance(getattr(answers, name), probe.Problem) for name in others)


def test_every_planned_index_must_be_answered(kernel_side):
    train, test, runs = kernel_side
    plan, raw = _raw(kernel_side)
    raw["data_test"]["ok"]["items"] = []  # an empty list used to pass: zip() compared nothing
    answers = probe.parse(raw, plan)
    assert isinstance(answers.data_test, probe.Problem)
    assert f"no answer for the item(s) at {plan.data_indices['data_test']}" in answers.data_test.message
    verdicts = _verdicts(train, test, plan, answers)
    for name in ("data_sizes", "data_samples"):
        assert verdicts[name].fraction == 0 and "no answer for the item(s)" in verdicts[name].message


def test_self_reported_facts_alone_earn_nothing(kernel_side):
    """A forger knows the plan (it is in the code the kernel runs) and can claim any length, mode,
    signature, output or history shape; without the lab's results none of it is credited."""
    train, test, runs = kernel_side
    plan, raw = _raw(kernel_side)
    for name in ("train_epoch", "train_epoch_doubled", "validate", "train", "train_doubled"):
        raw[name]["ok"]["params"] = {"weight": _zeros((10, 784)), "bias": _zeros((10,))}
        _make_up_numbers(raw[name]["ok"]["returned"])
    for name in ("data_train", "data_test"):
        for item in raw[name]["ok"]["items"]:
            item["label"], item["sum"] = (item["label"] + 1) % 10, item["sum"] + 1
    for name in probe.LOADERS:  # the right lengths, with labels the provided splits don't have there
        raw[name]["ok"]["labels"] = [(label + 1) % 10 for label in raw[name]["ok"]["labels"]]
    state = raw["model"]["ok"]["state"]
    state[0][1] = _zeros((10, 784))  # claimed weights that don't give the claimed output
    verdicts = _verdicts(train, test, plan, probe.parse(raw, plan))
    assert {name for name, verdict in verdicts.items() if verdict.fraction > 0} == set(), verdicts
    assert "not what its own weights compute" in verdicts["model_output_shape"].message
    assert "could not be credited" in verdicts["train_epoch_train_mode"].message


def test_a_train_loader_over_the_test_split_is_caught(kernel_side):
    """What the loaders hold is read in the kernel (length, labels at the grader's indices) and
    judged outside against the provided splits."""
    train, test, runs = kernel_side
    plan, raw = _raw(kernel_side)
    answers = probe.parse(raw, plan)
    assert answers.train_loader.length == len(train[0]) and answers.test_loader.length == len(test[0])
    assert list(answers.train_loader.labels) == [int(train[1][i]) for i in plan.data_indices["loaders"]]
    raw["train_loader"] = copy.deepcopy(raw["test_loader"])  # DataLoader(data_test, ...) as train_loader
    verdict = _verdicts(train, test, plan, probe.parse(raw, plan))["data_loaders"]
    assert verdict.fraction == 0
    assert verdict.message.startswith(f"train_loader holds the test split ({len(test[0])} items"), verdict.message
    assert "build it from data_train" in verdict.message and "tested on" in verdict.message
    del raw["test_loader"]["ok"]["dataset_type"]  # a malformed answer costs its own section only
    answers = probe.parse(raw, plan)
    assert isinstance(answers.test_loader, probe.Problem) and not isinstance(answers.train_loader, probe.Problem)


def _zeros(shape: tuple[int, ...]) -> dict:
    return {"dtype": "f8", "shape": list(shape), "data": base64.b64encode(np.zeros(shape).tobytes()).decode()}


def _make_up_numbers(value: dict) -> None:
    """Every number in a returned value (and its items) becomes 0.5: plausible, and not computed."""
    if value["number"] is not None:
        value["number"] = 0.5
    for item in value["items"] or ():
        _make_up_numbers(item)


def test_an_output_that_cannot_be_recomputed_is_credited_with_a_warning(kernel_side):
    train, test, _ = kernel_side
    plan, raw = _raw(kernel_side)
    raw["model"]["ok"]["state"] = None
    raw["model"]["ok"]["state_note"] = "net's state_dict holds entries that are not float tensors"
    verdicts = _verdicts(train, test, plan, probe.parse(raw, plan))
    assert verdicts["model_log_probs"].fraction == 1
    assert verdicts["model_log_probs"].warnings[0].startswith("model_unverified: net's state_dict holds entries")


def test_a_train_epoch_that_ignores_its_loss_fn_is_told_so(kernel_side):
    """Given a loss_fn giving twice NLLLoss, a train_epoch that computes its own NLLLoss trains as
    with the plain loss: the grader sees that in the weights, not in a claim."""
    train, test, runs = kernel_side
    plan, raw = _raw(kernel_side)
    raw["train_epoch_doubled"] = copy.deepcopy(raw["train_epoch"])
    verdicts = _verdicts(train, test, plan, probe.parse(raw, plan))
    verdict = verdicts["train_epoch_signature"]
    assert verdict.fraction == 0.5 and "trained exactly as with nn.NLLLoss()" in verdict.message


# --- the channel ---------------------------------------------------------------------------------

def _send(path: Path, data: bytes, close: bool = True) -> socket.socket:
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    connection.connect(str(path))
    connection.sendall(data)
    if close:
        connection.close()
    return connection


def test_the_channel_takes_the_one_answer_with_its_header(tmp_path):
    channel = probe.Channel(tmp_path, "0123456789abcdef", timeout=60)
    assert stat.S_IMODE(os.stat(channel.path).st_mode) == 0o666 and stat.S_ISSOCK(os.stat(channel.path).st_mode)
    _send(channel.path, b"labgrader-probe fedcba9876543210\n{}")  # another run's header
    _send(channel.path, b"GET / HTTP/1.0\r\n\r\n")
    _send(channel.path, channel_module.header("0123456789abcdef").encode() + b'{"answer": 42}')
    received = channel.close()
    assert (received.message, received.answers, received.ignored) == ({"answer": 42}, 1, 2)
    assert not channel.path.exists()
    assert received.findings(None) == ("2 other connection(s) to the probe's channel were ignored",)


def test_two_answers_void_each_other(tmp_path):
    channel = probe.Channel(tmp_path, "0123456789abcdef", timeout=60)
    for value in (1, 2):
        _send(channel.path, channel_module.header("0123456789abcdef").encode() + json.dumps({"answer": value}).encode())
    received = channel.close()
    assert received.message is None and received.answers == 2 and "2 answers" in received.problem
    assert any("received 2 answers" in finding for finding in received.findings(None))


def test_the_channel_neither_waits_for_ever_nor_reads_without_end(tmp_path, monkeypatch):
    monkeypatch.setattr(channel_module, "MAX_ANSWER_BYTES", 1000)
    channel = probe.Channel(tmp_path, "0123456789abcdef", timeout=600)
    header = channel_module.header("0123456789abcdef").encode()
    silent = _send(channel.path, header, close=False)  # begins an answer, then never finishes it
    flooding = _send(channel.path, header, close=False)
    stop = threading.Event()

    def flood():
        try:
            while not stop.is_set():
                flooding.sendall(b"0" * 4096)
        except OSError:
            pass  # the grader closed it

    flooder = threading.Thread(target=flood)
    flooder.start()
    try:
        received = channel.close()  # returns: the deadline is the grace period, whatever the peers do
    finally:
        stop.set()
        flooder.join()
        silent.close()
        flooding.close()
    assert (received.message, received.answers, received.ignored) == (None, 0, 2)
    assert received.problem == "the probe sent no answer"


def test_an_answer_that_is_not_json_is_a_problem(tmp_path):
    channel = probe.Channel(tmp_path, "0123456789abcdef", timeout=60)
    _send(channel.path, channel_module.header("0123456789abcdef").encode() + b"[" * 100_000)
    received = channel.close()
    assert received.message is None and "not valid JSON" in received.problem


def test_a_probe_that_ran_but_sent_nothing_is_flagged():
    assert probe.Received(sent=True, problem="the probe sent no answer").findings(None) == (
        "the probe's code ran without error but sent no answer (did the notebook change the code the kernel runs?)",)
    assert probe.Received(sent=True).findings("NameError: x") == ()  # it failed: the reason is that error
    assert probe.Received().findings(None) == ()  # never sent: the kernel died first


def test_the_plan_goes_in_beside_the_channel_and_nothing_in_the_work_dir(tmp_path):
    train, test = _pools(2)
    plan = probe.make_plan(train, test, seed=5)
    channel_dir = tmp_path / "channel"
    channel_dir.mkdir()
    code = probe.probe_code(plan, channel_dir, "/run/labgrader")
    assert "open(" not in code and ".labgrader-probe" not in code
    assert len(code) < 10_000  # the arrays are not in the code: the kernel echoes and transforms it
    compile(code, "<epilogue>", "exec")
    [inputs] = channel_dir.iterdir()
    assert f"'/run/labgrader/{inputs.name}'" in code and f"'/run/labgrader/{probe.channel.socket_name(plan.nonce)}'" in code
    assert inputs.stat().st_mode & 0o777 == 0o644
    assert inputs.read_bytes() == b"".join(array.tobytes() for array in plan.arrays.values())


@pytest.mark.slow
def test_fifos_symlinks_and_a_watcher_in_the_work_dir_change_nothing(grading_config):
    """bad_fifo_symlinks.ipynb plants a FIFO and symlinks where the probe's files used to be (one to
    a root-owned canary outside the sandbox) and keeps replacing new files with links from a thread.
    The grading finishes with full marks, the canary is unchanged, and the thread flags the result."""
    from grader import intake, pipeline, resources

    canary = Path("/tmp/labgrader-canary")
    canary.write_text("canary\n")
    try:
        before = (canary.read_bytes(), os.stat(canary).st_mtime_ns)
        [submission] = intake.collect([resources.EXAMPLES_DIR / "bad_fifo_symlinks.ipynb"])
        result = pipeline.grade(submission, grading_config())
        assert (canary.read_bytes(), os.stat(canary).st_mtime_ns) == before
    finally:
        canary.unlink()
    assert result.status == "graded" and result.score == result.max_score, result.reason
    assert any("link-planter" in finding for finding in result.integrity), result.integrity


def test_names_a_helper_module_publishes_as_builtins_are_found_as_python_finds_them(tmp_path):
    # The course's own version of the lab loads its data with a helper that puts data_train,
    # data_test and the loaders into builtins, not into the notebook's namespace.
    train, test = _pools(2)
    torch.save(train, tmp_path / "train.pt")
    torch.save(test, tmp_path / "test.pt")
    plan = probe.make_plan(train, test, seed=5)
    as_builtins = NOTEBOOK.format(train=str(tmp_path / "train.pt"), test=str(tmp_path / "test.pt")) + (
        "import builtins\n"
        "builtins.data_train, builtins.data_test = data_train, data_test\n"
        "del data_train, data_test\n")
    (tmp_path / "kernel.py").write_text(probe.prelude_code(0, 1, False) + as_builtins
                                        + probe.probe_code(plan, str(tmp_path)))
    channel = probe.Channel(tmp_path, plan.nonce, timeout=600)
    done = subprocess.run([sys.executable, str(tmp_path / "kernel.py")], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    received = channel.close()
    assert done.returncode == 0, done.stderr[-3000:]
    verdicts = _verdicts(train, test, plan, probe.parse(received.message, plan))
    assert verdicts["data_sizes"].fraction == 1.0 and verdicts["data_samples"].fraction == 1.0, (
        verdicts["data_sizes"].message, verdicts["data_samples"].message)
