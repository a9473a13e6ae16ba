"""The full-size MNIST path, as an instructor with the real files takes it: `labgrader data --dataset
mnist --data-dir DIR`, then `labgrader check` and `labgrader grade`, with no committed MNIST spec.

There is no real MNIST on this machine (no network), so the test writes IDX files in MNIST's layout
itself: 60000/10000 28x28 images of ten smooth random patterns blended with another class's pattern
and noise. A linear model learns them to about 0.9 test accuracy, as it does real MNIST, so the
derived threshold means something: the lab's correct notebook must clear it. Everything else (the
`mnist` profile, deriving and caching the spec, pinning, grading) is the product's real path.

Commands run in-process (``cli.main``) with their own cache (``XDG_CACHE_HOME``) and no
``LABGRADER_HOME`` or ``LABGRADER_DATA_DIR``, so the dataset root and the derived spec are where a
user's would be, inside the test's directory.
"""
from __future__ import annotations

import contextlib
import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from grader import cli, resources
from reference import provision as prov
from reference import spec
from reference.idx import read_idx, write_idx

pytestmark = pytest.mark.slow


def write_mnist_like(directory: Path, seed: int) -> Path:
    """Write the four IDX files of a 60000/10000 MNIST-shaped dataset under torchvision's names;
    the same ``seed`` gives the same files. Returns ``directory``."""
    rng = np.random.default_rng(seed)
    patterns = rng.random((10, 28, 28))
    for _ in range(3):  # smooth: each class is a few blobs, not pixel noise
        patterns = (patterns + np.roll(patterns, 1, 1) + np.roll(patterns, 1, 2)) / 3
    patterns = (patterns - patterns.min((1, 2), keepdims=True)) / np.ptp(patterns, (1, 2), keepdims=True)
    directory.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", 60000), ("t10k", 10000)):
        labels, other = rng.integers(0, 10, count), rng.integers(0, 10, count)
        blend = rng.uniform(0, 0.5, (count, 1, 1))  # up to half another class's pattern: not separable
        images = patterns[labels] * (1 - blend) + patterns[other] * blend + rng.normal(0, 0.4, (count, 28, 28))
        write_idx(directory / f"{split}-images-idx3-ubyte", np.clip(images * 255, 0, 255).astype(np.uint8))
        write_idx(directory / f"{split}-labels-idx1-ubyte", labels.astype(np.uint8))
    return directory


@dataclass(frozen=True)
class Ran:
    code: int
    out: str
    err: str


@dataclass(frozen=True)
class Lab:
    """A course directory: the student's notebook, the instructor's MNIST files, the user's cache."""

    directory: Path
    idx: Path
    cache: Path

    def labgrader(self, *args: str) -> Ran:
        out, err = io.StringIO(), io.StringIO()
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("XDG_CACHE_HOME", str(self.cache))
            mp.delenv("LABGRADER_HOME", raising=False)
            mp.delenv("LABGRADER_DATA_DIR", raising=False)
            mp.chdir(self.directory)
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = cli.main(list(args))
        return Ran(code, out.getvalue(), err.getvalue())

    def result(self, out: str) -> dict:
        return json.loads((self.directory / out / "lab" / "result.json").read_text())

    def cached_specs(self) -> list[Path]:
        return sorted((self.cache / "labgrader" / "specs").glob("*.json"))


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Lab:
    directory = tmp_path_factory.mktemp("course")
    shutil.copy(resources.EXAMPLES_DIR / "correct.ipynb", directory / "lab.ipynb")
    return Lab(directory, write_mnist_like(directory / "mnist-files", seed=0), directory / "cache")


@pytest.fixture(scope="module")
def first(lab: Lab) -> tuple[Ran, Ran]:
    """`labgrader data` with the instructor's files, then the first `labgrader check`."""
    return lab.labgrader("data", "--dataset", "mnist", "--data-dir", str(lab.idx)), lab.labgrader("check", "lab.ipynb")


