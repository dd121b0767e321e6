"""The status page (GET / on the admin listener) as headless Chromium renders it.

GATEWAY_SCREENSHOT=gateway/control/status-page.png python3 -m pytest tests/test_status_browser.py
also saves a screenshot of the page (the one the README shows).
"""

from __future__ import annotations

import asyncio
import os
import shutil
from typing import Any

import pytest
from aiohttp import web

pytest.importorskip("selenium", reason="selenium not installed (pip install 'selenium>=4')")
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.wait import WebDriverWait  # noqa: E402

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="no chromium or chromedriver on PATH (Debian packages chromium, chromium-driver)",
)

ROUTES = """
routes:
  - prefix: /
    service: web
services:
  web:
    health_check: {path: /healthz, interval: 100ms, timeout: 1s, healthy: 1, unhealthy: 2}
    outlier: {consecutive_5xx: 2, base_ejection: 10m}
"""
SCRIPT = '<script>window.pwned = 1; document.title = "pwned"</script>'


def _answering(health: int, other: int) -> web.Application:
    """An upstream that answers its health check with ``health``, anything else with ``other``."""

    async def handle(request: web.Request) -> web.Response:
        return web.Response(status=health if request.path == "/healthz" else other)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def _rows(driver: webdriver.Chrome) -> list[dict[str, str]]:
    """The last table's rows (the instances), as heading -> cell text."""
    heads = [th.text for th in driver.find_elements(By.CSS_SELECTOR, "table:last-of-type th")]
    return [
        dict(zip(heads, [td.text for td in tr.find_elements(By.TAG_NAME, "td")], strict=True))
        for tr in driver.find_elements(By.CSS_SELECTOR, "table:last-of-type tr")[1:]
    ]


def _render(url: str, screenshot: str | None, typed: str) -> dict[str, Any]:
    """What Chromium shows at ``url``: title, text, instance rows, and what scripts did;
    then the rows left after typing ``typed`` in the filter box and pressing Enter."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    options.add_argument("--window-size=1000,600")
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    try:
        driver.get(url)
        rows = _rows(driver)
        if screenshot:  # 1000 pixels wide, as high as the page
            chrome = driver.execute_script("return window.outerHeight - window.innerHeight")
            height = driver.execute_script("return document.documentElement.scrollHeight")
            driver.set_window_size(1000, height + chrome)
            driver.save_screenshot(screenshot)
        shown = {
            "title": driver.title,
            "text": driver.find_element(By.TAG_NAME, "body").text,
            "rows": rows,
            "pwned": driver.execute_script("return window.pwned"),
            "scripts": driver.execute_script(
                "return [...document.scripts].filter(s => s.text.includes('pwned')).length"
            ),
        }
        box = driver.find_element(By.NAME, "filter")
        box.send_keys(typed + Keys.ENTER)  # a GET form: the CSP's form-action must allow it
        WebDriverWait(driver, 10).until(lambda d: "filter=" in d.current_url)
        shown["filtered"] = _rows(driver)
        return shown
    finally:
        driver.quit()


async def test_status_page_shows_every_state_and_metadata_as_text(
    gateway_factory, upstreams, aiohttp_server
):
    gw = await gateway_factory(ROUTES)
    failing = await aiohttp_server(_answering(health=500, other=500))
    ejected = await aiohttp_server(_answering(health=200, other=500))
    ports = {
        "up": (await upstreams("up")).port,
        "draining": (await upstreams("draining")).port,
        "failing": failing.port,
        "ejected": ejected.port,
    }
    ids = {}
    for name, port in ports.items():
        metadata = {"note": SCRIPT} if name == "draining" else {"version": "1.4"}
        body = {"host": "127.0.0.1", "port": port, "metadata": metadata}
        async with gw.session.post(
            f"{gw.admin_url}/registry/services/web/instances", json=body
        ) as response:
            assert response.status == 201
            ids[name] = (await response.json())["id"]
    async with gw.session.patch(
        f"{gw.admin_url}/registry/services/web/instances/{ids['draining']}",
        json={"state": "draining"},
    ) as response:
        assert response.status == 200

    async def health() -> dict[str, str]:
        async with gw.session.get(f"{gw.admin_url}/registry/services/web") as response:
            return {i["id"]: i["health"] for i in (await response.json())["instances"]}

    async with asyncio.timeout(10):
        while (await health())[ids["failing"]] != "failing":  # its checks answer 500
            await asyncio.sleep(0.05)
        while (await health())[ids["ejected"]] != "ejected":  # its traffic answers 500
            async with gw.session.get(gw.proxy_url + "/") as response:
                assert response.status in (200, 500)

    page = await asyncio.to_thread(
        _render, gw.admin_url + "/", os.environ.get("GATEWAY_SCREENSHOT"), "FAIL"
    )

    shown = {row["id"]: (row["state"], row["health"]) for row in page["rows"]}
    assert shown == {
        ids["up"]: ("up", "healthy"),
        ids["draining"]: ("draining", "healthy"),
        ids["failing"]: ("up", "failing\nstatus 500"),  # and why: its last check's answer
        ids["ejected"]: ("up", "ejected · back in 9m\n2 5xx answers in a row"),  # 10m less a bit
    }
    assert [row["id"] for row in page["filtered"]] == [ids["failing"]]  # any case
    summary = "web 4 1/4 1 1 1 1"  # services: instances, routable/all, up/draining/ejected/failing
    assert summary in page["text"]
    assert f"note={SCRIPT}" in page["text"]  # the metadata, shown as the text it is
    assert page["pwned"] is None and page["title"] == "gateway" and page["scripts"] == 0
