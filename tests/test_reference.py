"""The reference implementation: dataset facts, the model, training semantics, determinism, specs."""
from __future__ import annotations

import dataclasses
import json
import re
import shutil

import pytest
import torch
from torch import nn

from reference import data, model, plots, spec, training


@pytest.fixture(scope="module")
def sample(mnist_sample_root):
    return data.load(mnist_sample_root.root, mnist_sample_root.torchvision_class)


def test_facts_match_the_data_on_disk(sample, mnist_sample_root):
    facts = data.facts(*sample)
    assert (facts.train_size, facts.test_size) == (mnist_sample_root.train_size, mnist_sample_root.test_size)
    assert facts.sample_shape == [1, 28, 28] and facts.sample_dtype == "float32"
    assert facts.min_intensity == 0.0 and facts.max_intensity == 1.0
    assert facts.labels == list(range(10))
    assert facts.first_labels == [int(sample[0].targets[i]) for i in range(10)]


def test_fast_tensors_are_bitwise_totensor(sample):
    features, labels = data.as_tensors(sample[0])
    for index in (0, 1, len(sample[0]) - 1):
        image, label = sample[0][index]
        assert torch.equal(features[index], image) and labels[index] == label


def test_split_read_from_the_files_equals_torchvisions(sample, mnist_sample_root):
    for dataset, train in zip(sample, (True, False)):
        features, labels = data.read_split(mnist_sample_root.root, mnist_sample_root.torchvision_class, train)
        expected_features, expected_labels = data.as_tensors(dataset)
        assert torch.equal(features, expected_features) and torch.equal(labels, expected_labels)
        assert labels.dtype == expected_labels.dtype


def test_model_gives_log_probabilities_per_image():
    out = model.make_model(seed=1)(torch.rand(5, 1, 28, 28))
    assert out.shape == (5, 10)
    torch.testing.assert_close(out.exp().sum(dim=1), torch.ones(5))


def test_seeded_models_start_identical_and_leave_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b = model.make_model(seed=3), model.make_model(seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a[1].weight, model.make_model(seed=4)[1].weight)


def _train_once(sample, seed):
    torch.set_num_threads(1)
    (train_x, train_y), (test_x, test_y) = data.as_tensors(sample[0]), data.as_tensors(sample[1])
    net = model.make_model(seed=seed)
    history = training.train(net, data.loader(train_x[:1024], train_y[:1024]), data.loader(test_x, test_y),
                             optimizer=torch.optim.Adam(net.parameters(), lr=0.01), epochs=2)
    return net, history


def test_training_is_bit_for_bit_deterministic(sample):
    (net_a, hist_a), (net_b, hist_b) = _train_once(sample, 7), _train_once(sample, 7)
    assert hist_a == hist_b
    assert all(torch.equal(x, y) for x, y in zip(net_a.parameters(), net_b.parameters()))


def test_history_has_the_labs_keys_and_improves(sample):
    _, history = _train_once(sample, 0)
    assert list(history) == ["train_loss", "train_acc", "val_loss", "val_acc"]
    assert all(len(values) == 2 for values in history.values())
    assert history["train_loss"][1] < history["train_loss"][0]


def test_loss_is_the_labs_sum_of_batch_means_over_items():
    features, labels = torch.rand(128, 1, 28, 28), torch.randint(10, (128,))
    net = model.make_model(seed=0)
    loss, accuracy = training.validate(net, data.loader(features, labels, 64))
    with torch.no_grad():
        out = net(features)
        batch_means = [nn.functional.nll_loss(out[i:i + 64], labels[i:i + 64]).item() for i in (0, 64)]
    assert loss == pytest.approx(sum(batch_means) / 128, rel=1e-6)
    assert accuracy == (out.argmax(1) == labels).sum().item() / 128


def test_train_epoch_keeps_no_graph_and_validate_changes_nothing():
    features, labels = torch.rand(128, 1, 28, 28), torch.randint(10, (128,))
    net = model.make_model(seed=0)
    loss, accuracy = training.train_epoch(net, data.loader(features, labels, 64))
    assert isinstance(loss, float) and isinstance(accuracy, float)
    before = [p.clone() for p in net.parameters()]
    training.validate(net, data.loader(features, labels, 64))
    assert not net.training
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))


def test_weights_round_trip_through_state_dict(tmp_path):
    net = model.make_model(seed=2)
    model.save_weights(net, tmp_path / "mnist_cnn.pt")
    loaded = model.load_weights(tmp_path / "mnist_cnn.pt")
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), loaded.parameters()))


def test_plots_draw_the_labs_figures(sample):
    net, history = _train_once(sample, 0)
    assert len(plots.samples(sample[0]).axes) == 7
    assert len(plots.history(history).axes) == 2
    assert len(plots.weights(net).axes) == 10
    assert plots.first_layer_weights(net).shape == (10, 784)


