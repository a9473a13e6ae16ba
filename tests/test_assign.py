"""grader.assign: making the student notebook from the instructor's, and refusing bad inputs."""
from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from grader.assign import (
    STUB_MESSAGE,
    AssignError,
    assign,
    leaked_lines,
    make_student_notebook,
)

ROOT = Path(__file__).resolve().parent.parent
INSTRUCTOR = ROOT / "lab" / "instructor.ipynb"
STUDENT = ROOT / "lab" / "student.ipynb"
STUB = f'raise NotImplementedError("{STUB_MESSAGE}")'


def full_marks(path: Path) -> tuple[float, float]:
    return 21.5, 21.5


def partial_marks(path: Path) -> tuple[float, float]:
    return 18.0, 21.5


def _nb(*sources: str) -> nbformat.NotebookNode:
    return new_notebook(cells=[new_markdown_cell("# A lab")] + [new_code_cell(s) for s in sources])


def _write(nb: nbformat.NotebookNode, path: Path) -> Path:
    nbformat.write(nb, path)
    return path


FUNCTION_CELL = '''\
def double(x):
    """Twice x."""
    ### BEGIN SOLUTION
    y = x * 2
    return y
    ### END SOLUTION

print(double(3))'''


def test_region_becomes_stub_at_its_indentation_and_outside_code_is_kept() -> None:
    student = make_student_notebook(_nb(FUNCTION_CELL))
    assert student.cells[1].source == (
        'def double(x):\n    """Twice x."""\n    ' + STUB + "\n\nprint(double(3))")


def test_several_regions_in_one_cell_and_whole_cell_regions() -> None:
    instructor = _nb("a = 1\n### BEGIN SOLUTION\nb = 2\n### END SOLUTION\nc = 3\n"
                     "### BEGIN SOLUTION\nd = 4\n### END SOLUTION",
                     "### BEGIN SOLUTION\nsecret = 42\n### END SOLUTION",
                     "untouched = True")
    student = make_student_notebook(instructor)
    assert student.cells[1].source == f"a = 1\n{STUB}\nc = 3\n{STUB}"
    assert student.cells[2].source == STUB
    assert student.cells[3].source == "untouched = True"
    assert student.cells[0].source == "# A lab"


def test_outputs_and_counts_are_cleared_and_the_instructor_copy_is_untouched() -> None:
    instructor = _nb("### BEGIN SOLUTION\nx = 1\n### END SOLUTION\nx")
    cell = instructor.cells[1]
    cell.outputs = [nbformat.v4.new_output("execute_result", data={"text/plain": "1"},
                                           execution_count=1)]
    cell.execution_count = 1
    student = make_student_notebook(instructor)
    assert student.cells[1].outputs == [] and student.cells[1].execution_count is None
    assert "x = 1" in instructor.cells[1].source and instructor.cells[1].outputs
    nbformat.validate(student)


@pytest.mark.parametrize("source, words", [
    ("### BEGIN SOLUTION\nx = 1", "never closed"),
    ("x = 1\n### END SOLUTION", "no '### BEGIN SOLUTION' before it"),
    ("### BEGIN SOLUTION\n### BEGIN SOLUTION\nx = 1\n### END SOLUTION\n### END SOLUTION",
     "cannot nest"),
])
def test_unbalanced_markers_are_refused(tmp_path: Path, source: str, words: str) -> None:
    with pytest.raises(AssignError, match=words):
        make_student_notebook(_nb(source))
    graded: list[Path] = []

    def grade(path: Path) -> tuple[float, float]:
        graded.append(path)
        return 1.0, 1.0

    out = tmp_path / "student.ipynb"
    with pytest.raises(AssignError, match=words):
        assign(_write(_nb(source), tmp_path / "instructor.ipynb"), out, grade)
    assert not graded, "markers are checked before the (slow) grading"
    assert not out.exists()


