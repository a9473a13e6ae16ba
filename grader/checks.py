"""The checks: one small named function each, returning the fraction earned and a message a
student can act on. Every verdict is made here, in the grader's process, from the executor's record,
the grader's own reading of the saved model, and the probe's answers compared with the reference's
answers on the same inputs.

Only values that cost the lab's work earn points. What the kernel reports is a claim: a signature, a
mode flag, a count, a length or a figure's contents could be written by a notebook that did none of
the lab. So each check is credited only alongside something the notebook could not have produced
without doing the work: results on the grader's inputs that match the reference's (or, for the
lab's commonest mistake, the reference's without ``zero_grad``), items at grader-chosen indices that
are the provided dataset's, an output the grader recomputes from net's own weights. The figure checks
(half a point each) rest on what the kernel recorded of the figures shown; they say so.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from grader import environment
from grader.probe import (BATCH_SIZE, DATASETS, LOADERS, LOSS_FACTOR, MODEL_BATCH, TEST_BATCHES, TRAIN_BATCHES,
                          Answers, DatasetAnswer, FunctionAnswer, LoaderAnswer, ModelAnswer, Plan, Problem, Value)
from grader.results import CheckResult, Execution

if TYPE_CHECKING:  # the checks compute with numpy; importing torch would cost every regrade seconds
    import nbformat

    from grader.expected import Expected, Outcome
    from grader.saved_model import SavedModel
    from reference.spec import Spec

# Single-threaded on both sides, equivalent implementations agree to the last bit; these bounds
# leave room for reordered sums while a skipped batch (~1e-3) or missing zero_grad (~5e-2) fails.
PARAM_ATOL, PARAM_RTOL = 1e-5, 1e-4
LOSS_RTOL = 1e-4
ACCURACY_SLACK = 2  # items: argmax ties may fall either way
# net's output against the grader's float64 recomputation from its float32 weights
OUTPUT_ATOL, OUTPUT_RTOL = 1e-4, 1e-4
TRAIN_ITEMS = TRAIN_BATCHES * BATCH_SIZE
TEST_ITEMS = TEST_BATCHES * BATCH_SIZE
IMAGE_SIDE = 28


@dataclass(frozen=True)
class Provided:
    """What grading gave the notebook besides its cells, so a message can tell the student's error
    from what the grading environment lacks. ``datasets``: torchvision classes under ./data;
    ``packages``: the rubric's declared packages with the installed version (None: missing);
    ``modules``: (import name, declared package) pairs."""

    datasets: tuple[str, ...] = ("MNIST",)
    graded_dataset: str = "MNIST"
    support_files: tuple[str, ...] = ()
    packages: tuple[tuple[str, str | None], ...] = ()
    modules: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Evidence:
    spec: Spec
    execution: Execution
    saved_model: SavedModel
    expected: Expected
    probe: Answers | None
    notebook: nbformat.NotebookNode | None
    plan: Plan | None = None
    unanswered: str | None = None  # why ``probe`` is None, when the channel says
    provided: Provided = Provided()


@dataclass(frozen=True)
class Verdict:
    fraction: float
    message: str
    warnings: tuple[str, ...] = ()


Check = Callable[[Evidence], Verdict]
CHECKS: dict[str, Check] = {}


def check(function: Check) -> Check:
    """Register ``check_NAME`` as the check NAME."""
    CHECKS[function.__name__.removeprefix("check_")] = function
    return function


def run_checks(evidence: Evidence) -> list[CheckResult]:
    """Every check, whatever the rubric scores: the verdicts are kept and a rubric may change."""
    results = []
    for name, check_function in CHECKS.items():
        try:
            verdict = check_function(evidence)
        except Unavailable as missing:
            verdict = Verdict(0.0, str(missing))
        except Exception as error:  # a grader bug must cost only its own check
            verdict = Verdict(0.0, f"This could not be checked: the grader failed on it ({type(error).__name__}); "
                              "please report it.")
        results.append(CheckResult(name, verdict.fraction, verdict.message, verdict.warnings))
    return results


# --- what the probe saw ------------------------------------------------------------------------

class Unavailable(Exception):
    """A check's evidence is missing; the message says why, in the student's terms."""


def _why_no_probe(evidence: Evidence) -> str:
    execution = evidence.execution
    died = next((c for c in execution.cells if c.status == "kernel-died"), None)
    if died is not None:
        return (f"the notebook's kernel died in cell {died.index + 1} ({died.error or execution.reason}), "
                "so nothing could be checked after it")
    if execution.status in ("timeout", "output-limit"):
        return f"the notebook was stopped ({execution.reason})"
    if execution.status == "not-run":
        return f"the notebook did not run ({execution.reason})"
    if execution.probe_error:
        first_line = execution.probe_error.strip().splitlines()[0][:200]
        return (f"the grader's probe failed in the notebook's kernel ({first_line}); does the notebook "
                "change how the kernel runs code, or leave it busy?")
    return evidence.unanswered or "the grader's probe got no answer from the notebook's kernel"


def _answer(evidence: Evidence, section: str, thing: str, using: str = ""):
    """A section's answer, or Unavailable with what the student should know. ``using``: what the
    probe did with ``thing``, when it was not calling it."""
    if evidence.probe is None:
        raise Unavailable(f"{thing} could not be checked: {_why_no_probe(evidence)}.")
    answer = getattr(evidence.probe, section)
    if isinstance(answer, Problem):
        if answer.kind == "absent":
            raise Unavailable(f"No {thing} was there when the notebook finished ({answer.message}). Define it "
                              "(with that exact name) in a cell that runs without errors.")
        if answer.kind == "raised":
            raise Unavailable(f"{using or 'Calling ' + thing} raised {answer.message}")
        raise Unavailable(f"{thing} could not be checked: {answer.message}.")
    return answer


def _function(evidence: Evidence, section: str) -> FunctionAnswer:
    return _answer(evidence, section, section.removesuffix("_doubled"))


def _pair(returned: Value) -> tuple[float, float] | None:
    """``(loss, accuracy)`` when a function returned exactly two plain numbers."""
    items = returned.items if returned.kind in ("tuple", "list") else None
    if items is None or len(items) != 2 or any(item.number is None for item in items):
        return None
    return items[0].number, items[1].number


def _describe_return(returned: Value) -> str:
    if returned.kind in ("tuple", "list") and returned.items is not None:
        return f"a {returned.kind} of {', '.join(item.kind for item in returned.items)}"
    return f"a {returned.kind}"


def _loss_matches(student: float, reference: float) -> bool:
    """The lab's loss (sum of batch means / items) or the plain mean loss per item."""
    return any(math.isclose(student, candidate, rel_tol=LOSS_RTOL, abs_tol=1e-9)
               for candidate in (reference, reference * BATCH_SIZE))


