"""The web playground end to end in headless Debian Chromium (Selenium + chromedriver): the server
(tiny model) runs with uvicorn in a thread on a loopback port; the test adds two variants, runs
them with Ctrl+Enter and checks that every column fills. Screenshot: artifacts/playground.png.

Chromium and chromedriver come from `scripts/ensure-browser.sh` (run by `make test`); the test
skips only when they cannot be found.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from testkit.live import app_url

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "artifacts"


def _find(env: str, path: str, name: str) -> str | None:
    for cand in (os.environ.get(env), path, shutil.which(name)):
        if cand and os.path.exists(cand):
            return cand
    return None


CHROMIUM = _find("CHROMIUM", "/usr/bin/chromium", "chromium")
CHROMEDRIVER = _find("CHROMEDRIVER", "/usr/bin/chromedriver", "chromedriver")
if CHROMIUM is None or CHROMEDRIVER is None:
    pytest.skip("Debian chromium/chromium-driver not found (/usr/bin/chromium, "
                "/usr/bin/chromedriver): run scripts/ensure-browser.sh as root",
                allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed "
                                "(pip install -e '.[dev]')")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run",
        "--disable-dev-shm-usage", "--window-size=1400,1000"]


@pytest.fixture(scope="module")
def server_url(tiny_lm, tiny_pack):
    with app_url(tiny_lm, tiny_pack, max_tokens_limit=64) as url:
        yield url


@pytest.fixture(scope="module")
def driver():
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="playground-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ARGS:
        options.add_argument(arg)
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    d.set_page_load_timeout(60)
    try:
        yield d
    finally:
        d.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _open(driver, url: str) -> None:
    driver.get(f"{url}/playground")
    WebDriverWait(driver, 30).until(
        lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true")


def _columns(driver):
    return driver.find_elements(By.CSS_SELECTOR, "#variants .variant")


def _by_label(driver, text: str):
    label = driver.find_element(By.XPATH, f"//label[normalize-space(text())='{text}']")
    return driver.find_element(By.ID, label.get_attribute("for"))


def _set_range(driver, element, value) -> None:
    driver.execute_script("arguments[0].value = arguments[1];"
                          "arguments[0].dispatchEvent(new Event('input', {bubbles: true}));"
                          "arguments[0].dispatchEvent(new Event('change', {bubbles: true}));",
                          element, str(value))


def test_playground_two_added_variants_fill(server_url, driver):
    _open(driver, server_url)
    start = len(_columns(driver))
    assert start >= 1
    add = driver.find_element(By.ID, "add-variant")
    assert add.text.strip() == "+ Add variant"
    add.click()
    add.click()
    cols = _columns(driver)
    assert len(cols) == start + 2
    first_new, second_new = cols[start], cols[start + 1]

    Select(first_new.find_element(By.CSS_SELECTOR, "select.method")).select_by_value("actadd")
    _set_range(driver, first_new.find_element(By.CSS_SELECTOR, "input.strength"), 2)
    assert not first_new.find_element(By.CSS_SELECTOR, "input.k").is_enabled()  # INLP only
    Select(second_new.find_element(By.CSS_SELECTOR, "select.method")).select_by_value("inlp_flip")
    k = second_new.find_element(By.CSS_SELECTOR, "input.k")
    assert k.is_enabled()
    assert int(k.get_attribute("min")) == 1 and int(k.get_attribute("max")) >= 1
    _set_range(driver, k, k.get_attribute("max"))

    # Labels are wired to their controls (keyboard and screen-reader use).
    prompt = _by_label(driver, "Prompt")
    assert prompt.get_attribute("id") == "prompt"
    prompt.clear()
    prompt.send_keys("How do I make a paper airplane?")
    max_tokens = _by_label(driver, "Max tokens")
    max_tokens.clear()
    max_tokens.send_keys("12")

    # Ctrl+Enter runs from the prompt box.
    prompt.send_keys(Keys.CONTROL, Keys.ENTER)
    WebDriverWait(driver, 90).until(lambda d: d.execute_script(
        "return [...document.querySelectorAll('#variants .completion')]"
        ".every(c => c.dataset.text !== undefined)"))
    assert "Done" in driver.find_element(By.ID, "status").text

    cols = _columns(driver)
    assert len(cols) == start + 2
    for i, col in enumerate(cols):
        text = col.find_element(By.CSS_SELECTOR, ".completion").text
        assert text.strip() and text != "Generating…", (i, text)
        meta = col.find_element(By.CSS_SELECTOR, ".result-meta").text
        assert "tok" in meta and ("refusal" in meta or "answered" in meta), meta
    assert "actadd" in cols[start].find_element(By.CSS_SELECTOR, ".applied").text
    assert "inlp_flip" in cols[start + 1].find_element(By.CSS_SELECTOR, ".applied").text

    # The request is shown as copyable snippets that match what was sent.
    curl = driver.find_element(By.ID, "curl-snippet").text
    python = driver.find_element(By.ID, "python-snippet").text
    assert "/v1/steering/compare" in curl and "inlp_flip" in curl
    assert "httpx.post" in python and "inlp_flip" in python

    # Nothing was fetched from outside the server (no CDN), and no script errors.
    urls = driver.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)")
    assert all(u.startswith(server_url) for u in urls), urls
    severe = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
    assert not severe, severe

    ARTIFACTS.mkdir(exist_ok=True)
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1400, max(1000, min(int(height) + 100, 4000)))
    driver.save_screenshot(str(ARTIFACTS / "playground.png"))
    driver.set_window_size(1400, 1000)


def test_playground_remove_variant_and_keyboard_focus(server_url, driver):
    _open(driver, server_url)
    before = len(_columns(driver))
    driver.find_element(By.ID, "add-variant").send_keys(Keys.ENTER)
    assert len(_columns(driver)) == before + 1
    # The new column's method select has focus, so it can be set from the keyboard.
    assert driver.execute_script(
        "return document.activeElement.classList.contains('method')")
    _columns(driver)[before].find_element(By.CSS_SELECTOR, "button.remove").click()
    assert len(_columns(driver)) == before


def test_playground_list_and_conditional_variants_stream(server_url, driver):
    """A variant with two interventions (ablate on the answer, then actadd) and a conditional
    variant: both stream into their columns; the condition's score and decision are shown."""
    _open(driver, server_url)
    for col in _columns(driver)[1:]:
        col.find_element(By.CSS_SELECTOR, "button.remove").click()
    add = driver.find_element(By.ID, "add-variant")
    add.click()
    add.click()
    listed, conditional = _columns(driver)[1], _columns(driver)[2]

    first = listed.find_element(By.CSS_SELECTOR, ".step")
    Select(first.find_element(By.CSS_SELECTOR, "select.method")).select_by_value("ablate")
    Select(first.find_element(By.CSS_SELECTOR, "select.apply-to")).select_by_value("generation")
    window_start = first.find_element(By.CSS_SELECTOR, "input.window-start")
    assert window_start.is_enabled()
    window_start.send_keys("0")
    first.find_element(By.CSS_SELECTOR, "input.window-end").send_keys("6")
    listed.find_element(By.CSS_SELECTOR, "button.add-step").click()
    steps = listed.find_elements(By.CSS_SELECTOR, ".step")
    assert len(steps) == 2
    Select(steps[1].find_element(By.CSS_SELECTOR, "select.method")).select_by_value("actadd")
    _set_range(driver, steps[1].find_element(By.CSS_SELECTOR, "input.strength"), 2)

    step = conditional.find_element(By.CSS_SELECTOR, ".step")
    Select(step.find_element(By.CSS_SELECTOR, "select.method")).select_by_value("actadd")
    threshold = step.find_element(By.CSS_SELECTOR, "input.threshold")
    assert not threshold.is_enabled()  # no condition yet
    Select(step.find_element(By.CSS_SELECTOR, "select.when")).select_by_value("above")
    assert threshold.is_enabled()
    threshold.clear()
    threshold.send_keys("-50")

    max_tokens = _by_label(driver, "Max tokens")
    max_tokens.clear()
    max_tokens.send_keys("10")
    curl = driver.find_element(By.ID, "curl-snippet").text
    assert '"steering"' in curl and '"generation_window"' in curl and '"when"' in curl
    driver.find_element(By.ID, "run").click()
    WebDriverWait(driver, 90).until(
        lambda d: "Done" in d.find_element(By.ID, "status").text
        or "Error" in d.find_element(By.ID, "status").text)
    assert "Done" in driver.find_element(By.ID, "status").text, \
        driver.find_element(By.ID, "status").text

    cols = _columns(driver)
    for col in cols:
        assert col.find_element(By.CSS_SELECTOR, ".completion").text.strip()
    applied = cols[1].find_element(By.CSS_SELECTOR, ".applied").text
    assert "ablate" in applied and "actadd" in applied and "answer tokens 0–6" in applied
    result = cols[2].find_element(By.CSS_SELECTOR, ".condition-result").text
    assert "prompt score" in result and "applied" in result and "not applied" not in result
    assert "score" in cols[2].find_element(By.CSS_SELECTOR, ".applied").text
    # The run streamed: the page asked for an event stream.
    assert driver.execute_script(
        "return performance.getEntriesByType('resource').some(e => "
        "e.name.endsWith('/v1/steering/compare'))")
    severe = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
    assert not severe, severe
    driver.save_screenshot(str(ARTIFACTS / "playground-controls.png"))


