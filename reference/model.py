"""The lab's network: one dense layer from 784 pixels to 10 log-probabilities."""
from __future__ import annotations

import torch
from torch import nn

N_PIXELS = 28 * 28
N_CLASSES = 10


def make_model(seed: int | None = None) -> nn.Sequential:
    """``Flatten -> Linear(784, 10) -> LogSoftmax(dim=1)``.

    The lab writes ``nn.LogSoftmax()``; without ``dim`` PyTorch guesses the dimension and warns.
    ``dim=1`` normalises each image's ten scores, which is what a classifier needs.
    With ``seed`` the initial weights depend on nothing else (the global RNG is left alone).
    """
    if seed is None:
        return _build()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _build()


def _build() -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(N_PIXELS, N_CLASSES), nn.LogSoftmax(dim=1))


def save_weights(net: nn.Module, path) -> None:
    """Save as the lab does: the ``state_dict`` only, never the pickled module."""
    torch.save(net.state_dict(), path)


def load_weights(path, net: nn.Module | None = None) -> nn.Module:
    """Load a ``state_dict`` saved by :func:`save_weights` without unpickling any code."""
    net = net if net is not None else make_model()
    state = torch.load(path, map_location="cpu", weights_only=True)
    net.load_state_dict(state, strict=True)
    return net
