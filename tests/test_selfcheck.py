"""``import labgrader; labgrader.check()`` in a student's own Jupyter kernel.

A real kernel, started by nbclient as a user's Jupyter would start it (its default ``python3``
kernel, which jupyter_client runs with this interpreter, the project's venv), runs an example
notebook from ``lab/examples`` in a folder whose ``./data`` holds the provisioned MNIST sample, then
cells that call the self-check. The verdicts read from the HTML it displays must be the grader's:
``lab/examples/expected.toml`` says which checks each example fails when graded.
"""
from __future__ import annotations

import json
import sys
import tomllib
from pathlib import Path

import lxml.html
import nbformat
import pytest
from nbclient import NotebookClient
from nbformat import v4

from grader import resources, selfcheck
from grader.score import load_rubric

RUBRIC = load_rubric(resources.RUBRIC_PATH)
EXPECTED = tomllib.loads((resources.EXAMPLES_DIR / "expected.toml").read_text())["examples"]
HIDDEN = {e.name for e in RUBRIC.entries if e.visibility == "hidden"}
# Visible checks the self-check judges: those not left to the grader's run of the whole notebook.
JUDGED = [e.name for e in RUBRIC.entries
          if e.visibility == "visible" and selfcheck.part_of(e.name) not in selfcheck.ON_SUBMISSION]

# Before the check: what the student has, kept aside by value.
SNAPSHOT = """\
import copy as _copy, random as _random
import numpy as _np
_before = {"state": _copy.deepcopy(net.state_dict()), "training": net.training, "hist": _copy.deepcopy(hist),
           "data": data_train.data.clone(), "torch_rng": torch.get_rng_state(), "numpy_rng": _np.random.get_state()[1].copy(),
           "python_rng": _random.getstate(), "threads": torch.get_num_threads(), "grad": torch.is_grad_enabled(),
           "objects": {name: id(globals()[name]) for name in ("net", "hist", "data_train", "train_loader", "train_epoch")}}
"""
# After it: the same, compared by value and identity; one JSON line.
COMPARE = """\
import json as _json
print(_json.dumps({
    "state": all(torch.equal(_before["state"][k], v) for k, v in net.state_dict().items()),
    "training": net.training == _before["training"], "hist": hist == _before["hist"],
    "data": torch.equal(data_train.data, _before["data"]), "torch_rng": torch.equal(torch.get_rng_state(), _before["torch_rng"]),
    "numpy_rng": bool((_np.random.get_state()[1] == _before["numpy_rng"]).all()),
    "python_rng": _random.getstate() == _before["python_rng"], "threads": torch.get_num_threads() == _before["threads"],
    "grad": torch.is_grad_enabled() == _before["grad"],
    "objects": {name: id(globals()[name]) for name in _before["objects"]} == _before["objects"]}))
"""
# A train_epoch that trains the notebook's own net with a global optimizer whatever it is given:
# were the check to call it on the student's objects, their weights would change.
GLOBALS_EPOCH = """\
opt = torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9)
net.eval()
def train_epoch(model, dataloader, lr=0.01, optimizer=None, loss_fn=nn.NLLLoss()):
    net.train()
    for features, labels in dataloader:
        opt.zero_grad()
        loss = loss_fn(net(features), labels)
        loss.backward()
        opt.step()
    return 0.0, 0.0
"""


def _run(notebook: str, tmp_path: Path, data_root: Path, *cells: str) -> list[nbformat.NotebookNode]:
    """Run ``notebook`` then ``cells`` in a fresh kernel in a folder of their own; each added cell's
    outputs."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "data").symlink_to(data_root, target_is_directory=True)
    nb = nbformat.read(resources.EXAMPLES_DIR / notebook, as_version=4)
    nb.cells += [v4.new_code_cell(source) for source in cells]
    client = NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(work)}})
    client.execute()
    return [cell.outputs for cell in nb.cells[-len(cells):]]


def _shown(outputs) -> lxml.html.HtmlElement:
    [html] = [o.data["text/html"] for o in outputs if o.output_type == "display_data"]
    return lxml.html.fragment_fromstring(html, create_parent="div")


def _verdicts(page: lxml.html.HtmlElement) -> dict[str, str]:
    """Each check shown, by name: its status as the report's markup gives it."""
    return {li.get("data-check"): li.get("class").split()[1] for li in page.xpath(".//li[@data-check]")}


