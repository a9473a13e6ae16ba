"""The reference's answers on a probe's inputs, computed in the grader's own process.

Besides the reference itself, the same training without ``optimizer.zero_grad()``: the lab's commonest
mistake, modelled so a message can name it, and so a function with that one bug is still known to
have trained for real (the checks credit what accompanies real training, never a claim alone).
Each way is run twice: with the lab's ``nn.NLLLoss()``, and with a loss function giving twice that,
which a function that ignores the ``loss_fn`` it is given can't follow.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from grader.probe import BATCH_SIZE, EPOCHS, LEARNING_RATE, LOSS_FACTOR, Plan
from reference import data, model, training

Params = dict[str, np.ndarray]  # the lab network's "weight" (10, 784) and "bias" (10,), as float64
EpochFunction = Callable[..., tuple[float, float]]


@dataclass(frozen=True)
class Outcome:
    """What one way of training gives on the plan's inputs."""

    epoch: tuple[float, float]  # train_epoch's (loss, accuracy)
    epoch_params: Params
    epoch_doubled_params: Params  # train_epoch given a loss_fn of LOSS_FACTOR x NLLLoss
    history: dict[str, list[float]]
    train_params: Params
    train_doubled_params: Params


@dataclass(frozen=True)
class Expected:
    initial_params: Params
    validate: tuple[float, float]
    reference: Outcome
    no_zero_grad: Outcome  # gradients never zeroed: told apart so the message can say so
    data_items: dict[str, list[dict]]  # per dataset: label and pixel sum at the plan's indices
    loader_labels: dict[str, list[int]]  # per split ("train", "test"): labels at the plan's loader indices

    def outcomes(self) -> dict[str, Outcome]:
        """Every way of training the grader recognises as real, by name."""
        return {"reference": self.reference, "no_zero_grad": self.no_zero_grad}


def compute(plan: Plan, train: tuple[torch.Tensor, torch.Tensor],
            test: tuple[torch.Tensor, torch.Tensor]) -> Expected:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the probe runs single-threaded too; more threads change the last bits
    try:
        validate_result = training.validate(_net(plan), _loader(plan, "test"))
        outcomes = [_outcome(plan, epoch) for epoch in (training.train_epoch, _train_epoch_without_zero_grad)]
    finally:
        torch.set_num_threads(threads)
    items = {name: [{"label": int(pool[1][i]), "sum": float(pool[0][i].double().sum())}
                    for i in plan.data_indices[name]]
             for name, pool in (("data_train", train), ("data_test", test))}
    loader_labels = {split: [int(pool[1][i]) for i in plan.data_indices["loaders"]]
                     for split, pool in (("train", train), ("test", test))}
    return Expected(_params(_net(plan)), validate_result, *outcomes, items, loader_labels)


def _outcome(plan: Plan, epoch: EpochFunction) -> Outcome:
    def one_epoch(loss_fn) -> tuple[tuple[float, float], Params]:
        net = _net(plan)
        return epoch(net, _loader(plan, "train"), optimizer=_sgd(net), loss_fn=loss_fn), _params(net)

    def whole_training(loss_fn) -> tuple[dict[str, list[float]], Params]:
        net = _net(plan)
        return train_with(epoch, net, plan, loss_fn), _params(net)

    epoch_result, epoch_params = one_epoch(nn.NLLLoss())
    history, train_params = whole_training(nn.NLLLoss())
    return Outcome(epoch_result, epoch_params, one_epoch(doubled_nll_loss)[1], history, train_params,
                   whole_training(doubled_nll_loss)[1])


def doubled_nll_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """What the probe's second loss_fn computes: NLLLoss times LOSS_FACTOR, the same operations."""
    return nn.NLLLoss()(output, target) * LOSS_FACTOR


def train_with(epoch: EpochFunction, net: nn.Module, plan: Plan, loss_fn) -> dict[str, list[float]]:
    """``training.train``'s loop with another train_epoch (tests/test_expected.py holds the two equal
    for the reference's own)."""
    optimizer = _sgd(net)
    history: dict[str, list[float]] = {key: [] for key in training.HISTORY_KEYS}
    for _ in range(EPOCHS):
        results = (*epoch(net, _loader(plan, "train"), optimizer=optimizer, loss_fn=loss_fn),
                   *training.validate(net, _loader(plan, "test"), loss_fn=loss_fn))
        for key, value in zip(training.HISTORY_KEYS, results):
            history[key].append(value)
    return history


def _tensor(plan: Plan, name: str) -> torch.Tensor:
    return torch.from_numpy(plan.arrays[name].copy())


def _loader(plan: Plan, prefix: str):
    return data.loader(_tensor(plan, prefix + "_x"), _tensor(plan, prefix + "_y"), BATCH_SIZE)


def _net(plan: Plan) -> nn.Sequential:
    net = model.make_model()
    with torch.no_grad():
        net[1].weight.copy_(_tensor(plan, "init_weight"))
        net[1].bias.copy_(_tensor(plan, "init_bias"))
    return net


class PlainSGD:
    """What ``torch.optim.SGD(params, lr)`` does on the CPU with no momentum or weight decay,
    ``p -= lr * grad`` bit for bit (tests/test_expected.py holds it to that). Written out because
    the first ``torch.optim`` optimizer made in a process imports ``torch._dynamo``: 4 s of a
    regrade that otherwise takes a fraction of a second."""

    def __init__(self, params, lr: float):
        self.params, self.lr = list(params), lr

    def zero_grad(self) -> None:
        for param in self.params:
            param.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for param in self.params:
            if param.grad is not None:
                param.add_(param.grad, alpha=-self.lr)


def _sgd(net: nn.Module) -> PlainSGD:
    return PlainSGD(net.parameters(), lr=LEARNING_RATE)


def _params(net: nn.Sequential) -> Params:
    return {"weight": net[1].weight.detach().double().numpy().copy(),
            "bias": net[1].bias.detach().double().numpy().copy()}


def _train_epoch_without_zero_grad(net: nn.Module, loader, optimizer, loss_fn) -> tuple[float, float]:
    """``training.train_epoch`` with one line left out: ``optimizer.zero_grad()``."""
    net.train()
    total_loss, correct, count = 0.0, 0, 0
    for features, labels in loader:
        out = net(features)
        loss = loss_fn(out, labels)
        loss.backward()
        optimizer.step()
        total_loss += loss.item()
        correct += int((out.argmax(dim=1) == labels).sum())
        count += len(labels)
    return total_loss / count, correct / count
