"""The lab's figures: sample digits, the training history, and the ten weight images."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # the reference draws into files; it never needs a screen
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from reference.training import History  # noqa: E402


def samples(dataset, count: int = 7):
    fig, axes = plt.subplots(1, count, figsize=(2 * count, 2.4))
    for i, ax in enumerate(axes):
        image, label = dataset[i]
        ax.imshow(image.view(28, 28), cmap="gray")
        ax.set_title(str(label))
        ax.axis("off")
    return fig


def history(hist: History):
    fig, (acc, loss) = plt.subplots(1, 2, figsize=(12, 4))
    acc.plot(hist["train_acc"], label="Training acc")
    acc.plot(hist["val_acc"], label="Validation acc")
    acc.set_xlabel("epoch")
    acc.legend()
    loss.plot(hist["train_loss"], label="Training loss")
    loss.plot(hist["val_loss"], label="Validation loss")
    loss.set_xlabel("epoch")
    loss.legend()
    return fig


def first_layer_weights(net: nn.Module) -> torch.Tensor:
    """The (10, 784) weight matrix of the first Linear layer: one row per digit."""
    linear = next(m for m in net.modules() if isinstance(m, nn.Linear))
    return linear.weight.detach()


def weights(net: nn.Module):
    weight = first_layer_weights(net)
    fig, axes = plt.subplots(1, len(weight), figsize=(15, 2))
    for ax, row in zip(axes, weight):
        ax.imshow(row.view(28, 28))
        ax.axis("off")
    return fig