def _accuracy_matches(student: float, reference: float, items: int) -> bool:
    return abs(student - reference) * items <= ACCURACY_SLACK + 1e-9


def _params_match(student: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> bool:
    return all(student[k].shape == reference[k].shape
               and np.allclose(student[k], reference[k], atol=PARAM_ATOL, rtol=PARAM_RTOL) for k in ("weight", "bias"))


def _trained_as(params: dict[str, np.ndarray], evidence: Evidence,
                field: Callable[[Outcome], dict[str, np.ndarray]]) -> str | None:
    """Which training the grader recognises (``reference``, ``no_zero_grad``) ended with ``params``."""
    return next((name for name, outcome in evidence.expected.outcomes().items()
                 if _params_match(params, field(outcome))), None)


def _graph_warning(section: FunctionAnswer) -> tuple[str, ...]:
    if not section.kept_graph:
        return ()
    names = ", ".join(section.kept_graph)
    return (f"graph_kept_alive: {names} still held an autograd graph when the function returned. "
            f"Adding loss tensors (total_loss += loss) keeps every batch's graph in memory until the "
            f"epoch ends; add loss.item() instead.",)


# --- the notebook ran ---------------------------------------------------------------------------

@check
def check_notebook_runs(evidence: Evidence) -> Verdict:
    """A cell that only downloads a file the instructor provides is not held against the student."""
    cells = evidence.execution.cells
    if not cells:
        return Verdict(0.0, f"The notebook did not run: {evidence.execution.reason}.")
    provided = _provided_downloads(evidence)
    bad = [c for c in cells if c.status != "ok" and c.number not in provided]
    modules, datasets = _module_notes(evidence, bad), _dataset_notes(evidence, bad)
    notes = [_support_note(name, sorted(n for n, f in provided.items() if f == name))
             for name in dict.fromkeys(provided.values())]
    notes += [*modules.values(), *dict.fromkeys(datasets.values())]
    explained = {*provided, *modules, *datasets}
    network = [entry for entry in evidence.execution.network_blocked if _cell_number(entry) not in explained]
    if network and bad:
        notes.append("Grading runs without network access, so downloads and pip installs fail ("
                     + "; ".join(network[:3]) + "): use only the packages installed and the dataset in ./data.")
    tail = "".join(" " + note for note in notes)
    if not bad:
        excused = len(cells) - sum(c.status == "ok" for c in cells)
        ran = (f"All {len(cells)} code cells ran without errors." if not excused else
               f"Every code cell ran without errors but {excused} that only downloaded a provided file.")
        return Verdict(1.0, ran + tail)
    shown = "; ".join(f"cell {c.number}: {c.status}" + (f" ({c.error})" if c.error else "") for c in bad[:5])
    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
    return Verdict((len(cells) - len(bad)) / len(cells),
                   f"{len(bad)} of {len(cells)} code cells did not run cleanly: {shown}{more}. "
                   f"Restart the kernel and run all cells to reproduce.{tail}")


def _cell_number(network_entry: str) -> int | None:
    """The cell an entry of ``Execution.network_blocked`` ("cell N: its first line") names."""
    found = re.match(r"cell (\d+):", network_entry)
    return int(found.group(1)) if found else None


def _sources(evidence: Evidence) -> dict[int, str]:
    """Each code cell's source by its number, as the executed notebook holds it."""
    notebook = evidence.notebook
    return {index + 1: cell.source for index, cell in enumerate(notebook.cells if notebook else ())
            if cell.cell_type == "code"}


# A line that fetches something: a shell download, or Python's urllib and requests.
DOWNLOAD = re.compile(r"^\s*[!%]\s*(wget|curl)\b|urlretrieve|urlopen|requests\.get|https?://", re.M)


def _provided_downloads(evidence: Evidence) -> dict[int, str]:
    """Cells whose every download fetches a support file (by cell number: the file's name)."""
    found = {}
    for number, source in _sources(evidence).items():
        lines = [line for line in source.splitlines() if DOWNLOAD.search(line)]
        names = [name for name in evidence.provided.support_files if lines and all(name in line for line in lines)]
        if names:
            found[number] = names[0]
    return found


def _support_note(name: str, numbers: list[int]) -> str:
    where = ", ".join(map(str, numbers))
    return (f"{name} is provided by the instructor; the download is not needed (cell{'s' * (len(numbers) > 1)} "
            f"{where}: grading runs without network access, and {name} is already in the notebook's folder).")


MISSING_MODULE = re.compile(r"^ModuleNotFoundError: No module named '([\w.]+)'")


def _module_notes(evidence: Evidence, bad: list) -> dict[int, str]:
    """What to tell about each cell that imports a module grading lacks, by cell number."""
    declared = dict(evidence.provided.packages)
    package_of = dict(evidence.provided.modules)
    notes = {}
    for cell in bad:
        found = MISSING_MODULE.match(cell.error or "")
        if not found:
            continue
        module = found.group(1).split(".")[0]
        package = package_of.get(module) or next((p for p in declared if environment.same_name(p, module)), None)
        if package is not None and declared.get(package) is None:
            notes[cell.number] = (f"Cell {cell.number} imports {module}, from the package {package} that the rubric "
                                  "declares, but the grading machine lacks it: that is not your error; your "
                                  f"instructor must install it (pip install {package}) and grade again.")
        elif package is None:
            notes[cell.number] = (f"Cell {cell.number} imports {module}, which the grading environment does not "
                                  f"provide, and every cell using it fails too: do without {module}, or ask your "
                                  "instructor to provide it (an instructor adds the package to the rubric's "
                                  "[environment] packages).")
    return notes


# torchvision's datasets a notebook of this lab may load, as a call: the class name.
DATASET_CALL = re.compile(r"\b(FashionMNIST|KMNIST|EMNIST|QMNIST|MNIST|CIFAR10|CIFAR100|SVHN|STL10)\s*\(")


def _loaded_datasets(source: str) -> list[str]:
    return list(dict.fromkeys(DATASET_CALL.findall(source)))


def _dataset_notes(evidence: Evidence, bad: list) -> dict[int, str]:
    """A failed cell that loads a dataset grading does not provide, by cell number: one sentence."""
    sources = _sources(evidence)
    provided = evidence.provided
    notes = {}
    for cell in bad:
        missing = [name for name in _loaded_datasets(sources.get(cell.number, "")) if name not in provided.datasets]
        if missing:
            notes[cell.number] = (f"This notebook loads {missing[0]}, but this batch provides "
                                  f"{' and '.join(provided.datasets) or 'no dataset'} under ./data; load "
                                  f"torchvision.datasets.{provided.graded_dataset}('./data', ...) as the lab asks.")
    return notes


def _other_dataset(evidence: Evidence) -> str:
    """A sentence when the notebook loads another provided dataset than the one graded, else ""."""
    loaded = [name for source in _sources(evidence).values() for name in _loaded_datasets(source)]
    graded = evidence.provided.graded_dataset
    if not loaded or graded in loaded:
        return ""
    return f" This notebook loads {loaded[0]}; the lab is graded on {graded}."


# --- data ---------------------------------------------------------------------------------------

def _datasets(evidence: Evidence) -> dict[str, DatasetAnswer]:
    return {name: _answer(evidence, name, name, f"Reading {name} (its length, or its items at the grader's "
                          "indices)") for name in DATASETS}


def _sample_problem(name: str, answer: DatasetAnswer, evidence: Evidence) -> str | None:
    """What is wrong with a dataset's items at the grader's indices, or None: each must be the image
    and label the provided dataset has there."""
    dataset = evidence.spec.dataset
    for item, want in zip(answer.items, evidence.expected.data_items[name], strict=True):
        where = f"{name}[{item.index}]"
        if item.shape is None:
            return f"{where} is a {item.kind}, not a tensor (use transform=ToTensor())"
        if list(item.shape) != dataset["sample_shape"]:
            return (f"{where} has shape {list(item.shape)}, expected {dataset['sample_shape']} "
                    "(use transform=ToTensor())")
        if not item.dtype.endswith(dataset["sample_dtype"]):
            return f"{where} is {item.dtype}, expected {dataset['sample_dtype']}"
        if item.min < dataset["min_intensity"] or item.max > dataset["max_intensity"]:
            return (f"{where} has intensities {item.min:.3g}..{item.max:.3g}, outside "
                    f"{dataset['min_intensity']}..{dataset['max_intensity']} (ToTensor scales pixels to 0..1; "
                    "don't normalise differently)")
        if item.label != want["label"] or not math.isclose(item.sum, want["sum"], rel_tol=1e-5):
            return (f"{where} is not the image the provided dataset has at that index "
                    "(load it unshuffled from './data' with ToTensor())")
    return None


def _labels_match(name: str, answer: DatasetAnswer, evidence: Evidence) -> bool:
    """Whether the labels at the grader's indices are the provided dataset's: what a dataset's length
    needs beside it to show the dataset is the one provided."""
    return all(item.label == want["label"] for item, want in zip(answer.items, evidence.expected.data_items[name]))


@check
def check_data_sizes(evidence: Evidence) -> Verdict:
    datasets = _datasets(evidence)
    sizes = evidence.spec.dataset
    problems = []
    for name, want in (("data_train", sizes["train_size"]), ("data_test", sizes["test_size"])):
        got = datasets[name].length
        if got != want:
            problems.append(f"{name} has {got} items, the provided data has {want} "
                            f"(load it with train={name == 'data_train'})")
        elif not _labels_match(name, datasets[name], evidence):
            problems.append(f"{name} has {want} items, as the provided data does, but not its labels at the "
                            "grader's indices (is it shuffled, or another dataset?), and a length alone earns "
                            "nothing")
    if problems:
        return Verdict(0.0, "; ".join(problems) + "." + _other_dataset(evidence))
    return Verdict(1.0, f"data_train has {sizes['train_size']} and data_test {sizes['test_size']} items, "
                   "the provided dataset's.")


@check
def check_data_samples(evidence: Evidence) -> Verdict:
    datasets = _datasets(evidence)
    dataset = evidence.spec.dataset
    problems = [problem for name in DATASETS if (problem := _sample_problem(name, datasets[name], evidence))]
    if problems:
        return Verdict(0.0, "; ".join(problems) + ".")
    return Verdict(1.0, f"Samples are {dataset['sample_shape']} {dataset['sample_dtype']} tensors with "
                   f"intensities in {dataset['min_intensity']}..{dataset['max_intensity']}, the provided "
                   "dataset's images at the grader's indices.")


def _split_of(answer: LoaderAnswer, evidence: Evidence) -> str | None:
    """Which provided split (``train``, ``test``) a loader's dataset is: its length and its labels
    at the grader's indices, or None when it is neither."""
    sizes = {"train": evidence.spec.dataset["train_size"], "test": evidence.spec.dataset["test_size"]}
    return next((split for split, labels in evidence.expected.loader_labels.items()
                 if answer.length == sizes[split] and list(answer.labels) == labels), None)


@check
def check_data_loaders(evidence: Evidence) -> Verdict:
    """The loaders hold the splits their names say: a train_loader over the test split trains on
    the digits the network is then measured on, and every other check would still pass."""
    problems, trains_on_test = [], False
    for name, split in zip(LOADERS, ("train", "test")):
        answer = _answer(evidence, name, name, f"Reading {name}.dataset (its length, or its labels at the "
                         "grader's indices)")
        holds = _split_of(answer, evidence)
        if holds == split:
            continue
        source = f"data_{split}"
        if holds is not None:
            trains_on_test |= name == "train_loader"
            problems.append(f"{name} holds the {holds} split ({answer.length} items with the provided {holds} "
                            f"set's labels at the grader's indices), not the {split} split: build it from {source}")
        else:
            problems.append(f"{name}'s dataset ({answer.length} items, a {answer.dataset_type}) is neither the "
                            f"provided training set nor its test set at the grader's indices: build it from {source}, "
                            "unshuffled as loaded (let the DataLoader shuffle)")
    if problems:
        why = (" The network trains on the digits it is then tested on, so its test accuracy means nothing."
               if trains_on_test else "")
        return Verdict(0.0, "; ".join(problems) + "." + why)
    return Verdict(1.0, "train_loader holds the provided training set and test_loader its test set.")


# --- the model ----------------------------------------------------------------------------------

def _log_softmax(z: np.ndarray, axis: int) -> np.ndarray:
    shifted = z - z.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


HIDDEN_ACTIVATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "ReLU": lambda x: np.maximum(x, 0), "sigmoid": lambda x: 0.5 * (1 + np.tanh(x / 2)), "tanh": np.tanh,
    "none": lambda x: x}
