"""Intake: every kind of bad input becomes a result with a reason, and the batch goes on."""
from __future__ import annotations

import io
import os
import stat
import threading
import zipfile
import zlib

import nbformat
import pytest

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
    by_id = {s.id: s for s in found}  # named after the path inside the archive named
    assert by_id["alice_lab"].error is None and by_id["alice_lab"].student_name == "alice"
    assert by_id["bob_lab"].error is None and by_id["bob_lab"].student_name == "bob"
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
    assert [s.id for s in found] == ["a_lab", "b_lab"]  # the folder that tells them apart, not a count


def _deflated_with_a_damaged_stream(name: str, content: bytes) -> bytes:
    archive = bytearray(_zip({name: content}, zipfile.ZIP_DEFLATED))
    start = 30 + len(name)  # the entry's data follows its 30-byte local header and its name
    archive[start:start + 8] = b"\xff" * 8
    return bytes(archive)


def test_nested_json_and_a_damaged_deflate_stream_are_listed_with_reasons(tmp_path):
    (tmp_path / "good.ipynb").write_bytes(_notebook_bytes())
    (tmp_path / "nested.ipynb").write_text("[" * 100_000 + "]" * 100_000)
    deep = '{"a": ' * 100_000 + "1" + "}" * 100_000
    (tmp_path / "deep_metadata.ipynb").write_text(
        '{"cells": [], "nbformat": 4, "nbformat_minor": 5, "metadata": ' + deep + "}")
    damaged = _deflated_with_a_damaged_stream("alice/lab.ipynb", _notebook_bytes())
    (tmp_path / "class.zip").write_bytes(damaged)
    with pytest.raises(zlib.error):  # what the archive does to a reader that expects nothing
        zipfile.ZipFile(tmp_path / "class.zip").read("alice/lab.ipynb")
    found = {s.id: s for s in intake.collect([tmp_path])}
    assert found["good"].error is None
    assert "nested too deeply" in found["nested"].error
    assert "nested too deeply" in found["deep_metadata"].error
    assert "zlib.error" in found["class.zip_alice_lab"].error
    assert all("\n" not in s.error for s in found.values() if s.error)


def test_any_failure_reading_a_file_is_that_files_result(tmp_path, monkeypatch):
    for name in ("a", "b", "c"):
        (tmp_path / f"{name}.ipynb").write_bytes(_notebook_bytes(f"print({name!r})"))
    validated = intake._validated

    def fails_for_b(place, source, raw):
        if place.display == "b.ipynb":
            raise LookupError("something nobody expected")
        return validated(place, source, raw)

    monkeypatch.setattr(intake, "_validated", fails_for_b)
    found = {s.id: s for s in intake.collect([tmp_path])}
    assert found["a"].error is None and found["c"].error is None
    assert found["b"].error == "cannot read it: LookupError: something nobody expected"


def test_every_file_in_a_folder_is_graded_or_listed(tmp_path):
    folder = tmp_path / "class"
    folder.mkdir()
    (folder / "alice.ipynb").write_bytes(_notebook_bytes())
    (folder / "bob.py").write_text("print('my lab')")
    (folder / "carol.html").write_text("<html></html>")
    (folder / "dave.ipynb").mkdir()
    (folder / "dave.ipynb" / "lab.ipynb").write_bytes(_notebook_bytes())
    (folder / "erin").mkdir()
    (folder / "erin" / "notes").write_text("no extension")
    found = {s.id: s for s in intake.collect([folder])}
    assert set(found) == {"alice", "bob.py", "carol.html", "dave", "dave.ipynb_lab", "erin_notes"}
    assert found["alice"].error is None and found["dave.ipynb_lab"].error is None
    assert "not a notebook (a .py file)" in found["bob.py"].error
    assert "not a notebook (a .html file)" in found["carol.html"].error
    assert "a folder, not a notebook file" in found["dave"].error
    assert "a file without an extension" in found["erin_notes"].error


