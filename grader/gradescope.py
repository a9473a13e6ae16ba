"""Gradescope's autograder, built by labgrader: ``labgrader gradescope --out autograder.zip``.

The zip holds, at its root, what Gradescope's autograder specification asks for
(https://gradescope-autograders.readthedocs.io/en/latest/specs/) and what they need:

``setup.sh``
    run once, as root, when Gradescope builds the autograder's Ubuntu image (22.04 or 24.04; the
    network is there then): installs bubblewrap and a venv of Python >= 3.11, CPU-only torch and
    torchvision of the versions the zip was built with (PyTorch's CPU index: Gradescope has no
    GPU), then the labgrader wheel the zip carries, then runs ``provision_data.sh``.
``provision_data.sh``
    checks the dataset the zip carries (``data/``: torchvision's four IDX files and labgrader's
    record of their profile and hashes) and makes it readable; files that match their record are
    reused as they are. Grading is pinned to the spec made from them and refuses any other data.
``run_autograder``
    run for each submission: ``labgrader gradescope --run <root>`` grades the notebook in
    ``<root>/submission`` and writes ``<root>/results/results.json``. ``<root>`` is
    ``/autograder``, or ``$LABGRADER_AUTOGRADER_ROOT`` to lay Gradescope's tree out elsewhere (to
    try an autograder before uploading it, or in a test).
``labgrader-*.whl``, ``spec.json``, ``rubric.toml``, ``data/``
    the grader, the expected behaviour (pinned: every submission is graded against the spec the
    instructor built the zip with, and nothing is derived on Gradescope), the rubric, the dataset.

Grading one submission (:func:`run`): the notebook is the one ``.ipynb`` in the submission folder,
found the way ``labgrader grade`` finds notebooks in a folder (hidden copies such as Jupyter's
checkpoints don't count; a zip Gradescope did not unpack is opened). No notebook, several, or a
file that is not a valid notebook each give a result with score 0 whose output says what to submit,
written like any other result: ``results.json`` is :func:`grader.export.gradescope_json` (hidden
checks as points only, the student's feedback as text) and ``report.html``, the student's report
(hidden checks without their messages), lies next to it in the results folder. Gradescope's
specification shows students only ``results.json``; the report is there for whoever fetches the
results folder.
"""
from __future__ import annotations

import shlex
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from collections.abc import Callable
from importlib import metadata
from pathlib import Path, PurePosixPath
from string import Template

from grader import intake, report, score
from grader.export import GRADESCOPE, write_gradescope
from grader.results import GradeResult, Submission
from reference import spec as specs
from reference import atomic
from reference.provision import PROFILE_FILE, RAW_FILES, Provisioned

__all__ = ["BuildError", "build", "run", "find_submission"]

ROOT_VARIABLE = "LABGRADER_AUTOGRADER_ROOT"
REPORT = "report.html"
SUBMISSION_ID = "submission"  # the id of a result that names no notebook
MAX_LISTED = 10  # files named in a message about what was submitted
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"

SETUP = Template("""\
#!/usr/bin/env bash
# Gradescope runs this once, as root, when it builds the autograder's image (Ubuntu 22.04 or
# 24.04). Written by `labgrader gradescope`. The network is needed here only: the data, the spec
# and the rubric come from this zip.
set -euo pipefail
SOURCE="$$(cd "$$(dirname "$${BASH_SOURCE[0]}")" && pwd)"
export DEBIAN_FRONTEND=noninteractive
apt-get update
# labgrader needs Python 3.11 or newer: Ubuntu 24.04's python3 is 3.12, 22.04 packages python3.11.
if python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    PYTHON=python3
    apt-get install -y --no-install-recommends bubblewrap python3-venv
else
    PYTHON=python3.11
    apt-get install -y --no-install-recommends bubblewrap python3.11 python3.11-venv
fi
"$$PYTHON" -m venv /opt/labgrader
# CPU-only builds (Gradescope has no GPU), the versions this autograder was built with.
/opt/labgrader/bin/pip install --no-cache-dir --index-url $index $torch $torchvision
/opt/labgrader/bin/pip install --no-cache-dir "$$SOURCE"/$wheel
# The packages the rubric declares grading provides (its [environment] packages).
/opt/labgrader/bin/labgrader packages --rubric "$$SOURCE/rubric.toml" | xargs -r /opt/labgrader/bin/pip install --no-cache-dir
ln -sf /opt/labgrader/bin/labgrader /usr/local/bin/labgrader
"$$SOURCE/provision_data.sh"
""")