@pytest.mark.slow
@pytest.mark.parametrize("fixture", ["mnist_sample_root", "fashion_root"])
def test_committed_spec_regenerates_within_cpu_rounding(fixture, request):
    provisioned = request.getfixturevalue(fixture)
    generated = json.loads(spec.dumps(spec.generate(provisioned)))
    committed = json.loads(spec.path_for(provisioned.profile).read_text())
    assert spec.differences(generated, committed) == []
    assert generated["thresholds"]["saved_model_min_accuracy"] == pytest.approx(
        generated["test_accuracy"] - spec.ACCURACY_MARGIN, abs=1e-4)


@pytest.mark.slow
def test_reference_reaches_080_on_full_fashion_mnist(fashion_root):
    content = json.loads(spec.path_for(fashion_root.profile).read_text())
    assert content["dataset"]["train_size"] == 60000 and content["dataset"]["test_size"] == 10000
    assert content["test_accuracy"] >= 0.80
    assert content["history"]["val_acc"][-1] == pytest.approx(content["test_accuracy"])


def test_spec_differences_tolerate_cpu_rounding_only():
    committed = json.loads(spec.path_for("mnist-sample").read_text())
    rounded = json.loads(json.dumps(committed))
    rounded["history"]["train_loss"][0] *= 1 + 2e-7  # what an AMD and an Intel CPU differed by
    rounded["history"]["val_acc"][1] += 1 / committed["dataset"]["test_size"]  # one argmax tie
    rounded["versions"] = {"torch": "another build"}
    assert spec.differences(rounded, committed) == []
    changed = json.loads(json.dumps(committed))
    changed["history"]["train_loss"][0] *= 1.01
    changed["history"]["val_acc"][1] += 3 / committed["dataset"]["test_size"]
    changed["dataset"]["train_size"] += 1
    changed["training"]["optimizer"] = "SGD"
    found = spec.differences(changed, committed)
    assert [line.split(":")[0] for line in found] == [
        "dataset.train_size", "history.train_loss.0", "history.val_acc.1", "training.optimizer"]


def test_spec_load_reports_a_missing_profile(tmp_path):
    with pytest.raises(FileNotFoundError, match="no spec for data profile 'nope'"):
        spec.load("nope", tmp_path / "nope.json")


def test_committed_specs_record_the_data_they_were_made_from(mnist_sample_root):
    found = spec.committed(mnist_sample_root)
    assert found is not None and found.source == "committed"
    assert found.content["data_sha256"] == mnist_sample_root.sha256
    assert found.version == spec.load("mnist-sample").version
    other = dataclasses.replace(mnist_sample_root, sha256={**mnist_sample_root.sha256,
                                                           "train-labels-idx1-ubyte": "0" * 64})
    assert spec.committed(other) is None  # other files: derived instead
    assert spec.data_differences(found.content, other) == ["train-labels-idx1-ubyte (the training labels) differs"]


def test_derived_specs_are_cached_by_data_and_build(mnist_sample_root, tmp_path, monkeypatch):
    monkeypatch.delenv("LABGRADER_HOME", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = spec.cache_path(mnist_sample_root)
    assert path.parent == tmp_path / "labgrader" / "specs" and path.name.startswith("mnist-sample-")
    assert spec.cache_path(dataclasses.replace(mnist_sample_root, root=tmp_path / "elsewhere")) == path
    other = dataclasses.replace(mnist_sample_root, sha256={**mnist_sample_root.sha256, "t10k-images-idx3-ubyte": "0" * 64})
    assert spec.cache_path(other) != path
    from importlib import metadata
    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda name: "0+other" if name == "torch" else real(name))
    assert spec.cache_path(mnist_sample_root) != path
    monkeypatch.setattr(metadata, "version", real)
    assert spec.cached(mnist_sample_root) is None
    path.parent.mkdir(parents=True)
    path.write_text("{truncated")  # damaged: treated as absent, derived again
    assert spec.cached(mnist_sample_root) is None
    shutil.copy(spec.path_for("mnist-sample"), path)
    assert spec.cached(mnist_sample_root).source == f"derived ({path})"


def test_pinned_specs_that_cannot_be_checked_are_refused(mnist_sample_root, tmp_path):
    old = json.loads(spec.path_for("mnist-sample").read_text())
    del old["data_sha256"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    (tmp_path / "broken.json").write_text("{")
    for name, says in [("old.json", "it records no data hashes (made by an older labgrader)"),
                       ("broken.json", "not a spec (invalid JSON"),
                       ("missing.json", "cannot read the spec: No such file or directory")]:
        with pytest.raises(spec.SpecError, match=re.escape(says)):
            spec.pinned(tmp_path / name, mnist_sample_root)
    assert spec.pinned(spec.path_for("mnist-sample"), mnist_sample_root).source == (
        f"pinned ({spec.path_for('mnist-sample')})")
