"""The checks: one small named function each, returning the fraction earned and a message a
student can act on. Every verdict is made here, in the grader's process, from the executor's record,
the grader's own reading of the saved model, and the probe's raw values compared with the reference's
answers on the same inputs.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from grader.probe import BATCH_SIZE, MODEL_BATCH, TEST_BATCHES, TRAIN_BATCHES
from grader.results import CheckResult, Execution

if TYPE_CHECKING:  # the checks compute with numpy; importing torch would cost every regrade seconds
    import nbformat

    from grader.expected import Expected
    from grader.saved_model import SavedModel
    from reference.spec import Spec

# Single-threaded on both sides, equivalent implementations agree to the last bit; these bounds
# leave room for reordered sums while a skipped batch (~1e-3) or missing zero_grad (~5e-2) fails.
PARAM_ATOL, PARAM_RTOL = 1e-5, 1e-4
LOSS_RTOL = 1e-4
ACCURACY_SLACK = 2  # items: argmax ties may fall either way
TRAIN_ITEMS = TRAIN_BATCHES * BATCH_SIZE
TEST_ITEMS = TEST_BATCHES * BATCH_SIZE


@dataclass(frozen=True)
class Evidence:
    spec: Spec
    execution: Execution
    saved_model: SavedModel
    expected: Expected
    probe: dict[str, Any] | None
    notebook: nbformat.NotebookNode | None


Check = Callable[[Evidence], CheckResult]
CHECKS: dict[str, Check] = {}


def check(function: Check) -> Check:
    CHECKS[function.__name__.removeprefix("check_")] = function
    return function


def run_checks(evidence: Evidence) -> list[CheckResult]:
    """Every check, whatever the rubric scores: the verdicts are kept and a rubric may change."""
    results = []
    for name, check_function in CHECKS.items():
        try:
            results.append(check_function(evidence))
        except Exception as error:  # a malformed probe answer must cost only its own check
            results.append(CheckResult(name, 0.0, "This could not be checked: the values your notebook "
                                       f"produced were not in a usable form ({type(error).__name__})."))
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
    return "the grader's probe got no answer from the notebook's kernel"


def _section(evidence: Evidence, name: str, thing: str) -> dict[str, Any]:
    if evidence.probe is None:
        raise Unavailable(f"{thing} could not be checked: {_why_no_probe(evidence)}.")
    section = evidence.probe.get(name)
    if section is None or section.get("exists") is False:
        raise Unavailable(f"No {thing} was defined when the notebook finished. Define it (with that "
                          "exact name) in a cell that runs without errors.")
    if "error" in section:
        error = section["error"]
        raise Unavailable(f"Calling {thing} raised {error['type']}: {error['message']}")
    return section


def guarded(function: Check) -> Check:
    def run(evidence: Evidence) -> CheckResult:
        try:
            return function(evidence)
        except Unavailable as missing:
            return CheckResult(function.__name__.removeprefix("check_"), 0.0, str(missing))
    run.__name__ = function.__name__
    run.__doc__ = function.__doc__
    return run


def _pair(returned: dict[str, Any] | None) -> tuple[float, float] | None:
    """``(loss, accuracy)`` when a function returned exactly two plain numbers."""
    if not returned or returned.get("kind") not in ("tuple", "list") or len(returned["items"]) != 2:
        return None
    items = returned["items"]
    if not all(i.get("kind") in ("float", "int", "float64", "float32") and isinstance(i.get("value"), float)
               for i in items):
        return None
    return items[0]["value"], items[1]["value"]


def _describe_return(returned: dict[str, Any] | None) -> str:
    if not returned:
        return "nothing"
    if returned.get("kind") in ("tuple", "list"):
        return f"a {returned['kind']} of {', '.join(i.get('kind', '?') for i in returned['items'])}"
    return f"a {returned.get('kind')}"


def _loss_matches(student: float, reference: float) -> bool:
    """The lab's loss (sum of batch means / items) or the plain mean loss per item."""
    return any(math.isclose(student, candidate, rel_tol=LOSS_RTOL, abs_tol=1e-9)
               for candidate in (reference, reference * BATCH_SIZE))


