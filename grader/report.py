"""HTML feedback: one self-contained report per submission, and a class summary for the teacher.

Both pages are rendered by Jinja2 from ``templates/`` with autoescaping on, so every string that
came from a student's notebook (error messages, tracebacks, cell sources, check messages that quote
them) reaches the browser as text, never as markup. As a second line of defence each page carries a
Content-Security-Policy that lets no script run but the summary's own sorting script (allowed by
its hash) and loads nothing but inline ``data:`` images: a page works offline from ``file://``.

A student's report never names, describes or quotes a hidden check: it only counts them and their
points, and says plainly when the visible checks all pass but hidden ones do not.
"""
from __future__ import annotations

import base64
import hashlib
import math
import re
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jinja2
from markupsafe import Markup

from grader.overrides import TOTAL
from grader.resources import TEMPLATES_DIR
from grader.results import CellRun, GradeResult, ScoredCheck
from reference import atomic

__all__ = ["render_report", "write_report", "render_summary", "write_summary", "fmt_points"]

REPORT_TEMPLATE = "report.html.j2"
SUMMARY_TEMPLATE = "summary.html.j2"
SORT_SCRIPT = "_sortable.js"

SAMPLE_PROFILE = "mnist-sample"
FAILED_CELL_STATUSES = ("error", "timeout", "kernel-died")

# (key in GradeResult.figures, heading, alt text and caption); "confusion" is a table made from
# GradeResult.confusion_matrix, not an image
FIGURES = (
    ("learning_curves", "Learning curves",
     "Accuracy and loss per epoch: the history your notebook recorded in its variable hist, as "
     "it left it (solid lines; shown, not graded), beside the reference's (dashed lines)."),
    ("weights", "What your model learned",
     "The ten 28 by 28 images of your model's first-layer weights, one per class; red pixels "
     "push towards the class, blue away from it."),
    ("hidden_units", "What your model's first layer learned",
     "The first units of your model's first hidden layer, each one's 784 weights as a 28 by 28 "
     "image (patterns, not classes: later layers combine them); red pixels raise the unit's "
     "output, blue lower it."),
    ("confusion", "Confusion matrix",
     "Your saved model on the test set: each row is a true class, each column the class your "
     "model predicted, each cell a count of test images. The diagonal is what it got right; the "
     "darker a cell, the larger its share of its row."),
    ("misclassified", "Some test images your model got wrong",
     "A few test images your model misclassified, each titled true label, arrow, predicted "
     "label."),
)
_BASE64 = re.compile(r"[A-Za-z0-9+/]+={0,2}")

EXECUTION_NOTES = {
    "completed": None,
    "timeout": "The notebook was stopped because a cell ran past the time limit; the cells after "
               "it did not run. Look for an endless loop, or training for far more epochs or data "
               "than the lab asks for.",
    "kernel-died": "The Python kernel died while running your notebook (most often it ran out of "
                   "memory); the cells after that point did not run.",
    "output-limit": "Your notebook printed more output than the grader keeps, so it was stopped. "
                    "Print less inside loops (for example once per epoch, not once per batch).",
    "not-run": "Your notebook was not run.",
}


# --------------------------------------------------------------------------------------------
# formatting helpers (also registered as Jinja filters)

def fmt_points(x: Any) -> str:
    """``7.5`` -> "7.5", ``10.0`` -> "10", ``2/3`` -> "0.67"; missing or NaN -> "–"."""
    try:
        f = float(x)
    except (TypeError, ValueError):
        return "–"
    if not math.isfinite(f):
        return "–"
    text = f"{f:.2f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def fmt_percent(part: float, whole: float) -> str:
    if not whole:
        return "–"
    return f"{100 * part / whole:.0f}%"


def fmt_seconds(s: Any) -> str:
    try:
        f = float(s)
    except (TypeError, ValueError):
        return "–"
    if not math.isfinite(f):
        return "–"
    if f < 60:
        return f"{f:.1f} s"
    return f"{int(f // 60)} min {f % 60:.0f} s"


def safe_href(link: str) -> str:
    """A relative link, percent-encoded; anything with a scheme (``javascript:``) is defused."""
    link = str(link).replace("\\", "/")
    head = link.split("/", 1)[0]
    if ":" in head:  # "javascript:..." or "C:..." -> a relative path, not a scheme
        link = "./" + link
    return quote(link, safe="/#.-_~")


