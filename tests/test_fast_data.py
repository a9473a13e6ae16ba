"""The fast data path (grader/probe/inkernel.py ``_install_fast_data``) against torchvision's stock path.

The fast path serves ``MNIST[i]`` from a tensor converted once when the transform is exactly
``ToTensor()``; it must give bitwise what torchvision gives, on every sample of every provisioned
dataset, and step aside for anything else. The patch is undone after each test (``MNIST.__getitem__``
is restored and ``MNIST.__getitems__`` removed by monkeypatch), so the rest of the suite sees stock
torchvision.
"""
from __future__ import annotations

import json
import os

import nbformat
import numpy as np
import pytest
import torch
import torchvision
from nbformat import v4
from torchvision.datasets import MNIST, FashionMNIST
from torchvision.transforms import Compose, Normalize, ToTensor

from grader.probe import inkernel

STOCK_GETITEM = MNIST.__getitem__
BATCH = 1000


@pytest.fixture
def fast_data(monkeypatch):
    """Install the fast path for one test; monkeypatch puts the stock ``__getitem__`` back and takes
    ``__getitems__`` (which stock torchvision lacks) away."""
    monkeypatch.setattr(MNIST, "__getitem__", STOCK_GETITEM)
    monkeypatch.setattr(MNIST, "__getitems__", None, raising=False)
    monkeypatch.setattr(torchvision.datasets.mnist, "_labgrader_fast_data", False, raising=False)
    inkernel._install_fast_data()
    assert MNIST.__getitem__ is not STOCK_GETITEM
    yield
    # monkeypatch restores MNIST.__getitem__ and the flag after this


class _Stock(torch.utils.data.Dataset):
    """A dataset read through torchvision's own ``__getitem__``, whatever MNIST's is now."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        return STOCK_GETITEM(self.dataset, index)


def _open(provisioned, train: bool, cls=None, **kw):
    cls = cls or getattr(torchvision.datasets, provisioned.torchvision_class)
    return cls(str(provisioned.root), train=train, **kw)


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(torch.int32) if tensor.dtype == torch.float32 else tensor.view(torch.int64)


def _same_item(fast, stock) -> None:
    (fast_x, fast_y), (stock_x, stock_y) = fast, stock
    assert type(fast_x) is type(stock_x)
    if isinstance(stock_x, torch.Tensor):
        assert fast_x.dtype == stock_x.dtype and fast_x.shape == stock_x.shape
        assert fast_x.stride() == stock_x.stride()
        assert torch.equal(_bits(fast_x), _bits(stock_x))
    else:  # a PIL image (no transform)
        assert np.array_equal(np.asarray(fast_x), np.asarray(stock_x))
    assert type(fast_y) is type(stock_y) and fast_y == stock_y


def _same_outcome(dataset, index) -> None:
    """The same item, or the same exception, as torchvision's own ``__getitem__``."""
    try:
        stock = STOCK_GETITEM(dataset, index)
    except Exception as error:  # noqa: BLE001 - whatever torchvision raises, the patch must too
        with pytest.raises(type(error)):
            dataset[index]
    else:
        _same_item(dataset[index], stock)


@pytest.mark.parametrize("profile", ["mnist_sample_root", "fashion_root"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "test"])
def test_fast_path_is_bitwise_identical_on_every_sample(request, fast_data, profile, train):
    provisioned = request.getfixturevalue(profile)
    dataset = _open(provisioned, train, transform=ToTensor())
    assert len(dataset) == (provisioned.train_size if train else provisioned.test_size)
    stock = torch.utils.data.DataLoader(_Stock(dataset), batch_size=BATCH, num_workers=0)
    # The stock items' types and strides, from a few samples read one by one.
    for index in (0, 1, len(dataset) - 1):
        _same_item(dataset[index], STOCK_GETITEM(dataset, index))
    start = 0
    for stock_x, stock_y in stock:
        items = [dataset[i] for i in range(start, start + len(stock_y))]
        assert all(type(y) is int for _, y in items)
        fast_x = torch.stack([x for x, _ in items])
        assert fast_x.dtype == stock_x.dtype == torch.float32 and fast_x.shape == stock_x.shape
        assert torch.equal(_bits(fast_x), _bits(stock_x)), f"items {start}..{start + len(stock_y)} differ"
        assert [y for _, y in items] == stock_y.tolist()
        start += len(stock_y)
    assert start == len(dataset)
    assert "_labgrader_tensor" in dataset.__dict__  # the fast path did serve these


