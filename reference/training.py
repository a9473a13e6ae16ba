"""Training and evaluation with the lab's return values.

The lab's loss is unusual and kept on purpose, so students' numbers can be compared with ours:
each batch contributes its *mean* loss, the means are summed over the epoch, and the sum is divided
by the number of items (not batches). With batch size 64 the figure is about 1/64 of the mean loss.
Unlike the lab, the sum is of ``loss.item()`` floats: adding the loss tensors themselves would keep
every batch's autograd graph alive until the end of the epoch.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypedDict

import torch
from torch import nn

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


class History(TypedDict):
    train_loss: list[float]
    train_acc: list[float]
    val_loss: list[float]
    val_acc: list[float]


HISTORY_KEYS = tuple(History.__annotations__)


def train_epoch(net: nn.Module, dataloader: Batches, lr: float = 0.01,
                optimizer: torch.optim.Optimizer | None = None,
                loss_fn: LossFn | None = None) -> tuple[float, float]:
    """One pass over ``dataloader``; returns ``(loss, accuracy)`` as defined in the module doc."""
    optimizer = optimizer or torch.optim.Adam(net.parameters(), lr=lr)
    loss_fn = loss_fn or nn.NLLLoss()
    net.train()
    total_loss, correct, count = 0.0, 0, 0
    for features, labels in dataloader:
        optimizer.zero_grad()
        out = net(features)
        loss = loss_fn(out, labels)
        loss.backward()
        optimizer.step()
        total_loss += loss.item()
        correct += int((out.argmax(dim=1) == labels).sum())
        count += len(labels)
    return total_loss / count, correct / count


def validate(net: nn.Module, dataloader: Batches,
             loss_fn: LossFn | None = None) -> tuple[float, float]:
    """Evaluate without changing the model: eval mode, no gradient tracking."""
    loss_fn = loss_fn or nn.NLLLoss()
    net.eval()
    total_loss, correct, count = 0.0, 0, 0
    with torch.no_grad():
        for features, labels in dataloader:
            out = net(features)
            total_loss += loss_fn(out, labels).item()
            correct += int((out.argmax(dim=1) == labels).sum())
            count += len(labels)
    return total_loss / count, correct / count


def train(net: nn.Module, train_loader: Batches, test_loader: Batches,
          optimizer: torch.optim.Optimizer | None = None, lr: float = 0.01, epochs: int = 10,
          loss_fn: LossFn | None = None,
          on_epoch: Callable[[int, float, float, float, float], None] | None = None) -> History:
    """Train for ``epochs``, validating after each; returns the per-epoch history."""
    optimizer = optimizer or torch.optim.Adam(net.parameters(), lr=lr)
    loss_fn = loss_fn or nn.NLLLoss()
    history: History = {key: [] for key in HISTORY_KEYS}  # type: ignore[assignment]
    for epoch in range(epochs):
        train_loss, train_acc = train_epoch(net, train_loader, optimizer=optimizer, loss_fn=loss_fn)
        val_loss, val_acc = validate(net, test_loader, loss_fn=loss_fn)
        for key, value in zip(HISTORY_KEYS, (train_loss, train_acc, val_loss, val_acc)):
            history[key].append(value)
        if on_epoch:
            on_epoch(epoch, train_loss, train_acc, val_loss, val_acc)
    return history


@torch.no_grad()
def predict(net: nn.Module, features: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Predicted class of every row of ``features``."""
    net.eval()
    return torch.cat([net(features[i:i + batch_size]).argmax(dim=1)
                      for i in range(0, len(features), batch_size)])
