"""The reports as a browser shows them: headless Debian Chromium driven by Playwright, from file://.

Needs the ``playwright`` Python package (the project's test extra) and Debian's ``chromium``; it
never downloads a browser (``playwright install`` is not used). Screenshots go to ``artifacts/``.
"""
from __future__ import annotations

from pathlib import Path

import pytest

import factories as f
from grader.report import write_report, write_summary

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
PHONE = {"width": 375, "height": 740}
DESKTOP = {"width": 1200, "height": 900}


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the browser tests need the 'playwright' Python package: install the test "
                    "extra (.venv/bin/pip install -e '.[test]'); the browser itself is Debian's "
                    "chromium, never 'playwright install'", pytrace=False)
    executable = CHROMIUM
    if not Path(executable).exists():
        pytest.fail(f"the browser tests need Debian's chromium at {CHROMIUM} "
                    "(apt-get install chromium)", pytrace=False)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """A run's output as the batch writes it: a report per submission and the class summary."""
    root = tmp_path_factory.mktemp("site")
    results = f.cohort()
    links = {}
    for r in results:
        write_report(r, root / r.submission_id / "report.html")
        links[r.submission_id] = f"{r.submission_id}/report.html"
    write_summary(results, links, root / "summary.html")
    ARTIFACTS.mkdir(exist_ok=True)
    return root


class Watched:
    """A page whose console errors, page errors and requests are recorded."""

    def __init__(self, browser, viewport):
        self.context = browser.new_context(viewport=viewport, java_script_enabled=True)
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("request", lambda r: self.requests.append(r.url))

    def open(self, path: Path):
        self.page.goto(path.as_uri(), wait_until="load")
        return self.page

    def assert_clean(self):
        assert self.errors == [], self.errors
        off_site = [u for u in self.requests if not u.startswith(("file:", "data:"))]
        assert off_site == [], off_site

    def close(self):
        self.context.close()


@pytest.fixture()
def watched(browser):
    pages: list[Watched] = []

    def make(viewport=DESKTOP) -> Watched:
        pages.append(Watched(browser, viewport))
        return pages[-1]

    yield make
    for w in pages:
        w.close()


def images_loaded(page) -> list[dict]:
    return page.eval_on_selector_all(
        "img", "els => els.map(e => ({alt: e.alt, w: e.naturalWidth, complete: e.complete}))")


def horizontal_overflow(page) -> int:
    return page.evaluate("() => document.documentElement.scrollWidth - window.innerWidth")


def test_report_shows_score_messages_and_figures(site, watched):
    w = watched()
    page = w.open(site / "bob" / "report.html")
    score = page.locator("#score")
    assert score.is_visible()
    assert " ".join(score.inner_text().split()).startswith("9 / 15 points")
    # the score is at the top: above the fold on a desktop screen
    assert score.bounding_box()["y"] < 300
    failed = page.locator('li.check.failed[data-check="train_epoch"]')
    assert failed.is_visible()
    assert "return a fraction between 0 and 1, not a percentage" in failed.inner_text()
    assert page.locator("#cell-13 pre.traceback").is_visible()
    assert "mat1 and mat2 shapes cannot be multiplied" in page.locator("#cell-13").inner_text()
    imgs = images_loaded(page)
    assert len(imgs) == 3
    assert all(i["complete"] and i["w"] > 0 and i["alt"] for i in imgs), imgs
    confusion = page.locator("#figure-confusion table")
    assert confusion.is_visible()
    # the diagonal's dark cells carry white text: drawn with its colours, not the page's defaults
    hit = confusion.locator("td.hit").first
    assert hit.evaluate("e => getComputedStyle(e).color") == "rgb(255, 255, 255)"
    assert hit.evaluate("e => getComputedStyle(e).backgroundColor") != "rgba(0, 0, 0, 0)"
    page.screenshot(path=str(ARTIFACTS / "report-desktop.png"), full_page=True)
    w.assert_clean()


def test_report_fits_a_phone(site, watched):
    for sid in ("bob", "carol", "dave", "hidden_gap"):
        w = watched(PHONE)
        page = w.open(site / sid / "report.html")
        assert horizontal_overflow(page) <= 0, sid
        assert page.locator("#score").is_visible()
        for i in images_loaded(page):
            assert i["w"] > 0
        # images scale down to the screen
        widths = page.eval_on_selector_all("img", "els => els.map(e => e.getBoundingClientRect().width)")
        assert all(wd <= PHONE["width"] for wd in widths)
        page.screenshot(path=str(ARTIFACTS / f"report-phone-{sid}.png"), full_page=True)
        w.assert_clean()


def test_hidden_gap_note_is_visible(site, watched):
    w = watched(PHONE)
    page = w.open(site / "hidden_gap" / "report.html")
    note = page.locator("#hidden-gap")
    assert note.is_visible()
    assert "All visible checks pass, but not all hidden checks do." in note.inner_text()
    assert "2 hidden checks: 3/5 points" in page.locator("#hidden-checks").inner_text()
    w.assert_clean()


def test_hostile_report_runs_no_script(tmp_path, watched):
    path = write_report(f.hostile(), tmp_path / "report.html")
    w = watched()
    dialogs: list[str] = []
    page = w.page
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    w.open(path)
    page.wait_for_timeout(200)
    assert dialogs == []
    assert page.evaluate("() => document.scripts.length") == 0
    assert '<script>alert("xss")</script>' in page.locator("li.check.failed").first.inner_text()
    w.assert_clean()


def ids_in_table(page) -> list[str]:
    return page.eval_on_selector_all(
        "#submissions tbody tr", "rows => rows.map(r => r.dataset.submission)")


def scores_in_table(page) -> list[float | None]:
    return page.eval_on_selector_all(
        "#submissions tbody tr",
        "rows => rows.map(r => { const v = r.cells[2].dataset.sort; return v === '' ? null : parseFloat(v); })")


def test_summary_sorts_links_and_fits_a_phone(site, watched):
    w = watched(PHONE)
    page = w.open(site / "summary.html")
    assert horizontal_overflow(page) <= 0
    assert page.locator("#histogram").is_visible()
    page.screenshot(path=str(ARTIFACTS / "summary-phone.png"), full_page=True)

    original = ids_in_table(page)
    header = page.locator("#submissions thead th", has_text="Score")
    header.locator("button").click()
    assert header.get_attribute("aria-sort") == "ascending"
    scores = scores_in_table(page)
    graded = [s for s in scores if s is not None]
    assert graded == sorted(graded)
    assert scores[0] is None  # the ungraded submission sorts below every score
    header.locator("button").click()
    assert header.get_attribute("aria-sort") == "descending"
    scores = scores_in_table(page)
    assert [s for s in scores if s is not None] == sorted(graded, reverse=True)
    assert scores[-1] is None
    assert sorted(ids_in_table(page)) == sorted(original)  # same rows, reordered

    name = page.locator("#submissions thead th", has_text="Submission")
    name.locator("button").click()
    assert ids_in_table(page) == sorted(original, key=str.lower)
    assert header.get_attribute("aria-sort") is None

    # each row links to its report, relatively, and the report opens
    page.locator('#submissions a', has_text="bob").click()
    page.wait_for_load_state("load")
    assert page.url == (site / "bob" / "report.html").as_uri()
    assert "9 / 15" in page.locator("#score").inner_text()
    w.assert_clean()

    w2 = watched()
    desktop = w2.open(site / "summary.html")
    desktop.screenshot(path=str(ARTIFACTS / "summary-desktop.png"), full_page=True)
    w2.assert_clean()
