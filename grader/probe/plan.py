"""The probe's inputs, drawn at grading time.

The inputs (initial weights, a few batches of real digits, dataset indices) are drawn from a seed
picked once the notebook's cells have run, so no cell can know or read them. Drawn with numpy, so
the grader's side of the probe never needs torch.
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

import numpy as np

BATCH_SIZE = 64
# Whole batches only: then a sum-reduced and a mean-reduced loss give the same epoch figure.
TRAIN_BATCHES = 4
TEST_BATCHES = 2
EPOCHS = 2
LEARNING_RATE = 0.05
MODEL_BATCH = 7  # not 10, so a LogSoftmax over the wrong dimension can't look right by chance
DATA_ITEMS = 3
# The probe runs train_epoch and train a second time with a loss_fn that multiplies NLLLoss by this:
# with plain SGD that doubles every update, so a function that ignores the loss it is given (and
# computes its own NLLLoss) ends with other weights than the reference's.
LOSS_FACTOR = 2.0
# The most values of net's state_dict the probe sends for the grader to recompute net's output from
# (the lab's network has 7,850; 784 -> 128 -> 10 has 101,770).
MAX_STATE_VALUES = 250_000
DATASETS = ("data_train", "data_test")
# The loaders the notebook trains and validates with: the probe reads their dataset's length and its
# labels at LOADER_ITEMS indices valid in both splits, which tell the two splits apart (and from
# anything else) without reading a whole epoch.
LOADERS = ("train_loader", "test_loader")
LOADER_ITEMS = 8


@dataclass(frozen=True)
class Plan:
    """The inputs of one probe run; the grader recomputes the reference's answers from these.

    ``nonce`` names the run's channel and marks its answer: the grader takes no other message."""

    seed: int
    nonce: str
    arrays: dict[str, np.ndarray]
    data_indices: dict[str, list[int]]

    def settings(self) -> dict[str, Any]:
        """What the kernel needs besides the arrays, as plain literals."""
        return {"data_indices": self.data_indices, "lr": LEARNING_RATE, "batch_size": BATCH_SIZE,
                "epochs": EPOCHS, "loss_factor": LOSS_FACTOR, "max_state_values": MAX_STATE_VALUES}


def make_plan(train: tuple[Any, Any], test: tuple[Any, Any], seed: int | None = None) -> Plan:
    """``train`` and ``test``: (images, labels) pairs, numpy arrays or torch tensors alike."""
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
        "loaders": generator.integers(min(len(train[0]), len(test[0])), size=LOADER_ITEMS).tolist(),
    }
    arrays = {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y,
              "model_input": model_x, "init_weight": init_weight, "init_bias": init_bias}
    return Plan(seed=seed, nonce=secrets.token_hex(8), arrays=arrays, data_indices=data_indices)
