"""The saved model is read as weights only: payloads never run, and the messages say what to do."""
from __future__ import annotations

import collections
import json
import os
import pickle
import subprocess
import sys
import textwrap
import threading
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from grader import saved_model
from reference import model


@pytest.fixture(scope="module")
def test_set():
    generator = torch.Generator().manual_seed(0)
    return torch.rand(200, 1, 28, 28, generator=generator), torch.randint(10, (200,), generator=generator)


def test_state_dict_of_the_lab_model(tmp_path, test_set):
    net = model.make_model(seed=0)
    model.save_weights(net, tmp_path / "mnist_cnn.pt")
    result = saved_model.inspect(tmp_path / "mnist_cnn.pt", *test_set)
    assert result.status == "ok" and result.architecture == "Linear(784, 10)"
    predicted = net(test_set[0]).argmax(1)
    assert result.accuracy == pytest.approx((predicted == test_set[1]).float().mean().item())
    assert sum(map(sum, result.confusion)) == 200
    assert len(result.first_layer) == 10 and len(result.first_layer[0]) == 784


def test_a_hidden_layer_stack_is_inferred(tmp_path, test_set):
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10), nn.LogSoftmax(dim=1))
    torch.save(net.state_dict(), tmp_path / "m.pt")
    result = saved_model.inspect(tmp_path / "m.pt", *test_set)
    assert result.architecture == "Linear(784, 32) -> Linear(32, 10)"
    predicted = net(test_set[0]).argmax(1)
    assert result.accuracy == pytest.approx((predicted == test_set[1]).float().mean().item())


def test_missing_file_names_the_call_to_make(tmp_path, test_set):
    result = saved_model.inspect(tmp_path / "mnist_cnn.pt", *test_set)
    assert result.status == "missing" and "torch.save(net.state_dict(), 'mnist_cnn.pt')" in result.message


def test_whole_module_is_refused_without_loading(tmp_path, test_set):
    torch.save(model.make_model(), tmp_path / "m.pt")
    result = saved_model.inspect(tmp_path / "m.pt", *test_set)
    assert result.status == "rejected" and "whole pickled model" in result.message


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {Payload.marker}",))


def test_code_executing_pickle_never_runs(tmp_path, test_set):
    Payload.marker = tmp_path / "pwned"
    torch.save({"1.weight": torch.zeros(10, 784), "evil": Payload()}, tmp_path / "m.pt")
    result = saved_model.inspect(tmp_path / "m.pt", *test_set)
    assert result.status == "rejected" and "asks to run code" in result.message
    assert not Payload.marker.exists()


def test_plain_pickle_and_garbage_are_unloadable(tmp_path, test_set):
    (tmp_path / "p.pt").write_bytes(pickle.dumps({"a": 1}))
    (tmp_path / "g.pt").write_bytes(os.urandom(1000))
    for name in ("p.pt", "g.pt"):
        result = saved_model.inspect(tmp_path / name, *test_set)
        assert result.status == "unloadable" and "not a file written by torch.save" in result.message


