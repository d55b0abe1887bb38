"""The web page at `/` in a real headless Chromium (Debian's chromium + chromium-driver, driven
by selenium): type a sentence, press Tag, and find each entity of the API's answer highlighted
inline with its label and score, and listed in the table. Slow: it starts a server and a browser."""
import json
import os
import shutil
import tempfile
import urllib.request

import pytest

pytestmark = pytest.mark.slow

CHROMIUM = os.environ.get("FASTNER_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("FASTNER_CHROMEDRIVER", "/usr/bin/chromedriver")


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    for path in (CHROMIUM, CHROMEDRIVER):
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            reason = f"{path} not installed (apt-get install chromium chromium-driver)"
            if os.environ.get("FASTNER_REQUIRE_BROWSER"):  # .ci/run installed them: missing is a failure
                pytest.fail(reason)
            pytest.skip(reason)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="fastner-chromium-")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--no-first-run", "--disable-extensions", f"--user-data-dir={profile}", "--window-size=1200,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pytest.importorskip("fastapi")
    from fastner.serve.process import ServerProcess
    from tests.serve_testing import tiny_model_dir

    with ServerProcess(tiny_model_dir(tmp_path_factory), ["--max-wait-ms", "1"]) as running:
        yield running


def api_entities(url: str, text: str):
    request = urllib.request.Request(url + "v1/entities", data=json.dumps({"documents": [text]}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())["documents"][0]["entities"]


@pytest.mark.parametrize("text", [
    "Shares of Kestrel Pharma jumped 4.2 percent in Frankfurt on Tuesday after Ingrid Lindqvist raised the outlook.",
    # code points beyond UTF-16's first plane before the entities: offsets must still line up
    "😀 <b>Omar Haddad</b> said Altamira Holdings will pay $3.2 billion for Crescent Logistics.",
])
def test_page_highlights_the_entities_the_api_finds(browser, server, text):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    expected = api_entities(server.url, text)
    assert expected, "the tiny tagger finds entities in this sentence"
    browser.get(server.url)
    box = browser.find_element(By.ID, "text")
    box.clear()
    box.send_keys(text)
    browser.find_element(By.ID, "tag").click()
    WebDriverWait(browser, 60).until(expected_conditions.text_to_be_present_in_element((By.ID, "status"), "entities in"))
    assert browser.find_element(By.ID, "status").text.startswith(f"{len(expected)} entities in")

    marks = browser.find_elements(By.CSS_SELECTOR, "#highlighted mark.entity")
    assert len(marks) == len(expected)
    for mark, entity in zip(marks, expected):
        assert mark.get_attribute("data-label") == entity["label"]
        assert int(mark.get_attribute("data-start")) == entity["start"]
        assert int(mark.get_attribute("data-end")) == entity["end"]
        assert mark.find_element(By.CSS_SELECTOR, ".words").text == entity["text"]
        assert mark.find_element(By.CSS_SELECTOR, ".tag").text == f"{entity['label']} {entity['score']:.2f}"
        assert entity["label"] in mark.get_attribute("class").split()
    # the highlighted block reads as the original text plus the inline labels; nothing was
    # interpreted as markup
    shown = browser.find_element(By.ID, "highlighted").get_attribute("textContent")
    for entity in expected:
        shown = shown.replace(f"{entity['label']} {entity['score']:.2f}", "", 1)
    assert shown == text
    assert not browser.find_elements(By.CSS_SELECTOR, "#highlighted b")

    rows = browser.find_elements(By.CSS_SELECTOR, "#entities tbody tr")
    assert [[cell.text for cell in row.find_elements(By.TAG_NAME, "td")] for row in rows] == \
           [[e["text"], e["label"], f"{e['score']:.3f}", str(e["start"]), str(e["end"])] for e in expected]


def test_page_shows_a_server_error(browser, server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server.url)
    box = browser.find_element(By.ID, "text")
    # over the default --max-document-tokens 2048; set directly (typing 10,000 keys takes a minute)
    browser.execute_script("arguments[0].value = arguments[1]", box, "word " * 2100)
    browser.find_element(By.ID, "tag").click()
    WebDriverWait(browser, 60).until(expected_conditions.text_to_be_present_in_element((By.ID, "status"), "error 413"))
    assert "at most 2048 a document" in browser.find_element(By.ID, "status").text
    assert "error" in browser.find_element(By.ID, "status").get_attribute("class")