OUTPUT_LAYERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "LogSoftmax(dim=1)": lambda z: _log_softmax(z, 1), "LogSoftmax(dim=0)": lambda z: _log_softmax(z, 0),
    "Softmax(dim=1)": lambda z: np.exp(_log_softmax(z, 1)), "Softmax(dim=0)": lambda z: np.exp(_log_softmax(z, 0)),
    "no output layer": lambda z: z}


def _linear_stack(state: tuple[tuple[str, np.ndarray], ...]) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """net's state as Linear layers in order (weight, bias), mapping 784 pixels onwards, or None."""
    entries = dict(state)
    layers = []
    for key, weight in state:
        if key.endswith(".weight"):
            bias = entries.get(key.removesuffix("weight") + "bias")
            if weight.ndim != 2 or bias is None or bias.shape != weight.shape[:1]:
                return None
            layers.append((weight, bias))
    widths = [784] + [weight.shape[0] for weight, _ in layers]
    if not layers or len(layers) * 2 != len(state) or any(w.shape[1] != n for (w, _), n in zip(layers, widths)):
        return None
    return layers


def _verify_output(answer: ModelAnswer, evidence: Evidence) -> tuple[bool, str]:
    """Whether net's reported output is what its own weights compute on the grader's images:
    (True, "") when it is; (False, why) when that can't be known. Raises Unavailable when the weights
    say otherwise: the output was not computed by those layers."""
    layers = _linear_stack(answer.state) if answer.state is not None else None
    if layers is None:
        why = answer.state_note or "net's weights are not a stack of Linear layers"
        return False, why
    x = evidence.plan.arrays["model_input"].reshape(MODEL_BATCH, -1).astype(np.float64)
    for name, activation in HIDDEN_ACTIVATIONS.items():
        z = x
        for index, (weight, bias) in enumerate(layers):
            z = (activation(z) if index else z) @ weight.T + bias
        for output_layer in OUTPUT_LAYERS.values():
            want = output_layer(z)
            if want.shape == answer.output.shape and np.allclose(answer.output, want, atol=OUTPUT_ATOL,
                                                                 rtol=OUTPUT_RTOL):
                return True, ""
        if len(layers) == 1:
            break  # one layer: no hidden activation to try
    raise Unavailable("net's output on the grader's images is not what its own weights compute (its "
                      "state_dict read as Linear layers in order, with ReLU, sigmoid or tanh between them and "
                      "LogSoftmax, Softmax or nothing at the end), so it could not be credited. If net is "
                      "such a stack, apply its layers in the order they are defined.")