def test_symbolic_links_are_listed_and_never_followed(tmp_path):
    folder = tmp_path / "class"
    folder.mkdir()
    outside = tmp_path / "solution.ipynb"  # a notebook that would be graded if the link were followed
    outside.write_bytes(_notebook_bytes("print('the instructor solution')"))
    (folder / "alice.ipynb").write_bytes(_notebook_bytes())
    (folder / "mallory.ipynb").symlink_to(outside)
    (folder / "copy.ipynb").symlink_to("alice.ipynb")
    (folder / "elsewhere").symlink_to(tmp_path)  # a folder: not walked
    found = {s.id: s for s in intake.collect([folder])}
    assert set(found) == {"alice", "mallory", "copy", "elsewhere"}
    assert found["alice"].error is None
    assert "leading out of the folder" in found["mallory"].error and str(outside) in found["mallory"].error
    assert "inside the folder" in found["copy"].error
    assert "leading out of the folder" in found["elsewhere"].error
    assert all(s.notebook is None for s in found.values() if s.id != "alice")
    [named] = intake.collect([folder / "mallory.ipynb"])  # as a shell glob over the folder names it
    assert named.notebook is None and "links are never followed" in named.error


def test_pipes_are_listed_without_being_opened(tmp_path):
    os.mkfifo(tmp_path / "pipe.ipynb")  # opening it to read would wait for a writer for ever
    found: list = []
    reader = threading.Thread(target=lambda: found.extend(intake.collect([tmp_path])), daemon=True)
    reader.start()
    reader.join(60)
    assert not reader.is_alive(), "intake blocked on the pipe"
    [pipe] = found
    assert "a named pipe (FIFO), not a regular file" in pipe.error


def test_hidden_files_are_skipped_but_hidden_notebooks_are_listed(tmp_path):
    (tmp_path / "lab.ipynb").write_bytes(_notebook_bytes())
    (tmp_path / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (tmp_path / "._lab.ipynb").write_bytes(b"\0\5\x16\7 AppleDouble")
    (tmp_path / ".ipynb_checkpoints").mkdir()
    (tmp_path / ".ipynb_checkpoints" / "lab-checkpoint.ipynb").write_bytes(_notebook_bytes())
    (tmp_path / "__MACOSX").mkdir()
    (tmp_path / "__MACOSX" / "lab.ipynb").write_bytes(b"junk")
    found = {s.id: s for s in intake.collect([tmp_path])}
    assert set(found) == {"lab", "ipynb_checkpoints_lab-checkpoint"}
    assert found["lab"].error is None
    assert "hidden copy" in found["ipynb_checkpoints_lab-checkpoint"].error


def test_every_entry_of_an_archive_is_graded_or_listed(tmp_path):
    link = zipfile.ZipInfo("mallory/lab.ipynb")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("alice/lab.ipynb", _notebook_bytes())
        archive.writestr("bob/lab.py", "print(1)")
        archive.writestr("carol/inner.zip", _zip({"lab.ipynb": _notebook_bytes()}))
        archive.writestr(link, "/etc/passwd")
        archive.writestr("dave/lab.ipynb/", b"")
        archive.writestr("erin/.ipynb_checkpoints/lab-checkpoint.ipynb", _notebook_bytes())
        archive.writestr("erin/.DS_Store", b"\0")
    (tmp_path / "class.zip").write_bytes(buffer.getvalue())
    found = {s.id: s for s in intake.collect([tmp_path / "class.zip"])}
    assert set(found) == {"alice_lab", "bob_lab.py", "carol_inner.zip", "mallory_lab", "dave_lab",
                          "erin_.ipynb_checkpoints_lab-checkpoint"}
    assert found["alice_lab"].error is None
    assert "not a notebook (a .py file)" in found["bob_lab.py"].error
    assert "archive inside the archive" in found["carol_inner.zip"].error
    assert "symbolic link" in found["mallory_lab"].error and found["mallory_lab"].notebook is None
    assert "a folder, not a notebook file" in found["dave_lab"].error
    assert "hidden copy" in found["erin_.ipynb_checkpoints_lab-checkpoint"].error


def test_regular_files_only_are_opened(tmp_path):
    (tmp_path / "file").write_bytes(b"content")
    (tmp_path / "link").symlink_to(tmp_path / "file")
    (tmp_path / "folder").mkdir()
    os.mkfifo(tmp_path / "pipe")
    with intake.open_regular(tmp_path / "file") as handle:
        assert handle.read() == b"content"
    for name, kind in [("link", f"a symbolic link to {tmp_path / 'file'}"), ("folder", "a folder"),
                       ("pipe", "a named pipe (FIFO)")]:
        with pytest.raises(intake.NotRegularFile) as refused:
            intake.open_regular(tmp_path / name)
        assert refused.value.kind == kind
    with pytest.raises(FileNotFoundError):
        intake.open_regular(tmp_path / "nothing")