PROVISION = Template("""\
#!/usr/bin/env bash
# Checks the dataset this zip carries in data/ (torchvision's IDX files and labgrader's record of
# their profile and hashes) and makes it readable by the grader's sandbox. Written by
# `labgrader gradescope`; setup.sh runs it.
set -euo pipefail
SOURCE="$$(cd "$$(dirname "$${BASH_SOURCE[0]}")" && pwd)"
labgrader data --dataset $dataset --root "$$SOURCE/data"
""")

RUN = Template("""\
#!/usr/bin/env bash
# Gradescope runs this for every submission. Written by `labgrader gradescope`. It grades the
# notebook in $$ROOT/submission and writes $$ROOT/results/results.json (and report.html there);
# $$ROOT is /autograder, or $$$root_variable to try the autograder elsewhere.
set -euo pipefail
ROOT="$${$root_variable:-/autograder}"
SOURCE="$$ROOT/source"
exec labgrader gradescope --run "$$ROOT" --dataset $dataset --root "$$SOURCE/data" \\
    --spec "$$SOURCE/spec.json" --rubric "$$SOURCE/rubric.toml" --quiet
""")


class BuildError(Exception):
    """The zip could not be built; the message says why and what to do."""


# --------------------------------------------------------------------------------------------
# Building the zip

def build(out: Path, *, provisioned: Provisioned, dataset: str, spec: specs.Spec, rubric: Path,
          wheel: Path | None = None) -> Path:
    """Write the autograder zip to ``out`` (atomically) and return its path.

    ``wheel``: the labgrader wheel to install on Gradescope; without it one is built from this
    checkout with ``pip wheel``."""
    support = _support_files(rubric)
    with tempfile.TemporaryDirectory(prefix="labgrader-wheel-") as scratch:
        wheel = wheel or _build_wheel(Path(scratch))
        if not wheel.is_file() or not wheel.name.endswith(".whl"):
            raise BuildError(f"{wheel} is not a wheel file")
        scripts = {"setup.sh": SETUP.substitute(index=TORCH_CPU_INDEX, torch=_pinned("torch"),
                                                torchvision=_pinned("torchvision"),
                                                wheel=shlex.quote(wheel.name)),
                   "provision_data.sh": PROVISION.substitute(dataset=shlex.quote(dataset)),
                   "run_autograder": RUN.substitute(dataset=shlex.quote(dataset), root_variable=ROOT_VARIABLE)}
        with atomic.replacing(out, binary=True) as file, \
                zipfile.ZipFile(file, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for name, text in scripts.items():
                _write_executable(archive, name, text)
            archive.write(wheel, wheel.name)
            archive.writestr("spec.json", specs.dumps(spec.content))
            archive.write(rubric, "rubric.toml")
            for path, inside in support:
                archive.write(path, inside)
            dataset_dir = provisioned.root / provisioned.torchvision_class
            archive.write(dataset_dir / PROFILE_FILE, f"data/{provisioned.torchvision_class}/{PROFILE_FILE}")
            for name in RAW_FILES:
                archive.write(dataset_dir / "raw" / name, f"data/{provisioned.torchvision_class}/raw/{name}")
    return out


def _support_files(rubric: Path) -> list[tuple[Path, str]]:
    """The rubric's support files, each with its path in the zip: where the rubric names it, beside
    ``rubric.toml``, so that the rubric reads the same on Gradescope as here."""
    try:
        score.load_rubric(rubric)  # a missing or clashing support file: one line, before any work
        declared = tomllib.loads(rubric.read_text()).get("environment", {}).get("support_files", [])
    except (OSError, ValueError) as error:
        raise BuildError(str(error)) from None
    files = []
    for name in declared:
        inside = PurePosixPath(name)
        if inside.is_absolute() or ".." in inside.parts:
            raise BuildError(f"{rubric}: support file {name!r} lies outside the rubric's folder; the zip carries "
                             "support files beside rubric.toml: name them by a path inside that folder")
        files.append((rubric.parent / name, inside.as_posix()))
    return files


def _write_executable(archive: zipfile.ZipFile, name: str, text: str) -> None:
    info = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))
    info.external_attr = 0o100755 << 16  # a regular file, rwxr-xr-x: Gradescope executes them
    info.compress_type = zipfile.ZIP_DEFLATED
    archive.writestr(info, text)


