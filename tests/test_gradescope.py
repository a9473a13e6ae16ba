"""`labgrader gradescope`: the autograder zip, and its run_autograder run the way Gradescope runs it.

Gradescope unpacks the zip into /autograder/source, runs setup.sh once, copies run_autograder to
/autograder/run_autograder and runs it for each submission, which it puts in /autograder/submission,
then reads /autograder/results/results.json. The test lays that tree out in a temporary folder
($LABGRADER_AUTOGRADER_ROOT), runs the zip's own data provisioning and run_autograder offline with
the labgrader of this environment on PATH (setup.sh's apt and pip steps are not run: their commands
are checked as text), and holds results.json to Gradescope's documented format.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

import jsonschema
import pytest

from grader import resources, score
from reference import spec
from test_exports import GRADESCOPE_SCHEMA, LABGRADER_TEST
from test_install_and_classroom import _offline

pytestmark = pytest.mark.slow

LABGRADER = Path(sys.executable).parent / "labgrader"
EXPECTED = tomllib.loads((resources.EXAMPLES_DIR / "expected.toml").read_text())["examples"]
TITLES = {entry.name: entry.title for entry in score.load_rubric(resources.RUBRIC_PATH).entries}
SCRIPTS = ("setup.sh", "provision_data.sh", "run_autograder")


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    env = {**os.environ, "LABGRADER_HOME": str(tmp_path_factory.mktemp("labgrader-home")),
           "PATH": f"{LABGRADER.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("LABGRADER_DATA_DIR", None)  # the offline mnist-sample profile, as on a fresh machine
    return env


@pytest.fixture(scope="module")
def autograder_zip(env, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("build") / "autograder.zip"
    built = subprocess.run([str(LABGRADER), "gradescope", "--out", str(out), "--dataset", "mnist"], env=env,
                           capture_output=True, text=True, timeout=900)
    assert built.returncode == 0, built.stdout + built.stderr
    assert f"wrote {out}" in built.stdout
    return out


@pytest.fixture(scope="module")
def tree(autograder_zip, env, tmp_path_factory) -> Path:
    """Gradescope's /autograder after setup.sh: the zip in source/, run_autograder copied up, the
    data provisioned by the zip's own script (offline)."""
    root = tmp_path_factory.mktemp("gradescope") / "autograder"
    source = root / "source"
    source.mkdir(parents=True)
    with zipfile.ZipFile(autograder_zip) as archive:
        archive.extractall(source)
        for info in archive.infolist():  # unzip keeps the modes zipfile.extractall drops
            if info.external_attr >> 16:
                os.chmod(source / info.filename, stat.S_IMODE(info.external_attr >> 16))
    shutil.copy2(source / "run_autograder", root / "run_autograder")
    provisioned = subprocess.run(_offline() + [str(source / "provision_data.sh")], env=env, capture_output=True,
                                 text=True, timeout=600)
    assert provisioned.returncode == 0, provisioned.stdout + provisioned.stderr
    assert f"mnist-sample (a SAMPLE of MNIST, not the full dataset): 4000 training / 1000 test images at " \
           f"{source / 'data'}" in provisioned.stdout
    return root


def _run_autograder(root: Path, env: dict[str, str], files: dict[str, bytes]) -> dict:
    """Put ``files`` in a fresh submission folder, run run_autograder offline, return results.json."""
    for folder in ("submission", "results"):
        shutil.rmtree(root / folder, ignore_errors=True)
        (root / folder).mkdir()
    for name, content in files.items():
        (root / "submission" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "submission" / name).write_bytes(content)
    done = subprocess.run(_offline() + [str(root / "run_autograder")], cwd=root, capture_output=True, text=True,
                          env={**env, "LABGRADER_AUTOGRADER_ROOT": str(root)}, timeout=1500)
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads((root / "results" / "results.json").read_text("utf-8"))
    jsonschema.validate(results, GRADESCOPE_SCHEMA)
    for test in results["tests"]:
        jsonschema.validate(test, LABGRADER_TEST)
    assert results["visibility"] == "visible" and results["stdout_visibility"] == "hidden"
    return results


def _example(name: str) -> bytes:
    return (resources.EXAMPLES_DIR / name).read_bytes()


