"""The expected behaviour of the lab, measured by running the reference on a provisioned dataset.

Nothing in a spec is typed in: sizes, shapes and intensities come from the data, the history and
test accuracy from seeded, single-threaded training, and the grading threshold from that accuracy
minus a documented margin. Regenerating a spec with the same torch build on the same CPU gives the
same bytes; on another CPU the training's float sums may round differently (measured: an Intel and
an AMD EPYC machine differed in a per-epoch loss at the 7th significant digit, 1.6e-7 relative), so
:func:`differences` compares a regenerated spec's floats with a tolerance and everything else
exactly. No verdict depends on those bits: grading reads the committed spec's threshold, and the
probe's reference answers are computed on the grading machine itself.

Which spec grading uses (:attr:`Spec.source`):

``pinned (PATH)``
    a spec file named on the command line (``--spec``), made with ``labgrader reference --out`` so
    that every grader of a course expects the same; refused unless it was made from the very files
    provisioned here (its ``data_sha256``).
``committed``
    ``reference/specs/<profile>.json``, for the profiles that are graded offline (``mnist-sample``,
    ``fashion-mnist``), when it was made from the files provisioned here.
``derived (PATH)``
    otherwise (full MNIST, or other files): made by running the reference on the provisioned data
    (:func:`derive`) and kept in ``<cache_home>/specs/``, under a key of exactly what determines
    the spec: the data's hashes, the torch and torchvision builds and the reference's code. Measured
    on a busy 2-core machine: 17 s for 60000 training images.
"""
from __future__ import annotations

import hashlib
import json
import math
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reference.provision import RAW_FILES, cache_home
from reference import atomic

if TYPE_CHECKING:
    from reference.provision import Provisioned

SPEC_FORMAT = 1
SPECS_DIR = Path(__file__).parent / "specs"

SEED = 0
EPOCHS = 5
BATCH_SIZE = 64
LEARNING_RATE = 0.01
# A student's saved model passes if its test accuracy is within this of the reference's. Students
# train with other seeds, shuffling and architectures: measured here with 10 seeds and shuffled
# batches, the reference's own accuracy spread over 0.903-0.922 on the MNIST sample and 0.826-0.839
# on Fashion-MNIST (4 seeds), so 0.05 leaves room for honest variation, while an untrained model
# (accuracy near 0.1) fails.
ACCURACY_MARGIN = 0.05


# What a derived spec depends on besides its data and the torch build (the cache key holds a digest).
_CODE_FILES = ("model.py", "training.py", "data.py", "spec.py")


class SpecError(ValueError):
    """No usable spec: the message, one line, says why and what to do."""


@dataclass(frozen=True)
class Spec:
    """A loaded spec; ``version`` is a digest of its content, so any change is visible; ``source``
    says where it came from (see the module doc)."""

    content: dict[str, Any]
    version: str
    source: str = "committed"

    @property
    def profile(self) -> str:
        return self.content["profile"]

    @property
    def dataset(self) -> dict[str, Any]:
        return self.content["dataset"]

    @property
    def min_accuracy(self) -> float:
        return self.content["thresholds"]["saved_model_min_accuracy"]


