"""Inspect the model file a notebook saved, in the grader's process, without unpickling code or
allocating what the file merely claims.

:func:`keep` copies the file out of the notebook's working directory: a regular file only, opened
without following a link or blocking on a pipe, and bounded in size; what was there instead (a
folder, a link, a pipe) is kept as the reason, so the message can say so.

:func:`inspect` reads it only as weights: after a size check, a look at the zip directory (no
bombs) and a list of the pickle's globals (so a whole pickled ``nn.Module`` or a code-executing
payload is named and refused before anything is loaded), ``torch.load(weights_only=True,
mmap=True)``, whose tensors stay views of the mapped file. A 2 kB file can describe ten billion
values: ``torch.zeros(1).expand(100000, 100000)`` is saved as its one stored value and strides of
0, and it loads as such a view for free; counting its values or building a layer from it would
take gigabytes. So the values and widths the shapes claim are capped before anything is computed
from them. (torch itself refuses a view that reaches past its storage, and a storage whose size in
the pickle differs from its record: tried with hand-made files.) The accuracy is the grader's own
measurement on the test set.
"""
from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from grader import intake
from reference import training

MAX_FILE_BYTES = 50_000_000
MAX_UNPACKED_BYTES = 200_000_000
MAX_VALUES = 10_000_000  # in all tensors together: 40 MB as float32; the lab's model has 7,850
# Units in one layer: the grader predicts 1,000 test images at a time, so a layer costs at most
# 16 MB of activations (without it, 784 -> 1 -> 900,000 -> 10 fits MAX_VALUES and takes 3.6 GB).
MAX_WIDTH = 4_096
MISCLASSIFIED_SHOWN = 8


@dataclass(frozen=True)
class SavedModel:
    status: str  # "ok", "missing", "rejected", "unloadable", "incompatible"
    message: str
    architecture: str = ""
    accuracy: float | None = None
    confusion: list[list[int]] | None = None
    first_layer: list[list[float]] | None = None  # up to ten rows of 784, for the weight images
    misclassified: list[dict] = field(default_factory=list)  # {"index", "label", "predicted"}


def keep(source: Path, target: Path) -> None:
    """Copy the model file a notebook saved at ``source`` to ``target``, for :func:`inspect`: a
    regular file only, and no more than one byte past the size limit (enough to report it as too
    big). When ``source`` is something else, what it is goes beside ``target`` instead."""
    try:
        with intake.open_regular(source) as model_file:
            target.write_bytes(model_file.read(MAX_FILE_BYTES + 1))
    except FileNotFoundError:
        return
    except intake.NotRegularFile as found:
        _instead(target).write_text(f"{found.kind}, not a file")
    except OSError as error:
        _instead(target).write_text(f"unreadable ({error.strerror})")


def _instead(target: Path) -> Path:
    return target.with_name(target.name + ".instead")


def inspect(path: Path, test_x: torch.Tensor, test_y: torch.Tensor, name: str | None = None) -> SavedModel:
    """``path``: the copy :func:`keep` made; ``name``: the file name to speak of in messages."""
    name = name or path.name
    if not path.is_file():
        instead = _instead(path)
        if instead.is_file():
            return SavedModel("missing", f"{name} was not read: it is {instead.read_text()}. Save the "
                              f"weights to a file with torch.save(net.state_dict(), {name!r}).")
        return SavedModel("missing", f"No {name} was saved. End the notebook with "
                          f"torch.save(net.state_dict(), {name!r}).")
    state, problem = _load_state_dict(path, name)
    if state is None:
        return problem
    net, architecture = _build(state)
    if net is None:
        return SavedModel("incompatible", architecture)
    predicted = training.predict(net, test_x)
    confusion = torch.zeros(10, 10, dtype=torch.long)
    confusion.index_put_((test_y, predicted), torch.ones_like(test_y), accumulate=True)
    wrong = (predicted != test_y).nonzero().flatten()[:MISCLASSIFIED_SHOWN].tolist()
    first = next(m for m in net.modules() if isinstance(m, nn.Linear)).weight.detach()[:10]
    return SavedModel(
        "ok", f"{name} loads as {architecture}.", architecture=architecture,
        accuracy=float((predicted == test_y).float().mean()), confusion=confusion.tolist(),
        first_layer=first.tolist(),
        misclassified=[{"index": i, "label": int(test_y[i]), "predicted": int(predicted[i])} for i in wrong])


