"""What the probe answers, as the checks take it: frozen records, parsed and validated once.

:func:`parse` turns the kernel's JSON into :class:`Answers`. Every field is checked for its type and
size, arrays for their shape, and every input the plan asked about must be answered: a section that
breaks any of that becomes a :class:`Problem` saying what was wrong, and the other sections stand.
Nothing here raises on what a notebook sent, and nothing in it is believed: the checks compare it
with the reference's answers computed outside the kernel.

The JSON a section carries is ``{"ok": <the section>}``, ``{"absent": "<what is missing>"}`` or
``{"raised": {"type", "message", "traceback"}}``. Arrays are ``{"dtype": "f8", "shape", "data"}``,
``data`` the base64 of their float64 bytes.
"""
from __future__ import annotations

import binascii
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from grader.probe.plan import DATASETS, LOADERS, MAX_STATE_VALUES, Plan

MAX_TEXT = 4000
MAX_LIST = 1000
MAX_FINDINGS = 100


@dataclass(frozen=True)
class Problem:
    """Why a section holds no answer. ``absent``: the notebook does not define what it asks for;
    ``raised``: the student's code raised (``message`` is ``Type: message``); ``malformed``: what came
    back broke the schema, or left a planned input unanswered."""

    kind: Literal["absent", "raised", "malformed"]
    message: str
    traceback: str = ""


@dataclass(frozen=True)
class Item:
    """One planned index of a dataset. The numbers are None when the image is not a tensor."""

    index: int
    label: int | None
    kind: str  # the image's type name
    shape: tuple[int, ...] | None
    dtype: str | None
    min: float | None
    max: float | None
    sum: float | None


@dataclass(frozen=True)
class DatasetAnswer:
    type: str
    length: int
    items: tuple[Item, ...]  # exactly the plan's indices, in its order


@dataclass(frozen=True)
class LoaderAnswer:
    """A loader's dataset: its length, and its labels at the plan's loader indices (None past its
    end, or where a label is not an integer)."""

    type: str
    dataset_type: str
    length: int
    labels: tuple[int | None, ...]  # exactly one per planned index, in its order


@dataclass(frozen=True, eq=False)
class ModelAnswer:
    """``net(model_input)`` and, when small enough and all floats, net's state_dict."""

    type: str
    is_module: bool
    output: np.ndarray | None  # None when net did not return a tensor
    output_type: str
    state: tuple[tuple[str, np.ndarray], ...] | None
    state_note: str  # why there is no state


@dataclass(frozen=True)
class Parameter:
    name: str
    kind: str  # inspect.Parameter.kind's name
    has_default: bool


@dataclass(frozen=True)
class Value:
    """What a function returned: its type's name, and a number (only for a Python or numpy number),
    or items (a list, tuple or dict; ``keys`` for a dict)."""

    kind: str
    number: float | None = None
    items: tuple[Value, ...] | None = None
    keys: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Forward:
    training: bool
    grad_enabled: bool


@dataclass(frozen=True, eq=False)
class FunctionAnswer:
    """One call of a student's function on the grader's network and batches."""

    signature: tuple[Parameter, ...] | None
    passed: tuple[str, ...]  # the keyword arguments the grader could pass by name
    returned: Value
    params: dict[str, np.ndarray]  # the grader's network's weight (10, 784) and bias (10,) after the call
    forwards: tuple[Forward, ...]
    loss_calls: int
    steps: int
    kept_graph: tuple[str, ...]  # locals still holding several batches' autograd graphs at return


@dataclass(frozen=True)
class HistoryAnswer:
    """The notebook's own ``hist``: its lists of numbers, for the report and the history figure."""

    values: dict[str, tuple[float, ...]]


@dataclass(frozen=True)
class Image:
    shape: tuple[int, ...]
    min: float
    max: float


@dataclass(frozen=True)
class Figure:
    """A figure the notebook showed: what it held when it was rendered."""

    cell: int | None  # the execution count of the cell that showed it
    axes: int
    images: tuple[Image, ...]
    lines: tuple[int, ...]  # points per line


@dataclass(frozen=True)
class Answers:
    integrity: tuple[str, ...]  # what the probe had to undo in the kernel before and while it ran
    data_train: DatasetAnswer | Problem
    data_test: DatasetAnswer | Problem
    train_loader: LoaderAnswer | Problem
    test_loader: LoaderAnswer | Problem
    model: ModelAnswer | Problem
    train_epoch: FunctionAnswer | Problem
    train_epoch_doubled: FunctionAnswer | Problem  # with a loss_fn giving twice NLLLoss
    validate: FunctionAnswer | Problem
    train: FunctionAnswer | Problem
    train_doubled: FunctionAnswer | Problem
    history: HistoryAnswer | Problem
    figures: tuple[Figure, ...] | Problem


class Malformed(Exception):
    """A field broke the schema; the message says which and how."""


# --- the field parsers: each takes the raw JSON value and returns it checked, or raises Malformed --

def _text(raw: Any) -> str:
    if not isinstance(raw, str):
        raise Malformed(f"expected text, got {_kind(raw)}")
    return raw[:MAX_TEXT]