def generate(provisioned: "Provisioned") -> dict[str, Any]:
    """Run the reference end to end on ``provisioned`` and return the spec's content."""
    # Imported here, not above: grading only loads specs, and a regrade should not pay for torch.
    import torch
    import torchvision

    from reference import data, model, training

    hashes = _hashes_on_disk(provisioned)
    if hashes != provisioned.sha256:
        changed = [name for name in RAW_FILES if hashes[name] != provisioned.sha256[name]]
        raise SpecError(f"{provisioned.root / provisioned.torchvision_class / 'raw'}: {', '.join(changed)} "
                        "changed since provisioning; run `labgrader data` again")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # more threads change the last bits of the sums
    try:
        data_train, data_test = data.load(provisioned.root, provisioned.torchvision_class)
        dataset_facts = data.facts(data_train, data_test)
        train_x, train_y = data.as_tensors(data_train)
        test_x, test_y = data.as_tensors(data_test)
        net = model.make_model(seed=SEED)
        optimizer = torch.optim.Adam(net.parameters(), lr=LEARNING_RATE)
        history = training.train(net, data.loader(train_x, train_y, BATCH_SIZE),
                                 data.loader(test_x, test_y, BATCH_SIZE),
                                 optimizer=optimizer, epochs=EPOCHS)
        test_accuracy = float((training.predict(net, test_x) == test_y).float().mean())
    finally:
        torch.set_num_threads(threads)
    return {
        "format": SPEC_FORMAT,
        "profile": provisioned.profile,
        "is_sample": provisioned.is_sample,
        "torchvision_class": provisioned.torchvision_class,
        "dataset": dataset_facts.to_json(),
        "data_sha256": hashes,
        "training": {"seed": SEED, "epochs": EPOCHS, "batch_size": BATCH_SIZE,
                     "optimizer": "Adam", "lr": LEARNING_RATE, "loss": "NLLLoss", "threads": 1},
        "history": dict(history),
        "test_accuracy": test_accuracy,
        "thresholds": {
            "accuracy_margin": ACCURACY_MARGIN,
            "saved_model_min_accuracy": round(test_accuracy - ACCURACY_MARGIN, 4),
        },
        "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__,
                     "python": platform.python_version()},
    }


# Floats from training agree across CPUs to about 1e-7 relative (above); a real change to the
# reference, its data or its seed moves losses by percents. Accuracies are counts over the test set:
# a rounding difference could flip an argmax tie, so they may differ by up to two items.
FLOAT_REL_TOL = 1e-4
ACCURACY_ITEMS_TOL = 2


def differences(generated: dict[str, Any], committed: dict[str, Any]) -> list[str]:
    """Where ``generated`` differs from ``committed`` beyond what another CPU explains: floats within
    :data:`FLOAT_REL_TOL` (accuracies within :data:`ACCURACY_ITEMS_TOL` test items), the rest exact.
    The ``versions`` block is left out: it records where a spec was made, not what it says."""
    items = committed.get("dataset", {}).get("test_size") or 1
    found: list[str] = []

    def walk(a: Any, b: Any, where: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                if key == "versions" and not where:
                    continue
                if key not in a or key not in b:
                    found.append(f"{where}{key}: only in the {'committed' if key in b else 'generated'} spec")
                else:
                    walk(a[key], b[key], f"{where}{key}.")
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            for i, (x, y) in enumerate(zip(a, b)):
                walk(x, y, f"{where}{i}.")
        elif isinstance(a, float) and isinstance(b, float):
            accuracy = "acc" in where or "accuracy" in where
            if not (abs(a - b) * items <= ACCURACY_ITEMS_TOL + 1e-9 if accuracy
                    else math.isclose(a, b, rel_tol=FLOAT_REL_TOL)):
                found.append(f"{where.rstrip('.')}: {a!r} != {b!r}")
        elif a != b or type(a) is not type(b):
            found.append(f"{where.rstrip('.')}: {a!r} != {b!r}")

    walk(generated, committed, "")
    return found


def dumps(content: dict[str, Any]) -> str:
    return json.dumps(content, indent=2, sort_keys=True) + "\n"


def write(content: dict[str, Any], path: Path) -> None:
    atomic.write(path, dumps(content))  # two graders may derive the same spec at once


def path_for(profile: str) -> Path:
    return SPECS_DIR / f"{profile}.json"


def load(profile: str, path: Path | None = None) -> Spec:
    """The committed spec of ``profile`` (or the file at ``path``)."""
    path = path or path_for(profile)
    try:
        return _read(path, "committed")
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no spec for data profile {profile!r} at {path}; "
            f"create it with: labgrader reference --dataset ...") from None