def test_truncated_archive_is_reported(tmp_path, test_set):
    model.save_weights(model.make_model(), tmp_path / "m.pt")
    data = (tmp_path / "m.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2] + data[-200:])
    result = saved_model.inspect(tmp_path / "cut.pt", *test_set)
    assert result.status in ("unloadable", "rejected") and result.accuracy is None


def test_oversized_file_is_refused_before_reading(tmp_path, test_set, monkeypatch):
    monkeypatch.setattr(saved_model, "MAX_FILE_BYTES", 1000)
    model.save_weights(model.make_model(), tmp_path / "m.pt")
    result = saved_model.inspect(tmp_path / "m.pt", *test_set)
    assert result.status == "rejected" and "byte limit" in result.message


def test_wrong_shapes_are_explained(tmp_path, test_set):
    torch.save({"fc.weight": torch.zeros(10, 100), "fc.bias": torch.zeros(10)}, tmp_path / "m.pt")
    result = saved_model.inspect(tmp_path / "m.pt", *test_set)
    assert result.status == "incompatible" and "784 pixels to 10 classes" in result.message


def test_non_finite_weights(tmp_path, test_set):
    torch.save({"1.weight": torch.full((10, 784), float("nan")), "1.bias": torch.zeros(10)}, tmp_path / "m.pt")
    result = saved_model.inspect(tmp_path / "m.pt", *test_set)
    assert result.status == "incompatible" and "non-finite" in result.message


def test_zip_bomb_model_is_refused(tmp_path, test_set, monkeypatch):
    monkeypatch.setattr(saved_model, "MAX_UNPACKED_BYTES", 10_000)
    model.save_weights(model.make_model(), tmp_path / "m.pt")
    assert zipfile.is_zipfile(tmp_path / "m.pt")
    result = saved_model.inspect(tmp_path / "m.pt", *test_set)
    assert result.status == "rejected" and "unpacks to" in result.message


def _in_thread(function, *args, seconds: float = 60):
    """``function(*args)``, failing the test instead of hanging it if it blocks (as on a pipe)."""
    done: list = []
    worker = threading.Thread(target=lambda: done.append(function(*args)), daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"{function.__name__} blocked"
    return done[0]


def test_only_a_regular_file_is_kept(tmp_path, test_set):
    weights = tmp_path / "weights.pt"
    model.save_weights(model.make_model(seed=0), weights)
    makers = {"a folder": lambda p: p.mkdir(), "a named pipe (FIFO)": os.mkfifo,
              f"a symbolic link to {weights}": lambda p: p.symlink_to(weights)}
    for index, (kind, make) in enumerate(makers.items()):
        work, run = tmp_path / f"work{index}", tmp_path / f"run{index}"
        work.mkdir(), run.mkdir()
        make(work / "mnist_cnn.pt")
        _in_thread(saved_model.keep, work / "mnist_cnn.pt", run / "model.pt")
        result = saved_model.inspect(run / "model.pt", *test_set, name="mnist_cnn.pt")
        assert result.status == "missing" and result.accuracy is None
        assert result.message == (f"mnist_cnn.pt was not read: it is {kind}, not a file. Save the weights to "
                                  "a file with torch.save(net.state_dict(), 'mnist_cnn.pt').")
    saved_model.keep(weights, tmp_path / "model.pt")
    assert saved_model.inspect(tmp_path / "model.pt", *test_set).status == "ok"
    saved_model.keep(tmp_path / "nothing.pt", tmp_path / "none.pt")
    assert saved_model.inspect(tmp_path / "none.pt", *test_set, name="mnist_cnn.pt").message.startswith(
        "No mnist_cnn.pt was saved")


def test_keep_reads_no_further_than_the_size_limit(tmp_path, test_set, monkeypatch):
    monkeypatch.setattr(saved_model, "MAX_FILE_BYTES", 1000)
    (tmp_path / "big.pt").write_bytes(os.urandom(5000))
    saved_model.keep(tmp_path / "big.pt", tmp_path / "model.pt")
    assert (tmp_path / "model.pt").stat().st_size == 1001
    result = saved_model.inspect(tmp_path / "model.pt", *test_set)
    assert result.status == "rejected" and "byte limit" in result.message


class _View:
    """Pickles as a tensor of ``size`` and ``stride`` over ``storage``, as torch.save writes one,
    whatever the storage holds: a hand-made file that claims more than it stores."""

    def __init__(self, storage, size, stride):
        self.storage, self.size, self.stride = storage, size, stride

    def __reduce_ex__(self, protocol):
        return (torch._utils._rebuild_tensor_v2,
                (self.storage, 0, self.size, self.stride, False, collections.OrderedDict()))


def _inspect_in_a_fresh_process(files: dict[str, Path]) -> dict:
    """Inspect each file in a new interpreter capped at 8 GiB of address space (so that a regression
    fails there rather than exhausting the machine), and report how far its peak RSS rose above
    its RSS before (the peak is reset first: importing torch peaks higher than it then stays)."""
    script = textwrap.dedent(f"""
        import json, resource
        resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))
        from pathlib import Path
        import torch
        from grader import saved_model

        def status_kb(field):
            line = next(l for l in open("/proc/self/status") if l.startswith(field + ":"))
            return int(line.split()[1])

        test_x, test_y = torch.rand(200, 1, 28, 28), torch.randint(10, (200,))
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # the peak (VmHWM) starts again from the RSS now
        before_kb = status_kb("VmRSS")
        found = {{name: saved_model.inspect(Path(path), test_x, test_y)
                 for name, path in {({k: str(v) for k, v in files.items()})!r}.items()}}
        grew_kb = status_kb("VmHWM") - before_kb
        print(json.dumps({{"grew_kb": grew_kb, **{{n: [r.status, r.message] for n, r in found.items()}}}}))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_shapes_are_capped_before_anything_is_allocated(tmp_path):
    one = torch.zeros(1)
    # 2 kB on disk, ten billion values loaded: stride-0 views of one stored value.
    torch.save({"1.weight": one.expand(100_000, 100_000), "1.bias": one.expand(100_000),
                "2.weight": one.expand(10, 100_000), "2.bias": torch.zeros(10)}, tmp_path / "expanded.pt")
    # Within the values cap, but a layer of 5,000 units.
    torch.save({"1.weight": one.expand(5_000, 784), "1.bias": one.expand(5_000),
                "2.weight": one.expand(10, 5_000), "2.bias": torch.zeros(10)}, tmp_path / "wide.pt")
    # A 100,000 x 100,000 view with ordinary strides over a storage of four values.
    torch.save({"1.weight": _View(torch.zeros(4).untyped_storage(), (100_000, 100_000), (100_000, 1)),
                "1.bias": torch.zeros(10)}, tmp_path / "overreach.pt")
    names = ("expanded", "wide", "overreach")
    assert all((tmp_path / f"{name}.pt").stat().st_size < 4000 for name in names)
    found = _inspect_in_a_fresh_process({name: tmp_path / f"{name}.pt" for name in names})
    assert found["grew_kb"] < 200 * 1024, found  # not the 10-40 GB the shapes claim
    status, message = found["expanded"]
    assert status == "rejected" and "describes 10,001,100,010 weight values" in message
    assert "more than its" in message and f"at most {saved_model.MAX_VALUES:,}" in message
    status, message = found["wide"]
    assert status == "rejected" and f"at most {saved_model.MAX_WIDTH:,} units" in message
    status, message = found["overreach"]
    assert status == "unloadable" and "could not be loaded as weights" in message