def test_first_check_derives_the_spec_and_grades_on_full_mnist(lab: Lab, first: tuple[Ran, Ran]) -> None:
    data, check = first
    root = lab.cache / "labgrader" / "datasets"
    assert data.code == 0 and data.out.startswith(f"mnist: 60000 training / 10000 test images at {root}")
    assert not spec.path_for("mnist").exists()  # nothing committed: the spec must be derived
    [kept] = lab.cached_specs()
    assert check.code == 0, check.out + check.err
    assert check.err.count("deriving it by running the reference") == 1 and "none is committed" in check.err
    assert "derived the spec in " in check.err and f"kept at {kept}" in check.err
    derived = json.loads(kept.read_text())
    provisioned = prov.read_profile(root, "mnist")
    assert derived["profile"] == "mnist" and derived["data_sha256"] == provisioned.sha256
    assert derived["data_sha256"] == {name: prov._sha256(lab.idx / name) for name in prov.RAW_FILES}
    assert (derived["dataset"]["train_size"], derived["dataset"]["test_size"]) == (60000, 10000)
    assert derived["thresholds"]["saved_model_min_accuracy"] == round(derived["test_accuracy"] - spec.ACCURACY_MARGIN, 4)
    result = lab.result("labgrader-report")
    assert (result["data_profile"], result["spec_source"]) == ("mnist", f"derived ({kept})")
    assert result["spec_version"] == spec.load("mnist", kept).version
    # Every visible check passed, the saved model's accuracy against the derived threshold included.
    assert result["score"] == result["max_score"] > 0
    assert "PASS" in check.out and "FAIL" not in check.out


def test_second_run_uses_the_cached_spec(lab: Lab, first: tuple[Ran, Ran]) -> None:
    [kept] = lab.cached_specs()
    written = kept.stat().st_mtime_ns
    graded = lab.labgrader("grade", "lab.ipynb", "--out", "graded", "--quiet")
    assert graded.code == 0, graded.err
    assert "deriv" not in graded.err  # neither derived nor announced
    assert lab.cached_specs() == [kept] and kept.stat().st_mtime_ns == written
    result = lab.result("graded")
    assert result["spec_source"] == f"derived ({kept})"
    assert result["score"] == result["max_score"]


def test_a_pinned_spec_is_used_and_one_made_from_other_files_is_refused(lab: Lab, first: tuple[Ran, Ran]) -> None:
    [kept] = lab.cached_specs()
    made = lab.labgrader("reference", "--dataset", "mnist", "--out", "course-spec.json")
    assert made.code == 0, made.err
    pinned = lab.directory / "course-spec.json"
    # Made on the same machine from the same files: the spec grading derived, byte for byte.
    assert pinned.read_text() == kept.read_text()
    checked = lab.labgrader("check", "lab.ipynb", "--spec", "course-spec.json")
    assert checked.code == 0 and "deriv" not in checked.err, checked.out + checked.err
    assert lab.result("labgrader-report")["spec_source"] == "pinned (course-spec.json)"

    # Another course's files: the same, but for one test label.
    other = lab.directory / "other-files"
    shutil.copytree(lab.idx, other)
    labels = read_idx(other / "t10k-labels-idx1-ubyte")
    labels[0] = (labels[0] + 1) % 10
    write_idx(other / "t10k-labels-idx1-ubyte", labels)
    other_root = str(lab.directory / "other-root")
    assert lab.labgrader("data", "--dataset", "mnist", "--data-dir", str(other), "--root", other_root).code == 0
    refused = lab.labgrader("check", "lab.ipynb", "--root", other_root, "--spec", "course-spec.json")
    assert refused.code == 2 and refused.out == ""
    assert refused.err == (
        f"labgrader: course-spec.json was not made from the mnist data at {other_root}: t10k-labels-idx1-ubyte "
        "(the test labels) differs. Grade with the data it was made from, or make a spec for this data with "
        "`labgrader reference --out`\n")
    sample_spec = str(spec.path_for("mnist-sample"))
    refused = lab.labgrader("grade", "lab.ipynb", "--spec", sample_spec, "--quiet")
    assert refused.code == 2 and "made on the mnist-sample profile, the data here is mnist" in refused.err
    assert refused.err.count("\n") == 1 and all(f"{name} (the" in refused.err for name in prov.RAW_FILES)


def test_data_that_changed_after_provisioning_cannot_be_derived_from(lab: Lab, first: tuple[Ran, Ran], tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("LABGRADER_HOME", raising=False)
    root = tmp_path / "data"
    shutil.copytree(lab.cache / "labgrader" / "datasets" / "MNIST", root / "MNIST")
    provisioned = prov.read_profile(root, "mnist")
    damaged = root / "MNIST" / "raw" / "train-images-idx3-ubyte"
    damaged.write_bytes(damaged.read_bytes()[:1000])
    with pytest.raises(spec.SpecError) as error:
        spec.derive(provisioned)
    assert str(error.value) == (f"{root / 'MNIST' / 'raw'}: train-images-idx3-ubyte changed since provisioning; "
                                "run `labgrader data` again")
    assert not spec.cache_path(provisioned).exists()