def _accuracy_matches(student: float, reference: float, items: int) -> bool:
    return abs(student - reference) * items <= ACCURACY_SLACK + 1e-9


def _params_match(student: dict[str, Any], reference: dict[str, Any]) -> bool:
    pairs = [(np.asarray(student[k], dtype=np.float64), np.asarray(reference[k], dtype=np.float64))
             for k in ("weight", "bias")]
    return all(got.shape == want.shape and np.allclose(got, want, atol=PARAM_ATOL, rtol=PARAM_RTOL)
               for got, want in pairs)


def _graph_warning(section: dict[str, Any]) -> tuple[str, ...]:
    kept = section.get("kept_graph") or []
    if not kept:
        return ()
    names = ", ".join(kept)
    return (f"graph_kept_alive: {names} still held an autograd graph when the function returned. "
            f"Adding loss tensors (total_loss += loss) keeps every batch's graph in memory until the "
            f"epoch ends; add loss.item() instead.",)


# --- the notebook ran ---------------------------------------------------------------------------

@check
def check_notebook_runs(evidence: Evidence) -> CheckResult:
    cells = evidence.execution.cells
    if not cells:
        return CheckResult("notebook_runs", 0.0, f"The notebook did not run: {evidence.execution.reason}.")
    bad = [c for c in cells if c.status != "ok"]
    if not bad:
        return CheckResult("notebook_runs", 1.0, f"All {len(cells)} code cells ran without errors.")
    shown = "; ".join(f"cell {c.index + 1}: {c.status}" + (f" ({c.error})" if c.error else "") for c in bad[:5])
    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
    network = ""
    if evidence.execution.network_blocked:
        network = (" Grading runs without network access, so downloads and pip installs fail ("
                   + "; ".join(evidence.execution.network_blocked[:3]) + "): use only the packages "
                   "installed and the dataset in ./data.")
    return CheckResult("notebook_runs", (len(cells) - len(bad)) / len(cells),
                       f"{len(bad)} of {len(cells)} code cells did not run cleanly: {shown}{more}. "
                       f"Restart the kernel and run all cells to reproduce.{network}")


# --- data ---------------------------------------------------------------------------------------

@check
@guarded
def check_data_sizes(evidence: Evidence) -> CheckResult:
    facts = _section(evidence, "data", "data_train/data_test")
    dataset = evidence.spec.dataset
    problems = []
    for name, want in (("data_train", dataset["train_size"]), ("data_test", dataset["test_size"])):
        got = facts.get(name)
        if got is None:
            problems.append(f"{name} is not defined")
        elif got["len"] != want:
            problems.append(f"{name} has {got['len']} items, the provided data has {want} "
                            f"(load it with train={name == 'data_train'})")
    if problems:
        return CheckResult("data_sizes", 0.0, "; ".join(problems) + ".")
    return CheckResult("data_sizes", 1.0, f"data_train has {dataset['train_size']} and data_test "
                       f"{dataset['test_size']} items, as expected.")


