"""gpt-serve's page in a real browser: headless Chromium (Debian's `chromium` and `chromium-driver`)
driven by Selenium types a prompt, waits for the streamed answer, checks that every token carries
its probability and shows its alternatives, and saves a screenshot.

Skipped, with the reason, where the browser or its driver is not installed (.ci/run installs them
with apt-get when it can). GPT_SERVE_SCREENSHOT=path keeps the screenshot, and
GPT_SERVE_CHECKPOINT=run serves that run instead of a tiny random model (docs/serve.png is one).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium (the test extra) is missing")
openai = pytest.importorskip("openai", reason="the test extra's openai client is not installed")
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402
from serve_helpers import save_run, serve  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
if CHROMIUM is None or DRIVER is None:
    pytest.skip("headless Chromium is not installed: apt-get install chromium chromium-driver",
                allow_module_level=True)

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "Every object has"


@pytest.fixture
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1200,760", "--disable-extensions", "--no-first-run"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=DRIVER),
                              options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def set_field(driver, name: str, value: str) -> None:
    field = driver.find_element(By.ID, name)
    field.clear()
    field.send_keys(value)


def test_the_page_streams_an_answer_shaded_by_probability(browser, tmp_path: Path) -> None:
    given = os.environ.get("GPT_SERVE_CHECKPOINT")
    run = Path(given) if given else save_run(tmp_path / "run")
    with serve(run) as (url, served, _):
        # Sampled, but seeded: a request alone is repeatable, so the page's answer is known.
        expected = openai.OpenAI(base_url=f"{url}/v1", api_key="-").chat.completions.create(
            model=served.name, messages=[{"role": "user", "content": PROMPT}], max_tokens=24,
            temperature=0.8, top_p=1, seed=3, logprobs=True, extra_body={"top_k": 50})
        browser.get(f"{url}/")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda d: d.find_element(By.ID, "model").text == f"model: {served.name}")
        set_field(browser, "max_tokens", "24")
        set_field(browser, "temperature", "0.8")  # top-p 1 and top-k 50: the page's defaults
        set_field(browser, "seed", "3")
        prompt = browser.find_element(By.ID, "prompt")
        prompt.send_keys(PROMPT)
        prompt.send_keys(Keys.ENTER)
        answer = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".message.assistant.done"))
        tokens = answer.find_elements(By.CSS_SELECTOR, ".tok")
        assert len(tokens) == len(expected.choices[0].logprobs.content)  # 24 unless end-of-text
        text = "".join(t.get_attribute("textContent") for t in tokens)
        assert text == expected.choices[0].message.content
        probabilities = [float(t.get_attribute("data-p")) for t in tokens]
        assert all(0 < p <= 1 for p in probabilities)
        assert len({t.value_of_css_property("background-color") for t in tokens}) > 1
        meta = answer.find_element(By.CSS_SELECTOR, ".meta").text
        assert f"{expected.usage.completion_tokens} tokens" in meta

        ActionChains(browser).move_to_element(tokens[2]).perform()
        tip = wait.until(lambda d: d.find_element(By.ID, "tip") if d.find_element(
            By.ID, "tip").is_displayed() else None)
        assert len(tip.find_elements(By.CSS_SELECTOR, "tr")) == 5  # the page asks for 5
        assert "p = " in tip.text and "%" in tip.text

        screenshot = Path(os.environ.get("GPT_SERVE_SCREENSHOT") or tmp_path / "page.png")
        assert browser.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 10_000
    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert not errors, errors  # no script error, nothing the page's CSP refused