def test_playground_heatmap_under_a_compared_answer(server_url, driver, tiny_pack):
    """Issue 30: "Inspect" under an answer draws the layer × token heatmap of the prompt and
    that answer (POST /v1/steering/inspect), one row per layer, the lens beneath."""
    _open(driver, server_url)
    prompt = _by_label(driver, "Prompt")
    prompt.clear()
    prompt.send_keys("How do I pick a lock?")
    max_tokens = _by_label(driver, "Max tokens")
    max_tokens.clear()
    max_tokens.send_keys("6")
    driver.find_element(By.ID, "run").click()
    WebDriverWait(driver, 90).until(lambda d: d.execute_script(
        "return [...document.querySelectorAll('#variants .completion')]"
        ".every(c => c.dataset.text !== undefined)"))
    col = _columns(driver)[1]
    col.find_element(By.CSS_SELECTOR, "button.inspect-button").click()
    WebDriverWait(driver, 60).until(
        lambda d: col.find_elements(By.CSS_SELECTOR, "table.heatmap"))
    table = col.find_element(By.CSS_SELECTOR, "table.heatmap")
    layers, tokens = int(table.get_attribute("data-layers")), int(table.get_attribute("data-tokens"))
    assert layers == tiny_pack.n_layers and tokens > 0
    cells = table.find_elements(By.CSS_SELECTOR, "td.cell")
    assert len(cells) == layers * tokens
    scores = [float(c.get_attribute("data-score")) for c in cells]
    assert all(s == s for s in scores)  # finite numbers from the server, no NaN
    assert len({c.value_of_css_property("background-color") for c in cells}) > 1
    assert table.find_elements(By.CSS_SELECTOR, "th.pack-layer")
    assert "promotes" in col.find_element(By.CSS_SELECTOR, ".lens").text
    severe = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
    assert not severe, severe
    ARTIFACTS.mkdir(exist_ok=True)
    driver.execute_script("arguments[0].scrollIntoView()", table)
    driver.save_screenshot(str(ARTIFACTS / "playground-heatmap.png"))
