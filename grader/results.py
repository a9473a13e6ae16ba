"""The plain records each stage hands to the next.

Everything is frozen: a later stage builds a new record rather than changing an earlier one.
The JSON written for a submission is :func:`GradeResult.to_json`; its schema is documented in
``docs/result-schema.md`` and versioned by :data:`SCHEMA_VERSION`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

SCHEMA_VERSION = "1.4"
HIDDEN_MESSAGE = "A hidden check: your instructor sees its message."


@dataclass(frozen=True)
class Submission:
    """One notebook as intake found it; ``error`` is set when it cannot be graded."""

    id: str
    source: str
    notebook: bytes | None = None
    sha256: str | None = None
    error: str | None = None
    # The student, as the LMS download named them (Canvas: user id and "lastfirst"; Moodle:
    # participant id and full name) or, for a folder per student, the folder's name (no id).
    student_id: str | None = None
    student_name: str | None = None
    # Set on a student's other files: the id of the submission graded for them instead.
    superseded_by: str | None = None


CellStatus = Literal["ok", "error", "timeout", "kernel-died", "not-run", "skipped"]


@dataclass(frozen=True)
class CellRun:
    index: int
    status: CellStatus
    seconds: float = 0.0
    error: str | None = None  # "ZeroDivisionError: division by zero"
    traceback: str | None = None  # plain text, ANSI colours removed
    images: int = 0  # image outputs the cell displayed
    source_head: str = ""  # first line of the cell, to name it in feedback

    @property
    def number(self) -> int:
        """The cell's 1-based position in the notebook, as Jupyter shows it: the one number every
        message, report and export uses for it (``index`` counts markdown cells too, from 0)."""
        return self.index + 1


@dataclass(frozen=True)
class Execution:
    """What running the notebook did, as recorded by the trusted executor outside the sandbox."""

    status: Literal["completed", "kernel-died", "timeout", "output-limit", "not-run"]
    cells: tuple[CellRun, ...]
    isolation: str  # "bubblewrap" or "subprocess (weaker: no namespaces)"
    seconds: float
    reason: str | None = None
    output_truncated: bool = False
    network_blocked: tuple[str, ...] = ()  # cells whose error shows a blocked download / pip
    executed_notebook: Path | None = None
    workdir: Path | None = None
    probe_error: str | None = None  # the epilogue (probe) code's error text, if it failed
    fast_data: bool = False
    preloaded: tuple[str, ...] = ()  # modules the kernel had imported before the first cell


@dataclass(frozen=True)
class CheckResult:
    """A check's verdict: ``fraction`` of its points earned (0..1) and what to tell the student."""

    name: str
    fraction: float
    message: str
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class ScoredCheck:
    name: str
    title: str
    points: float
    max_points: float
    status: Literal["passed", "partial", "failed"]
    message: str
    visibility: Literal["visible", "hidden"]
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class Override:
    """An instructor's decision on one check (``check``: its name) or on the whole submission
    (``check`` "total"): the points it replaced and the points it gives, why, who, when."""

    check: str
    automatic_points: float
    points: float
    comment: str
    by: str
    at: str  # ISO 8601, as the overrides file gave it


@dataclass(frozen=True)
class GradeResult:
    submission_id: str
    source: str
    status: Literal["graded", "error"]
    score: float
    max_score: float
    notebook_sha256: str | None = None
    reason: str | None = None
    checks: tuple[ScoredCheck, ...] = ()
    cells: tuple[CellRun, ...] = ()
    execution_status: str | None = None
    isolation: str | None = None
    output_truncated: bool = False  # copied from Execution, for the report
    network_blocked: tuple[str, ...] = ()  # copied from Execution, for the report
    fast_data: bool = False
    data_profile: str | None = None
    spec_version: str | None = None
    spec_source: str | None = None  # "committed", "derived (<cache path>)" or "pinned (<path>)"
    rubric_sha256: str | None = None
    # The packages the rubric declares the grading environment provides ([environment] packages),
    # each with the version installed when the notebook ran (None: declared but not installed).
    packages: dict[str, str | None] = field(default_factory=dict)
    seconds: float = 0.0
    graded_at: str = ""
    # For the report only (never for the score): the learning curves the student's train() produced
    # in the probe, the reference's, and the saved model's figures (base64 PNG) and its confusion
    # matrix on the test set (rows: true class, columns: predicted).
    figures: dict[str, str] = field(default_factory=dict)
    confusion_matrix: list[list[int]] | None = None
    student_history: dict[str, list[float]] | None = None
    reference_history: dict[str, list[float]] | None = None
    # What the probe had to undo in the notebook's kernel (a replaced builtin or torch function, an
    # IPython hook, a trace function, a thread left running...) and what the grader saw on the probe's
    # channel (extra answers, a probe that sent nothing): for an instructor to review. Empty when the
    # kernel was left as the grader set it up.
    integrity: tuple[str, ...] = ()
    student_id: str | None = None  # copied from the Submission
    student_name: str | None = None
    # The instructor's overrides (grader/overrides.py): ``score`` and the overridden checks' points
    # are final, ``automatic_score`` is the score the grader gave (None when nothing is overridden).
    overrides: tuple[Override, ...] = ()
    automatic_score: float | None = None
    # The process that ran the notebook (``host (dask worker address)``); None where none did (an
    # unreadable submission, ``labgrader check``) or the run was kept from before 1.4.
    worker: str | None = None
    # Modules the kernel had imported before the notebook's first cell (a warm kernel); empty for a
    # cold one (``--no-preload``) or a run kept from before 1.4.
    preloaded: tuple[str, ...] = ()
    schema_version: str = SCHEMA_VERSION

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def for_students(self) -> "GradeResult":
        """This result as a student may read it: hidden checks keep their title and points, but
        not their message or warnings (which can quote the reference's values)."""
        checks = tuple(dataclasses.replace(c, message=HIDDEN_MESSAGE, warnings=())
                       if c.visibility == "hidden" else c for c in self.checks)
        return dataclasses.replace(self, checks=checks)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "GradeResult":
        data = dict(data)
        data["checks"] = tuple(ScoredCheck(**{**c, "warnings": tuple(c.get("warnings", ()))})
                               for c in data.get("checks", ()))
        data["cells"] = tuple(CellRun(**c) for c in data.get("cells", ()))
        data["integrity"] = tuple(data.get("integrity", ()))
        data["preloaded"] = tuple(data.get("preloaded", ()))
        data["overrides"] = tuple(Override(**o) for o in data.get("overrides", ()))
        if "network_blocked" in data:
            data["network_blocked"] = tuple(data["network_blocked"])
        return cls(**data)