@check
@guarded
def check_data_samples(evidence: Evidence) -> CheckResult:
    facts = _section(evidence, "data", "data_train/data_test")
    dataset = evidence.spec.dataset
    problems = []
    for name in ("data_train", "data_test"):
        got = facts.get(name)
        if got is None:
            problems.append(f"{name} is not defined")
            continue
        for item, want in zip(got["items"], evidence.expected.data_items[name]):
            where = f"{name}[{item['index']}]"
            if item["shape"] != dataset["sample_shape"]:
                problems.append(f"{where} has shape {item['shape']}, expected {dataset['sample_shape']} "
                                "(use transform=ToTensor())")
            elif not item["dtype"].endswith(dataset["sample_dtype"]):
                problems.append(f"{where} is {item['dtype']}, expected {dataset['sample_dtype']}")
            elif item["min"] < dataset["min_intensity"] or item["max"] > dataset["max_intensity"]:
                problems.append(f"{where} has intensities {item['min']:.3g}..{item['max']:.3g}, outside "
                                f"{dataset['min_intensity']}..{dataset['max_intensity']} (ToTensor scales "
                                "pixels to 0..1; don't normalise differently)")
            elif item["label"] != want["label"] or not math.isclose(item["sum"], want["sum"], rel_tol=1e-5):
                problems.append(f"{where} is not the image the provided dataset has at that index "
                                "(load it unshuffled from './data' with ToTensor())")
            if problems:
                break
    if problems:
        return CheckResult("data_samples", 0.0, "; ".join(problems) + ".")
    return CheckResult("data_samples", 1.0, f"Samples are {dataset['sample_shape']} {dataset['sample_dtype']} "
                       f"tensors with intensities in {dataset['min_intensity']}..{dataset['max_intensity']}.")


# --- the model ----------------------------------------------------------------------------------

def _model_output(evidence: Evidence) -> np.ndarray:
    section = _section(evidence, "model", "net")
    if not section.get("is_module"):
        raise Unavailable(f"net is a {section.get('type')}, not a torch.nn.Module.")
    output = section.get("output")
    if not isinstance(output, list):
        raise Unavailable("net(images) did not return a tensor.")
    return np.asarray(output, dtype=np.float64)


@check
@guarded
def check_model_output_shape(evidence: Evidence) -> CheckResult:
    output = _model_output(evidence)
    batch = MODEL_BATCH
    if tuple(output.shape) != (batch, 10):
        return CheckResult("model_output_shape", 0.0, f"net mapped a batch of shape ({batch}, 1, 28, 28) to "
                           f"{tuple(output.shape)}; it should give ({batch}, 10): one score per digit.")
    return CheckResult("model_output_shape", 1.0, f"net maps ({batch}, 1, 28, 28) images to ({batch}, 10).")


@check
@guarded
def check_model_log_probs(evidence: Evidence) -> CheckResult:
    output = _model_output(evidence)
    if output.ndim != 2 or output.shape[1] != 10:
        return CheckResult("model_log_probs", 0.0, "net's output is not (batch, 10), so it can't hold "
                           "log-probabilities per image.")
    if np.allclose(np.exp(output).sum(axis=1), 1.0, atol=1e-4):
        return CheckResult("model_log_probs", 1.0, "Each image's ten outputs are log-probabilities "
                           "(their exponentials sum to 1).", _implicit_dim_warning(evidence))
    if np.allclose(np.exp(output).sum(axis=0), 1.0, atol=1e-4):
        return CheckResult("model_log_probs", 0.0, "net normalises over the batch, not over the ten "
                           "digits: use nn.LogSoftmax(dim=1) so each image's probabilities sum to 1.")
    return CheckResult("model_log_probs", 0.0, "net's outputs are not log-probabilities: end the model "
                       "with nn.LogSoftmax(dim=1) (NLLLoss expects log-probabilities).")


def _implicit_dim_warning(evidence: Evidence) -> tuple[str, ...]:
    """PyTorch warns when LogSoftmax has no ``dim``; the guess is right for (N, 10), but only by luck."""
    for cell in evidence.notebook.cells if evidence.notebook else ():
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream" and "Implicit dimension choice" in output.get("text", ""):
                return ("logsoftmax_implicit_dim: nn.LogSoftmax() without dim makes PyTorch guess the "
                        "dimension (and warn); write nn.LogSoftmax(dim=1) to normalise over the ten digits.",)
    return ()


# --- train_epoch --------------------------------------------------------------------------------

def _train_epoch(evidence: Evidence) -> dict[str, Any]:
    return _section(evidence, "train_epoch", "train_epoch")


