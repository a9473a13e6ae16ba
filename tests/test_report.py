"""The HTML report and class summary: what a student and a teacher are shown, and what they are not."""
from __future__ import annotations

import base64
import hashlib
import re
from html.parser import HTMLParser
from pathlib import Path

import lxml.html
import pytest

import factories as f
from grader import report
from grader.report import render_report, render_summary, write_report, write_summary

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def parse(html: str):
    return lxml.html.document_fromstring(html)


_COMPOUND = re.compile(r'^(?P<tag>[\w-]+|\*)?(?P<rest>.*)$')
_SIMPLE = re.compile(r'#(?P<id>[\w-]+)|\.(?P<cls>[\w-]+)|\[(?P<attr>[\w-]+)="(?P<val>[^"]*)"\]')


def css(el, selector: str) -> list:
    """Elements under ``el`` matching a simple CSS selector (tag, #id, .class, [a="v"], descendant),
    as XPath: lxml's own cssselect needs a package the test extra does not install."""
    steps = []
    for compound in selector.split():
        m = _COMPOUND.match(compound)
        preds = []
        for s in _SIMPLE.finditer(m["rest"]):
            if s["id"]:
                preds.append(f'@id="{s["id"]}"')
            elif s["cls"]:
                preds.append(f'contains(concat(" ", normalize-space(@class), " "), " {s["cls"]} ")')
            else:
                preds.append(f'@{s["attr"]}="{s["val"]}"')
        steps.append((m["tag"] or "*") + "".join(f"[{p}]" for p in preds))
    return el.xpath(".//" + "//".join(steps))


def text_of(html: str) -> str:
    return " ".join(parse(html).text_content().split())


