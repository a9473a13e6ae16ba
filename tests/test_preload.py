"""Warm kernels: a kernel imports torch, torchvision and matplotlib as it starts, before its notebook is
handed to it, and the notebook cannot tell, but for the time its first cell saves.

Asserted against real kernels: the notebook's namespace is a cold kernel's (modules only, no name);
a figure drawn without ``plt.show()`` still displays (matplotlib's inline backend hooked into the
shell as when a cell imports it); a whole notebook grades the same warm and cold, and each result
says which it had.
"""
from __future__ import annotations

import json

import pytest
from nbformat import v4

from grader import intake, pipeline
from grader.execute import PRELOAD, Kernels, Limits, Sandboxing
from grader.resources import EXAMPLES_DIR

LOOK = """\
import sys
print(json.dumps({"names": sorted(k for k in globals() if not k.startswith('_')),
                  "loaded": [m for m in %r if m in sys.modules]}))
""" % (PRELOAD,)


def _run(tmp_path, preload: tuple[str, ...]):
    notebook = v4.new_notebook(cells=[v4.new_code_cell("import json\n" + LOOK),
                                      v4.new_code_cell("import matplotlib.pyplot as plt\nplt.plot([1, 2, 3])")])
    record = tmp_path / ("warm" if preload else "cold")
    sandboxing = Sandboxing(limits=Limits(cell_timeout=60, notebook_timeout=180), hide=(record,), preload=preload)
    with Kernels(sandboxing, notebooks=1) as kernels, kernels.kernel() as kernel:
        execution = kernel.run(notebook, record)
    executed = json.loads((record / "executed.ipynb").read_text())
    seen = json.loads("".join(executed["cells"][0]["outputs"][0]["text"]))
    return execution, seen


def test_a_warm_kernel_has_the_modules_and_not_a_single_name_more(tmp_path):
    warm, warm_seen = _run(tmp_path, PRELOAD)
    cold, cold_seen = _run(tmp_path, ())
    assert [c.status for c in warm.cells] == [c.status for c in cold.cells] == ["ok", "ok"]
    assert warm_seen["names"] == cold_seen["names"]
    assert not {"torch", "torchvision", "matplotlib", "plt"} & set(warm_seen["names"])
    assert warm_seen["loaded"] == list(PRELOAD) and "torch" not in cold_seen["loaded"]
    # a figure left open at the end of a cell is shown, warm as cold
    assert warm.cells[1].images == cold.cells[1].images == 1
    assert (warm.preloaded, cold.preloaded) == (PRELOAD, ())


@pytest.mark.slow
def test_a_notebook_grades_the_same_warm_and_cold_and_the_result_says_which(grading_config, tmp_path):
    [submission] = intake.collect([EXAMPLES_DIR / "correct.ipynb"])
    warm = pipeline.grade(submission, grading_config(runs_dir=tmp_path / "warm"))
    cold = pipeline.grade(submission, grading_config(runs_dir=tmp_path / "cold", preload=False))
    assert warm.status == cold.status == "graded", (warm.reason, cold.reason)
    assert [(c.name, c.status, c.points) for c in warm.checks] == [(c.name, c.status, c.points) for c in cold.checks]
    assert warm.score == cold.score
    assert (warm.preloaded, cold.preloaded) == (PRELOAD, ())
    assert [c.status for c in warm.cells] == [c.status for c in cold.cells]
