"""The reference's answers on a probe's inputs, computed in the grader's own process."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from grader.probe import BATCH_SIZE, EPOCHS, LEARNING_RATE, Plan
from reference import data, model, training


@dataclass(frozen=True)
class Expected:
    initial_params: dict[str, torch.Tensor]
    train_epoch: tuple[float, float]
    train_epoch_params: dict[str, torch.Tensor]
    # What train_epoch gives when gradients are never zeroed: told apart so the message can say so.
    no_zero_grad_params: dict[str, torch.Tensor]
    validate: tuple[float, float]
    train_history: dict[str, list[float]]
    train_params: dict[str, torch.Tensor]
    data_items: dict[str, list[dict]]  # per dataset: label and pixel sum at the plan's indices


def compute(plan: Plan, train: tuple[torch.Tensor, torch.Tensor],
            test: tuple[torch.Tensor, torch.Tensor]) -> Expected:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the probe runs single-threaded too; more threads change the last bits
    try:
        train_loader = data.loader(_tensor(plan, "train_x"), _tensor(plan, "train_y"), BATCH_SIZE)
        test_loader = data.loader(_tensor(plan, "test_x"), _tensor(plan, "test_y"), BATCH_SIZE)

        net = _net(plan)
        epoch_result = training.train_epoch(net, train_loader, optimizer=_sgd(net))
        epoch_params = _params(net)

        net = _net(plan)
        _train_epoch_without_zero_grad(net, train_loader)
        no_zero_grad_params = _params(net)

        validate_result = training.validate(_net(plan), test_loader)

        net = _net(plan)
        history = training.train(net, train_loader, test_loader, optimizer=_sgd(net), epochs=EPOCHS)
        train_params = _params(net)
    finally:
        torch.set_num_threads(threads)
    items = {name: [{"label": int(pool[1][i]), "sum": float(pool[0][i].double().sum())}
                    for i in plan.data_indices[name]]
             for name, pool in (("data_train", train), ("data_test", test))}
    return Expected(_params(_net(plan)), epoch_result, epoch_params, no_zero_grad_params, validate_result,
                    dict(history), train_params, items)


def _tensor(plan: Plan, name: str) -> torch.Tensor:
    return torch.from_numpy(plan.arrays[name].copy())


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


def _params(net: nn.Sequential) -> dict[str, torch.Tensor]:
    return {"weight": net[1].weight.detach().double().clone(), "bias": net[1].bias.detach().double().clone()}


def _train_epoch_without_zero_grad(net: nn.Module, loader) -> None:
    optimizer = _sgd(net)
    loss_fn = nn.NLLLoss()
    net.train()
    for features, labels in loader:
        loss_fn(net(features), labels).backward()
        optimizer.step()