# --------------------------------------------------------------------------------------------
# the Jinja environment

@lru_cache(maxsize=4)
def _environment(templates_dir: str) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(templates_dir),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html", "j2", "html.j2", "xml"),
                                            default_for_string=True, default=True),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["pts"] = fmt_points
    env.filters["seconds"] = fmt_seconds
    env.filters["href"] = safe_href
    return env


def environment() -> jinja2.Environment:
    return _environment(str(TEMPLATES_DIR))


def _sort_script(env: jinja2.Environment) -> tuple[Markup, str]:
    """Our own sorting script, verbatim, and its CSP hash source (``'sha256-...'``)."""
    source, _, _ = env.loader.get_source(env, SORT_SCRIPT)  # type: ignore[union-attr]
    source = source.strip("\n")
    if "</" in source:
        raise ValueError(f"{SORT_SCRIPT} must not contain '</'")
    digest = base64.b64encode(hashlib.sha256(source.encode("utf-8")).digest()).decode("ascii")
    return Markup(source), f"'sha256-{digest}'"


def _csp(script_hash: str | None) -> str:
    script = script_hash if script_hash else "'none'"
    return ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
            f"script-src {script}; base-uri 'none'; form-action 'none'")


# --------------------------------------------------------------------------------------------
# the per-submission report

@dataclass(frozen=True)
class Note:
    level: str  # "good", "info", "warn" or "bad" (a CSS class)
    text: str


def _is_sample(profile: str | None) -> bool:
    return bool(profile) and SAMPLE_PROFILE in str(profile).lower()