def test_leftover_solution_code_is_refused(tmp_path: Path) -> None:
    # A mistyped marker ("## BEGIN" has two #) leaves its region in the student notebook, and the
    # same line repeated outside a region gives the answer away too.
    instructor = _nb("### BEGIN SOLUTION\nnet = make_net(layers=3)\n### END SOLUTION",
                     "## BEGIN SOLUTION\nanswer = 42\n## END SOLUTION",
                     "### BEGIN SOLUTION\nanswer   =   42\n### END SOLUTION",
                     "net = make_net(layers=3)  ")
    assert leaked_lines(instructor, make_student_notebook(instructor)) == [
        "net = make_net(layers=3)", "answer = 42"]
    out = tmp_path / "student.ipynb"
    with pytest.raises(AssignError, match=r"(?s)2 solution line\(s\).*answer = 42"):
        assign(_write(instructor, tmp_path / "instructor.ipynb"), out, full_marks)
    assert not out.exists()


def test_lines_without_letters_or_digits_are_not_counted_as_leaks() -> None:
    instructor = _nb("x = f(\n### BEGIN SOLUTION\n    1,\n)\n### END SOLUTION", ")")
    assert leaked_lines(instructor, make_student_notebook(instructor)) == []


def test_no_regions_is_refused(tmp_path: Path) -> None:
    with pytest.raises(AssignError, match="no '### BEGIN SOLUTION'"):
        assign(_write(_nb("x = 1"), tmp_path / "i.ipynb"), tmp_path / "s.ipynb", full_marks)


def test_instructor_without_full_marks_is_refused(tmp_path: Path) -> None:
    instructor = _write(_nb(FUNCTION_CELL), tmp_path / "instructor.ipynb")
    out = tmp_path / "student.ipynb"
    with pytest.raises(AssignError, match="scored 18/21.5"):
        assign(instructor, out, partial_marks)
    assert not out.exists()
    with pytest.raises(AssignError, match="not full marks"):
        assign(instructor, out, lambda path: (0.0, 0.0))
    assert not out.exists()


def test_assign_writes_the_student_notebook(tmp_path: Path) -> None:
    instructor = _write(_nb(FUNCTION_CELL), tmp_path / "instructor.ipynb")
    seen: list[Path] = []

    def grade(path: Path) -> tuple[float, float]:
        seen.append(Path(path))
        return full_marks(path)

    out = tmp_path / "out" / "student.ipynb"
    returned = assign(instructor, out, grade)
    assert seen == [instructor]
    written = nbformat.read(out, as_version=4)
    assert written == returned
    assert STUB in written.cells[1].source and "y = x * 2" not in written.cells[1].source


def test_unreadable_instructor_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "instructor.ipynb"
    bad.write_text("{ not json", encoding="utf-8")
    with pytest.raises(AssignError, match="cannot read"):
        assign(bad, tmp_path / "student.ipynb", full_marks)


def test_the_lab_instructor_notebook_has_regions_and_leaks_nothing() -> None:
    instructor = nbformat.read(INSTRUCTOR, as_version=4)
    student = make_student_notebook(instructor)
    assert leaked_lines(instructor, student) == []
    sources = [c.source for c in student.cells if c.cell_type == "code"]
    assert sum(s.count(STUB) for s in sources) >= 8
    assert not any("SOLUTION" in s for s in sources)


def test_committed_student_notebook_is_up_to_date() -> None:
    """lab/student.ipynb must be what make_student_notebook makes from lab/instructor.ipynb now
    (regenerate it with `labgrader assign` after changing the instructor notebook)."""
    expected = make_student_notebook(nbformat.read(INSTRUCTOR, as_version=4))
    committed = nbformat.read(STUDENT, as_version=4)
    assert committed == expected
    assert STUDENT.read_text(encoding="utf-8").rstrip("\n") == nbformat.writes(expected).rstrip("\n")


@pytest.mark.slow
def test_labgrader_assign_grades_the_instructor_notebook_for_real(tmp_path: Path, mnist_sample_root) -> None:
    import subprocess
    import sys

    from grader.resources import LAB_DIR

    student = tmp_path / "student.ipynb"
    done = subprocess.run([sys.executable, "-m", "grader.cli", "assign", "--student", str(student), "--quiet",
                           "--root", str(mnist_sample_root.root)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    written, committed = (nbformat.read(p, as_version=4) for p in (student, LAB_DIR / "student.ipynb"))
    assert [c.source for c in written.cells] == [c.source for c in committed.cells]
