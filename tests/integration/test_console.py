"""The console at /ui in a real headless browser (Debian's chromium and chromium-driver, driven by
selenium).

The fleet of 200 games is written straight into the store (a start job each, then the transitions a
controller would make: running on two nodes, a few unreachable), and served by the HTTP surface
alone over that store, as a standby replica serves it: 200 engines would take minutes, and the page
reads only the REST and watch APIs. The action goes to one real game of a real controller.

``RTMANAGER_CONSOLE_SCREENSHOT=docs/console.png`` keeps the fleet view's screenshot,
``RTMANAGER_CONSOLE_GAME_SCREENSHOT=docs/console-game.png`` a game's page after the action.
"""

from __future__ import annotations

import asyncio
import collections
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.common.exceptions import (
    NoAlertPresentException,
    NoSuchElementException,
    StaleElementReferenceException,
)
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from controller.admission import Admission
from controller.config import HttpSettings
from controller.http import HttpDeps, HttpServer
from controller.metrics import Metrics
from desired.db.store import Store
from desired.drains import DrainRequest
from desired.jobs import ImageAllowlist, Job, RecordDefaults
from desired.model import ErrorCode, JobKind, OpSource
from desired.paging import PageRequest, RuntimeFilter
from desired.policy import CrashPolicy
from desired.rollouts import RolloutRequest
from desired.transitions import Probe
from desired.values import Crash
from desired.versions import VersionStatus
from tests.support.api import FAST, STUB_10, STUB_11, engine_turn
from tests.support.net import free_port
from tests.support.waits import eventually

VIEWER = "v" * 32
OPERATOR = "o" * 32
DEFAULTS = RecordDefaults(docker_network="net", state_root="/srv/games", engine_port=8080)
GAMES = 200


@pytest.fixture(scope="module")
def browser():
    for tool in ("chromium", "chromedriver"):
        assert shutil.which(tool), f"{tool} is missing: apt-get install chromium chromium-driver"
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1000", "--disable-extensions", "--no-first-run"):
        options.add_argument(arg)
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        yield driver
    finally:
        driver.quit()


async def run(fn: Callable[..., Any], *args: Any) -> Any:
    """A blocking browser call, off the event loop that serves the page."""
    return await asyncio.to_thread(fn, *args)


def until(driver: webdriver.Chrome, cond: Callable[[webdriver.Chrome], Any], timeout: float = 10) -> Any:
    """Wait for ``cond``; an element the page redrew meanwhile (it redraws on every change) is looked up
    again."""
    return WebDriverWait(driver, timeout, poll_frequency=0.02,
                         ignored_exceptions=(StaleElementReferenceException, NoSuchElementException)).until(cond)


def read(driver: webdriver.Chrome, what: Callable[[webdriver.Chrome], Any]) -> Any:
    """What ``what`` reads from the page, read again when the page redrew in the middle of it."""
    for _ in range(20):
        try:
            return what(driver)
        except StaleElementReferenceException:
            continue
    raise AssertionError("the page never held still")


