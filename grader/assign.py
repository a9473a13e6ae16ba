"""Make the student version of the lab from the instructor's notebook.

The instructor notebook (``lab/instructor.ipynb``) is the lab done right. Inside its code cells, the
parts students must write are marked as in nbgrader::

    def validate(net, dataloader, loss_fn=nn.NLLLoss()):
        \"\"\"...\"\"\"
        ### BEGIN SOLUTION
        net.eval()
        ...
        ### END SOLUTION

:func:`make_student_notebook` replaces each marked region with one
``raise NotImplementedError(...)`` line at the indentation of its ``### BEGIN SOLUTION`` line, keeps
every line outside the regions, and clears outputs and execution counts.

:func:`assign` is what ``labgrader assign`` runs. It writes the student notebook only when

* the markers are balanced (no nesting, no ``END`` without ``BEGIN``, none left open) and there is
  at least one region,
* the instructor notebook earns full marks from the grader (``grade_fn``), so the notebook students
  get is known to be solvable and the grader agrees with it, and
* no line of any solution survives anywhere in the student notebook (a guard against markers typed
  wrongly, e.g. ``## BEGIN SOLUTION``, which would otherwise leak the answer silently).

Lines are compared after normalising whitespace; lines with no letters or digits (``)``, ``])``)
give nothing away and are not compared.
"""
from __future__ import annotations

import copy
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nbformat
from nbformat import NotebookNode

from reference import atomic

BEGIN_MARKER = "### BEGIN SOLUTION"
END_MARKER = "### END SOLUTION"
STUB_MESSAGE = "Replace this line with your code"

GradeFn = Callable[[Path], tuple[float, float]]
"""What :func:`assign` calls to grade the instructor notebook: path -> (score, max_score)."""


class AssignError(Exception):
    """The student notebook cannot be made from this instructor notebook; the message says why."""


@dataclass(frozen=True)
class SolutionRegion:
    """One marked region: the code cell it is in (index in ``nb.cells``) and its lines."""

    cell_index: int
    begin_line: int  # 1-based line number of the BEGIN marker in the cell
    lines: tuple[str, ...]


def _marker(line: str) -> str | None:
    stripped = line.strip()
    if stripped == BEGIN_MARKER:
        return "begin"
    if stripped == END_MARKER:
        return "end"
    return None


def _split_cell(source: str, cell_index: int) -> tuple[list[str], list[SolutionRegion]]:
    """The cell's lines with each region replaced by a stub line, and the regions found."""
    out: list[str] = []
    regions: list[SolutionRegion] = []
    open_at: int | None = None
    indent = ""
    body: list[str] = []
    for number, line in enumerate(source.splitlines(), start=1):
        kind = _marker(line)
        if kind == "begin":
            if open_at is not None:
                raise AssignError(
                    f"cell {cell_index}: '{BEGIN_MARKER}' on line {number} is inside the region "
                    f"opened on line {open_at}; regions cannot nest")
            open_at, indent, body = number, line[: len(line) - len(line.lstrip())], []
        elif kind == "end":
            if open_at is None:
                raise AssignError(
                    f"cell {cell_index}: '{END_MARKER}' on line {number} has no "
                    f"'{BEGIN_MARKER}' before it")
            out.append(f'{indent}raise NotImplementedError("{STUB_MESSAGE}")')
            regions.append(SolutionRegion(cell_index, open_at, tuple(body)))
            open_at = None
        elif open_at is not None:
            body.append(line)
        else:
            out.append(line)
    if open_at is not None:
        raise AssignError(
            f"cell {cell_index}: '{BEGIN_MARKER}' on line {open_at} is never closed by "
            f"'{END_MARKER}'")
    return out, regions


def solution_regions(instructor: NotebookNode) -> list[SolutionRegion]:
    """Every marked region of the notebook's code cells, in order; raises on unbalanced markers."""
    regions: list[SolutionRegion] = []
    for index, cell in enumerate(instructor.cells):
        if cell.cell_type == "code":
            regions.extend(_split_cell(cell.source, index)[1])
    return regions


def make_student_notebook(instructor: NotebookNode) -> NotebookNode:
    """A copy of ``instructor`` with each solution region replaced by ``raise NotImplementedError``.

    Code outside the regions, markdown, cell ids and metadata are kept; code cells lose their
    outputs and execution counts. Raises :class:`AssignError` on unbalanced markers.
    """
    student = copy.deepcopy(instructor)
    for index, cell in enumerate(student.cells):
        if cell.cell_type != "code":
            continue
        lines, regions = _split_cell(cell.source, index)
        if regions:
            cell.source = "\n".join(lines)
        cell.outputs = []
        cell.execution_count = None
    return student


_SPACES = re.compile(r"\s+")
_MEANINGFUL = re.compile(r"[A-Za-z0-9]")


def _normalise(line: str) -> str:
    return _SPACES.sub(" ", line.strip())


def leaked_lines(instructor: NotebookNode, student: NotebookNode) -> list[str]:
    """Solution lines (normalised) that still appear as a line of any cell of ``student``."""
    student_lines = {_normalise(line) for cell in student.cells
                     for line in cell.source.splitlines()}
    leaked: list[str] = []
    for region in solution_regions(instructor):
        for line in region.lines:
            norm = _normalise(line)
            if _MEANINGFUL.search(norm) and norm in student_lines and norm not in leaked:
                leaked.append(norm)
    return leaked


def assign(instructor_path: Path | str, student_path: Path | str,
           grade_fn: GradeFn) -> NotebookNode:
    """Check the instructor notebook, then write the student notebook; returns it.

    Raises :class:`AssignError` (and writes nothing) when the markers are unbalanced or absent,
    when ``grade_fn(instructor_path)`` is not full marks, or when solution code would survive in
    the student notebook.
    """
    instructor_path, student_path = Path(instructor_path), Path(student_path)
    try:
        instructor = nbformat.read(instructor_path, as_version=4)
        nbformat.validate(instructor)
    except (OSError, ValueError, nbformat.ValidationError) as exc:
        raise AssignError(f"cannot read {instructor_path} as a notebook: {exc}") from exc

    regions = solution_regions(instructor)  # raises on unbalanced markers, before grading
    if not regions:
        raise AssignError(
            f"{instructor_path} has no '{BEGIN_MARKER}' ... '{END_MARKER}' regions: "
            "the student notebook would be the full solution")

    score, max_score = grade_fn(instructor_path)
    if max_score <= 0 or score < max_score - 1e-9:
        raise AssignError(
            f"the instructor notebook scored {score:g}/{max_score:g}, not full marks; fix the "
            "notebook (or the grader) before making the student version")

    student = make_student_notebook(instructor)
    leaked = leaked_lines(instructor, student)
    if leaked:
        shown = "\n  ".join(leaked[:10])
        more = f"\n  ... and {len(leaked) - 10} more" if len(leaked) > 10 else ""
        raise AssignError(
            f"{len(leaked)} solution line(s) would still be in the student notebook (a marker "
            f"mistyped, or solution code repeated outside its region):\n  {shown}{more}")
    nbformat.validate(student)
    atomic.write(student_path, nbformat.writes(student))
    return student