@check
@guarded
def check_train_epoch_signature(evidence: Evidence) -> CheckResult:
    section = _train_epoch(evidence)
    names = [p["name"] for p in section.get("signature") or []]
    missing = [n for n in ("optimizer", "loss_fn") if n not in section.get("passed", [])]
    if len(names) < 2:
        return CheckResult("train_epoch_signature", 0.0, "train_epoch should take the network and a "
                           "DataLoader as its first two arguments.")
    if missing:
        return CheckResult("train_epoch_signature", 0.5, "train_epoch has no parameter named "
                           f"{' or '.join(missing)}; the lab's signature is train_epoch(net, dataloader, "
                           "lr=0.01, optimizer=None, loss_fn=nn.NLLLoss()).")
    return CheckResult("train_epoch_signature", 1.0, f"train_epoch({', '.join(names)}) accepts the "
                       "optimizer and loss function it is given.")


@check
@guarded
def check_train_epoch_result(evidence: Evidence) -> CheckResult:
    section = _train_epoch(evidence)
    pair = _pair(section.get("returned"))
    if pair is None:
        return CheckResult("train_epoch_result", 0.0, "train_epoch should return two plain numbers "
                           f"(loss, accuracy), but returned {_describe_return(section.get('returned'))}. "
                           "Convert tensors with .item().", _graph_warning(section))
    loss, accuracy = pair
    want_loss, want_accuracy = evidence.expected.train_epoch
    problems = []
    if not _accuracy_matches(accuracy, want_accuracy, TRAIN_ITEMS):
        problems.append(f"accuracy {accuracy:.4f} where the reference gets {want_accuracy:.4f} "
                        "(accuracy is correct predictions / items, between 0 and 1)")
    if not _loss_matches(loss, want_loss):
        problems.append(f"loss {loss:.6g} where the reference gets {want_loss:.6g} (sum of the batches' "
                        "loss.item() divided by the number of items)")
    if problems:
        return CheckResult("train_epoch_result", 0.0, "On the grader's batches train_epoch returned "
                           + "; ".join(problems) + ".", _graph_warning(section))
    return CheckResult("train_epoch_result", 1.0, "train_epoch's loss and accuracy match the reference "
                       "on the grader's batches.", _graph_warning(section))


@check
@guarded
def check_train_epoch_updates(evidence: Evidence) -> CheckResult:
    section = _train_epoch(evidence)
    expected = evidence.expected
    if _params_match(section["params"], expected.train_epoch_params):
        return CheckResult("train_epoch_updates", 1.0, "train_epoch updates the weights exactly as the "
                           "reference does.")
    if _params_match(section["params"], expected.no_zero_grad_params):
        return CheckResult("train_epoch_updates", 0.0, "Gradients pile up from batch to batch: call "
                           "optimizer.zero_grad() before loss.backward() in every batch.")
    if section.get("steps", 0) == 0:
        return CheckResult("train_epoch_updates", 0.0, "The optimizer passed to train_epoch never "
                           "stepped: use the optimizer argument (optimizer.step() after backward()) "
                           "instead of creating a new one.")
    batches = TRAIN_ITEMS // BATCH_SIZE
    if section.get("steps") != batches:
        return CheckResult("train_epoch_updates", 0.0, f"The optimizer stepped {section.get('steps')} "
                           f"times over {batches} batches; step once per batch, over every batch.")
    return CheckResult("train_epoch_updates", 0.0, "After one epoch the weights differ from the "
                       "reference's: check the order zero_grad() -> forward -> loss -> backward() -> "
                       "step(), and that the loss uses loss_fn.")


@check
@guarded
def check_train_epoch_train_mode(evidence: Evidence) -> CheckResult:
    forwards = _train_epoch(evidence).get("forwards") or []
    if not forwards:
        return CheckResult("train_epoch_train_mode", 0.0, "train_epoch never ran the network.")
    if all(f["training"] and f["grad_enabled"] for f in forwards):
        return CheckResult("train_epoch_train_mode", 1.0, "train_epoch switches the network to training "
                           "mode (net.train()).")
    return CheckResult("train_epoch_train_mode", 0.0, "train_epoch ran the network outside training "
                       "mode: call net.train() at its start (validate switches to eval mode).")