class MyMNIST(MNIST):
    """A student's subclass; it reads the same files."""

    @property
    def raw_folder(self) -> str:
        return os.path.join(self.root, "MNIST", "raw")


class MyToTensor(ToTensor):
    def __call__(self, pic):
        return super().__call__(pic) * 2


@pytest.mark.parametrize("make", [
    pytest.param(lambda root: _open(root, True, transform=Compose([ToTensor(), Normalize((0.1307,), (0.3081,))])),
                 id="compose-normalize"),
    pytest.param(lambda root: _open(root, True, transform=lambda image: ToTensor()(image) * 2), id="lambda"),
    pytest.param(lambda root: _open(root, True, transform=MyToTensor()), id="totensor-subclass"),
    pytest.param(lambda root: _open(root, True, transform=ToTensor(), target_transform=lambda y: y + 1),
                 id="target-transform"),
    pytest.param(lambda root: _open(root, True, cls=MyMNIST, transform=ToTensor()), id="mnist-subclass"),
    pytest.param(lambda root: _open(root, True), id="no-transform"),
])
def test_anything_else_takes_the_stock_path(mnist_sample_root, fast_data, make):
    dataset = make(mnist_sample_root)
    indices = [*range(50), len(dataset) - 1]
    for index in indices:
        _same_item(dataset[index], STOCK_GETITEM(dataset, index))
    for fast, index in zip(dataset.__getitems__(indices), indices):
        _same_item(fast, STOCK_GETITEM(dataset, index))
    assert "_labgrader_tensor" not in dataset.__dict__


