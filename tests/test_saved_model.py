"""The saved model is read as weights only: payloads never run, and the messages say what to do."""
from __future__ import annotations

import os
import pickle
import zipfile

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