def _printed(outputs) -> str:
    return "".join(o.text for o in outputs if o.output_type == "stream" and o.name == "stdout")


@pytest.fixture
def kernel_env(monkeypatch, tmp_path):
    """The kernel inherits this: labgrader's cache in the test's folder, no data dir named."""
    monkeypatch.setenv("LABGRADER_HOME", str(tmp_path / "labgrader-home"))
    monkeypatch.delenv("LABGRADER_DATA_DIR", raising=False)
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")


def test_a_correct_notebook_passes_and_nothing_of_the_students_changes(mnist_sample_root, tmp_path, kernel_env):
    whole, part, unchanged, interpreter, trained, unchanged_after = _run(
        "correct.ipynb", tmp_path, mnist_sample_root.root,
        SNAPSHOT + "import labgrader\nlabgrader.check()", 'labgrader.check("train_epoch")', COMPARE,
        "import sys\nprint(sys.executable)",
        GLOBALS_EPOCH + SNAPSHOT + 'labgrader.check("train_epoch")', COMPARE)
    assert _printed(interpreter).strip() == sys.executable  # the project's venv, as the user's Jupyter runs it

    page = _shown(whole)
    verdicts = _verdicts(page)
    assert list(verdicts) == JUDGED and set(verdicts.values()) == {"passed"}
    text = page.text_content()
    assert f"{len(JUDGED)} of {len(JUDGED)} visible checks passed" in text
    assert not HIDDEN & set(verdicts)  # hidden checks: counted, never named or described
    assert not any(e.title in text for e in RUBRIC.entries if e.name in HIDDEN)
    assert f"{len(HIDDEN)} hidden checks of your instructor's are not shown" in text
    later = page.get_element_by_id("on-submission").text_content()
    assert all(e.title in later for e in RUBRIC.entries if selfcheck.part_of(e.name) in selfcheck.ON_SUBMISSION)
    assert "mnist-sample data" in text

    # One part: only its checks.
    shown = _verdicts(_shown(part))
    assert list(shown) == [name for name in JUDGED if name.startswith("train_epoch_")] and len(shown) == 4

    assert json.loads(_printed(unchanged)) == dict.fromkeys(json.loads(_printed(unchanged)), True)
    # A train_epoch that trains the global net with a global optimizer trained only their copies.
    after = json.loads(_printed(unchanged_after))
    assert after == dict.fromkeys(after, True), after
    broken = _verdicts(_shown(trained))
    assert broken["train_epoch_updates"] == "failed" and broken["train_epoch_result"] == "failed"


def test_a_broken_notebook_gets_the_graders_verdicts(mnist_sample_root, tmp_path, kernel_env):
    name = "mistake_no_zero_grad.ipynb"
    [whole] = _run(name, tmp_path, mnist_sample_root.root, "import labgrader\nlabgrader.check()")
    page = _shown(whole)
    verdicts = _verdicts(page)
    failing = set(EXPECTED[name]["fails"]) & set(JUDGED)
    assert failing  # the example fails visible checks the self-check judges
    assert list(verdicts) == JUDGED
    assert {check for check, status in verdicts.items() if status != "passed"} == failing
    for check, wanted in EXPECTED[name].get("messages", {}).items():
        [shown] = page.xpath(f'.//li[@data-check="{check}"]//p[@class="msg"]')
        assert wanted in shown.text_content()


def test_an_unknown_part_is_one_line_naming_the_parts():
    shown = selfcheck.run({}, "trian_epoch")
    assert shown.checks == () and "no part or check has that name" in shown.problem
    assert "train_epoch" in shown.problem and "trian_epoch" in shown._repr_html_()


def test_a_global_that_cannot_be_copied_stops_before_the_students_code_runs(mnist_sample_root, monkeypatch):
    monkeypatch.setenv("LABGRADER_HOME", str(mnist_sample_root.root.parent / "home"))
    import threading

    namespace = {"__name__": "__main__", "threading": threading}
    exec(compile("lock = threading.Lock()\n"
                 "def train_epoch(net, dataloader, optimizer=None, loss_fn=None):\n"
                 "    lock.acquire()\n"
                 "    return 0.0, 0.0\n", "<cell>", "exec"), namespace)
    shown = selfcheck.run(namespace, data_root=mnist_sample_root.root)
    assert shown.checks == () and "lock (lock) cannot be copied" in shown.problem
    assert not namespace["lock"].locked()