def _loader(dataset, seed: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(dataset, batch_size=64, shuffle=True,
                                       generator=torch.Generator().manual_seed(seed))


def _same_batches(fast_loader, stock_loader) -> int:
    count = 0
    for (fast_x, fast_y), (stock_x, stock_y) in zip(fast_loader, stock_loader, strict=True):
        assert fast_x.dtype == stock_x.dtype and fast_x.shape == stock_x.shape
        assert torch.equal(_bits(fast_x), _bits(stock_x)) and torch.equal(fast_y, stock_y)
        count += 1
    return count


def test_a_dataloaders_batches_are_bitwise_the_stock_ones(fashion_root, fast_data):
    dataset = _open(fashion_root, False, transform=ToTensor())
    count = _same_batches(_loader(dataset, 5), _loader(_Stock(dataset), 5))
    assert count == -(-len(dataset) // 64)
    # The batch came from one gather: its items are views of one new tensor, not of the cache.
    first, second = dataset.__getitems__([3, 8])
    assert first[0].untyped_storage().data_ptr() == second[0].untyped_storage().data_ptr()
    cache = dataset.__dict__["_labgrader_tensor"][5]
    assert first[0].untyped_storage().data_ptr() != cache.untyped_storage().data_ptr()
    _same_item(first, STOCK_GETITEM(dataset, 3))


def test_a_random_split_is_served_in_batches_too(mnist_sample_root, fast_data):
    dataset = _open(mnist_sample_root, True, transform=ToTensor())
    split = torch.utils.data.random_split(dataset, [0.8, 0.2], generator=torch.Generator().manual_seed(1))
    stock_split = [torch.utils.data.Subset(_Stock(dataset), part.indices) for part in split]
    for part, stock_part in zip(split, stock_split):
        assert _same_batches(_loader(part, 2), _loader(stock_part, 2)) > 0
    assert "_labgrader_tensor" in dataset.__dict__


@pytest.mark.parametrize("indices", [
    pytest.param([0, -1, 4], id="negative"),
    pytest.param([2, 10**6], id="out-of-range"),
    pytest.param([np.int64(3), 7], id="numpy-int"),
    pytest.param([torch.tensor(3)], id="tensor"),
    pytest.param([], id="empty"),
])
def test_a_batch_of_any_indices_has_the_stock_outcome(mnist_sample_root, fast_data, indices):
    dataset = _open(mnist_sample_root, False, transform=ToTensor())
    try:
        stock = [STOCK_GETITEM(dataset, index) for index in indices]
    except Exception as error:  # noqa: BLE001 - whatever torchvision raises, the patch must too
        with pytest.raises(type(error)):
            dataset.__getitems__(indices)
    else:
        fast = dataset.__getitems__(indices)
        assert len(fast) == len(stock)
        for fast_item, stock_item in zip(fast, stock):
            _same_item(fast_item, stock_item)


def test_targets_shorter_than_data_fail_as_the_stock_path_does(mnist_sample_root, fast_data):
    dataset = _open(mnist_sample_root, False, transform=ToTensor())
    dataset.targets = dataset.targets[:10]  # a student's half-done subset
    assert len(dataset.__getitems__([0, 9])) == 2
    with pytest.raises(IndexError, match="out of bounds"):  # torch's words, from the stock path
        dataset.__getitems__([5, 10])


def test_a_getitem_the_notebook_replaced_serves_its_batches(mnist_sample_root, fast_data, monkeypatch):
    dataset = _open(mnist_sample_root, False, transform=ToTensor())
    dataset[0]  # the converted copy exists, and must not be used behind the notebook's back
    monkeypatch.setattr(MNIST, "__getitem__", lambda self, index: (torch.full((1, 2), float(index)), index))
    images, labels = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4)))
    assert labels.tolist() == [0, 1, 2, 3] and images[:, 0, 0].tolist() == [0.0, 1.0, 2.0, 3.0]


def test_fashion_mnist_is_served_fast_and_its_subclasses_are_not(fashion_root, fast_data):
    class MyFashion(FashionMNIST):
        @property
        def raw_folder(self) -> str:
            return os.path.join(self.root, "FashionMNIST", "raw")

    fast, sub = _open(fashion_root, False, transform=ToTensor()), _open(fashion_root, False, cls=MyFashion,
                                                                        transform=ToTensor())
    _same_item(fast[7], STOCK_GETITEM(fast, 7))
    _same_item(sub[7], STOCK_GETITEM(sub, 7))
    assert "_labgrader_tensor" in fast.__dict__ and "_labgrader_tensor" not in sub.__dict__


def test_in_place_edit_of_a_returned_tensor_does_not_change_later_reads(mnist_sample_root, fast_data):
    dataset = _open(mnist_sample_root, True, transform=ToTensor())
    image, _ = dataset[3]
    expected = STOCK_GETITEM(dataset, 3)[0]
    image.mul_(0).add_(7)
    image2, _ = dataset[3]
    assert torch.equal(image2, expected)
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=8)))[0]
    batch.zero_()
    assert torch.equal(dataset[3][0], expected)


def test_changed_data_targets_or_default_dtype_are_followed(mnist_sample_root, fast_data):
    dataset = _open(mnist_sample_root, True, transform=ToTensor())
    dataset[0]  # build the converted copy
    dataset.data = dataset.data[100:200]  # a subset, as students sometimes make
    dataset.targets = dataset.targets[100:200]
    for index in (0, 99):
        _same_item(dataset[index], STOCK_GETITEM(dataset, index))
    dataset.data[5] = 255 - dataset.data[5]  # edited in place
    dataset.targets[5] = (dataset.targets[5] + 1) % 10
    _same_item(dataset[5], STOCK_GETITEM(dataset, 5))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        _same_item(dataset[6], STOCK_GETITEM(dataset, 6))
        assert dataset[6][0].dtype == torch.float64
    finally:
        torch.set_default_dtype(previous)
    dataset.data = dataset.data.float()  # not uint8 any more: the stock path decides what happens
    _same_outcome(dataset, 0)
    assert dataset.__dict__["_labgrader_tensor"][0] is not dataset.data