def _model_output(evidence: Evidence) -> tuple[np.ndarray, tuple[str, ...]]:
    """net's output on the grader's images, and the warning to attach when it can't be verified."""
    answer: ModelAnswer = _answer(evidence, "model", "net")
    if not answer.is_module:
        raise Unavailable(f"net is a {answer.type}, not a torch.nn.Module.")
    if answer.output is None:
        raise Unavailable(f"net(images) returned a {answer.output_type}, not a tensor.")
    verified, why = _verify_output(answer, evidence)
    warning = () if verified else (f"model_unverified: {why}, so labgrader could not recompute net's output "
                                   "from its weights; this verdict rests on the output the kernel reported.",)
    return answer.output, warning


@check
def check_model_output_shape(evidence: Evidence) -> Verdict:
    output, warning = _model_output(evidence)
    batch = MODEL_BATCH
    if output.shape != (batch, 10):
        return Verdict(0.0, f"net mapped a batch of shape ({batch}, 1, 28, 28) to {output.shape}; it should "
                       f"give ({batch}, 10): one score per digit.", warning)
    return Verdict(1.0, f"net maps ({batch}, 1, 28, 28) images to ({batch}, 10).", warning)


@check
def check_model_log_probs(evidence: Evidence) -> Verdict:
    output, warning = _model_output(evidence)
    if output.ndim != 2 or output.shape[1] != 10:
        return Verdict(0.0, "net's output is not (batch, 10), so it can't hold log-probabilities per image.",
                       warning)
    if np.allclose(np.exp(output).sum(axis=1), 1.0, atol=1e-4):
        return Verdict(1.0, "Each image's ten outputs are log-probabilities (their exponentials sum to 1).",
                       warning + _implicit_dim_warning(evidence))
    if np.allclose(np.exp(output).sum(axis=0), 1.0, atol=1e-4):
        return Verdict(0.0, "net normalises over the batch, not over the ten digits: use "
                       "nn.LogSoftmax(dim=1) so each image's probabilities sum to 1.", warning)
    return Verdict(0.0, "net's outputs are not log-probabilities: end the model with nn.LogSoftmax(dim=1) "
                   "(NLLLoss expects log-probabilities).", warning)


