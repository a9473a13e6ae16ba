"""Where the templates and lab files are, from a source checkout or an installed wheel."""
from __future__ import annotations

from pathlib import Path

_INSTALLED = Path(__file__).parent / "_resources"
# In a checkout (or an editable install) they sit at the top of the repository; the wheel copies
# them into grader/_resources (see pyproject.toml).
_ROOT = _INSTALLED if _INSTALLED.is_dir() else Path(__file__).resolve().parent.parent

TEMPLATES_DIR = _ROOT / "templates"
LAB_DIR = _ROOT / "lab"
EXAMPLES_DIR = LAB_DIR / "examples"
RUBRIC_PATH = LAB_DIR / "rubric.toml"