# --------------------------------------------------------------------------------------------
# The zip

def test_zip_holds_what_gradescope_runs_and_what_they_need(autograder_zip):
    with zipfile.ZipFile(autograder_zip) as archive:
        names = set(archive.namelist())
        [wheel] = [n for n in names if n.endswith(".whl")]
        for script in SCRIPTS:  # at the root of the archive, executable
            assert stat.S_IMODE(archive.getinfo(script).external_attr >> 16) == 0o755
        texts = {script: archive.read(script).decode() for script in SCRIPTS}
        zipped_spec = json.loads(archive.read("spec.json"))
        rubric = archive.read("rubric.toml")
        record = json.loads(archive.read("data/MNIST/labgrader-profile.json"))
        data = {name: archive.read(f"data/MNIST/raw/{name}") for name in record["sha256"]}
        with archive.open(wheel) as handle, zipfile.ZipFile(handle) as packed:
            wheel_files = set(packed.namelist())
    assert wheel.startswith("labgrader-") and {"grader/gradescope.py", "grader/cli.py",
                                               "grader/_resources/lab/rubric.toml"} <= wheel_files
    for script, text in texts.items():
        syntax = subprocess.run(["bash", "-n", "-c", text], capture_output=True, text=True)
        assert syntax.returncode == 0, f"{script}: {syntax.stderr}"
    setup = texts["setup.sh"]
    assert "apt-get install" in setup and "bubblewrap" in setup
    assert "--index-url https://download.pytorch.org/whl/cpu" in setup  # CPU-only torch
    for name in ("torch", "torchvision"):
        assert f"{name}=={metadata.version(name).split('+')[0]}" in setup
    assert f'"$SOURCE"/{wheel}' in setup and setup.rstrip().endswith('"$SOURCE/provision_data.sh"')
    assert "labgrader data --dataset mnist --root \"$SOURCE/data\"" in texts["provision_data.sh"]
    assert "${LABGRADER_AUTOGRADER_ROOT:-/autograder}" in texts["run_autograder"]
    # The spec and the data are the ones this machine grades mnist-sample with.
    assert zipped_spec == json.loads(spec.path_for("mnist-sample").read_text())
    assert rubric == resources.RUBRIC_PATH.read_bytes()
    assert record["profile"] == "mnist-sample"
    assert {n: hashlib.sha256(b).hexdigest() for n, b in data.items()} == record["sha256"] == zipped_spec["data_sha256"]


