"""Builders of realistic :class:`GradeResult` records for the report and export tests.

The checks, messages and cells are shaped like what the pipeline produces for the "first PyTorch
model" lab; the figures are real PNGs drawn by :mod:`grader.figures` (cached: drawing takes time).
"""
from __future__ import annotations

import dataclasses
from functools import lru_cache

import numpy as np

from grader import figures
from grader.results import CellRun, GradeResult, ScoredCheck

# (name, title, max points, visibility) as a rubric would list them.
RUBRIC = (
    ("dataset_facts", "Dataset facts (sizes, shapes, pixel range)", 2.0, "visible"),
    ("model_shape", "Model: one Linear layer 784 → 10", 2.0, "visible"),
    ("forward", "forward() returns logits of shape (N, 10)", 1.0, "visible"),
    ("train_epoch", "train_epoch() loss and accuracy", 2.0, "visible"),
    ("validate", "validate() loss and accuracy", 1.0, "visible"),
    ("saved_model_accuracy", "Saved model's test accuracy", 2.0, "visible"),
    ("hidden_train_other_data", "train_epoch() on other data", 3.0, "hidden"),
    ("hidden_validate_batch_sizes", "validate() with other batch sizes", 2.0, "hidden"),
)
RUBRIC_CHECK_NAMES = [name for name, *_ in RUBRIC]

PASS_MESSAGES = {
    "dataset_facts": "60000 training and 10000 test images of 1×28×28, pixels in [0, 1].",
    "model_shape": "nn.Linear(784, 10) found.",
    "forward": "forward() returns a (64, 10) tensor.",
    "train_epoch": "Loss 0.4312 and accuracy 0.8867 match the reference within tolerance.",
    "validate": "Loss and accuracy match the reference.",
    "saved_model_accuracy": "Your saved model scores 91.8% on the test set (needs ≥ 90%).",
    "hidden_train_other_data": "HIDDEN-PASS-DETAIL: matched reference on seed 1234, 137 samples.",
    "hidden_validate_batch_sizes": "HIDDEN-PASS-DETAIL: batch sizes 7, 33 matched.",
}
FAIL_MESSAGES = {
    "train_epoch": ("train_epoch() returned accuracy 88.67, but the reference gets 0.8867 on the "
                    "same batches: return a fraction between 0 and 1, not a percentage."),
    "saved_model_accuracy": ("Your saved model scores 71.2% on the test set; 90% earns full "
                             "points. Train for the 10 epochs the lab asks for."),
    "hidden_train_other_data": ("HIDDEN-SECRET: on inputs torch.manual_seed(1234) with 137 "
                                "samples, reference code `loss.item() * len(x)` gave 0.52"),
    "hidden_validate_batch_sizes": "HIDDEN-SECRET: batch size 7 gave accuracy 0.31 vs 0.88",
}

REFERENCE_HISTORY = {
    "train_loss": [0.62, 0.39, 0.35, 0.33, 0.32],
    "train_acc": [0.84, 0.89, 0.90, 0.91, 0.91],
    "val_loss": [0.41, 0.36, 0.33, 0.32, 0.31],
    "val_acc": [0.89, 0.90, 0.91, 0.91, 0.92],
}
STUDENT_HISTORY = {
    "train_loss": [0.70, 0.45, 0.40, 0.37, 0.36],
    "train_acc": [0.80, 0.87, 0.88, 0.89, 0.90],
    "val_loss": [0.50, 0.41, 0.38, 0.36, 0.35],
    "val_acc": [0.86, 0.88, 0.89, 0.90, 0.90],
}

TRACEBACK = """\
---------------------------------------------------------------------------
RuntimeError                              Traceback (most recent call last)
Cell In[12], line 3
      1 net = Net()
      2 x = torch.randn(64, 28, 28)
----> 3 net(x)

File ~/lab/model.py:9, in Net.forward(self, x)
      8 def forward(self, x):
----> 9     return self.linear(x)

RuntimeError: mat1 and mat2 shapes cannot be multiplied (1792x28 and 784x10)"""