def sign_in(driver: webdriver.Chrome, base: str, token: str, where: str = "") -> None:
    driver.get(base + "/ui" + where)
    driver.execute_script("sessionStorage.clear()")
    driver.get(base + "/ui" + where)
    until(driver, lambda d: d.find_element(By.ID, "login").is_displayed())
    d = driver
    d.find_element(By.ID, "token").send_keys(token)
    d.find_element(By.ID, "signin").click()
    until(driver, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-loaded") == "1")


def shown_counts(driver: webdriver.Chrome) -> dict[str, dict[str, int]]:
    cards = {c.get_attribute("data-status"): int(c.find_element(By.CLASS_NAME, "n").text)
             for c in driver.find_elements(By.CSS_SELECTOR, "#by-status .card")}
    nodes = {r.get_attribute("data-key"): int(r.find_element(By.CLASS_NAME, "n").text)
             for r in driver.find_elements(By.CSS_SELECTOR, "#by-node tr")}
    versions = {r.get_attribute("data-key"): int(r.find_element(By.CLASS_NAME, "n").text)
                for r in driver.find_elements(By.CSS_SELECTOR, "#by-version tr")}
    return {"status": cards, "node": nodes, "version": versions}


async def _ready() -> dict[str, str]:
    return {}


async def test_the_fleet_view_of_200_games_is_right_live_and_a_read_token_cannot_act(pool, browser, tmp_path: Path):
    store = Store(pool)
    games = [f"fleet-{i:03d}" for i in range(GAMES)]
    image = {g: STUB_11 if i % 4 == 0 else STUB_10 for i, g in enumerate(games)}
    await store.create_version("1.0", STUB_10, VersionStatus.ACTIVE, "")
    await store.create_version("1.1", STUB_11, VersionStatus.ACTIVE, "")
    await store.submit_many([Job(kind=JobKind.START, game_id=g, source=OpSource.LOBBY, image_ref=image[g])
                             for g in games], DEFAULTS)
    for i, g in enumerate(games[:150]):  # 150 running on two nodes, the rest still starting
        rec = await store.mark_starting(await store.get(g), rollback_image=None)
        rec = await store.mark_running(rec, container_id=f"{i:064d}", image=image[g],
                                       node="node1" if i % 3 else "node2")
    rollout, moving = await store.create_rollout(RolloutRequest(target_version="1.1", source_version="1.0",
                                                           game_ids=(games[5], games[6], games[7])),
                                            ImageAllowlist("galaxy/*"), False)
    late = games[9]  # a schedule of a minute, the last turn ten minutes ago
    await pool.execute("UPDATE runtime_records SET turn_interval = 60, last_turn_at = now() - interval '10 min',"
                       " clock_from = now() - interval '10 min' WHERE game_id = $1", late)
    drain = await store.create_drain(DrainRequest(node="node2", max_parallel=2, deadline=600), OpSource.ADMIN)
    unreachable = games[:4]
    for g in unreachable:
        await store.record_observation(await store.get(g), Probe(healthy=False), unreachable_after=1,
                                       generation_timeout=600)
    records, _ = await store.page(PageRequest(filter=RuntimeFilter(), after=None, limit=1000))
    assert len(records) == GAMES
    expected = {"status": dict(collections.Counter(r.status.value for r in records)),
                "node": dict(collections.Counter(r.node_id or "(this host)" for r in records)),
                "version": dict(collections.Counter(r.engine_version or "(unregistered)" for r in records))}
    assert expected["status"].get("engine_unreachable") == 4, expected

    tokens = tmp_path / "tokens"
    tokens.write_text(f"viewer read {VIEWER}\nops operate {OPERATOR}\n")
    port = free_port()
    server = HttpServer(HttpDeps(
        http=HttpSettings(http_port=port, http_host="127.0.0.1", api_token="", api_tokens_file=str(tokens)),
        allowlist=ImageAllowlist("galaxy/*"), store=store, admission=Admission(store, DEFAULTS, wake=lambda g: None),
        metrics=Metrics(), is_leader=lambda: False, readiness=_ready, results_changed=store.outbox.next,
        watch=store, drains=store, rollouts=store))
    await server.start()
    base = f"http://127.0.0.1:{port}"
    try:
        t0 = time.monotonic()
        await run(sign_in, browser, base, VIEWER)
        await run(until, browser, lambda d: d.find_element(By.ID, "total").get_attribute("data-total") == str(GAMES))
        loaded = time.monotonic() - t0
        assert await run(read, browser, shown_counts) == expected
        trouble = await run(read, browser, lambda d: {
            r.get_attribute("data-game") for r in d.find_elements(By.CSS_SELECTOR, "#trouble tr.bad")})
        assert trouble == {*unreachable, late}
        assert "turn late by" in await run(read, browser, lambda d: d.find_element(
            By.CSS_SELECTOR, f'#trouble tr[data-game="{late}"]').text)
        states = await run(read, browser, lambda d: [c.text for c in d.find_elements(
            By.CSS_SELECTOR, f'[data-rollout="{rollout.id}"] td[data-state]')])
        assert len(states) == min(len(moving), 12) and all(states), states
        assert browser.find_element(By.ID, "who").text == "viewer (read)"
        assert "node2" in await run(read, browser, lambda d: d.find_element(
            By.CSS_SELECTOR, f'[data-drain="{drain.id}"]').text)
        await run(until, browser, lambda d: d.find_element(By.ID, "live").text == "live")

        # A crash loop committed now is on the page within a second.
        victim = games[100]
        rec = await store.get(victim)
        committed = time.monotonic()
        await store.record_crash(rec, Crash(code=ErrorCode.ENGINE_UNHEALTHY, detail="exit 3", container_id=None,
                                            exit_code=3, log_tail="turn 7: loading\npanic: no such planet\n"),
                                 CrashPolicy(limit=1, window=60, backoff_max=1))
        row = f'#trouble tr[data-game="{victim}"]'
        await run(until, browser, lambda d: d.find_elements(By.CSS_SELECTOR, row), 5)
        seen = time.monotonic() - committed
        assert seen < 1.0, f"the crash loop took {seen:.2f}s to show"
        assert "crash loop" in await run(read, browser, lambda d: d.find_element(By.CSS_SELECTOR, row).text)
        shot = os.environ.get("RTMANAGER_CONSOLE_SCREENSHOT")
        if shot:
            browser.save_screenshot(shot)

        # The games list, filtered.
        await run(browser.find_element(By.CSS_SELECTOR, 'nav a[href="#games"]').click)
        await run(browser.find_element(By.ID, "filter").send_keys, "unreachable")
        await run(until, browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#game-list tbody tr")) == 4)

        # A read token: no action buttons on a game's page, and a POST from the page is refused.
        await run(browser.execute_script, "location.hash = arguments[0]", f"#game/{victim}")
        await run(until, browser, lambda d: d.find_element(
            By.CSS_SELECTOR, '#record td[data-field="crash_count"]').text == "1")
        assert "panic: no such planet" in browser.find_element(By.ID, "log-tail").text
        first = await run(read, browser, lambda d: [c.text for c in d.find_elements(
            By.CSS_SELECTOR, "#operations tbody tr")[0].find_elements(By.TAG_NAME, "td")])
        assert first[1] == "restart", "the crash's note leads the operation log"
        assert browser.find_elements(By.CSS_SELECTOR, "#actions button") == []
        status = await run(browser.execute_async_script, """
            const done = arguments[arguments.length - 1];
            fetch('/api/v1/runtimes/' + arguments[0] + '/restart', {method: 'POST', headers: {
                Authorization: 'Bearer ' + sessionStorage.getItem('rtmanager-token')}}).then(r => done(r.status));
        """, games[10])
        assert status == 403
        # The files are public, with a strict policy; the data is not.
        assert (await run(browser.execute_async_script, """
            const done = arguments[arguments.length - 1];
            fetch('/api/v1/runtimes').then(r => done(r.status));""")) == 401
    finally:
        await server.stop()
    print(f"200 games loaded in {loaded:.2f}s, a crash loop shown {seen:.2f}s after its commit")


async def test_the_console_files_carry_a_strict_content_security_policy(pool, tmp_path: Path) -> None:
    import aiohttp

    store = Store(pool)
    port = free_port()
    server = HttpServer(HttpDeps(
        http=HttpSettings(http_port=port, http_host="127.0.0.1", api_token=VIEWER, api_tokens_file=""),
        allowlist=ImageAllowlist("galaxy/*"), store=store, admission=Admission(store, DEFAULTS, wake=lambda g: None),
        metrics=Metrics(), is_leader=lambda: True, readiness=_ready, results_changed=store.outbox.next, watch=store))
    await server.start()
    try:
        async with aiohttp.ClientSession() as http:
            for path in ("/ui", "/ui/", "/ui/console.js", "/ui/console.css"):
                async with http.get(f"http://127.0.0.1:{port}{path}") as resp:
                    assert resp.status == 200, path
                    csp = resp.headers["Content-Security-Policy"]
                    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
                    assert resp.headers["X-Content-Type-Options"] == "nosniff"
                    body = await resp.text()
                    assert "http://" not in body and "https://" not in body, f"{path} fetches from elsewhere"
            async with http.get(f"http://127.0.0.1:{port}/ui/index.html") as resp:
                html = await resp.text()
            assert "<script>" not in html and " style=" not in html and " on" not in html.replace("\n", " ").split(
                "<body", 1)[1].split(">", 1)[0]
            async with http.get(f"http://127.0.0.1:{port}/ui/../controller/http.py") as resp:
                assert resp.status == 404
            async with http.get(f"http://127.0.0.1:{port}/api/v1/whoami",
                                headers={"Authorization": f"Bearer {VIEWER}"}) as resp:
                me = await resp.json()
            assert me["name"] == "default" and me["role"] == "admin" and me["operate"] is True
    finally:
        await server.stop()


async def test_an_action_pressed_on_the_page_reaches_the_engine(api, browser) -> None:
    await api.start(**FAST)
    game = f"ui-{api.env['RTMANAGER_INSTANCE'][-8:]}"
    _, res = await api.job(game, "start", {"image_ref": STUB_10})
    assert res["outcome"] == "success", res

    async def turn_known() -> bool:
        _, body = await api.get(f"/api/v1/runtimes/{game}")
        return body["turn"] is not None
    await eventually(turn_known, what="the engine's turn known")
    before = engine_turn(api, game)

    await run(sign_in, browser, api.base, api.token, f"#game/{game}")
    await run(until, browser, lambda d: d.find_elements(By.ID, "action-force-next-turn"))
    labels = [b.text for b in browser.find_elements(By.CSS_SELECTOR, "#actions button")]
    assert labels == ["restart", "patch", "pause", "resume", "force a turn", "stop"]
    await run(browser.find_element(By.ID, "action-force-next-turn").click)

    def confirm(d: webdriver.Chrome) -> bool:
        try:
            alert = d.switch_to.alert
        except NoAlertPresentException:
            return False
        assert game in alert.text
        alert.accept()
        return True
    await run(until, browser, confirm)
    await run(until, browser, lambda d: d.find_element(By.ID, "action-result").get_attribute("data-status"), 20)
    assert browser.find_element(By.ID, "action-result").text.startswith("force a turn: 200 success"), \
        browser.find_element(By.ID, "action-result").text
    assert engine_turn(api, game) == before + 1
    await run(until, browser, lambda d: "force_next_turn" in d.find_element(By.ID, "operations").text)
    shot = os.environ.get("RTMANAGER_CONSOLE_GAME_SCREENSHOT")
    if shot:
        browser.save_screenshot(shot)
    _, ops = await api.get(f"/api/v1/operations?game_id={game}&op=force_next_turn")
    assert ops["operations"][0]["actor"] == "token:default"
