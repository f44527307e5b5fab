"""The chat page in headless Chromium: pick a model, send a message, watch the answer stream in.

Needs Debian's `chromium` and `chromium-driver` (.ci/run installs them); skipped with the reason when absent.
"""

from __future__ import annotations

import shutil

import pytest
from serve_fixtures import ANSWER, REASONING, live_server

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="Chromium is not installed: apt-get install -y chromium chromium-driver")
# Records the answer's text length at every change, to tell a streamed answer from one that appears whole.
WATCH_LENGTHS = """
window.lengths = [];
new MutationObserver(() => {
  const content = document.querySelector('.message.assistant:last-of-type .content');
  if (content) window.lengths.push(content.textContent.length);
}).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
"""


@pytest.fixture(scope="module")
def server():
    with live_server() as running:
        yield running


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def ask(browser, server, model: str, text: str, max_tokens: int = 512):
    browser.get(server.url + "/")
    WebDriverWait(browser, 20).until(lambda b: len(Select(b.find_element(By.ID, "model")).options) == 2)
    Select(browser.find_element(By.ID, "model")).select_by_value(model)
    max_tokens_input = browser.find_element(By.ID, "max-tokens")
    max_tokens_input.clear()
    max_tokens_input.send_keys(str(max_tokens))
    browser.execute_script(WATCH_LENGTHS)
    browser.find_element(By.ID, "prompt").send_keys(text + "\n")
    return WebDriverWait(browser, 30).until(
        lambda b: b.find_element(By.CSS_SELECTOR, '.message.assistant[data-done="true"]'))


def test_an_answer_streams_in_with_the_reasoning_collapsed(browser, server):
    reply = ask(browser, server, "script", "Add 4 and 5.")
    assert reply.find_element(By.CLASS_NAME, "content").text == ANSWER
    reasoning = reply.find_element(By.CLASS_NAME, "reasoning")
    assert reasoning.get_attribute("open") is None  # collapsed
    assert browser.execute_script("return arguments[0].textContent", reasoning.find_element(By.CLASS_NAME, "reasoning-text")) == REASONING
    assert reply.get_attribute("data-finish-reason") == "stop"
    assert int(reply.get_attribute("data-chunks")) > len(ANSWER.split())
    assert browser.find_element(By.CSS_SELECTOR, ".message.user").text == "Add 4 and 5."

    reply = ask(browser, server, "tiny", "Tell me a story.", max_tokens=200)
    lengths = browser.execute_script("return window.lengths")
    assert len(set(lengths)) >= 3, lengths  # the text grew step by step, not all at once
    assert reply.get_attribute("data-finish-reason") in {"length", "stop"}