def _implicit_dim_warning(evidence: Evidence) -> tuple[str, ...]:
    """PyTorch warns when LogSoftmax has no ``dim``; the guess is right for (N, 10), but only by luck."""
    for cell in evidence.notebook.cells if evidence.notebook else ():
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream" and "Implicit dimension choice" in output.get("text", ""):
                return ("logsoftmax_implicit_dim: nn.LogSoftmax() without dim makes PyTorch guess the "
                        "dimension (and warn); write nn.LogSoftmax(dim=1) to normalise over the ten digits.",)
    return ()


# --- train_epoch --------------------------------------------------------------------------------

SIGNATURE = "train_epoch(net, dataloader, lr=0.01, optimizer=None, loss_fn=nn.NLLLoss())"


@check
def check_train_epoch_signature(evidence: Evidence) -> Verdict:
    """Uses the optimizer and the loss function it is given: its update follows the given SGD, and
    doubles with a loss_fn that doubles the loss."""
    section = _function(evidence, "train_epoch")
    missing = [name for name in ("optimizer", "loss_fn") if name not in section.passed]
    if missing:
        return Verdict(0.0, f"train_epoch has no parameter named {' or '.join(missing)}, so it can't be given "
                       f"them; the lab's signature is {SIGNATURE}.")
    if _trained_as(section.params, evidence, lambda o: o.epoch_params) is None:
        return Verdict(0.0, "train_epoch's update of the weights is not the reference's (see "
                       "train_epoch_updates), so whether it uses the optimizer and loss function it is given "
                       "could not be confirmed.")
    doubled = evidence.probe.train_epoch_doubled
    if isinstance(doubled, FunctionAnswer) and _trained_as(doubled.params, evidence, lambda o: o.epoch_doubled_params):
        return Verdict(1.0, "train_epoch uses the optimizer and the loss function it is given: with a loss_fn "
                       f"giving {LOSS_FACTOR:g} x NLLLoss, its update changed as the reference's does.")
    return Verdict(0.5, "train_epoch uses the optimizer it is given but not the loss function: "
                   + _ignored_loss(doubled, evidence, lambda o: o.epoch_params)
                   + " Compute each batch's loss with loss_fn(output, labels).")