def _load_state_dict(path: Path, name: str) -> tuple[dict[str, torch.Tensor] | None, SavedModel | None]:
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        return None, SavedModel("rejected", f"{name} is {size:,} bytes, over the {MAX_FILE_BYTES:,} "
                                "byte limit; a state_dict of this lab's model is about 32 kB.")
    if not zipfile.is_zipfile(path):
        return None, SavedModel("unloadable", f"{name} is not a file written by torch.save "
                                "(it is not the zip format torch.save uses). Save it with "
                                f"torch.save(net.state_dict(), {name!r}).")
    try:
        with zipfile.ZipFile(path) as archive:
            unpacked = sum(info.file_size for info in archive.infolist())
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except (zipfile.BadZipFile, RuntimeError, pickle.UnpicklingError, ValueError, EOFError) as error:
        return None, SavedModel("unloadable", f"{name} is damaged and can't be read ({error}). "
                                f"Save it again with torch.save(net.state_dict(), {name!r}).")
    if unpacked > MAX_UNPACKED_BYTES:
        return None, SavedModel("rejected", f"{name} unpacks to {unpacked:,} bytes; refused.")
    if any(g.startswith("torch.nn.modules") or g.startswith("__main__.") for g in unsafe):
        return None, SavedModel("rejected", f"{name} holds a whole pickled model ({', '.join(unsafe[:3])}), "
                                "which can only be loaded by running code. Save the weights instead: "
                                f"torch.save(net.state_dict(), {name!r}).")
    if unsafe:
        return None, SavedModel("rejected", f"{name} asks to run code when loaded "
                                f"({', '.join(unsafe[:3])}); it was not loaded. Save only "
                                f"net.state_dict().")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        refused = _refused(state, name, size)
    except Exception as error:  # torch raises many types for malformed archives and odd tensors
        return None, SavedModel("unloadable", f"{name} could not be loaded as weights "
                                f"({type(error).__name__}: {str(error)[:200]}). Save it again with "
                                f"torch.save(net.state_dict(), {name!r}).")
    return (None, refused) if refused else (state, None)


def _refused(state, name: str, size: int) -> SavedModel | None:
    """Why the loaded ``state`` is not used, or None. Its tensors are views of the file: only their
    shapes are looked at until those are known to be small."""
    if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) and v.layout == torch.strided
            and not v.is_nested and v.device.type == "cpu" for k, v in state.items()):
        return SavedModel("incompatible", f"{name} is not a state_dict (a mapping of parameter "
                          f"names to tensors); save net.state_dict().")
    values = sum(v.numel() for v in state.values())
    if values > MAX_VALUES:
        stored = (f", more than its {size:,} bytes can hold (tensors expanded from a few stored values)"
                  if values > size else "")
        return SavedModel("rejected", f"{name} describes {values:,} weight values{stored}; the grader "
                          f"loads at most {MAX_VALUES:,} (this lab's model has 7,850). Save "
                          "net.state_dict() of the lab's model.")
    widest = max((max(v.shape, default=0) for v in state.values()), default=0)
    if widest > MAX_WIDTH:
        return SavedModel("rejected", f"{name} has a tensor {widest:,} values across; the grader builds "
                          f"layers of at most {MAX_WIDTH:,} units (this lab's model has 10).")
    if not all(v.is_floating_point() and bool(torch.isfinite(v).all()) for v in state.values()):
        return SavedModel("incompatible", f"{name} has non-float or non-finite (NaN/inf) weights; "
                          "check that training did not diverge.")
    return None


def _build(state: dict[str, torch.Tensor]) -> tuple[nn.Module | None, str]:
    """The grader's own model for ``state``: a stack of Linear layers read off its keys and shapes,
    with ReLU between them (the lab's architecture is the one-layer case)."""
    layers: list[tuple[torch.Tensor, torch.Tensor]] = []
    for key, weight in state.items():
        if not key.endswith(".weight"):
            continue
        bias = state.get(key.removesuffix("weight") + "bias")
        if weight.dim() != 2 or bias is None or bias.shape != weight.shape[:1]:
            return None, (f"the saved weights are not a stack of Linear layers ({key}: "
                          f"{tuple(weight.shape)}); this lab's model is Flatten, Linear(784, 10), LogSoftmax.")
        layers.append((weight, bias))
    if len(layers) * 2 != len(state):
        extra = sorted(k for k in state if not k.endswith((".weight", ".bias")))
        return None, f"the saved weights have entries a Linear stack doesn't: {', '.join(extra[:4])}."
    sizes = [784] + [w.shape[0] for w, _ in layers]
    if not layers or any(w.shape[1] != n for (w, _), n in zip(layers, sizes)) or sizes[-1] != 10:
        shapes = ", ".join(str(tuple(w.shape)) for w, _ in layers) or "none"
        return None, (f"the saved layers don't map 784 pixels to 10 classes (weight shapes: {shapes}).")
    modules: list[nn.Module] = [nn.Flatten()]
    for index, (weight, bias) in enumerate(layers):
        if index:
            modules.append(nn.ReLU())
        linear = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            linear.weight.copy_(weight)
            linear.bias.copy_(bias)
        modules.append(linear)
    modules.append(nn.LogSoftmax(dim=1))
    return nn.Sequential(*modules), " -> ".join(f"Linear({w.shape[1]}, {w.shape[0]})" for w, _ in layers)
