"""The grader's side of the probe: choose its inputs at grading time, and read back what it wrote.

The inputs (initial weights, a few batches of real digits, dataset indices) are drawn from a seed
picked at grading time, once the notebook's cells have run, so no cell can know or read them. They go
to the kernel as an ``.npz`` file (arrays only) and the answers come back as JSON: neither format can
run code when read.
"""
from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from grader import inkernel

BATCH_SIZE = 64
# Whole batches only: then a sum-reduced and a mean-reduced loss give the same epoch figure.
TRAIN_BATCHES = 4
TEST_BATCHES = 2
EPOCHS = 2
LEARNING_RATE = 0.05
MODEL_BATCH = 7  # not 10, so a LogSoftmax over the wrong dimension can't look right by chance
DATA_ITEMS = 3
MAX_PROBE_BYTES = 20_000_000


@dataclass(frozen=True)
class Plan:
    """The inputs of one probe run; the grader recomputes the reference's answers from these."""

    seed: int
    nonce: str
    arrays: dict[str, np.ndarray]
    data_indices: dict[str, list[int]]

    def settings(self) -> dict[str, Any]:
        return {"nonce": self.nonce, "data_indices": self.data_indices, "lr": LEARNING_RATE,
                "batch_size": BATCH_SIZE, "epochs": EPOCHS}


def make_plan(train: tuple[Any, Any], test: tuple[Any, Any], seed: int | None = None) -> Plan:
    """``train`` and ``test``: (images, labels) pairs, numpy arrays or torch tensors alike. Drawn with
    numpy, so the grader's side of the probe never needs torch."""
    seed = secrets.randbits(31) if seed is None else seed
    generator = np.random.default_rng(seed)

    def pick(pool: tuple[Any, Any], count: int) -> tuple[np.ndarray, np.ndarray]:
        index = generator.permutation(len(pool[0]))[:count]
        return np.asarray(pool[0][index]), np.asarray(pool[1][index])

    train_x, train_y = pick(train, TRAIN_BATCHES * BATCH_SIZE)
    test_x, test_y = pick(test, TEST_BATCHES * BATCH_SIZE)
    model_x, _ = pick(test, MODEL_BATCH)
    bound = 1 / 784 ** 0.5  # nn.Linear's own initial range
    init_weight = generator.uniform(-bound, bound, (10, 784)).astype(np.float32)
    init_bias = generator.uniform(-bound, bound, 10).astype(np.float32)
    data_indices = {
        "data_train": generator.integers(len(train[0]), size=DATA_ITEMS).tolist(),
        "data_test": generator.integers(len(test[0]), size=DATA_ITEMS).tolist(),
    }
    arrays = {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y,
              "model_input": model_x, "init_weight": init_weight, "init_bias": init_bias}
    return Plan(seed=seed, nonce=secrets.token_hex(8), arrays=arrays, data_indices=data_indices)


def write_inputs(plan: Plan, directory: Path) -> tuple[Path, Path]:
    """Put the plan where the kernel can read it; returns (plan file, output file) paths."""
    arrays_path = directory / f".labgrader-probe-{plan.nonce}.npz"
    np.savez(arrays_path, **plan.arrays)
    plan_path = directory / f".labgrader-probe-{plan.nonce}.json"
    plan_path.write_text(json.dumps({**plan.settings(), "arrays": arrays_path.name}))
    return plan_path, directory / f".labgrader-probe-{plan.nonce}-out.json"


def prelude_code(seed: int, threads: int, fast_data: bool) -> str:
    return _kernel_call("prelude", f"{seed!r}, {threads!r}, {fast_data!r}")


def probe_code(plan_path: Path, out_path: Path) -> str:
    # Relative names: the kernel sees the work directory at another path than the grader does.
    return _kernel_call("probe", f"get_ipython().user_ns, {plan_path.name!r}, {out_path.name!r}")


def _kernel_call(function: str, arguments: str) -> str:
    """Run :mod:`grader.inkernel` in a namespace of its own, so the student's names are untouched."""
    source = Path(inkernel.__file__).read_text()
    return (f"__labgrader = {{'__name__': 'labgrader'}}\n"
            f"exec(compile({source!r}, '<labgrader>', 'exec'), __labgrader)\n"
            f"__labgrader[{function!r}]({arguments})\n"
            "del __labgrader\n")


def read(out_path: Path, plan: Plan) -> dict[str, Any] | None:
    """The probe's answers, or None when it wrote nothing usable (they are claims, checked later)."""
    try:
        if out_path.stat().st_size > MAX_PROBE_BYTES:
            return None
        answers = json.loads(out_path.read_text())
    except (OSError, ValueError):
        return None
    return answers if isinstance(answers, dict) and answers.get("nonce") == plan.nonce else None