def _ignored_loss(doubled: FunctionAnswer | Problem, evidence: Evidence,
                  plain: Callable[[Outcome], dict[str, np.ndarray]]) -> str:
    """What the probe saw when it passed a loss_fn giving twice NLLLoss."""
    if isinstance(doubled, Problem):
        return f"given a loss_fn giving {LOSS_FACTOR:g} x NLLLoss, the call failed ({doubled.message[:200]})."
    if _trained_as(doubled.params, evidence, plain) is not None:
        return (f"given a loss_fn giving {LOSS_FACTOR:g} x NLLLoss, it trained exactly as with nn.NLLLoss() "
                f"(it called that loss_fn {doubled.loss_calls} times).")
    return (f"given a loss_fn giving {LOSS_FACTOR:g} x NLLLoss, its update was neither the reference's with "
            f"that loss nor with nn.NLLLoss() (it called that loss_fn {doubled.loss_calls} times).")


@check
def check_train_epoch_result(evidence: Evidence) -> Verdict:
    section = _function(evidence, "train_epoch")
    pair = _pair(section.returned)
    if pair is None:
        return Verdict(0.0, "train_epoch should return two plain numbers (loss, accuracy), but returned "
                       f"{_describe_return(section.returned)}. Convert tensors with .item().", _graph_warning(section))
    loss, accuracy = pair
    want_loss, want_accuracy = evidence.expected.reference.epoch
    problems = []
    if not _accuracy_matches(accuracy, want_accuracy, TRAIN_ITEMS):
        problems.append(f"accuracy {accuracy:.4f} where the reference gets {want_accuracy:.4f} "
                        "(accuracy is correct predictions / items, between 0 and 1)")
    if not _loss_matches(loss, want_loss):
        problems.append(f"loss {loss:.6g} where the reference gets {want_loss:.6g} (sum of the batches' "
                        "loss.item() divided by the number of items)")
    if problems:
        return Verdict(0.0, "On the grader's batches train_epoch returned " + "; ".join(problems) + ".",
                       _graph_warning(section))
    return Verdict(1.0, "train_epoch's loss and accuracy match the reference on the grader's batches.",
                   _graph_warning(section))


@check
def check_train_epoch_updates(evidence: Evidence) -> Verdict:
    section = _function(evidence, "train_epoch")
    trained = _trained_as(section.params, evidence, lambda o: o.epoch_params)
    if trained == "reference":
        return Verdict(1.0, "train_epoch updates the weights exactly as the reference does.")
    if trained == "no_zero_grad":
        return Verdict(0.0, "Gradients pile up from batch to batch: call optimizer.zero_grad() before "
                       "loss.backward() in every batch.")
    if section.steps == 0:
        return Verdict(0.0, "The optimizer passed to train_epoch never stepped: use the optimizer argument "
                       "(optimizer.step() after backward()) instead of creating a new one.")
    if section.steps != TRAIN_BATCHES:
        return Verdict(0.0, f"The optimizer stepped {section.steps} times over {TRAIN_BATCHES} batches; step "
                       "once per batch, over every batch.")
    return Verdict(0.0, "After one epoch the weights differ from the reference's: check the order "
                   "zero_grad() -> forward -> loss -> backward() -> step(), and that the loss uses loss_fn.")


@check
def check_train_epoch_train_mode(evidence: Evidence) -> Verdict:
    section = _function(evidence, "train_epoch")
    if not section.forwards:
        return Verdict(0.0, "train_epoch never ran the network.")
    if not all(f.training and f.grad_enabled for f in section.forwards):
        return Verdict(0.0, "train_epoch ran the network outside training mode: call net.train() at its start "
                       "(validate switches to eval mode).")
    if _trained_as(section.params, evidence, lambda o: o.epoch_params) is None:
        return Verdict(0.0, "train_epoch ran the network in training mode, but its update of the weights is not "
                       "the reference's (see train_epoch_updates), so its training mode could not be credited.")
    return Verdict(1.0, "train_epoch switches the network to training mode (net.train()).")


# --- validate -----------------------------------------------------------------------------------

