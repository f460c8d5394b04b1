"""The demo page (/ui) in a real headless browser against a real stack: `recsys up --redis`
(its own key prefix) on the quick MovieLens-100K store, driven by Selenium through Debian's
chromium and chromedriver. Nothing downloads a browser: without both on the PATH the test
skips, naming the packages (`make install` installs them when it runs as root with apt).

`--ui-screenshot PNG` saves the page after the click (how docs/ui.png is made):
    .venv/bin/pytest tests/services/gateway/test_ui.py --ui-screenshot docs/ui.png
"""

from __future__ import annotations

import asyncio
import http.client
import json
import math
import shutil
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from recsys.artifacts import load_core
from recsys.store import ModelStore
from tests.recsys.feature_store import REDIS_URL
from tests.support.stack import UpProcess, free_ports, start_up

WAIT_SECONDS = 30.0
USER = "196"
# Deadlines no busy CI box can miss (as tests/services/gateway/test_gateway.py uses): a channel
# cut off would change the answer the test compares; deadlines have tests of their own.
GENEROUS = {
    "RECSYS_RECALL_CHANNEL_TIMEOUT_MS": "2000",
    "RECSYS_RECALL_FEATURE_STORE_TIMEOUT_MS": "2000",
    "RECSYS_GATEWAY_DEFAULT_DEADLINE_MS": "10000",
    "RECSYS_GATEWAY_RECALL_TIMEOUT_MS": "4000",
    "RECSYS_GATEWAY_RANK_TIMEOUT_MS": "4000",
}


CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
# Decided at collection, so that without a browser the test skips before any store is built.
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None or CHROMEDRIVER is None,
        reason="the /ui browser test needs Debian's chromium and chromedriver on the PATH: "
        "apt-get install -y chromium chromium-driver (`make install` does it when run as root)",
    ),
]


@pytest.fixture
def browser() -> Iterator[Any]:
    assert CHROMIUM is not None
    assert CHROMEDRIVER is not None
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",  # root in a container: chromium's sandbox needs user namespaces
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1400,1000",
        "--lang=en-US",
    ):
        options.add_argument(argument)
    # The driver's path given: Selenium Manager (which would download one) never runs.
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(WAIT_SECONDS)
    try:
        yield driver
    finally:
        driver.quit()


def status_without_redirects(url: str) -> tuple[int, str]:
    host, _, path = url.removeprefix("http://").partition("/")
    connection = http.client.HTTPConnection(host, timeout=5)
    try:
        connection.request("GET", f"/{path}")
        answer = connection.getresponse()
        return answer.status, answer.read().decode()
    finally:
        connection.close()


def post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        result: dict[str, Any] = json.loads(answer.read())
        return result


# Read in one script each: the page re-renders while the test polls, and a script runs
# between the page's own tasks, so it never sees a half-drawn table (element by element, a
# row could be replaced between two reads).
ROWS_SCRIPT = """
return Array.from(document.querySelectorAll("#items tbody tr"), (row) => {
  const cells = Array.from(row.cells, (cell) => cell.innerText);
  return {item_id: row.dataset.itemId, position: cells[0], title: cells[1], shown_id: cells[2],
          score: cells[3], tasks: cells[4], channels: cells[5], new: row.classList.contains("new")};
});
"""
HISTORY_SCRIPT = """
return Array.from(document.querySelectorAll("#history li"),
  (entry) => [entry.dataset.kind, entry.dataset.itemId, entry.querySelector(".title").textContent]);
"""


def rows(driver: Any) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = driver.execute_script(ROWS_SCRIPT)
    return found


def history(driver: Any) -> list[tuple[str, str, str]]:
    """(kind, item id, title) of the history panel's entries, top first."""
    return [(str(kind), str(item), str(title)) for kind, item, title in driver.execute_script(HISTORY_SCRIPT)]


def meta(driver: Any, field: str) -> str:
    return str(
        driver.execute_script(f"return document.querySelector('#meta [data-field=\"{field}\"]').textContent")
    )