def _read(path: Path, source: str) -> Spec:
    text = path.read_text()
    try:
        content = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SpecError(f"{path}: not a spec (invalid JSON: {exc})") from None
    if not isinstance(content, dict) or content.get("format") != SPEC_FORMAT:
        found = content.get("format") if isinstance(content, dict) else None
        raise SpecError(f"{path}: spec format {found!r}, expected {SPEC_FORMAT}")
    return Spec(content=content, version=f"{SPEC_FORMAT}-{hashlib.sha256(text.encode()).hexdigest()[:12]}",
                source=source)


def data_differences(content: dict[str, Any], provisioned: "Provisioned") -> list[str]:
    """How the data a spec was made from differs from ``provisioned``; empty when it is the same."""
    recorded = content.get("data_sha256")
    if not isinstance(recorded, dict):
        return ["it records no data hashes (made by an older labgrader)"]
    found = []
    if content.get("profile") != provisioned.profile:
        found.append(f"it was made on the {content.get('profile')} profile, the data here is {provisioned.profile}")
    for name in RAW_FILES:
        if recorded.get(name) != provisioned.sha256[name]:
            split = "training" if name.startswith("train") else "test"
            found.append(f"{name} (the {split} {RAW_FILES[name]}) differs")
    return found


def pinned(path: Path, provisioned: "Provisioned") -> Spec:
    """The spec file at ``path``, which must have been made from the provisioned files."""
    try:
        found = _read(path, f"pinned ({path})")
    except OSError as exc:
        raise SpecError(f"{path}: cannot read the spec: {exc.strerror or exc}") from None
    differing = data_differences(found.content, provisioned)
    if differing:
        raise SpecError(
            f"{path} was not made from the {provisioned.profile} data at {provisioned.root}: "
            f"{'; '.join(differing)}. Grade with the data it was made from, or make a spec for this "
            f"data with `labgrader reference --out`")
    return found


def committed(provisioned: "Provisioned") -> Spec | None:
    """The committed spec of the provisioned profile, if there is one and it was made from these files."""
    path = path_for(provisioned.profile)
    if not path.is_file():
        return None
    found = _read(path, "committed")
    return None if data_differences(found.content, provisioned) else found


def cache_path(provisioned: "Provisioned") -> Path:
    """Where the spec derived for ``provisioned`` by this torch build and reference code is kept."""
    from importlib import metadata

    # The installed distributions' versions, not ``torch.__version__``: the same string (with its
    # build tag, e.g. "+cpu") without importing torch, which a regrade from kept runs never does.
    key = {"data_sha256": provisioned.sha256,
           "builds": {name: metadata.version(name) for name in ("torch", "torchvision")},
           "code": hashlib.sha256(b"".join((Path(__file__).parent / name).read_bytes()
                                           for name in _CODE_FILES)).hexdigest()}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_home() / "specs" / f"{provisioned.profile}-{digest}.json"


def cached(provisioned: "Provisioned") -> Spec | None:
    """The spec derived for ``provisioned`` before, if it is in the cache and readable."""
    path = cache_path(provisioned)
    try:
        return _read(path, f"derived ({path})")
    except (OSError, SpecError):  # absent, or damaged: derived again
        return None


def derive(provisioned: "Provisioned") -> Spec:
    """Run the reference on ``provisioned`` and keep the spec in the cache (:func:`cache_path`)."""
    path = cache_path(provisioned)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)  # fails now rather than after the training
        content = generate(provisioned)
        write(content, path)
        return _read(path, f"derived ({path})")
    except SpecError:
        raise
    except (OSError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise SpecError(f"could not derive the spec from the {provisioned.profile} data at {provisioned.root}: "
                        f"{type(exc).__name__}: {first}") from None


def _hashes_on_disk(provisioned: "Provisioned") -> dict[str, str]:
    raw = provisioned.root / provisioned.torchvision_class / "raw"
    return {name: hashlib.sha256((raw / name).read_bytes()).hexdigest() for name in RAW_FILES}
