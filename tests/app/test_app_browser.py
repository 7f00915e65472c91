"""`alphaset app` in a real browser: headless Debian chromium driven by selenium, on the server
the HTTP tests use. Generate an image with each sampler, filter, search, open a detail, save a
view, look at the duplicates; a screenshot of each tab is saved under the test's tmp dir.

Skipped, with the reason, where chromium or chromedriver is missing (CI installs them:
``.ci/run``). ``ALPHASET_DOCS_SCREENSHOTS=docs`` also writes the README's two screenshots
(``docs/app-generate.png``, ``docs/app-explore.png``, downscaled to 128 colours).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from training.sample import SAMPLERS

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="needs Debian's chromium and chromium-driver (apt-get install -y chromium "
    "chromium-driver; .ci/run installs them)",
)
WAIT = 60  # seconds for one UI update (a CPU busy with other tests is slow)


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1000", "--force-device-scale-factor=1"):  # fmt: skip
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def page(browser, app_server):
    browser.get(app_server)
    _wait(browser, lambda d: d.find_elements("id", "gen-run"))
    return browser


def _wait(driver, condition, timeout: float = WAIT):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(condition)


def _css(driver, selector: str):
    return driver.find_element("css selector", selector)


def _type(driver, selector: str, text: str, enter: bool = False) -> None:
    from selenium.webdriver.common.keys import Keys

    box = _css(driver, selector)
    box.click()
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.BACKSPACE)
    box.send_keys(text + (Keys.ENTER if enter else ""))


def _choose(driver, elem_id: str, option: str) -> None:
    """Pick ``option`` in a Gradio dropdown."""
    _css(driver, f"#{elem_id} input").click()
    selector = f"li[role=option][aria-label='{option}']"
    _wait(driver, lambda d: d.find_elements("css selector", selector))[0].click()


def _captions(driver, elem_id: str) -> list[str]:
    return [
        e.get_attribute("textContent").strip()
        for e in driver.find_elements("css selector", f"#{elem_id} .caption-label")
    ]


def _tab(driver, name: str) -> None:
    tab = [t for t in driver.find_elements("css selector", "[role=tab]") if t.text.strip() == name]
    tab[0].click()
    time.sleep(0.3)


def _toast(driver, expect: str) -> str:
    """Wait for Gradio's error toast holding ``expect``; close every toast; return its text."""

    def shown(d):
        texts = [
            e.get_attribute("textContent") for e in d.find_elements("css selector", ".toast-body")
        ]
        return [t for t in texts if expect in t]

    text = _wait(driver, shown)[0]
    for close in driver.find_elements("css selector", ".toast-close"):
        close.click()
    return text


def _screenshot(driver, tmp_path: Path, name: str, docs: bool = False) -> Path:
    """Save a screenshot under the test's tmp dir; ``docs``: also the README's small copy."""
    path = tmp_path / f"{name}.png"
    driver.save_screenshot(str(path))
    assert path.stat().st_size > 10_000
    folder = os.environ.get("ALPHASET_DOCS_SCREENSHOTS")
    if docs and folder:
        from PIL import Image

        img = Image.open(path).convert("RGB")
        img.thumbnail((1100, 1100))
        img.quantize(colors=128).save(Path(folder) / f"app-{name}.png", optimize=True)
    return path