def _pinned(distribution: str) -> str:
    """``name==version`` of the installed build, without its local tag (``2.5.1+cpu`` -> ``2.5.1``),
    which PyTorch's CPU index serves as that version's CPU build."""
    return shlex.quote(f"{distribution}=={metadata.version(distribution).split('+')[0]}")


def _build_wheel(into: Path) -> Path:
    checkout = Path(__file__).resolve().parent.parent
    if not (checkout / "pyproject.toml").is_file():
        raise BuildError("labgrader is installed from a wheel here, not run from its source: pass that "
                         "wheel with --wheel (build one with `pip wheel --no-deps <labgrader checkout>`)")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(into),
                           str(checkout)], capture_output=True, text=True)
    built = sorted(into.glob("labgrader-*.whl"))
    if done.returncode != 0 or len(built) != 1:
        why = (done.stderr.strip().splitlines() or ["no wheel was written"])[-1]
        raise BuildError(f"could not build labgrader's wheel from {checkout} with pip ({why}); "
                         "build one yourself and pass it with --wheel")
    return built[0]


# --------------------------------------------------------------------------------------------
# Grading on Gradescope

def run(root: Path, grade: Callable[[Submission], GradeResult]) -> GradeResult:
    """Grade the submission in Gradescope's tree at ``root`` with ``grade`` and write the results."""
    result = grade(find_submission(root / "submission"))
    results = root / "results"
    report.write_report(result.for_students(), results / REPORT)
    write_gradescope(result, results / GRADESCOPE)
    return result


def find_submission(folder: Path) -> Submission:
    """The one notebook in ``folder``; else a submission whose error says what to submit."""
    found = intake.collect([folder]) if folder.is_dir() else []
    notebooks = [s for s in found if s.error is None or _named_like_notebook(s, folder)]
    if len(notebooks) == 1:
        return notebooks[0]
    if notebooks:
        why = (f"your submission holds {len(notebooks)} notebooks ({_listing(notebooks, folder)}) and "
               "labgrader grades exactly one: submit only your lab notebook.")
    elif found:
        why = (f"your submission holds no Jupyter notebook, only {_listing(found, folder)}: submit your "
               "lab as one notebook file (.ipynb).")
    else:
        why = "nothing was submitted: submit your lab as one Jupyter notebook file (.ipynb)."
    return Submission(id=SUBMISSION_ID, source=str(folder), error=why)


def _relative(submission: Submission, folder: Path) -> PurePosixPath:
    path = Path(submission.source)
    return PurePosixPath(path.relative_to(folder).as_posix() if path.is_relative_to(folder) else path.name)


def _named_like_notebook(submission: Submission, folder: Path) -> bool:
    """A .ipynb file intake could not read as a notebook (not a hidden copy): it was meant as one."""
    name = _relative(submission, folder)
    return name.suffix == intake.NOTEBOOK and not any(part.startswith(".") for part in name.parts)


def _listing(submissions: list[Submission], folder: Path) -> str:
    names = sorted({str(_relative(s, folder)) for s in submissions})
    more = f" and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else ""
    return ", ".join(names[:MAX_LISTED]) + more