def _integer(raw: Any) -> int:
    if type(raw) is not int:
        raise Malformed(f"expected an integer, got {_kind(raw)}")
    return raw


def _count(raw: Any) -> int:
    value = _integer(raw)
    if value < 0:
        raise Malformed(f"expected a count, got {value}")
    return value


def _flag(raw: Any) -> bool:
    if type(raw) is not bool:
        raise Malformed(f"expected true or false, got {_kind(raw)}")
    return raw


def _number(raw: Any) -> float:
    if type(raw) not in (int, float):
        raise Malformed(f"expected a number, got {_kind(raw)}")
    return float(raw)


def _optional(parse: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda raw: None if raw is None else parse(raw)


def _list(parse: Callable[[Any], Any], limit: int = MAX_LIST) -> Callable[[Any], tuple]:
    def parse_list(raw: Any) -> tuple:
        if not isinstance(raw, list):
            raise Malformed(f"expected a list, got {_kind(raw)}")
        if len(raw) > limit:
            raise Malformed(f"a list of {len(raw)} items, more than {limit}")
        return tuple(_at(f"[{i}]", parse, item) for i, item in enumerate(raw))
    return parse_list


def _array(raw: Any, limit: int = MAX_STATE_VALUES) -> np.ndarray:
    fields = _record(raw, dtype=_text, shape=_list(_count, 8), data=_text_unbounded)
    if fields["dtype"] != "f8":
        raise Malformed(f"an array of dtype {fields['dtype']!r}, not 'f8'")
    shape = fields["shape"]
    size = math.prod(shape)
    if size > limit:
        raise Malformed(f"an array of {size} values, more than {limit}")
    try:
        data = binascii.a2b_base64(fields["data"], strict_mode=True)
    except binascii.Error as error:
        raise Malformed(f"an array whose data is not base64 ({error})") from None
    if len(data) != size * 8:
        raise Malformed(f"an array of shape {shape} with {len(data)} bytes, not {size * 8}")
    return np.frombuffer(data, dtype=np.float64).reshape(shape)


def _text_unbounded(raw: Any) -> str:
    if not isinstance(raw, str):
        raise Malformed(f"expected text, got {_kind(raw)}")
    return raw


def _record(raw: Any, **fields: Callable[[Any], Any]) -> dict[str, Any]:
    """An object with exactly these fields, each parsed."""
    if not isinstance(raw, dict):
        raise Malformed(f"expected an object, got {_kind(raw)}")
    missing, extra = sorted(set(fields) - set(raw)), sorted(set(raw) - set(fields))
    if missing or extra:
        raise Malformed("; ".join(part for part in (
            f"missing field(s) {', '.join(missing)}" if missing else "",
            f"unexpected field(s) {', '.join(map(str, extra))[:200]}" if extra else "") if part))
    return {name: _at(f".{name}", parse, raw[name]) for name, parse in fields.items()}


def _at(where: str, parse: Callable[[Any], Any], raw: Any) -> Any:
    """Parse ``raw``; a failure names where it happened."""
    try:
        return parse(raw)
    except Malformed as error:
        raise Malformed(f"{where}: {error}" if not str(error).startswith((".", "[")) else f"{where}{error}") from None


def _kind(raw: Any) -> str:
    return {dict: "an object", list: "a list", str: "text", bool: "true/false", int: "an integer",
            float: "a number", type(None): "null"}.get(type(raw), type(raw).__name__)


# --- the sections ----------------------------------------------------------------------------------

def _item(raw: Any) -> Item:
    fields = _record(raw, index=_integer, label=_optional(_integer), kind=_text,
                     shape=_optional(_list(_count, 8)), dtype=_optional(_text), min=_optional(_number),
                     max=_optional(_number), sum=_optional(_number))
    return Item(**fields)


def _dataset(planned: list[int]) -> Callable[[Any], DatasetAnswer]:
    def parse_dataset(raw: Any) -> DatasetAnswer:
        fields = _record(raw, type=_text, length=_count, items=_list(_item, len(planned) + 1))
        answered = [item.index for item in fields["items"]]
        if answered != list(planned):
            unanswered = [index for index in planned if index not in answered]
            raise Malformed(f"the probe got no answer for the item(s) at {unanswered or planned} "
                            f"(it answered {answered[:8]})")
        return DatasetAnswer(**fields)
    return parse_dataset


def _loader(planned: list[int]) -> Callable[[Any], LoaderAnswer]:
    def parse_loader(raw: Any) -> LoaderAnswer:
        fields = _record(raw, type=_text, dataset_type=_text, length=_count,
                         labels=_list(_optional(_integer), len(planned)))
        if len(fields["labels"]) != len(planned):
            raise Malformed(f"{len(fields['labels'])} labels for the {len(planned)} indices asked")
        return LoaderAnswer(**fields)
    return parse_loader


def _model(raw: Any) -> ModelAnswer:
    fields = _record(raw, type=_text, is_module=_flag, output=_optional(lambda r: _array(r, 100_000)),
                     output_type=_text, state=_optional(_list(_state_entry, 1000)), state_note=_text)
    if fields["state"] is not None and sum(array.size for _, array in fields["state"]) > MAX_STATE_VALUES:
        raise Malformed(f"net's state has more than {MAX_STATE_VALUES} values")
    return ModelAnswer(**fields)


def _state_entry(raw: Any) -> tuple[str, np.ndarray]:
    if not isinstance(raw, list) or len(raw) != 2:
        raise Malformed(f"expected a [name, array] pair, got {_kind(raw)}")
    return _at("[0]", _text, raw[0]), _at("[1]", _array, raw[1])


def _value(raw: Any, depth: int = 0) -> Value:
    if depth > 5:
        raise Malformed("a returned value nested too deep")
    fields = _record(raw, kind=_text, number=_optional(_number),
                     items=_optional(_list(lambda r: _value(r, depth + 1), 100)),
                     keys=_optional(_list(_text, 100)))
    if fields["keys"] is not None and (fields["items"] is None or len(fields["keys"]) != len(fields["items"])):
        raise Malformed("a dict whose keys and values don't pair up")
    return Value(**fields)


def _params(raw: Any) -> dict[str, np.ndarray]:
    fields = _record(raw, weight=_array, bias=_array)
    if fields["weight"].shape != (10, 784) or fields["bias"].shape != (10,):
        raise Malformed(f"the network's parameters have shapes {fields['weight'].shape} and "
                        f"{fields['bias'].shape}, not (10, 784) and (10,)")
    return fields


def _parameter(raw: Any) -> Parameter:
    return Parameter(**_record(raw, name=_text, kind=_text, has_default=_flag))


def _forward(raw: Any) -> Forward:
    if not isinstance(raw, list) or len(raw) != 2:
        raise Malformed(f"expected a [training, grad_enabled] pair, got {_kind(raw)}")
    return Forward(_at("[0]", _flag, raw[0]), _at("[1]", _flag, raw[1]))


def _function(raw: Any) -> FunctionAnswer:
    return FunctionAnswer(**_record(
        raw, signature=_optional(_list(_parameter, 100)), passed=_list(_text, 10), returned=_value,
        params=_params, forwards=_list(_forward), loss_calls=_count, steps=_count,
        kept_graph=_list(_text, 100)))


def _history(raw: Any) -> HistoryAnswer:
    if not isinstance(raw, dict) or len(raw) > 100:
        raise Malformed(f"expected an object of at most 100 lists, got {_kind(raw)}")
    return HistoryAnswer({_text(key): _at(f".{key}", _list(_number), values) for key, values in raw.items()})


def _image(raw: Any) -> Image:
    return Image(**_record(raw, shape=_list(_count, 8), min=_number, max=_number))


def _figure(raw: Any) -> Figure:
    return Figure(**_record(raw, cell=_optional(_integer), axes=_count, images=_list(_image, 64),
                            lines=_list(_count, 64)))


def _problem(raw: Any) -> Problem:
    if not isinstance(raw, dict) or len(raw) != 1:
        raise Malformed(f"expected one of ok, absent or raised, got {_kind(raw)}")
    [(kind, detail)] = raw.items()
    if kind == "absent":
        return Problem("absent", _text(detail))
    if kind == "raised":
        error = _record(detail, type=_text, message=_text, traceback=_text)
        return Problem("raised", f"{error['type']}: {error['message']}", error["traceback"])
    raise Malformed(f"a section marked {str(kind)[:40]!r}, not ok, absent or raised")


def _section(raw: Any, parse: Callable[[Any], Any]) -> Any:
    """A section's answer, or the Problem it has; never an exception."""
    try:
        if isinstance(raw, dict) and set(raw) == {"ok"}:
            return parse(raw["ok"])
        return _problem(raw)
    except Malformed as error:
        return Problem("malformed", str(error)[:MAX_TEXT])
    except RecursionError:
        return Problem("malformed", "the answer is nested too deep")


def parse(raw: Any, plan: Plan) -> Answers:
    """The probe's JSON as :class:`Answers`; ``plan``: what the probe was asked."""
    raw = raw if isinstance(raw, dict) else {}
    parsers: dict[str, Callable[[Any], Any]] = {
        **{name: _dataset(plan.data_indices[name]) for name in DATASETS},
        **{name: _loader(plan.data_indices["loaders"]) for name in LOADERS},
        "model": _model, "train_epoch": _function, "train_epoch_doubled": _function, "validate": _function,
        "train": _function, "train_doubled": _function, "history": _history,
        "figures": _list(_figure, 50)}
    sections = {name: _section(raw[name], parse) if name in raw else
                Problem("malformed", "the probe sent no answer for it") for name, parse in parsers.items()}
    integrity = raw.get("integrity")
    findings = tuple(_text(f)[:300] for f in integrity[:MAX_FINDINGS] if isinstance(f, str)) \
        if isinstance(integrity, list) else ("the probe's answer had no integrity findings list",)
    extra = sorted(set(raw) - set(parsers) - {"integrity"})
    if extra:
        findings += (f"the probe's answer had unexpected sections: {', '.join(map(str, extra))[:200]}",)
    return Answers(integrity=findings, **sections)