def drive(driver: Any, base: str, titles: dict[str, str], version: str, screenshot: Path | None) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def wait_for(what: str, condition: Any) -> None:
        WebDriverWait(driver, WAIT_SECONDS, poll_frequency=0.1).until(
            lambda _: condition(), message=f"the page never showed {what}: rows {rows(driver)}"
        )

    driver.get(f"{base}/ui")
    assert driver.title.startswith("recsys")
    driver.find_element(By.ID, "user").send_keys(USER)
    dry_run = driver.find_element(By.ID, "dry-run")
    assert dry_run.is_selected()  # the default: looking records nothing
    driver.find_element(By.ID, "recommend").click()
    wait_for("10 items", lambda: len(rows(driver)) == 10 and meta(driver, "request_id") != "–")
    first = rows(driver)
    first_request = meta(driver, "request_id")
    assert [row["position"] for row in first] == [str(n) for n in range(1, 11)]
    for row in first:
        assert row["shown_id"] == row["item_id"]
        assert row["title"] == titles[row["item_id"]]  # the catalogue's title, as served
        assert math.isfinite(float(row["score"]))
        tasks = dict(line.split() for line in row["tasks"].splitlines())
        assert set(tasks) == {"click", "like"}
        assert all(0.0 <= float(value) <= 1.0 for value in tasks.values())
        assert row["channels"]
    assert meta(driver, "model_version") == version
    assert meta(driver, "scene") == "default"
    assert meta(driver, "arm") == "none"
    assert meta(driver, "cold_start") == "no"
    assert "dry run" in driver.find_element(By.ID, "message").text
    wait_for("the history", lambda: len(history(driver)) == 20)
    trained = history(driver)
    assert {kind for kind, _, _ in trained} == {"history"}  # the version's data only, so far
    assert all(title == titles[item] for _, item, title in trained)
    assert "/ui?user=196" in driver.current_url  # the address names the user

    # Click the top item: the event is reported, the answer and the history reload.
    clicked = first[0]
    driver.find_elements(By.CSS_SELECTOR, "#items tbody tr button.click")[0].click()
    wait_for(
        "the answer after the click",
        lambda: (
            meta(driver, "request_id") not in ("–", first_request)
            and len(rows(driver)) == 10
            and history(driver)[:1] == [("click", clicked["item_id"], clicked["title"])]
        ),
    )
    after = rows(driver)
    after_ids = [row["item_id"] for row in after]
    assert clicked["item_id"] not in after_ids  # consumed: recall never returns it again
    entered = [row["item_id"] for row in after if row["new"]]
    assert entered  # at least the clicked item's place was taken
    assert set(entered) == set(after_ids) - {row["item_id"] for row in first}
    assert history(driver)[1:] == trained[:19]  # the click on top of the same history
    message = driver.find_element(By.ID, "message").text
    assert message.startswith(f"Clicked “{clicked['title']}”. It left the list. 10 items for user 196")
    # What the page shows is what the API answers now (a dry run changes nothing).
    answer = post(f"{base}/v1/recommend", {"user_id": USER, "count": 10, "dry_run": True})
    assert clicked["item_id"] not in [item["item_id"] for item in answer["items"]]
    if screenshot is not None:
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        assert driver.save_screenshot(str(screenshot))

    # Dry run off: the answer is recorded as shown, so the next one brings other items.
    dry_run.click()
    assert not dry_run.is_selected()
    before_request = meta(driver, "request_id")
    driver.find_element(By.ID, "recommend").click()
    wait_for("a recorded answer", lambda: meta(driver, "request_id") != before_request)
    assert "dry run" not in driver.find_element(By.ID, "message").text
    shown = {row["item_id"] for row in rows(driver)}
    time.sleep(0.5)  # the exposure writes follow the answer, off its latency
    before_request = meta(driver, "request_id")
    driver.find_element(By.ID, "recommend").click()
    wait_for("the next answer", lambda: meta(driver, "request_id") != before_request)
    again = {row["item_id"] for row in rows(driver)}
    assert len(again) == 10
    assert not shown & again, "items recorded as shown came back"


async def test_the_page_recommends_reports_a_click_and_shows_the_change(
    browser: Any,
    quick_store: ModelStore,
    prefix: str,
    stacks: list[UpProcess],
    request: pytest.FixtureRequest,
) -> None:
    (http_port,) = free_ports(1)
    up = start_up(quick_store.path, REDIS_URL, prefix, "--http-port", str(http_port), env=GENEROUS)
    stacks.append(up)
    await asyncio.to_thread(up.wait_serving)
    base = f"http://127.0.0.1:{http_port}"
    assert ["ui", f"{base}/ui"] in [line.split() for line in up.stdout]  # on, and `up` says where
    status, page = await asyncio.to_thread(status_without_redirects, f"{base}/ui")
    assert status == 200
    assert "<title>recsys" in page
    version = quick_store.current()
    assert version is not None
    catalogue = load_core(quick_store.version_path(version)).catalogue
    titles = dict(zip(catalogue.item_ids.tolist(), catalogue.titles.tolist(), strict=True))
    screenshot = request.config.getoption("ui_screenshot")
    started = time.monotonic()
    await asyncio.to_thread(drive, browser, base, titles, version, Path(screenshot) if screenshot else None)
    print(f"browser steps: {time.monotonic() - started:.1f} s")