def _figures(figures: Mapping[str, str], confusion: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for key, title, alt in FIGURES:
        if key == "confusion":
            rows = _confusion_rows(confusion)
            if rows:
                out.append({"key": key, "title": title, "alt": alt, "rows": rows})
            continue
        data = figures.get(key)
        if not isinstance(data, str):
            continue
        data = "".join(data.split())
        if not data or not _BASE64.fullmatch(data):
            continue  # never put anything but base64 into a data: URL
        out.append({"key": key, "title": title, "alt": alt, "src": "data:image/png;base64," + data})
    return out


def _confusion_rows(counts: Any) -> list[list[dict[str, Any]]] | None:
    """The confusion matrix's cells, each shaded by its share of its row (of the test images of
    that true class); None unless it is ten rows of ten counts. A result.json may have been edited
    by hand, so nothing else reaches the table."""
    if not (isinstance(counts, list) and len(counts) == 10 and all(
            isinstance(row, list) and len(row) == 10 and all(
                isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in row) for row in counts)):
        return None
    rows = []
    for true_class, row in enumerate(counts):
        total = sum(row) or 1
        cells = []
        for predicted, count in enumerate(row):
            # a square root, so that mistakes of a few percent still show against the diagonal
            lightness = round(97 - 60 * math.sqrt(count / total))
            cells.append({"count": count, "lightness": lightness, "dark": lightness < 60,
                          "hit": predicted == true_class})
        rows.append(cells)
    return rows


def _execution_notes(result: GradeResult, failed_cells: list[CellRun]) -> list[Note]:
    notes: list[Note] = []
    status = result.execution_status
    if status in EXECUTION_NOTES:
        if EXECUTION_NOTES[status]:
            notes.append(Note("bad", EXECUTION_NOTES[status]))  # type: ignore[arg-type]
    elif status:
        notes.append(Note("warn", f"The notebook's run ended with status “{status}”."))
    if any(c.status == "timeout" for c in result.cells) and status != "timeout":
        notes.append(Note("bad", "A cell ran past the time limit and was stopped."))
    if any(c.status == "kernel-died" for c in result.cells) and status != "kernel-died":
        notes.append(Note("bad", "The kernel died while a cell was running."))
    errors = [c for c in failed_cells if c.status == "error"]
    if errors:
        cells = ", ".join(str(c.number) for c in errors)
        notes.append(Note("bad", f"{len(errors)} cell{'s' if len(errors) != 1 else ''} raised an "
                                 f"error (cell{'s' if len(errors) != 1 else ''} {cells}); the "
                                 "traceback is below."))
    if result.output_truncated:
        notes.append(Note("warn", "Some of your notebook's output was too long and was cut in "
                                  "what the grader kept."))
    if result.network_blocked:
        notes.append(Note("warn", "The grader runs without network access: "
                                  f"{', '.join(result.network_blocked)} tried to download something "
                                  "or install a package, which was blocked. The lab's data is "
                                  "already provided offline, and every package it needs is "
                                  "installed; remove pip installs and downloads that need the "
                                  "internet."))
    if result.integrity:
        notes.append(Note("bad", "Flagged for your instructor to review: the grader had to undo changes "
                                 "your notebook made to its own kernel before checking it ("
                                 + "; ".join(result.integrity) + "). Only what your code computes "
                                 "counts; remove hooks, patches and threads that outlive their cell."))
    not_run = sum(1 for c in result.cells if c.status == "not-run")
    if not_run:
        notes.append(Note("warn", f"{not_run} cell{'s' if not_run != 1 else ''} did not run "
                                  "because of an earlier problem."))
    if status == "completed" and not failed_cells and not notes:
        notes.append(Note("good", "Every cell of your notebook ran without an error."))
    return notes


def _hidden_summary(hidden: list[ScoredCheck]) -> dict[str, Any] | None:
    if not hidden:
        return None
    points = sum(c.points for c in hidden)
    max_points = sum(c.max_points for c in hidden)
    passed = sum(1 for c in hidden if c.status == "passed")
    n = len(hidden)
    return {
        "count": n,
        "label": f"{n} hidden check{'s' if n != 1 else ''}",
        "points": points,
        "max_points": max_points,
        "passed": passed,
        "not_passed": n - passed,
        "all_passed": passed == n,
    }


def student(result: GradeResult) -> str | None:
    """The student as the LMS named them: "name (LMS id)", or the name alone; None when unknown."""
    if result.student_name is None:
        return None
    return f"{result.student_name} ({result.student_id})" if result.student_id else result.student_name


def report_context(result: GradeResult) -> dict[str, Any]:
    """Everything the report template shows, computed here so the template stays plain."""
    visible = [c for c in result.checks if c.visibility != "hidden"]
    hidden = [c for c in result.checks if c.visibility == "hidden"]
    failed_cells = [c for c in result.cells if c.status in FAILED_CELL_STATUSES]
    hidden_summary = _hidden_summary(hidden)
    visible_all_passed = bool(visible) and all(c.status == "passed" for c in visible)
    hidden_all_passed = hidden_summary is None or hidden_summary["all_passed"]
    everything_passed = (result.status == "graded" and bool(result.checks)
                         and visible_all_passed and hidden_all_passed)
    visible_points = sum(c.points for c in visible)
    visible_max = sum(c.max_points for c in visible)
    overridden = {o.check: o for o in result.overrides}
    return {
        "r": result,
        "student": student(result),
        # The instructor's overrides: the grader's verdict and points stay shown beside them.
        "overridden": overridden,
        "hidden_overrides": [overridden[c.name] for c in hidden if c.name in overridden],
        "total_override": overridden.get(TOTAL),
        "automatic_score": fmt_points(result.automatic_score),
        "graded": result.status == "graded",
        "score": fmt_points(result.score),
        "max_score": fmt_points(result.max_score),
        "percent": fmt_percent(result.score, result.max_score),
        "visible": visible,
        "visible_points": visible_points,
        "visible_max": visible_max,
        "visible_passed": sum(1 for c in visible if c.status == "passed"),
        "hidden": hidden_summary,
        # The case a student must not misread: everything they can see is green, yet points were
        # lost in checks they cannot see.
        "hidden_gap": visible_all_passed and not hidden_all_passed,
        "everything_passed": everything_passed,
        "failed_cells": failed_cells,
        "notes": _execution_notes(result, failed_cells) if result.status == "graded" else [],
        "sample_profile": _is_sample(result.data_profile),
        "figures": _figures(result.figures or {}, result.confusion_matrix),
        "csp": _csp(None),
    }


def render_report(result: GradeResult) -> str:
    """The student's feedback page for one submission, as one self-contained HTML string."""
    env = environment()
    return env.get_template(REPORT_TEMPLATE).render(**report_context(result))


def write_report(result: GradeResult, path: str | Path) -> Path:
    """Render the report and write it atomically (a temporary file, then ``os.replace``)."""
    path = Path(path)
    atomic.write(path, render_report(result))
    return path


# --------------------------------------------------------------------------------------------
# the class summary

def _histogram(percents: list[float], bins: int = 10) -> list[dict[str, Any]]:
    counts = [0] * bins
    for p in percents:
        i = min(bins - 1, max(0, int(p // (100 / bins))))
        counts[i] += 1
    top = max(counts) if counts else 0
    out = []
    width = 100 / bins
    for i, n in enumerate(counts):
        lo, hi = round(i * width), round((i + 1) * width)
        out.append({
            "label": f"{lo}–{hi}%" if i == bins - 1 else f"{lo}–<{hi}%",
            "short": f"{lo}",
            "count": n,
            "height": round(100 * n / top) if top else 0,
        })
    return out


def _check_stats(graded: list[GradeResult]) -> list[dict[str, Any]]:
    by_name: dict[str, list[ScoredCheck]] = {}
    for r in graded:
        for c in r.checks:
            by_name.setdefault(c.name, []).append(c)
    out = []
    for name, checks in by_name.items():
        n = len(checks)
        passed = sum(1 for c in checks if c.status == "passed")
        partial = sum(1 for c in checks if c.status == "partial")
        out.append({
            "name": name,
            "title": checks[0].title,
            "visibility": checks[0].visibility,
            "max_points": checks[0].max_points,
            "n": n,
            "passed": passed,
            "partial": partial,
            "failed": n - passed - partial,
            "pass_rate": round(100 * passed / n) if n else 0,
            "mean_points": sum(c.points for c in checks) / n if n else 0.0,
        })
    return out


def _percent(r: GradeResult) -> float | None:
    if r.status != "graded" or not r.max_score:
        return None
    return 100 * r.score / r.max_score


def summary_context(results: Iterable[GradeResult],
                    report_links: Mapping[str, str]) -> dict[str, Any]:
    results = list(results)
    graded = [r for r in results if r.status == "graded"]
    errored = [r for r in results if r.status != "graded"]
    percents = [p for p in (_percent(r) for r in graded) if p is not None]
    scores = [r.score for r in graded]
    rows = []
    for r in results:
        pct = _percent(r)
        rows.append({
            "r": r,
            "student": student(r),
            "link": report_links.get(r.submission_id),
            "percent": pct,
            "percent_text": f"{pct:.0f}%" if pct is not None else "–",
            "passed": sum(1 for c in r.checks if c.status == "passed"),
            "n_checks": len(r.checks),
            "failed_cells": sum(1 for c in r.cells if c.status in FAILED_CELL_STATUSES),
        })
    script, script_hash = _sort_script(environment())
    max_scores = sorted({fmt_points(r.max_score) for r in graded})
    return {
        "n": len(results),
        "n_graded": len(graded),
        "n_errored": len(errored),
        "mean": statistics.fmean(scores) if scores else None,
        "median": statistics.median(scores) if scores else None,
        "max_scores": max_scores,
        "histogram": _histogram(percents),
        "checks": _check_stats(graded),
        "errored": [{"r": r, "link": report_links.get(r.submission_id)} for r in errored],
        "rows": rows,
        "profiles": sorted({str(r.data_profile) for r in graded if r.data_profile}),
        "sample_profile": any(_is_sample(r.data_profile) for r in graded),
        "spec_versions": sorted({str(r.spec_version) for r in graded if r.spec_version}),
        "isolations": sorted({str(r.isolation) for r in graded if r.isolation}),
        "sort_script": script,
        "csp": _csp(script_hash),
    }


def render_summary(results: list[GradeResult], report_links: dict[str, str]) -> str:
    """The class summary: score distribution, each check's pass rate, errors, a sortable table.

    ``report_links`` maps a submission id to its report, relative to where the summary is written.
    """
    env = environment()
    return env.get_template(SUMMARY_TEMPLATE).render(**summary_context(results, report_links))


def write_summary(results: list[GradeResult], report_links: dict[str, str],
                  path: str | Path) -> Path:
    path = Path(path)
    atomic.write(path, render_summary(results, report_links))
    return path