# --- validate -----------------------------------------------------------------------------------

def _validate(evidence: Evidence) -> dict[str, Any]:
    return _section(evidence, "validate", "validate")


@check
@guarded
def check_validate_result(evidence: Evidence) -> CheckResult:
    section = _validate(evidence)
    pair = _pair(section.get("returned"))
    if pair is None:
        return CheckResult("validate_result", 0.0, "validate should return two plain numbers (loss, "
                           f"accuracy), but returned {_describe_return(section.get('returned'))}.")
    loss, accuracy = pair
    want_loss, want_accuracy = evidence.expected.validate
    if _accuracy_matches(accuracy, want_accuracy, TEST_ITEMS) and _loss_matches(loss, want_loss):
        return CheckResult("validate_result", 1.0, "validate's loss and accuracy match the reference.")
    return CheckResult("validate_result", 0.0, f"On the grader's test batches validate returned loss "
                       f"{loss:.6g} and accuracy {accuracy:.4f}; the reference gets {want_loss:.6g} and "
                       f"{want_accuracy:.4f}.")


@check
@guarded
def check_validate_no_side_effects(evidence: Evidence) -> CheckResult:
    section = _validate(evidence)
    forwards = section.get("forwards") or []
    problems = []
    if not _params_match(section["params"], evidence.expected.initial_params):
        problems.append("it changed the weights (validation must not train)")
    if not forwards or any(f["training"] for f in forwards):
        problems.append("it ran the network in training mode (call net.eval() first)")
    if not forwards or any(f["grad_enabled"] for f in forwards):
        problems.append("it tracked gradients (wrap the loop in `with torch.no_grad():`)")
    if problems:
        return CheckResult("validate_no_side_effects", 1 - len(problems) / 3,
                           "validate " + "; ".join(problems) + ".")
    return CheckResult("validate_no_side_effects", 1.0, "validate uses eval mode and no_grad and "
                       "leaves the weights unchanged.")


# --- train --------------------------------------------------------------------------------------

@check
@guarded
def check_train_history(evidence: Evidence) -> CheckResult:
    section = _section(evidence, "train", "train")
    returned = section.get("returned") or {}
    if returned.get("kind") != "dict":
        return CheckResult("train_history", 0.0, f"train should return the history dict, but returned "
                           f"{_describe_return(returned)}.")
    history = returned["items"]
    want = evidence.expected.train_history
    keys = set(history)
    if keys != set(want):
        return CheckResult("train_history", 0.0, f"train's history has keys {sorted(keys)}; it should have "
                           f"exactly {list(want)}.")
    epochs = len(want["train_loss"])
    values = {}
    for key in want:
        entry = history[key]
        items = entry.get("items") if entry.get("kind") in ("list", "tuple") else None
        if items is None or len(items) != epochs or not all(isinstance(i.get("value"), float) for i in items):
            return CheckResult("train_history", 0.25, f"history['{key}'] should be a list of {epochs} plain "
                               f"numbers (one per epoch, run with epochs={epochs}).")
        values[key] = [i["value"] for i in items]
    bad_range = [k for k in want if any(not math.isfinite(v) or v < 0 or ("acc" in k and v > 1)
                                                for v in values[k])]
    if bad_range:
        return CheckResult("train_history", 0.5, f"history values out of range in {', '.join(bad_range)} "
                           "(accuracies are in 0..1, losses are non-negative).")
    off = [k for k in want if not all(
        (_accuracy_matches(v, w, TRAIN_ITEMS if k == "train_acc" else TEST_ITEMS) if "acc" in k else _loss_matches(v, w))
        for v, w in zip(values[k], want[k]))]
    if off:
        return CheckResult("train_history", 0.75, f"The history has the right shape, but {', '.join(off)} "
                           "differ from the reference on the grader's data: train should record what "
                           "train_epoch and validate return, in that order, every epoch.")
    return CheckResult("train_history", 1.0, f"train returns the four histories, one value per epoch, "
                       "matching the reference.")


