"""Intake: every kind of bad input becomes a result with a reason, and the batch goes on."""
from __future__ import annotations

import io
import zipfile

import nbformat

from grader import intake


def _notebook_bytes(source="print(1)") -> bytes:
    nb = nbformat.v4.new_notebook()
    nb.cells.append(nbformat.v4.new_code_cell(source))
    return nbformat.writes(nb).encode()


def test_directory_with_good_and_bad_notebooks(tmp_path):
    (tmp_path / "good.ipynb").write_bytes(_notebook_bytes())
    (tmp_path / "text.ipynb").write_text("just some text")
    (tmp_path / "cut.ipynb").write_bytes(_notebook_bytes()[:40])
    (tmp_path / "schema.ipynb").write_text('{"cells": 3, "nbformat": 4, "nbformat_minor": 5, "metadata": {}}')
    found = {s.id: s for s in intake.collect([tmp_path])}
    assert found["good"].error is None and found["good"].notebook
    assert "invalid JSON" in found["text"].error
    assert "invalid JSON" in found["cut"].error
    assert "not a valid Jupyter notebook" in found["schema"].error


def test_size_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(intake, "MAX_NOTEBOOK_BYTES", 100)
    (tmp_path / "big.ipynb").write_bytes(_notebook_bytes("x = 1\n" * 100))
    [sub] = intake.collect([tmp_path / "big.ipynb"])
    assert "the limit is 100" in sub.error


def test_missing_path_is_a_result_not_an_exception(tmp_path):
    [sub] = intake.collect([tmp_path / "nope.ipynb"])
    assert "does not exist" in sub.error


def _zip(entries: dict[str, bytes], compression=zipfile.ZIP_STORED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, content in entries.items():
            archive.writestr(name, content)
    return buffer.getvalue()


def test_zip_from_an_lms(tmp_path):
    (tmp_path / "class.zip").write_bytes(_zip({
        "alice/lab.ipynb": _notebook_bytes(), "bob/lab.ipynb": _notebook_bytes("print(2)"),
        "../../evil.ipynb": _notebook_bytes(), "/abs.ipynb": _notebook_bytes(),
        "__MACOSX/._lab.ipynb": b"junk", "notes.txt": b"hi"}))
    found = intake.collect([tmp_path / "class.zip"])
    by_source = {s.id: s for s in found}
    assert by_source["class.zip_alice_lab"].error is None
    assert by_source["class.zip_bob_lab"].error is None
    unsafe = [s for s in found if s.error and "unsafe path" in s.error]
    assert len(unsafe) == 2
    assert not (tmp_path.parent / "evil.ipynb").exists()
    assert len({s.id for s in found}) == len(found)


def test_zip_bomb_is_refused_without_extracting(tmp_path):
    (tmp_path / "bomb.zip").write_bytes(_zip({"a.ipynb": b"\0" * 50_000_000}, zipfile.ZIP_DEFLATED))
    [sub] = intake.collect([tmp_path / "bomb.zip"])
    assert "zip bomb" in sub.error


def test_broken_zip(tmp_path):
    (tmp_path / "broken.zip").write_bytes(b"PK\x03\x04 not really")
    [sub] = intake.collect([tmp_path / "broken.zip"])
    assert "not a readable zip archive" in sub.error


def test_duplicate_names_get_distinct_ids(tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "lab.ipynb").write_bytes(_notebook_bytes())
    found = intake.collect([tmp_path / "a" / "lab.ipynb", tmp_path / "b" / "lab.ipynb"])
    assert [s.id for s in found] == ["lab", "lab-2"]
