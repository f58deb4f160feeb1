"""report.html: the same tables and plots as report.md in one self-contained page, opened in a real
browser (headless Chromium through selenium and Debian's chromedriver): every image loads, the
console stays clean, and the random-weights banner is there."""

import os
import re
import shutil
from pathlib import Path

import pytest

from raml.evaluate.report import write_report
from raml.evaluate.report_html import report_html
from raml.evaluate.run import evaluate_checkpoints
from raml.train.config import make_config
from raml.train.fit import fit, write_run

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
QUICK = dict(epochs=3, lr=3e-3, hidden_dim=32, attn_dim=8, feature_dim=16, pixel_hidden_dim=32)


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory, mvtec_token_cache):
    """A report of two seeds trained on the synthetic MVTec tree's cache (patch tokens and masks: a
    pixel head, anomaly maps, and the images on disk for the overlay grid)."""
    from raml.cache import read_cache

    table = read_cache(mvtec_token_cache)
    runs = tmp_path_factory.mktemp("runs")
    for seed in (0, 1):
        write_run(runs / f"full-seed{seed}", fit(table, make_config("adaptive", seed=seed, **QUICK)))
    results, _ = evaluate_checkpoints([runs], mvtec_token_cache, runs / "results", n_resamples=20, log=lambda *_: None)
    out = tmp_path_factory.mktemp("report")
    write_report([results], out)
    return out


def test_the_page_has_the_markdowns_tables_and_every_plot_embedded(report_dir):
    markdown, page = (report_dir / "report.md").read_text(), (report_dir / "report.html").read_text()
    plots = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert {Path(name).stem.rsplit("_", 1)[-1] for name in plots} == {"auroc", "roc", "histograms", "maps"}
    assert page.count('src="data:image/png;base64,') == len(plots)
    tables = sum(1 for line in markdown.splitlines() if line.startswith("|---"))
    assert page.count('<table class="sortable">') == tables
    assert re.findall(r"https?://", page) == []  # nothing to fetch
    assert 'id="random-weights-banner"' in page and "NOT MEANINGFUL" in page


def test_markdown_subset_is_escaped_and_rendered():
    page = report_html(
        "# T <x>\n\n> **careful** `a&b`\n\n| k | v |\n|---|---|\n| b | 2 |\n| a | 10 |\n| **mean** | 6 |\n\n- one\n",
        Path("."),
        banner_text="careful",
    )
    assert "<title>T &lt;x&gt;</title>" in page
    assert '<blockquote class="banner" id="random-weights-banner" role="alert"><strong>careful</strong> ' in page
    assert "<code>a&amp;b</code>" in page and "<ul><li>one</li></ul>" in page
    assert "<tbody><tr><td>b</td><td>2</td></tr><tr><td>a</td><td>10</td></tr></tbody>" in page
    assert "<tfoot><tr><td><strong>mean</strong></td><td>6</td></tr></tfoot>" in page


def _browser():
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip(f"needs {CHROMIUM} and {CHROMEDRIVER} (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install selenium)")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,1000",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # the system's chromedriver, named: selenium would otherwise try to download one
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=str(CHROMEDRIVER)))


@pytest.mark.browser
def test_in_a_browser_every_image_loads_without_console_errors_and_the_banner_shows(report_dir, tmp_path):
    browser = _browser()
    try:
        browser.get((report_dir / "report.html").resolve().as_uri())
        images = browser.execute_script(
            "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth]);"
        )
        assert len(images) == 4 and all(complete and width > 0 for _, complete, width in images), images
        banner = browser.find_element("id", "random-weights-banner")
        assert banner.is_displayed() and "NOT MEANINGFUL" in banner.text
        # a click on a header sorts the table's body by that column (the mean row stays in the footer)
        first = browser.find_element("css selector", "table.sortable")
        header = first.find_elements("css selector", "th")[0]
        header.click()
        column = [row.text.split(" ")[0] for row in first.find_elements("css selector", "tbody tr")]
        assert column == sorted(column, reverse=True) and len(column) == 2
        errors = [entry for entry in browser.get_log("browser") if entry["level"] in ("SEVERE", "ERROR")]
        assert errors == []
        browser.save_screenshot(str(tmp_path / "report.png"))
        if os.environ.get("RAML_SCREENSHOT_DIR"):  # to look at it
            shutil.copy(tmp_path / "report.png", os.environ["RAML_SCREENSHOT_DIR"])
    finally:
        browser.quit()