def test_generate_tab(page, tmp_path):
    """Each sampler: choosing it fills in its steps and cfg; generating shows the image in the
    gallery with its settings. A bad seed is a message in the page, and the page keeps working."""
    _type(page, "#gen-prompt textarea", "a photo of a cat")
    for name, spec in SAMPLERS.items():
        if _css(page, "#gen-sampler input").get_attribute("value") != name:
            _choose(page, "gen-sampler", name)
        _wait(page, lambda d, s=spec: _css(d, "#gen-steps input").get_attribute("value") == str(s.steps))  # fmt: skip
        assert float(_css(page, "#gen-cfg input").get_attribute("value")) == spec.cfg
        _type(page, "#gen-steps input", "2")
        _css(page, "#gen-run").click()
        want = f"a photo of a cat · {name} 2 steps · cfg {spec.cfg:g} · seed 0 · 256x256"
        _wait(page, lambda d, w=want: w in _captions(d, "gen-gallery"))
        _wait(page, lambda d: _css(d, "#gen-gallery img").get_attribute("naturalWidth") == "256")
    _screenshot(page, tmp_path, "generate", docs=True)

    _type(page, "#gen-seed input", str(2**70))
    _css(page, "#gen-run").click()
    assert "Traceback" not in _toast(page, "seed must be 0")
    _type(page, "#gen-seed input", "1")
    _css(page, "#gen-run").click()
    _wait(page, lambda d: any("seed 1 ·" in c for c in _captions(d, "gen-gallery")))


def test_explore_tab(page, tmp_path, demo_store):
    """Grid, a --where filter and a semantic search change the grid; an image's detail lists its
    rows; a bad expression is a message; saving a view writes the Parquet file; duplicates."""
    _tab(page, "Explore")
    _css(page, "#ex-apply").click()
    _wait(page, lambda d: len(_captions(d, "ex-grid")) == 14)
    every = _captions(page, "ex-grid")
    assert "every row: 14 rows" in _css(page, "#ex-info").text

    _type(page, "#ex-where textarea", "nope > 1", enter=True)
    assert "Traceback" not in _toast(page, "unknown column 'nope'")
    where = "clip_aesthetic > 6.1 and dup_of is null"
    _type(page, "#ex-where textarea", where, enter=True)
    _wait(page, lambda d: f"where {where}" in _css(d, "#ex-info").text)
    filtered = _captions(page, "ex-grid")
    assert 0 < len(filtered) < 14 and set(filtered) < set(every)

    _type(page, "#ex-query textarea", "a tabby cat", enter=True)
    _wait(page, lambda d: "search 'a tabby cat'" in _css(d, "#ex-info").text)
    found = _captions(page, "ex-grid")
    assert found != filtered and all(" · cos " in c for c in found)

    page.find_elements("css selector", "#ex-grid button.thumbnail-item")[0].click()
    key = found[0].split(" · ")[0]
    _wait(page, lambda d: key in _css(d, "#ex-detail").text)
    detail = _css(page, "#ex-detail").text  # the rows in view; test_app_http checks them all
    assert "meta" in detail and "captions/tiny" in detail and "alt_text" in detail
    _wait(page, lambda d: d.find_elements("css selector", "#ex-detail-image img"))
    _screenshot(page, tmp_path, "explore", docs=True)
    _css(page, "#ex-like").click()  # the opened image as the query
    _wait(page, lambda d: f"more like {key}" in _css(d, "#ex-info").text)
    top = _captions(page, "ex-grid")[:2]  # itself first (a byte copy may tie with it)
    assert any(c.startswith(f"{key} · cos 1.000") for c in top)

    _type(page, "#ex-view-name textarea", "from_browser")
    _css(page, "#ex-save").click()
    _wait(page, lambda d: "saved views/from_browser.parquet" in _css(d, "#ex-saved").text)
    view = pq.read_table(Path(demo_store) / "views" / "from_browser.parquet")
    info = json.loads(view.schema.metadata[b"alphaset.view"])
    assert info["where"] == where and view.num_rows == len(filtered)
    assert set(view["key"].to_pylist()) == {c.split(" · ")[0] for c in filtered}

    _tab(page, "Duplicates")
    _css(page, "#ex-dups-show").click()
    _wait(page, lambda d: _captions(d, "ex-dups"))
    assert _captions(page, "ex-dups")[0].startswith("kept coffee-")
    assert "1 groups" in _css(page, "#ex-dups-info").text
    _screenshot(page, tmp_path, "duplicates")