def test_build_refuses_a_wheel_that_is_not_one(env, tmp_path):
    fake = tmp_path / "labgrader.whl"
    fake.mkdir()
    done = subprocess.run([str(LABGRADER), "gradescope", "--out", str(tmp_path / "a.zip"), "--wheel", str(fake)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2 and f"{fake} is not a wheel file" in done.stderr
    assert list(tmp_path.iterdir()) == [fake]  # no zip, no temporary file left


def _rubric_with_support(folder: Path, support: str) -> Path:
    """A copy of the bundled rubric in ``folder`` that names ``support`` as a support file."""
    folder.mkdir(parents=True, exist_ok=True)
    text = resources.RUBRIC_PATH.read_text()
    assert "support_files = []" in text
    rubric = folder / "rubric.toml"
    rubric.write_text(text.replace("support_files = []", f"support_files = [{support!r}]"))
    return rubric


def test_support_files_and_packages_travel_with_the_zip(autograder_zip, env, tmp_path):
    with zipfile.ZipFile(autograder_zip) as archive:
        [wheel] = [n for n in archive.namelist() if n.endswith(".whl")]
        archive.extract(wheel, tmp_path)
    helper = resources.EXAMPLES_DIR / "support" / "pytorchcv.py"
    rubric = _rubric_with_support(tmp_path / "course", "helpers/pytorchcv.py")
    (rubric.parent / "helpers").mkdir()
    shutil.copy(helper, rubric.parent / "helpers" / "pytorchcv.py")
    out = tmp_path / "course.zip"
    built = subprocess.run([str(LABGRADER), "gradescope", "--out", str(out), "--rubric", str(rubric),
                            "--wheel", str(tmp_path / wheel)], env=env, capture_output=True, text=True, timeout=900)
    assert built.returncode == 0, built.stdout + built.stderr
    unpacked = tmp_path / "source"
    with zipfile.ZipFile(out) as archive:
        archive.extractall(unpacked)
        setup = archive.read("setup.sh").decode()
    # The helper sits where the zipped rubric names it, and the rubric loads there as here.
    assert (unpacked / "helpers" / "pytorchcv.py").read_bytes() == helper.read_bytes()
    loaded = score.load_rubric(unpacked / "rubric.toml")
    assert [(f.name, f.content) for f in loaded.environment.support_files] == [("pytorchcv.py", helper.read_bytes())]
    # setup.sh installs the packages the zipped rubric declares, with the pip it installs labgrader with.
    assert loaded.environment.packages
    assert ('/opt/labgrader/bin/labgrader packages --rubric "$SOURCE/rubric.toml" | xargs -r '
            '/opt/labgrader/bin/pip install') in setup


def test_a_support_file_outside_the_rubrics_folder_is_refused_in_one_line(env, tmp_path):
    (tmp_path / "helper.py").write_text("VALUE = 1\n")
    rubric = _rubric_with_support(tmp_path / "course", "../helper.py")
    done = subprocess.run([str(LABGRADER), "gradescope", "--out", str(tmp_path / "a.zip"), "--rubric", str(rubric)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2 and "lies outside the rubric's folder" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "a.zip").exists()


# --------------------------------------------------------------------------------------------
# run_autograder, as Gradescope runs it

@pytest.mark.parametrize("example", ["correct.ipynb", "mistake_history_keys.ipynb"])
def test_run_autograder_grades_the_submission(example, tree, env):
    files = {example: _example(example), "README.md": b"# my lab\n",
             # Jupyter's checkpoint copy, as a GitHub or zip submission carries it: not a second notebook
             ".ipynb_checkpoints/lab-checkpoint.ipynb": _example("correct.ipynb")}
    results = _run_autograder(tree, env, files)
    expected = EXPECTED[example]
    assert results["score"] == pytest.approx(expected["score"])
    assert results["score"] == pytest.approx(sum(t["score"] for t in results["tests"]))
    assert results["output"].startswith(f"Score: {expected['score']:g}/")
    missed = {t["name"] for t in results["tests"] if t["score"] < t["max_score"]}
    assert missed == {TITLES[name] for name in expected.get("fails", [])}
    for test in results["tests"]:
        if test["visibility"] == "hidden":
            assert test["output"].startswith("Hidden check: ")
    for check, message in expected.get("messages", {}).items():
        [test] = [t for t in results["tests"] if t["name"] == TITLES[check]]
        assert test["visibility"] == "visible" and message in test["output"]
    # The student's report lies next to results.json; the kept run (hidden messages) does not.
    assert sorted(p.name for p in (tree / "results").iterdir()) == ["report.html", "results.json"]
    assert "<html" in (tree / "results" / "report.html").read_text("utf-8").lower()


@pytest.mark.parametrize("files, says", [
    ({}, "nothing was submitted: submit your lab as one Jupyter notebook file (.ipynb)."),
    ({"a.ipynb": _example("correct.ipynb"), "lab/b.ipynb": _example("correct.ipynb")},
     "your submission holds 2 notebooks (a.ipynb, lab/b.ipynb) and labgrader grades exactly one: "
     "submit only your lab notebook."),
    ({"lab.py": b"print('my lab')\n", "README.md": b"# lab\n"},
     "your submission holds no Jupyter notebook, only README.md, lab.py: submit your lab as one "
     "notebook file (.ipynb)."),
    ({"lab.ipynb": b'{"cells": [', "notes.txt": b"x"}, "not a notebook: invalid JSON"),
], ids=["empty", "two-notebooks", "no-notebook", "broken-notebook"])
def test_unusable_submission_gets_a_message_not_a_crash(files, says, tree, env):
    results = _run_autograder(tree, env, files)
    assert results["score"] == 0 and results["tests"] == []
    assert results["output"].startswith(f"Not graded: {says}")
    assert (tree / "results" / "report.html").is_file()