@pytest.mark.parametrize("index", [np.int64(9), torch.tensor(9), -1])
def test_integer_like_indices_match(mnist_sample_root, fast_data, index):
    dataset = _open(mnist_sample_root, False, transform=ToTensor())
    _same_item(dataset[index], STOCK_GETITEM(dataset, index))


@pytest.mark.parametrize("index", [slice(0, 3), torch.tensor([1]), True, [1, 2]])
def test_other_indices_take_the_stock_path(mnist_sample_root, fast_data, index):
    _same_outcome(_open(mnist_sample_root, False, transform=ToTensor()), index)


# ---------------------------------------------------------------------------------------------
# --no-fast-data is honoured and shown

_FLAG_NOTEBOOK = v4.new_notebook(cells=[v4.new_code_cell(
    "import torchvision\n"
    "from torchvision.transforms import ToTensor\n"
    "data_train = torchvision.datasets.MNIST('./data', train=True, transform=ToTensor())\n"
    "data_train[0]\n"
    "print('FAST', getattr(torchvision.datasets.mnist, '_labgrader_fast_data', False),\n"
    "      '_labgrader_tensor' in data_train.__dict__)")])


def _printed(result_dir) -> str:
    executed = nbformat.read(result_dir, as_version=4)
    return "".join(o.get("text", "") for o in executed.cells[0].outputs)


def test_no_fast_data_is_used_recorded_and_reported(tmp_path, mnist_sample_root, monkeypatch):
    from grader import cli

    monkeypatch.setenv("LABGRADER_HOME", str(tmp_path / "home"))  # where check keeps its run
    notebook = tmp_path / "flag.ipynb"
    nbformat.write(_FLAG_NOTEBOOK, notebook)
    out = tmp_path / "out"
    code = cli.main(["check", str(notebook), "--out", str(out), "--dataset", "mnist",
                     "--root", str(mnist_sample_root.root), "--no-fast-data", "--quiet"])
    assert code in (0, 1)  # the notebook fails most checks; what matters is what was recorded
    [result_file] = list(out.glob("*/result.json"))
    result = json.loads(result_file.read_text())
    assert result["status"] == "graded" and result["fast_data"] is False
    report = (result_file.parent / "report.html").read_text()
    assert "Fast data path</dt><dd>no</dd>" in report
    [run] = list((tmp_path / "home" / "check-runs").glob("*/*"))
    assert _printed(run / "executed.ipynb").split() == ["FAST", "False", "False"]
    assert json.loads((run / "key.json").read_text())["fast_data"] is False


def test_fast_data_is_used_recorded_and_reported(tmp_path, mnist_sample_root):
    from grader import batch, intake, pipeline, resources, score
    from reference import spec

    notebook = tmp_path / "flag.ipynb"
    nbformat.write(_FLAG_NOTEBOOK, notebook)
    config = pipeline.Config(provisioned=mnist_sample_root, spec=spec.load(mnist_sample_root.profile),
                             rubric=score.load_rubric(resources.RUBRIC_PATH), runs_dir=tmp_path / "runs")
    assert config.fast_data is True  # the default
    [submission] = intake.collect([notebook])
    result = pipeline.grade(submission, config)
    assert result.status == "graded" and result.fast_data is True
    layout = batch.Layout(tmp_path / "out")
    batch.write_result(result, layout)
    assert "Fast data path</dt><dd>yes</dd>" in layout.report(result.submission_id).read_text()
    printed = _printed(tmp_path / "runs" / submission.id / "executed.ipynb")
    assert printed.split() == ["FAST", "True", "True"]