def _validate_matches(section: FunctionAnswer, evidence: Evidence) -> tuple[float, float] | None:
    """validate's (loss, accuracy) when they are the reference's, else None."""
    pair = _pair(section.returned)
    want_loss, want_accuracy = evidence.expected.validate
    if pair is not None and _accuracy_matches(pair[1], want_accuracy, TEST_ITEMS) and _loss_matches(pair[0], want_loss):
        return pair
    return None


@check
def check_validate_result(evidence: Evidence) -> Verdict:
    section = _function(evidence, "validate")
    pair = _pair(section.returned)
    if pair is None:
        return Verdict(0.0, "validate should return two plain numbers (loss, accuracy), but returned "
                       f"{_describe_return(section.returned)}.")
    if _validate_matches(section, evidence):
        return Verdict(1.0, "validate's loss and accuracy match the reference.")
    want_loss, want_accuracy = evidence.expected.validate
    return Verdict(0.0, f"On the grader's test batches validate returned loss {pair[0]:.6g} and accuracy "
                   f"{pair[1]:.4f}; the reference gets {want_loss:.6g} and {want_accuracy:.4f}.")


@check
def check_validate_no_side_effects(evidence: Evidence) -> Verdict:
    section = _function(evidence, "validate")
    if _validate_matches(section, evidence) is None:
        return Verdict(0.0, "validate's loss and accuracy are not the reference's (see validate_result), so "
                       "how it runs the network could not be credited.")
    problems = []
    if not _params_match(section.params, evidence.expected.initial_params):
        problems.append("changed the weights (validation must not train)")
    if not section.forwards or any(f.training for f in section.forwards):
        problems.append("ran the network in training mode (call net.eval() first)")
    if not section.forwards or any(f.grad_enabled for f in section.forwards):
        problems.append("tracked gradients (wrap the loop in `with torch.no_grad():`)")
    if problems:
        return Verdict(1 - len(problems) / 3, "validate " + "; ".join(problems) + ".")
    return Verdict(1.0, "validate uses eval mode and no_grad and leaves the weights unchanged.")


# --- train --------------------------------------------------------------------------------------

@check
def check_train_history(evidence: Evidence) -> Verdict:
    section = _function(evidence, "train")
    returned = section.returned
    if returned.kind != "dict" or returned.keys is None:
        return Verdict(0.0, f"train should return the history dict, but returned {_describe_return(returned)}.")
    want = evidence.expected.reference.history
    if set(returned.keys) != set(want):
        return Verdict(0.0, f"train's history has keys {sorted(returned.keys)}; it should have exactly "
                       f"{list(want)}.")
    epochs = len(want["train_loss"])
    values = {}
    for key, entry in zip(returned.keys, returned.items):
        if entry.items is None or len(entry.items) != epochs or any(item.number is None for item in entry.items):
            return Verdict(0.0, f"history['{key}'] should be a list of {epochs} plain numbers (one per epoch, "
                           f"run with epochs={epochs}).")
        values[key] = [item.number for item in entry.items]
    matching = {name: [key for key in want if _history_matches(key, values[key], outcome.history[key])]
                for name, outcome in evidence.expected.outcomes().items()}
    if len(matching["reference"]) == len(want):
        return Verdict(1.0, "train returns the four histories, one value per epoch, matching the reference.")
    if len(matching["no_zero_grad"]) == len(want):
        return Verdict(0.75, "train returns the four histories, but they are what training without "
                       "optimizer.zero_grad() gives (see train_epoch_updates), not the reference's.")
    if matching["reference"]:
        off = [key for key in want if key not in matching["reference"]]
        return Verdict(0.75, f"The history has the right shape, but {', '.join(off)} differ from the reference "
                       "on the grader's data: train should record what train_epoch and validate return, in "
                       "that order, every epoch.")
    return Verdict(0.0, "train returns a history of the right shape, but none of its values are those of "
                   "training on the grader's data, so its shape alone earns nothing: train should record "
                   "what train_epoch and validate return, in that order, every epoch.")


def _history_matches(key: str, values: list[float], want: list[float]) -> bool:
    if "acc" in key:
        items = TRAIN_ITEMS if key == "train_acc" else TEST_ITEMS
        return all(_accuracy_matches(v, w, items) for v, w in zip(values, want))
    return all(_loss_matches(v, w) for v, w in zip(values, want))


@check
def check_train_uses_arguments(evidence: Evidence) -> Verdict:
    """The optimizer shows in the trained weights; the loss function in how they change when it
    gives twice NLLLoss."""
    section = _function(evidence, "train")
    if _trained_as(section.params, evidence, lambda o: o.train_params) is None:
        seen = []
        if section.steps == 0:
            seen.append("the optimizer passed to train never stepped")
        if section.loss_calls == 0:
            seen.append("the loss function passed to train was never called")
        observed = f" ({'; '.join(seen)})" if seen else ""
        return Verdict(0.0, "train's trained weights are not those of training on the grader's data with the "
                       f"optimizer it is given{observed}, so that it uses its arguments could not be confirmed: "
                       "run train_epoch once per epoch with the given optimizer and loss_fn, and validate "
                       "without training.")
    doubled = evidence.probe.train_doubled
    if isinstance(doubled, FunctionAnswer) and _trained_as(doubled.params, evidence, lambda o: o.train_doubled_params):
        return Verdict(1.0, "train uses the optimizer and loss function it is given.")
    epoch_doubled = evidence.probe.train_epoch_doubled
    if isinstance(epoch_doubled, FunctionAnswer) and _trained_as(epoch_doubled.params, evidence,
                                                                 lambda o: o.epoch_params) is not None:
        # Then train's weights can't show whether it passes loss_fn on: say what was seen, and where.
        return Verdict(0.5, "train uses the optimizer it is given; "
                       + _ignored_loss(doubled, evidence, lambda o: o.train_params)
                       + " train_epoch ignores the loss_fn it is given (see train_epoch_signature), so train "
                       "can't use it either: compute each batch's loss with loss_fn(output, labels) in train_epoch.")
    return Verdict(0.5, "train uses the optimizer it is given but not the loss function: "
                   + _ignored_loss(doubled, evidence, lambda o: o.train_params)
                   + " Pass loss_fn on to train_epoch and validate.")