@lru_cache(maxsize=1)
def real_figures() -> dict[str, str]:
    rng = np.random.default_rng(0)
    return {
        "learning_curves": figures.learning_curves(STUDENT_HISTORY, REFERENCE_HISTORY),
        "weights": figures.weight_images(rng.normal(0, 0.05, (10, 784)), [str(d) for d in range(10)]),
        "misclassified": figures.misclassified(rng.random((6, 784)), [4, 9, 3, 7, 2, 5],
                                               [9, 4, 5, 1, 7, 3]),
    }


def confusion() -> list[list[int]]:
    """A plausible test-set confusion matrix: mostly right, a few mistakes in every row."""
    rng = np.random.default_rng(1)
    return (np.diag(rng.integers(850, 990, 10)) + rng.integers(0, 15, (10, 10))).tolist()


def check(name: str, fraction: float = 1.0, message: str | None = None,
          warnings: tuple[str, ...] = ()) -> ScoredCheck:
    _, title, max_points, visibility = next(r for r in RUBRIC if r[0] == name)
    status = "passed" if fraction >= 1 else ("failed" if fraction <= 0 else "partial")
    if message is None:
        message = PASS_MESSAGES[name] if status == "passed" else FAIL_MESSAGES.get(
            name, f"{name} did not match the reference.")
    return ScoredCheck(name=name, title=title, points=round(fraction * max_points, 4),
                       max_points=max_points, status=status, message=message,
                       visibility=visibility, warnings=warnings)  # type: ignore[arg-type]


def ok_cells(n: int = 14) -> tuple[CellRun, ...]:
    return tuple(CellRun(index=i, status="ok", seconds=0.1 + i / 10, source_head=f"# cell {i}")
                 for i in range(n))


def graded(submission_id: str = "alice", fractions: dict[str, float] | None = None,
           cells: tuple[CellRun, ...] | None = None, with_figures: bool = True,
           **overrides) -> GradeResult:
    """A graded result; ``fractions`` overrides the fraction earned per check (default 1.0)."""
    fractions = fractions or {}
    checks = tuple(check(name, fractions.get(name, 1.0)) for name in RUBRIC_CHECK_NAMES)
    fields = dict(
        submission_id=submission_id,
        source=f"submissions/{submission_id}/lab.ipynb",
        status="graded",
        score=round(sum(c.points for c in checks), 4),
        max_score=sum(c.max_points for c in checks),
        notebook_sha256="9f2c" + "0" * 60,
        checks=checks,
        cells=cells if cells is not None else ok_cells(),
        execution_status="completed",
        isolation="bubblewrap",
        fast_data=True,
        data_profile="mnist",
        spec_version="2025.1",
        rubric_sha256="ab12" + "0" * 60,
        seconds=48.3,
        graded_at="2025-03-14T10:22:05+00:00",
        figures=dict(real_figures()) if with_figures else {},
        confusion_matrix=confusion() if with_figures else None,
        student_history=STUDENT_HISTORY,
        reference_history=REFERENCE_HISTORY,
    )
    fields.update(overrides)
    if "checks" in overrides and "score" not in overrides:
        fields["score"] = round(sum(c.points for c in fields["checks"]), 4)
        fields["max_score"] = sum(c.max_points for c in fields["checks"])
    return GradeResult(**fields)  # type: ignore[arg-type]


def perfect(submission_id: str = "perfect") -> GradeResult:
    return graded(submission_id)


def hidden_gap(submission_id: str = "hidden_gap") -> GradeResult:
    """Every visible check passes; one hidden check is partial (1/3), the other passes: 3/5."""
    return graded(submission_id, {"hidden_train_other_data": 1 / 3})