@check
@guarded
def check_train_uses_arguments(evidence: Evidence) -> CheckResult:
    section = _section(evidence, "train", "train")
    problems = []
    if section.get("steps", 0) == 0:
        problems.append("the optimizer passed to train never stepped (pass it on to train_epoch)")
    if section.get("loss_calls", 0) == 0:
        problems.append("the loss function passed to train was never called (pass loss_fn on)")
    if problems:
        return CheckResult("train_uses_arguments", 1 - len(problems) / 2, "; ".join(problems).capitalize() + ".")
    if not _params_match(section["params"], evidence.expected.train_params):
        return CheckResult("train_uses_arguments", 0.5, "train used its optimizer and loss, but the "
                           "trained weights differ from the reference's: run train_epoch once per epoch "
                           "with the given optimizer, and validate without training.")
    return CheckResult("train_uses_arguments", 1.0, "train uses the optimizer and loss function it is given.")


# --- the saved model ----------------------------------------------------------------------------

@check
def check_saved_model_loads(evidence: Evidence) -> CheckResult:
    saved = evidence.saved_model
    return CheckResult("saved_model_loads", 1.0 if saved.status == "ok" else 0.0, saved.message)


@check
def check_saved_model_accuracy(evidence: Evidence) -> CheckResult:
    saved = evidence.saved_model
    if saved.accuracy is None:
        return CheckResult("saved_model_accuracy", 0.0, "The saved model's accuracy could not be measured: "
                           + saved.message)
    need = evidence.spec.min_accuracy
    sample = " (on the MNIST sample profile)" if evidence.spec.content.get("is_sample") else ""
    if saved.accuracy >= need:
        return CheckResult("saved_model_accuracy", 1.0, f"The saved model classifies {saved.accuracy:.1%} "
                           f"of the test set correctly{sample}; at least {need:.1%} is needed.")
    return CheckResult("saved_model_accuracy", 0.0, f"The saved model classifies only {saved.accuracy:.1%} "
                       f"of the test set correctly{sample}; at least {need:.1%} is needed. Save the model "
                       "after training it (the reference reaches "
                       f"{evidence.spec.content['test_accuracy']:.1%} in {evidence.spec.content['training']['epochs']} epochs).")


# --- figures ------------------------------------------------------------------------------------

FIGURES = {
    "figures_samples": ("the sample digits", re.compile(r"data_(train|test)"), re.compile(r"imshow")),
    "figures_history": ("the training history", re.compile(r"(train|val)_(acc|loss)"), re.compile(r"plot")),
    "figures_weights": ("the ten weight images", re.compile(r"weight|parameters\(\)|state_dict"),
                        re.compile(r"imshow")),
}


def _figure(evidence: Evidence, name: str) -> CheckResult:
    what, subject, call = FIGURES[name]
    if evidence.notebook is None:
        return CheckResult(name, 0.0, f"{what.capitalize()} could not be checked: the notebook did not run.")
    for cell in evidence.notebook.cells:
        if cell.cell_type != "code" or not (subject.search(cell.source) and call.search(cell.source)):
            continue
        outputs = cell.get("outputs", [])
        # A cell that failed half way may still show an empty set of axes: that is no figure.
        if any(o.get("output_type") == "error" for o in outputs):
            continue
        if any("image/png" in output.get("data", {}) for output in outputs):
            return CheckResult(name, 1.0, f"The notebook shows {what}.")
    return CheckResult(name, 0.0, f"No cell displayed {what}: plot them with matplotlib in a cell "
                       "that runs without errors.")


@check
def check_figures_samples(evidence: Evidence) -> CheckResult:
    return _figure(evidence, "figures_samples")


@check
def check_figures_history(evidence: Evidence) -> CheckResult:
    return _figure(evidence, "figures_history")


@check
def check_figures_weights(evidence: Evidence) -> CheckResult:
    return _figure(evidence, "figures_weights")
