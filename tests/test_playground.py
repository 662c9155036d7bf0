"""The playground page in a real headless Chromium (Debian's `chromium` and
`chromium-driver`, driven by Selenium): it loads, a prompt gets both answers, an edit made
from the page changes the edited answer and not the base one, removing it restores it."""

from __future__ import annotations

import shutil

import pytest
from test_server import Running

webdriver = pytest.importorskip("selenium.webdriver")
CHROMEDRIVER = shutil.which("chromedriver")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(not (CHROMEDRIVER and CHROMIUM),
                                reason="needs chromium and chromium-driver (apt-get install)")

PROMPT = "The Eiffel Tower is located in the city of"


@pytest.fixture
def browser():
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1200,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def wait_for(driver, condition, timeout=180):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda d: condition(d))


def ask(driver, prompt: str) -> tuple[str, str, str]:
    from selenium.webdriver.common.by import By

    box = driver.find_element(By.ID, "prompt")
    box.clear()
    box.send_keys(prompt)
    driver.execute_script(
        "document.getElementById('base').textContent = '';"
        "document.getElementById('edited').textContent = '';")
    driver.find_element(By.ID, "ask").click()
    wait_for(driver, lambda d: d.find_element(By.ID, "edited").text
             and d.find_element(By.ID, "base").text)
    return (driver.find_element(By.ID, "base").text.strip(),
            driver.find_element(By.ID, "edited").text.strip(), driver.find_element(By.ID, "fired").text)


def test_playground_edit_and_remove_in_chromium(tiny_editor, browser):
    from selenium.webdriver.common.by import By

    running = Running(tiny_editor)
    try:
        browser.get(running.base + "/")
        assert "knowpatch playground" in browser.title
        base, edited, fired = ask(browser, PROMPT)
        assert edited == base and fired.startswith("none")

        browser.find_element(By.ID, "eprompt").send_keys(PROMPT)
        browser.find_element(By.ID, "esubject").send_keys("Eiffel Tower")
        browser.find_element(By.ID, "etarget").send_keys("Rome")
        browser.find_element(By.ID, "edit").click()
        wait_for(browser, lambda d: "done" in d.find_element(By.ID, "job").text
                 or "failed" in d.find_element(By.ID, "job").text)
        assert "done" in browser.find_element(By.ID, "job").text
        rows = wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#patches tr"))
        assert len(rows) == 1 and "Rome" in rows[0].text
        patch_id = rows[0].get_attribute("data-id")

        base2, edited2, fired2 = ask(browser, PROMPT)
        assert base2 == base  # the base answer does not move
        assert edited2.startswith("Rome") and fired2 == patch_id
        assert patch_id in browser.find_element(By.ID, "scores").text

        rows[0].find_element(By.CSS_SELECTOR, "button.remove").click()
        wait_for(browser, lambda d: not d.find_elements(By.CSS_SELECTOR, "#patches tr"))
        base3, edited3, fired3 = ask(browser, PROMPT)
        assert base3 == edited3 == base and fired3.startswith("none")
    finally:
        running.stop()


def test_playground_asks_in_chat_mode(tiny_editor, browser):
    """With "ask in chat" ticked, the page asks /v1/chat/completions (the question as a user
    turn of the chat template): its answers are the model's chat replies."""
    from selenium.webdriver.common.by import By

    question = "Where is the Eiffel Tower?"
    expected = tiny_editor.chat(question, patches=[], max_new_tokens=8)[0]
    running = Running(tiny_editor)
    try:
        browser.get(running.base + "/")
        browser.find_element(By.ID, "chat").click()
        box = browser.find_element(By.ID, "max")
        box.clear()
        box.send_keys("8")
        base, edited, fired = ask(browser, question)
        assert base == edited == expected and fired.startswith("none")
        assert base != ask_completion(browser, question)
    finally:
        running.stop()


def ask_completion(driver, prompt: str) -> str:
    from selenium.webdriver.common.by import By

    driver.find_element(By.ID, "chat").click()  # off again: a completion of the same text
    return ask(driver, prompt)[0]


def test_playground_lists_a_scoped_behaviour_patch_and_shows_where_it_fires(
        tiny_editor, browser, tmp_path, monkeypatch):
    from selenium.webdriver.common.by import By

    from knowpatch.behaviour_edit import BehaviourJob, run_behaviour
    from knowpatch.judges import parse_judges

    (tmp_path / "playground_judges.py").write_text("def even(text):\n    return len(text) % 2 == 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    languages = [f"Which language is spoken in town {i}?" for i in range(6)]
    job = BehaviourJob("Be brief.", parse_judges(["playground_judges:even"]), languages, [],
                       [f"Who owns company number {i}?" for i in range(4)], languages)
    patch, _ = run_behaviour(tiny_editor, job, {"prefixes": 0, "gate": "all", "max_steps": 2,
                                                "lr": 3e-2, "modules": ["all"]})
    tiny_editor.save(patch)
    tiny_editor.apply(patch)
    running = Running(tiny_editor)
    try:
        browser.get(running.base + "/")
        rows = wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#patches tr"))
        assert "behaviour: Be brief. (scoped)" in rows[0].text and "pass" in rows[0].text
        browser.find_element(By.ID, "chat").click()
        assert ask(browser, "Which language is spoken in town 8?")[2] == patch.id
        assert ask(browser, "Who owns company number 8?")[2].startswith("none")
    finally:
        running.stop()