# --- the saved model ----------------------------------------------------------------------------

@check
def check_saved_model_loads(evidence: Evidence) -> Verdict:
    saved = evidence.saved_model
    return Verdict(1.0 if saved.status == "ok" else 0.0, saved.message)


@check
def check_saved_model_accuracy(evidence: Evidence) -> Verdict:
    saved = evidence.saved_model
    if saved.accuracy is None:
        return Verdict(0.0, "The saved model's accuracy could not be measured: " + saved.message)
    need = evidence.spec.min_accuracy
    sample = " (on the MNIST sample profile)" if evidence.spec.content.get("is_sample") else ""
    if saved.accuracy >= need:
        return Verdict(1.0, f"The saved model classifies {saved.accuracy:.1%} of the test set correctly{sample}; "
                       f"at least {need:.1%} is needed.")
    return Verdict(0.0, f"The saved model classifies only {saved.accuracy:.1%} of the test set correctly{sample}; "
                   f"at least {need:.1%} is needed. Save the model after training it (the reference reaches "
                   f"{evidence.spec.content['test_accuracy']:.1%} in {evidence.spec.content['training']['epochs']} epochs).")


# --- figures ------------------------------------------------------------------------------------
# What the kernel recorded of each figure shown (its images' shapes and value ranges, its lines'
# lengths): self-reported, which is why these checks are worth little. No figure is credited for a
# picture alone: it must hold what the lab draws.

SELF_REPORTED = "(as recorded in the kernel when the figure was shown)"


def _digits(figure) -> list:
    """The figure's images that are 28x28 pictures (a trailing channel allowed)."""
    return [image for image in figure.images
            if len(image.shape) in (2, 3) and tuple(image.shape[:2]) == (IMAGE_SIDE, IMAGE_SIDE)]


def _figures(evidence: Evidence, what: str) -> tuple:
    if evidence.probe is None:
        raise Unavailable(f"{what.capitalize()} could not be checked: {_why_no_probe(evidence)}.")
    figures = evidence.probe.figures
    if isinstance(figures, Problem):
        raise Unavailable(f"{what.capitalize()} could not be checked: {figures.message}.")
    return figures


@check
def check_figures_samples(evidence: Evidence) -> Verdict:
    for figure in _figures(evidence, "the sample digits"):
        # Pixels as the dataset holds them: 0..1 (ToTensor) or 0..255; the weights have negative values.
        if any(image.min >= 0 and image.max <= 255 for image in _digits(figure)):
            return Verdict(1.0, f"The notebook shows sample digits: 28x28 images of pixel values {SELF_REPORTED}.")
    return Verdict(0.0, "No figure showed a sample digit (a 28x28 image of the dataset's pixels): show some "
                   "with plt.imshow(image.view(28, 28)) in a cell that runs without errors.")


@check
def check_figures_history(evidence: Evidence) -> Verdict:
    figures = _figures(evidence, "the training history")
    history = evidence.probe.history
    lengths = {len(values) for values in history.values.values()} if not isinstance(history, Problem) else set()
    epochs = [n for n in lengths if n >= 2]
    if not epochs:
        return Verdict(0.0, "The training history plot could not be matched to the notebook's training: the "
                       "notebook has no hist with two or more epochs of values (hist = train(...)).")
    if any(points in epochs for figure in figures for points in figure.lines):
        return Verdict(1.0, f"The notebook plots the training history: a line with one point per epoch "
                       f"{SELF_REPORTED}.")
    return Verdict(0.0, f"No figure plotted the training history (a line of {' or '.join(map(str, epochs))} "
                   "points, one per epoch of hist): plot hist['train_acc'] and the others with plt.plot.")


@check
def check_figures_weights(evidence: Evidence) -> Verdict:
    for figure in _figures(evidence, "the ten weight images"):
        if len(_digits(figure)) >= 10 and any(image.min < 0 for image in _digits(figure)):
            return Verdict(1.0, f"The notebook shows the weights as ten 28x28 images {SELF_REPORTED}.")
    return Verdict(0.0, "No figure showed the ten weight images (ten 28x28 images of the first layer's weights, "
                   "which have negative values): draw each row of the weight matrix with "
                   "imshow(row.view(28, 28).detach()).")
