"""The web console in a real browser: the profile inspector at /ui and the API docs at /docs,
driven in headless Chromium against a running `persona up` with reads protected, every
request the pages make recorded and none allowed to leave the machine.

`make screenshots` runs this with PERSONA_SCREENSHOTS=docs: the README's pictures."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from persona.settings import PROJECT_ROOT
from tests.ray_heads import persona as run_persona
from tests.ray_heads import stack_env

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
READ_TOKEN = secrets.token_hex(16)
ADMIN_TOKEN = secrets.token_hex(16)
LOCAL_SCHEMES = {"data", "blob", "about", "chrome-error"}


def persona(env: dict, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    done = run_persona(env, *args, timeout=timeout)
    assert done.returncode == 0, f"persona {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """`persona up` on free ports with reads protected, a generated catalog and log loaded
    and a model trained: the API's address, the demo user (most events) and another."""
    data_dir = tmp_path_factory.mktemp("console")
    digest = lambda token: hashlib.sha256(token.encode()).hexdigest()  # noqa: E731
    env = stack_env(
        data_dir,
        PERSONA_PARTITIONS=16,
        PERSONA_PROTECT_READS=1,
        PERSONA_SIGNALS_REFRESH_S=1,
        PERSONA_API_TOKENS=json.dumps(
            {
                "viewer": {"sha256": digest(READ_TOKEN), "role": "read"},
                "ops": {"sha256": digest(ADMIN_TOKEN), "role": "admin"},
            }
        ),
    )
    env.pop("PERSONA_API_TOKEN", None)
    generated = data_dir / "demo"
    persona(
        env,
        "generate",
        "--users",
        "40",
        "--items",
        "120",
        "--events",
        "4000",
        "--out",
        str(generated),
    )
    api = f"http://127.0.0.1:{env['PERSONA_HTTP_PORT']}"
    try:
        persona(env, "up")
        items = [json.loads(line) for line in (generated / "items.jsonl").open()]
        put = httpx.put(
            f"{api}/v1/items", json={"items": items}, headers=bearer(ADMIN_TOKEN), timeout=60
        )
        assert put.status_code == 200, put.text
        persona(env, "ingest", str(generated / "events.jsonl"))
        persona(env, "train", str(generated / "events.jsonl"))
        users = Counter(
            json.loads(line)["user_id"] for line in (generated / "events.jsonl").open()
        ).most_common(2)
        yield api, users[0][0], users[1][0]
    finally:
        subprocess.run(
            [sys.executable, "-m", "jobs.cli", "down"], env=env, cwd=PROJECT_ROOT, timeout=300
        )


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium from the system (Debian's chromium and chromium-driver), with
    DevTools performance logs: every network request a page makes is in them."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.fail(
            f"the console tests need headless Chromium, and {', '.join(missing)} is missing: "
            "apt-get install -y chromium chromium-driver (`make test` installs them)",
            pytrace=False,
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new",
        "--no-sandbox",  # root in a container
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,1000",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--lang=en-US",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def requested_urls(driver) -> list[str]:
    """The URLs of the requests made since the last call (the log is drained)."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
        elif message["method"] == "Network.webSocketCreated":
            urls.append(message["params"]["url"])
    return urls


def assert_all_local(urls: list[str], api: str) -> None:
    host = urlsplit(api).netloc
    leaving = [
        u for u in urls if urlsplit(u).scheme not in LOCAL_SCHEMES and urlsplit(u).netloc != host
    ]
    assert urls and not leaving, f"requests leaving the machine: {leaving}"


def wait_for(driver, condition, timeout: float = 30.0, what: str = ""):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(lambda d: condition(d), message=what)


def screenshot(driver, name: str, tmp: Path) -> None:
    """The whole page as a PNG, into docs/ when PERSONA_SCREENSHOTS says so."""
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1280, min(max(height + 120, 800), 4000))
    time.sleep(0.3)
    target = os.environ.get("PERSONA_SCREENSHOTS")
    folder = PROJECT_ROOT / target if target else tmp
    folder.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(folder / name))
    driver.set_window_size(1280, 1000)


def texts(driver, selector: str) -> list[str]:
    from selenium.webdriver.common.by import By

    return [e.text for e in driver.find_elements(By.CSS_SELECTOR, selector)]


def api_get(api: str, path: str) -> dict:
    reply = httpx.get(f"{api}{path}", headers=bearer(READ_TOKEN), timeout=30)
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_the_inspector_shows_a_demo_user_with_reads_protected(stack, browser, tmp_path):
    from selenium.webdriver.common.by import By

    api, user, _ = stack
    # Reads are protected: the page's own calls need the token it is given.
    assert httpx.get(f"{api}/v1/users/{user}/profile", timeout=30).status_code == 401
    requested_urls(browser)
    browser.get(f"{api}/ui")
    browser.find_element(By.ID, "token").send_keys(READ_TOKEN)
    browser.find_element(By.ID, "token-save").click()
    browser.find_element(By.ID, "user-id").send_keys(user)
    browser.find_element(By.CSS_SELECTOR, "#lookup button").click()
    wait_for(browser, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-loaded"))
    # The token lives in this tab's sessionStorage only: no cookie, nothing in localStorage.
    stored = browser.execute_script("return sessionStorage.getItem('persona.token')")
    assert stored == READ_TOKEN
    assert browser.execute_script("return localStorage.length") == 0
    assert browser.get_cookies() == []

    profile = api_get(api, f"/v1/users/{user}/profile")
    liked = [i["topic"] for i in profile["interests"] if i["score"] > 0][:12]
    bars = browser.find_elements(By.CSS_SELECTOR, "#interest-chart rect.bar")
    assert [b.get_attribute("data-topic") for b in bars] == liked and liked
    widths = [float(b.get_attribute("width")) for b in bars]
    assert widths == sorted(widths, reverse=True) and widths[0] > widths[-1]

    actions = texts(browser, "#timeline li.entry")
    assert len(actions) == min(50, len(profile["recent_actions"])) > 0
    newest = profile["recent_actions"][0]
    assert newest["action"] in actions[0] and newest["item_id"] in actions[0]

    recs = api_get(api, f"/v1/users/{user}/recommendations?k=10")
    rows = browser.find_elements(By.CSS_SELECTOR, "#recs tbody tr.rec")
    shown = [r.find_element(By.CSS_SELECTOR, ".item").text for r in rows]
    assert sorted(shown) == sorted(i["item_id"] for i in recs["items"]) and len(shown) == 10
    meta = browser.find_element(By.ID, "recs-meta").text
    assert f"variant {recs['variant'] or 'none'}" in meta and f"model {recs['model']}" in meta
    assert recs["model"], "the trained model serves"
    for row, item in zip(rows, recs["items"], strict=False):
        assert row.find_element(By.CSS_SELECTOR, ".parts").text != "—"
        assert sum(item["sources"].values()) == pytest.approx(item["score"], abs=1e-4)

    nearest = api_get(api, f"/v1/users/{user}/nearest?k=8")
    assert texts(browser, "#nearest-embedding li span:first-child") == [
        i["item_id"] for i in nearest["embedding"]
    ]
    assert len(nearest["model_items"]) == 8
    assert texts(browser, "#nearest-model li span:first-child") == [
        i["item_id"] for i in nearest["model_items"]
    ]

    wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#shard-table tbody tr"))
    shard_rows = texts(browser, "#shard-table tbody tr")
    assert len(shard_rows) == 2 and all(" ok " in f" {r} " for r in shard_rows)
    # GET /v1/experiments: whether or not this server has it, the panel says something.
    wait_for(browser, lambda d: d.find_element(By.ID, "experiments").text)

    screenshot(browser, "console.png", tmp_path)
    assert_all_local(requested_urls(browser), api)


def test_deleting_from_the_inspector_asks_first_and_needs_an_admin_token(stack, browser):
    from selenium.webdriver.common.by import By

    api, _, user = stack
    requested_urls(browser)
    browser.get(f"{api}/ui?user={user}")  # the token is still in this tab
    wait_for(browser, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-loaded"))

    def delete(answer: bool) -> str:
        browser.find_element(By.ID, "delete-user").click()
        alert = wait_for(browser, lambda d: d.switch_to.alert, what="a confirmation")
        assert user in alert.text
        alert.accept() if answer else alert.dismiss()
        time.sleep(0.5)
        return browser.find_element(By.ID, "delete-state").text

    assert delete(False) == ""  # not confirmed: nothing sent
    assert "admin" in delete(True)  # a read token may not delete
    assert api_get(api, f"/v1/users/{user}/profile")["user_id"] == user

    browser.execute_script(f"sessionStorage.setItem('persona.token', '{ADMIN_TOKEN}')")
    assert delete(True) == f"{user} deleted"
    gone = httpx.get(f"{api}/v1/users/{user}/profile", headers=bearer(READ_TOKEN), timeout=30)
    assert gone.status_code == 404
    assert_all_local(requested_urls(browser), api)


def test_the_api_docs_list_every_operation_with_no_cdn(stack, browser, tmp_path):
    from selenium.webdriver.common.by import By

    api, _, _ = stack
    schema = httpx.get(f"{api}/openapi.json", timeout=30).json()
    operations = {(m.upper(), p) for p, ops in schema["paths"].items() for m in ops}
    assert ("GET", "/v1/users/{user_id}/nearest") in operations
    assert ("GET", "/v1/shards") in operations

    requested_urls(browser)
    browser.get(f"{api}/docs")
    wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".opblock"), what="Swagger UI")
    listed = {
        (
            block.find_element(By.CSS_SELECTOR, ".opblock-summary-method").text,
            block.find_element(By.CSS_SELECTOR, ".opblock-summary-path").get_attribute("data-path"),
        )
        for block in browser.find_elements(By.CSS_SELECTOR, ".opblock")
    }
    assert listed == operations
    screenshot(browser, "api-docs.png", tmp_path)
    assert_all_local(requested_urls(browser), api)
    # FastAPI's ReDoc page is gone with its CDN script (ReDoc loads its logo from one).
    assert httpx.get(f"{api}/redoc", timeout=30).status_code == 404