def with_failed_cell(submission_id: str = "bob") -> GradeResult:
    """A shape error in cell 13 (index 12; kept as a traceback), later cells not run, two checks failing."""
    cells = list(ok_cells(12))
    cells.append(CellRun(index=12, status="error", seconds=0.02,
                         error="RuntimeError: mat1 and mat2 shapes cannot be multiplied "
                               "(1792x28 and 784x10)",
                         traceback=TRACEBACK, source_head="net = Net()"))
    cells += [CellRun(index=i, status="not-run") for i in (13, 14)]
    fractions = {"train_epoch": 0.0, "saved_model_accuracy": 0.5, "hidden_train_other_data": 0.0}
    warning = ("train_epoch() printed 938 lines; print once per epoch instead.",)
    checks = tuple(check(n, fractions.get(n, 1.0), warnings=warning if n == "train_epoch" else ())
                   for n in RUBRIC_CHECK_NAMES)
    return graded(submission_id, cells=tuple(cells), checks=checks)


def timed_out(submission_id: str = "carol") -> GradeResult:
    cells = list(ok_cells(8))
    cells.append(CellRun(index=8, status="timeout", seconds=600.0, source_head="for epoch in range(1000):",
                         error="Cell ran past the 600 s limit"))
    cells += [CellRun(index=i, status="not-run") for i in range(9, 14)]
    return graded(submission_id, {n: 0.0 for n in RUBRIC_CHECK_NAMES[3:]}, cells=tuple(cells),
                  execution_status="timeout", isolation="subprocess (weaker: no namespaces)",
                  output_truncated=True, network_blocked=("cell 2",), data_profile="mnist-sample",
                  fast_data=False, seconds=612.0, with_figures=False)


def error(submission_id: str = "dave", reason: str = "not a valid notebook: "
          "Notebook JSON is invalid: 'cells' is a required property") -> GradeResult:
    return GradeResult(submission_id=submission_id, source=f"submissions/{submission_id}/lab.ipynb",
                       status="error", score=0.0, max_score=15.0, reason=reason,
                       graded_at="2025-03-14T10:22:05+00:00")


XSS = '<script>alert("xss")</script><img src=x onerror="alert(1)"><b onmouseover=alert(2)>x</b>'


def hostile(submission_id: str = "mallory") -> GradeResult:
    """Student-controlled text everywhere, full of markup that must stay text."""
    cells = (CellRun(index=0, status="ok", source_head="print('" + XSS + "')"),
             CellRun(index=1, status="error", error="ValueError: " + XSS,
                     traceback="Traceback (most recent call last):\n  " + XSS + "\nValueError: "
                               + XSS + "\n\x1b[0;31m</pre><script>alert(3)</script>",
                     source_head=XSS))
    checks = tuple(dataclasses.replace(
        check(n, 0.0 if n in ("forward", "hidden_train_other_data") else 1.0),
        message=f"Your function printed {XSS}" if n == "forward" else check(n).message,
        warnings=(f"Warning from your code: {XSS}",) if n == "forward" else ())
        for n in RUBRIC_CHECK_NAMES)
    return graded(submission_id, checks=checks, cells=cells,
                  source='submissions/"><script>alert(4)</script>/lab.ipynb',
                  execution_status="completed", network_blocked=(XSS,),
                  data_profile='<img src=x onerror=alert(5)>', spec_version=XSS,
                  figures={**real_figures(), "weights": '"><script>alert(6)</script>',
                           "misclassified": 'AAAA" onerror="alert(7)'},
                  confusion_matrix=[["<script>alert(8)</script>"] * 10] * 10)


def cohort() -> list[GradeResult]:
    """A small class: varied scores, one hidden gap, a failed cell, a timeout, an invalid notebook."""
    out = [perfect("perfect"), hidden_gap("hidden_gap"), with_failed_cell("bob"), timed_out("carol"),
           error("dave")]
    for i, frac in enumerate((0.0, 0.25, 0.5, 0.75, 0.9)):
        out.append(graded(f"student{i:02d}", {n: frac for n in RUBRIC_CHECK_NAMES[i % 3::2]},
                          with_figures=False, seconds=30.0 + i))
    return out
