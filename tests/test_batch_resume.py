"""A batch killed half way and run again ends with every submission graded exactly once."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import factories as f
from grader import batch, report, resources

pytestmark = pytest.mark.slow


def _grade(folder: Path, out: Path, root: Path, tmp: Path) -> subprocess.Popen:
    """``tmp``: the batch's TMPDIR, where its kernels' working directories go; a killed batch
    cannot remove its own, so it is left in the test's directory rather than in /tmp."""
    return subprocess.Popen([sys.executable, "-m", "grader.cli", "grade", str(folder), "--out", str(out),
                             "--jobs", "1", "--quiet", "--root", str(root)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "TMPDIR": str(tmp)})


def test_killed_batch_resumes_without_regrading(tmp_path, mnist_sample_root):
    folder = tmp_path / "class"
    folder.mkdir()
    for index in range(3):
        shutil.copy(resources.EXAMPLES_DIR / "correct_argmax.ipynb", folder / f"student{index}.ipynb")
    out = tmp_path / "out"
    tmp = tmp_path / "tmp"
    tmp.mkdir()

    first = _grade(folder, out, mnist_sample_root.root, tmp)
    deadline = time.monotonic() + 300
    while not list(out.glob("*/result.json")) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert first.poll() is None, "the batch finished before it could be interrupted"
    first.send_signal(signal.SIGKILL)  # no chance to clean up: the worst case
    first.wait()
    done_before = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("*/result.json")}
    assert 1 <= len(done_before) < 3
    assert not list(out.rglob("*.tmp")) or all(".runs" in str(p) for p in out.rglob("*.tmp"))

    left_by_the_kill = set(tmp.iterdir())
    second = _grade(folder, out, mnist_sample_root.root, tmp)
    stdout, stderr = second.communicate(timeout=900)
    assert second.returncode == 0, stderr
    assert set(tmp.iterdir()) == left_by_the_kill  # a batch that ends removes its working directories
    results = {p.parent.name: json.loads(p.read_text()) for p in out.glob("*/result.json")}
    assert sorted(results) == ["student0", "student1", "student2"]
    assert all(r["status"] == "graded" and r["score"] == r["max_score"] for r in results.values())
    # The ones finished before the kill were kept, not graded again.
    assert {name: (out / name / "result.json").stat().st_mtime_ns for name in done_before} == done_before
    rows = (out / "gradebook.csv").read_text().splitlines()
    assert len(rows) == 1 + 3


def test_a_result_is_written_only_after_its_report(tmp_path, monkeypatch):
    """result.json tells a resumed batch that a submission is done, so nothing may come after it."""
    def killed(result, path):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "write_report", killed)
    with pytest.raises(KeyboardInterrupt):
        batch.write_result(f.perfect("alice"), batch.Layout(tmp_path))
    assert not batch.Layout(tmp_path).result("alice").exists()