class TagCollector(HTMLParser):
    """Every start tag and its attributes, as a tokenizing HTML parser (like a browser's) sees them."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.script_text: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"

    def handle_startendtag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script = False

    def handle_data(self, data):
        if self._in_script:
            self.script_text.append(data)


def collect(html: str) -> TagCollector:
    c = TagCollector()
    c.feed(html)
    c.close()
    return c


# --------------------------------------------------------------------------------------------
# the student's report

def test_score_and_maximum_come_first():
    html = render_report(f.with_failed_cell())
    doc = parse(html)
    score = doc.get_element_by_id("score")
    assert " ".join(score.text_content().split()).startswith("9 / 15 points (60%)")
    # the score precedes every check and every section heading
    body_text = text_of(html)
    assert body_text.index("9 / 15") < body_text.index("Checks")


def test_each_visible_check_with_points_status_message_and_warnings():
    result = f.with_failed_cell()
    doc = parse(render_report(result))
    items = {li.get("data-check"): li for li in css(doc, "li.check")}
    visible = [c for c in result.checks if c.visibility == "visible"]
    assert list(items) == [c.name for c in visible]
    for c in visible:
        li = items[c.name]
        text = " ".join(li.text_content().split())
        assert c.title in text
        assert " ".join(c.message.split()) in text
        assert f"{report.fmt_points(c.points)}/{report.fmt_points(c.max_points)}" in text
        assert c.status in li.get("class")
        assert c.status in css(li, ".badge")[0].text_content()
    assert "print once per epoch instead" in css(items["train_epoch"], ".warnings")[0].text_content()
    assert "return a fraction between 0 and 1" in items["train_epoch"].text_content()
    assert "partial" in items["saved_model_accuracy"].get("class")
    assert "1/2" in items["saved_model_accuracy"].text_content()


def test_hidden_checks_are_counted_never_described():
    result = f.hidden_gap()
    html = render_report(result)
    text = text_of(html)
    assert "2 hidden checks: 3/5 points" in text
    assert "(1 passed, 1 not passed)" in text
    for c in result.checks:
        if c.visibility == "hidden":
            assert c.name not in html
            assert c.title not in html
            assert c.message not in html
    assert "HIDDEN" not in html  # the factories mark every hidden message with it
    assert "seed" not in html and "reference code" not in html


def test_visible_all_pass_but_hidden_do_not_is_said_explicitly():
    html = render_report(f.hidden_gap())
    doc = parse(html)
    note = " ".join(doc.get_element_by_id("hidden-gap").text_content().split())
    assert note.startswith("All visible checks pass, but not all hidden checks do.")
    assert "1 of 2 hidden checks did not pass" in note
    assert "2 points were lost" in note
    text = text_of(html).lower()
    assert "every check passed" not in text
    assert not re.search(r"all (tests|checks) (passed|pass\b)(?!, but)", text)


def test_everything_passed_only_when_hidden_checks_pass_too():
    html = render_report(f.perfect())
    assert "Every check passed, the hidden ones included." in text_of(html)
    assert "hidden-gap" not in html
    assert "2 hidden checks: 5/5 points" in text_of(html)


def test_failed_cell_traceback_in_pre():
    doc = parse(render_report(f.with_failed_cell()))
    cell = doc.get_element_by_id("cell-13")
    tb = css(cell, "pre.traceback")[0].text_content()
    assert tb == f.TRACEBACK  # verbatim, whitespace kept
    assert "RuntimeError: mat1 and mat2 shapes cannot be multiplied" in cell.text_content()
    assert "net = Net()" in css(cell, "pre.source")[0].text_content()
    assert "2 cells did not run because of an earlier problem." in text_of(
        render_report(f.with_failed_cell()))
    # cells that ran fine are not listed
    assert not css(doc, "#cell-0")


def test_figures_are_embedded_pngs_with_alt_text():
    doc = parse(render_report(f.perfect()))
    assert [el.get("id") for el in css(doc, "figure")] == [
        "figure-learning_curves", "figure-weights", "figure-confusion", "figure-misclassified"]
    imgs = css(doc, "img")
    assert [img.getparent().get("id") for img in imgs] == [
        "figure-learning_curves", "figure-weights", "figure-misclassified"]
    for img in imgs:
        src = img.get("src")
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG_MAGIC)
        assert len(img.get("alt")) > 20


def test_the_confusion_matrix_is_a_table_of_the_counts():
    result = f.perfect()
    doc = parse(render_report(result))
    table = css(doc, "#figure-confusion table")[0]
    assert [th.text_content() for th in css(table, "thead th")][1:] == [str(c) for c in range(10)]
    rows = css(table, "tbody tr")
    assert [row.find("th").text_content() for row in rows] == [str(c) for c in range(10)]
    assert [[int(td.text_content()) for td in css(row, "td")] for row in rows] == result.confusion_matrix
    # the diagonal (right answers) stands out, and a cell's shade follows its share of its row
    assert [[td.get("class") for td in css(row, "td")].index("num hit dark") for row in rows] == list(range(10))
    assert css(rows[0], "td")[1].get("class") == "num"
    assert "the darker a cell" in css(doc, "#figure-confusion figcaption")[0].text_content()


@pytest.mark.parametrize("counts", [None, [[1] * 10] * 9, [[1] * 9] * 10, [[1.5] * 10] * 10,
                                    [[True] * 10] * 10, [[-1] * 10] * 10, [["9"] * 10] * 10, "10x10"])
def test_a_confusion_matrix_that_is_not_ten_rows_of_ten_counts_is_left_out(counts):
    doc = parse(render_report(f.graded(confusion_matrix=counts)))
    assert not css(doc, "#figure-confusion")
    assert css(doc, "#figure-weights img")


def test_an_empty_row_of_the_confusion_matrix_is_shown_unshaded():
    counts = f.confusion()
    counts[3] = [0] * 10
    doc = parse(render_report(f.graded(confusion_matrix=counts)))
    row = css(doc, "#figure-confusion tbody tr")[3]
    assert [td.text_content() for td in css(row, "td")] == ["0"] * 10
    assert {td.get("style") for td in css(row, "td")} == {"background: hsl(212 70% 97%)"}


def test_execution_problems_isolation_profile_and_spec_are_reported():
    html = render_report(f.timed_out())
    text = text_of(html)
    assert "stopped because a cell ran past the time limit" in text
    assert "output was too long and was cut" in text
    assert "cell 2 tried to download something or install a package, which was blocked" in text
    assert "5 cells did not run" in text
    doc = parse(html)
    assert "mnist-sample" in doc.get_element_by_id("sample-profile").text_content()
    assert "small sample of MNIST" in doc.get_element_by_id("sample-profile").text_content()
    facts = {dt.text_content(): dt.getnext().text_content() for dt in css(doc, "dl.facts dt")}
    assert facts["Isolation"] == "subprocess (weaker: no namespaces)"
    assert facts["Data profile"] == "mnist-sample (sample data)"
    assert facts["Fast data path"] == "no"
    assert facts["Output truncated"] == "yes"
    assert facts["Network blocked"] == "cell 2"
    assert facts["Spec version"] == "2025.1"
    assert "timed out" in doc.get_element_by_id("cell-9").text_content()


def test_kernel_death_and_clean_run_notes():
    died = f.graded("erin", execution_status="kernel-died")
    assert "The Python kernel died" in text_of(render_report(died))
    clean = text_of(render_report(f.perfect()))
    assert "Every cell of your notebook ran without an error." in clean
    facts = css(parse(render_report(f.perfect())), "dl.facts")[0].text_content()
    assert "bubblewrap" in facts and "Fast data pathyes" in facts
    assert "sample-profile" not in render_report(f.perfect())


def test_error_result_renders_its_reason():
    result = f.error()
    html = render_report(result)
    doc = parse(html)
    reason = doc.get_element_by_id("error-reason").text_content()
    assert "Not graded." in reason
    assert result.reason in reason
    assert "0 / 15" in " ".join(doc.get_element_by_id("score").text_content().split())
    assert not css(doc, "li.check") and not css(doc, "img")
    assert "Every check passed" not in html


def test_report_is_self_contained_and_phone_friendly():
    html = render_report(f.with_failed_cell())
    doc = parse(html)
    assert css(doc, 'meta[name="viewport"]')[0].get("content") == (
        "width=device-width, initial-scale=1")
    assert not re.search(r"https?://", html), "a report must not point at the network"
    assert not css(doc, "script") and not css(doc, 'link[rel="stylesheet"]')
    for el in doc.iter():
        for attr in ("src", "href"):
            value = el.get(attr)
            if value is not None:
                assert value.startswith("data:"), (el.tag, attr, value[:40])
    style = css(doc, "style")[0].text_content()
    assert "max-width: 100%" in style and "overflow-x: auto" in style
    csp = css(doc, 'meta[http-equiv="Content-Security-Policy"]')[0].get("content")
    assert "script-src 'none'" in csp and "default-src 'none'" in csp


# --------------------------------------------------------------------------------------------
# hostile text: everything a student controls must stay text

def assert_inert(html: str, allowed_script: str | None = None) -> TagCollector:
    tags = collect(html)
    scripts = [a for t, a in tags.tags if t == "script"]
    if allowed_script is None:
        assert scripts == []
    else:
        assert len(scripts) == 1 and scripts[0] == {}
        assert "".join(tags.script_text) == allowed_script
    for tag, attrs in tags.tags:
        assert not [a for a in attrs if a.lower().startswith("on")], (tag, attrs)
        assert tag not in ("iframe", "object", "embed", "base", "form")
        if tag == "img":
            assert attrs["src"].startswith("data:image/png;base64,")
            assert re.fullmatch(r"data:image/png;base64,[A-Za-z0-9+/]+={0,2}", attrs["src"])
        if tag == "a":
            assert not attrs.get("href", "").lower().startswith("javascript:")
    # lxml (libxml2) must agree: no script element, no on* attribute
    doc = parse(html)
    assert len(doc.xpath("//script")) == (0 if allowed_script is None else 1)
    assert not doc.xpath("//@*[starts-with(translate(name(), 'ON', 'on'), 'on')]")
    return tags


def test_hostile_notebook_text_is_escaped_in_the_report():
    result = f.hostile()
    html = render_report(result)
    assert_inert(html)
    text = parse(html).text_content()
    # shown to the student as the literal text their notebook produced
    assert 'Your function printed <script>alert("xss")</script><img src=x onerror="alert(1)">' in text
    assert "</pre><script>alert(3)</script>" in text
    assert 'submissions/"><script>alert(4)</script>/lab.ipynb' in text
    assert "<img src=x onerror=alert(5)>" in text
    # the figures that were not base64 and the confusion matrix that was not counts were dropped,
    # the good figure kept
    ids = [el.get("id") for el in css(parse(html), "figure")]
    assert ids == ["figure-learning_curves"]


def test_hostile_text_is_escaped_in_the_summary():
    evil = f.hostile('x"><img src=y onerror=alert(9)>')
    results = [evil, f.perfect(), f.error("e", reason=f.XSS)]
    links = {evil.submission_id: "javascript:alert(1)", "perfect": "perfect/report.html",
             "e": 'e/"><script>alert(2)</script>.html'}
    html = render_summary(results, links)
    script, _ = report._sort_script(report.environment())
    assert_inert(html, allowed_script=str(script))
    doc = parse(html)
    hrefs = [a.get("href") for a in css(doc, "a")]
    assert "./javascript%3Aalert%281%29" in hrefs
    assert all(":" not in h.split("/")[0] for h in hrefs)
    assert f.XSS in doc.text_content()


def test_csp_hash_allows_exactly_our_sorting_script():
    html = render_summary(f.cohort(), {})
    tags = collect(html)
    script = "".join(tags.script_text)
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    csp = css(parse(html), 'meta[http-equiv="Content-Security-Policy"]')[0].get("content")
    assert f"script-src 'sha256-{digest}'" in csp
    assert "unsafe-inline" not in csp.split("script-src")[1].split(";")[0]


# --------------------------------------------------------------------------------------------
# the class summary

def cohort_links(results):
    return {r.submission_id: f"{r.submission_id}/report.html" for r in results}


def test_summary_distribution_pass_rates_errors_and_table():
    results = f.cohort()
    html = render_summary(results, cohort_links(results))
    doc = parse(html)
    graded = [r for r in results if r.status == "graded"]
    assert doc.get_element_by_id("n-submissions").text_content() == str(len(results))
    assert doc.get_element_by_id("n-errored").text_content() == "1"

    bars = css(doc, "#histogram .col")
    assert len(bars) == 10
    counts = [int(css(c, ".count")[0].text_content()) if css(c, ".count") else 0
              for c in bars]
    expected = [0] * 10
    for r in graded:
        expected[min(9, int(100 * r.score / r.max_score // 10))] += 1
    assert counts == expected and sum(counts) == len(graded)

    rows = {tr.get("data-check"): tr for tr in css(doc, "#check-table tbody tr")}
    assert list(rows) == f.RUBRIC_CHECK_NAMES  # teachers see hidden checks' names
    dataset = [next(c for c in r.checks if c.name == "dataset_facts") for r in graded]
    passed = sum(c.status == "passed" for c in dataset)
    assert f"{round(100 * passed / len(dataset))}%" in rows["dataset_facts"].text_content()
    assert "hidden" in rows["hidden_train_other_data"].text_content()

    errored = doc.get_element_by_id("errored").text_content()
    assert "dave" in errored and "Notebook JSON is invalid" in errored

    table = doc.get_element_by_id("submissions")
    body_rows = css(table, "tbody tr")
    assert [tr.get("data-submission") for tr in body_rows] == [r.submission_id for r in results]
    links = [css(tr, "a")[0].get("href") for tr in body_rows]
    assert links == [f"{r.submission_id}/report.html" for r in results]
    assert all(css(th, "button") for th in css(table, "thead th"))
    bob = next(tr for tr in body_rows if tr.get("data-submission") == "bob")
    assert css(bob, "td")[2].get("data-sort") == "9.0"
    assert css(bob, "td")[5].text_content() == "1"  # one failed cell
    assert "mnist-sample" in doc.get_element_by_id("sample-profile").text_content()


def test_summary_of_nothing_graded():
    html = render_summary([f.error("a"), f.error("b")], {})
    doc = parse(html)
    assert doc.get_element_by_id("n-errored").text_content() == "2"
    assert "No graded submissions." in doc.text_content()


# --------------------------------------------------------------------------------------------
# writing

def test_write_report_and_summary_are_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    out = tmp_path / "out" / "bob" / "report.html"
    write_report(f.with_failed_cell(), out)
    first = out.read_text(encoding="utf-8")
    assert first == render_report(f.with_failed_cell())
    summary = write_summary(f.cohort(), {}, tmp_path / "out" / "summary.html")
    assert summary.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")

    def broken(*_args, **_kwargs):
        raise RuntimeError("disk full")

    # a failure while writing leaves the old file whole and no temporary file behind
    monkeypatch.setattr("grader.export.os.fsync", broken)
    with pytest.raises(RuntimeError):
        write_report(f.perfect(), out)
    assert out.read_text(encoding="utf-8") == first
    assert sorted(p.name for p in out.parent.iterdir()) == ["report.html"]


# --------------------------------------------------------------------------------------------
# the figures themselves

def png_size(b64: str) -> tuple[int, int]:
    data = base64.b64decode(b64)
    assert data.startswith(PNG_MAGIC)
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_figures_are_small_pngs():
    for key, b64 in f.real_figures().items():
        w, h = png_size(b64)
        assert 100 < w <= 900 and 100 < h <= 700, (key, w, h)
        assert len(b64) < 120_000, key


def test_figures_take_untrusted_numbers_and_reject_wrong_shapes():
    import numpy as np

    from grader import figures

    weird = {"train_acc": [0.1, float("nan"), float("inf"), "x", None, 0.5],
             "$\\frac{1}{0}$ loss": list(range(10_000))}
    png_size(figures.learning_curves(weird, f.REFERENCE_HISTORY))
    png_size(figures.learning_curves(None, f.REFERENCE_HISTORY))
    png_size(figures.misclassified(np.zeros((2, 1, 28, 28)), ["$a$", 3], [1, "\\b"]))
    png_size(figures.misclassified(np.zeros((0, 784)), [], []))
    with pytest.raises(ValueError):
        figures.weight_images(np.zeros((784, 10)), [str(d) for d in range(10)])
    png_size(figures.weight_images(np.zeros((8, 784)), [f"unit {u}" for u in range(1, 9)]))  # 8 hidden units
    with pytest.raises(ValueError):
        figures.misclassified(np.zeros((2, 784)), [1], [2, 3])


def test_a_flagged_submission_says_so_in_its_report_and_the_summary():
    import dataclasses

    finding = "builtins.len replaced"
    flagged = dataclasses.replace(f.graded("mallory"), integrity=(finding,))
    assert "Flagged for your instructor to review" in text_of(render_report(flagged))
    assert finding in render_report(flagged)
    assert "Flagged" not in text_of(render_report(f.graded("alice")))
    summary = render_summary([flagged, f.graded("alice")], {"mallory": "mallory/report.html",
                                                            "alice": "alice/report.html"})
    assert len(css(parse(summary), "span.flagged")) == 1 and finding in summary
