"""The dashboard and orderlog.js in a real headless browser (Debian's chromium driven by Playwright).

The server runs as a real `orderlog serve` subprocess, so the test can stop it and start it
again on the same port and database while the page stays open. Orders are placed from Python
(through orderlog.client, or straight into the SQLite file while the server is down).
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import trio

from orderlog.auth import mint
from orderlog.client import connect
from orderlog.domain import Command, Principal
from orderlog.records import Request
from orderlog.store import Store

from conftest import cli_env

CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-features=LocalNetworkAccessChecks",
]
SECRET = "browser-test-secret-0123456789-abcdef"
START_TIMEOUT = 20.0  # seconds for `orderlog serve` to say it listens
PAGE_TIMEOUT = 15_000  # ms for anything on the page (a reconnect waits up to 4 s of backoff)
SCREENSHOT = Path("/tmp/orderlog-dashboard.png")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m orderlog.cli serve` on a fixed port, started and stopped by the test."""

    def __init__(self, db: Path, port: int, *extra: str):
        self.db, self.port, self.extra = db, port, extra
        self.proc: subprocess.Popen | None = None
        self.log: list[str] = []

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/ws"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "orderlog.cli", "serve", "--db", str(self.db), "--port", str(self.port),
             "--jwt-secret", SECRET, *self.extra],
            env=cli_env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True, cwd=self.db.parent,
        )
        listening = threading.Event()

        def read(stream) -> None:
            for line in stream:
                self.log.append(line)
                if "event=listening" in line:
                    listening.set()

        threading.Thread(target=read, args=(self.proc.stderr,), daemon=True).start()
        if not listening.wait(START_TIMEOUT):
            self.stop()
            raise AssertionError("the server did not start:\n" + "".join(self.log))

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
            raise AssertionError("the server did not stop within 15 s of SIGTERM")
        finally:
            self.proc = None
        assert code == 0, "".join(self.log)


def token(sub: str, role: str) -> str:
    return mint(sub, role, 600, time.time(), SECRET, "HS256")


def send_commands(url: str, sub: str, role: str, commands: list[tuple[str, str | None, dict]]) -> list[dict]:
    """Send commands through the Python client (each waits for its ack); return the acks."""

    async def main() -> list[dict]:
        with trio.fail_after(10):
            async with connect(url, token(sub, role)) as client:
                return [await client.command(name, order_id=order_id, data=data)
                        for name, order_id, data in commands]

    return trio.run(main)


def place_directly(db: Path, user: str, order_id: str) -> None:
    """Place an order through the store's command path while no server runs."""
    store = Store.open(str(db))
    try:
        command = Command("place_order", uuid.uuid4().hex, order_id,
                          data={"items": [{"sku": "kibble", "quantity": 1}]})
        [outcome] = store.execute_batch([Request(Principal(user, "customer"), command, "2026-11-25T17:00:00.000Z")]).outcomes
        assert hasattr(outcome, "seq"), outcome
    finally:
        store.close()


def order(sku: str = "kibble", quantity: int = 2) -> dict:
    return {"items": [{"sku": sku, "quantity": quantity}]}


@pytest.fixture
def browser(chromium: str):
    """A headless Debian chromium under Playwright (conftest's `chromium` installs it when missing)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, timeout=30_000)
        try:
            yield browser
        finally:
            browser.close()


def test_dashboard_shows_live_orders_and_resumes_after_a_restart(tmp_path: Path, browser) -> None:
    """The dashboard shows orders live, drives a staff action, and after a server restart resumes with the order placed while it was down and no duplicate row."""
    from playwright.sync_api import expect

    db = tmp_path / "orderlog.db"
    server = ServerProcess(db, free_port())
    server.start()
    try:
        send_commands(server.url, "s1", "staff",
                      [("add_stock", None, {"sku": "kibble", "quantity": 100, "name": "Kibble 2 kg"}),
                       ("add_stock", None, {"sku": "catnip", "quantity": 4, "name": "Catnip"})])
        send_commands(server.url, "alice", "customer", [("place_order", "o-alice-1", order())])

        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.set_default_timeout(PAGE_TIMEOUT)
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        # The page runs under the server's Content-Security-Policy: nothing it does may be refused.
        page.on("console", lambda m: errors.append(m.text) if "Content Security Policy" in m.text else None)
        page.add_init_script("document.addEventListener('securitypolicyviolation', "
                             "e => console.error('Content Security Policy violation: ' + e.violatedDirective))")
        page.goto(f"http://127.0.0.1:{server.port}/dashboard")

        # Sign in: the token goes to sessionStorage, never to the address bar.
        staff_token = token("s1", "staff")
        page.fill("#token", staff_token)
        page.click("#sign-in-form button[type=submit]")
        expect(page.locator("#connection-text")).to_have_text("connected")
        assert staff_token not in page.url
        assert page.evaluate("sessionStorage.getItem('orderlog.token')") == staff_token
        rows = page.locator("#orders tbody tr")
        expect(page.locator('tr[data-order-id="o-alice-1"]')).to_have_attribute("data-status", "placed")
        expect(page.locator('#stock tr[data-sku="kibble"] td').nth(1)).to_have_text("98")

        # An order placed from Python appears live.
        send_commands(server.url, "bob", "customer", [("place_order", "o-bob-1", order("catnip", 1))])
        expect(page.locator('tr[data-order-id="o-bob-1"]')).to_have_attribute("data-status", "placed")
        expect(page.locator('#stock tr[data-sku="catnip"] td').nth(1)).to_have_text("3")

        # Staff buttons send commands; the row follows the event.
        page.click('tr[data-order-id="o-alice-1"] button[data-action="approve"]')
        expect(page.locator('tr[data-order-id="o-alice-1"]')).to_have_attribute("data-status", "approved")
        expect(page.locator('tr[data-order-id="o-alice-1"] button[data-action="ship"]')).to_be_visible()

        # Stop the server: the page says it is reconnecting.
        server.stop()
        expect(page.locator("#connection-text")).to_contain_text("reconnecting in")
        reader = Store.open(str(db), readonly=True)
        head_before = reader.head()
        reader.close()

        # An order placed while the server is down (straight into the log).
        place_directly(db, "carol", "o-carol-1")

        # Start it again on the same port and file: the page resumes and shows the missed order.
        server.start()
        expect(page.locator('tr[data-order-id="o-carol-1"]')).to_have_attribute("data-status", "placed")
        expect(page.locator("#connection-text")).to_have_text(f"resumed from seq {head_before}")
        send_commands(server.url, "dave", "customer", [("place_order", "o-dave-1", order())])
        expect(page.locator('tr[data-order-id="o-dave-1"]')).to_be_visible()
        expect(page.locator('#stock tr[data-sku="kibble"] td').nth(1)).to_have_text("95")

        ids = [rows.nth(i).get_attribute("data-order-id") for i in range(rows.count())]
        assert sorted(ids) == ["o-alice-1", "o-bob-1", "o-carol-1", "o-dave-1"], ids
        expect(page.locator('.tile[data-status="all"] .n')).to_have_text("4")
        assert staff_token not in page.url
        assert errors == []
        page.screenshot(path=str(SCREENSHOT), full_page=True)
    finally:
        server.stop()


def test_dashboard_refused_token_shows_sign_in(tmp_path: Path, browser) -> None:
    """A token the server refuses (4001) brings back the sign-in form with the reason and clears the stored token."""
    from playwright.sync_api import expect

    server = ServerProcess(tmp_path / "orderlog.db", free_port())
    server.start()
    try:
        page = browser.new_page()
        page.set_default_timeout(PAGE_TIMEOUT)
        page.goto(f"http://127.0.0.1:{server.port}/")
        page.fill("#token", mint("eve", "staff", 600, time.time(), "another-secret-0123456789-abcdefgh", "HS256"))
        page.click("#sign-in-form button[type=submit]")
        expect(page.locator("#sign-in-error")).to_contain_text("invalid token")
        expect(page.locator("#sign-in")).to_be_visible()
        assert page.evaluate("sessionStorage.getItem('orderlog.token')") is None
    finally:
        server.stop()


def test_orderlog_js_sends_the_token_in_an_auth_message_not_the_url(tmp_path: Path, browser) -> None:
    """orderlog.js (and so the dashboard) puts the token in a first `auth` message, never in the WebSocket URL; `tokenInUrl` keeps `?token=` as an option."""
    from playwright.sync_api import expect

    server = ServerProcess(tmp_path / "orderlog.db", free_port())
    server.start()
    try:
        page = browser.new_page()
        page.set_default_timeout(PAGE_TIMEOUT)
        sockets: list[dict] = []

        def opened(ws) -> None:
            seen = {"url": ws.url, "sent": []}
            sockets.append(seen)
            ws.on("framesent", lambda payload: seen["sent"].append(payload))

        page.on("websocket", opened)
        console: list[str] = []
        page.on("console", lambda message: console.append(message.text))
        page.goto(f"http://127.0.0.1:{server.port}/")
        staff_token = token("s1", "staff")
        page.fill("#token", staff_token)
        page.click("#sign-in-form button[type=submit]")
        expect(page.locator("#connection-text")).to_have_text("connected")
        assert sockets and all(staff_token not in s["url"] and "token=" not in s["url"] for s in sockets), sockets
        assert json.loads(sockets[0]["sent"][0]) == {"type": "auth", "token": staff_token}

        # The option: the token in the query string, for whoever needs it there.
        welcome = page.evaluate("""async ([url, token]) => {
            const { OrderlogClient } = await import("/orderlog.js");
            const client = new OrderlogClient(url, token, { tokenInUrl: true });
            const welcome = await new Promise((resolve) => {
              client.addEventListener("welcome", (e) => resolve(e.detail));
              client.start();
            });
            client.close();
            return welcome;
        }""", [server.url, token("s2", "auditor")])
        assert welcome["user"] == "s2"
        assert any("token=" in s["url"] and not s["sent"] for s in sockets), sockets
        assert not any(staff_token in line for line in console)
    finally:
        server.stop()


def test_dashboard_on_a_refused_origin_says_how_to_allow_it(tmp_path: Path, browser) -> None:
    """Behind --allow-origin without its own origin, the dashboard shows the origin to add instead of only cycling "reconnecting"."""
    from playwright.sync_api import expect

    port = free_port()
    server = ServerProcess(tmp_path / "orderlog.db", port, "--allow-origin", "https://shop.example")
    server.start()
    try:
        page = browser.new_page()
        page.set_default_timeout(PAGE_TIMEOUT)
        console: list[str] = []
        page.on("console", lambda message: console.append(message.text))
        page.goto(f"http://127.0.0.1:{port}/")
        staff_token = token("s1", "staff")
        page.fill("#token", staff_token)
        page.click("#sign-in-form button[type=submit]")
        hint = page.locator("#hint")
        expect(hint).to_be_visible()
        expect(hint).to_contain_text(f"--allow-origin http://127.0.0.1:{port}")
        expect(page.locator("#connection-text")).to_contain_text("reconnecting in")
        assert not any(staff_token in line for line in console), console
    finally:
        server.stop()


def test_dashboard_on_a_seeded_log_starts_from_snapshots(seeded_db: Path, browser) -> None:
    """On a seeded log the dashboard shows every status count, the newest orders first and every
    stock level (from snapshots, not a replay), and an order placed elsewhere appears live."""
    from playwright.sync_api import expect

    store = Store.open(str(seeded_db), readonly=True)
    try:
        state = store.stored_projections()
    finally:
        store.close()
    counts = {s: sum(o.status == s for o in state.orders.values())
              for s in ("placed", "approved", "shipped", "delivered", "cancelled")}
    newest = sorted(state.orders.values(), key=lambda o: (o.created_at, o.order_id), reverse=True)
    server = ServerProcess(seeded_db, free_port())
    server.start()
    try:
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.set_default_timeout(PAGE_TIMEOUT)
        page.goto(f"http://127.0.0.1:{server.port}/dashboard")
        page.fill("#token", token("s1", "staff"))
        page.click("#sign-in-form button[type=submit]")
        expect(page.locator('.tile[data-status="all"] .n')).to_have_text(str(len(state.orders)))
        for status, n in counts.items():
            expect(page.locator(f'.tile[data-status="{status}"] .n')).to_have_text(str(n))
        rows = page.locator("#orders tbody tr")
        expect(rows).to_have_count(min(500, len(newest)))
        assert [rows.nth(i).get_attribute("data-order-id") for i in range(3)] == [o.order_id for o in newest[:3]]
        expect(page.locator("#stock tbody tr")).to_have_count(len(state.stock))
        sku, level = sorted(state.stock.items())[0]
        expect(page.locator(f'#stock tr[data-sku="{sku}"] td').nth(1)).to_have_text(str(level.available))

        send_commands(server.url, "s1", "staff", [("add_stock", None, {"sku": "kibble", "quantity": 10}),
                                                 ("place_order", "o-live-1", {**order(), "customer": "zoe"})])
        expect(page.locator('tr[data-order-id="o-live-1"]')).to_have_attribute("data-status", "placed")
        expect(page.locator('.tile[data-status="all"] .n')).to_have_text(str(len(state.orders) + 1))
        expect(page.locator('#stock tr[data-sku="kibble"] td').nth(1)).to_have_text("8")
    finally:
        server.stop()


def test_dashboard_counts_up_while_the_orders_snapshot_comes_in(tmp_path: Path, browser) -> None:
    """Until the last frame of the `orders` snapshot is in, the tiles count the rows so far and
    the table is not drawn ("Loading orders: n of total"); with the last frame, the table is.
    The page talks to the real server through Playwright's WebSocket route, which holds back
    the server's frames from the last snapshot frame of `orders` on until the test lets them go."""
    import re

    from playwright.sync_api import expect

    db = tmp_path / "many.db"
    done = subprocess.run([sys.executable, "-m", "orderlog.cli", "seed", "--db", str(db), "--commands", "6000",
                           "--seed", "3"], env=cli_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    store = Store.open(str(db), readonly=True)
    try:
        total = len(store.stored_projections().orders)
    finally:
        store.close()
    assert total > 1000  # so that the snapshot takes several frames
    server = ServerProcess(db, free_port())
    server.start()
    held: list[str] = []
    routes: list = []
    holding = [False]

    def route(ws) -> None:
        upstream = ws.connect_to_server()

        def from_server(message) -> None:
            if isinstance(message, str) and message.startswith('{"type":"snapshot","channel":"orders"') \
                    and '"last":true' in message:
                holding[0] = True
            if holding[0]:
                held.append(message)
            else:
                ws.send(message)

        upstream.on_message(from_server)
        routes.append(ws)

    try:
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.set_default_timeout(PAGE_TIMEOUT)
        page.route_web_socket(re.compile(r".*/v1/ws.*"), route)
        page.goto(f"http://127.0.0.1:{server.port}/dashboard")
        page.fill("#token", token("s1", "staff"))
        page.click("#sign-in-form button[type=submit]")
        loading = page.locator("#orders-empty")
        expect(loading).to_have_text(re.compile(r"Loading orders: [\d,.\s]+ of [\d,.\s]+…"))
        assert held, "the last frame of the orders snapshot was not held back"
        shown = int(page.locator('.tile[data-status="all"] .n').inner_text())
        got, of = (int(re.sub(r"\D", "", part)) for part in loading.inner_text()[len("Loading orders: "):-1].split(" of "))
        assert 0 < shown == got < total == of
        expect(page.locator("#orders tbody tr")).to_have_count(0)
        holding[0] = False
        for message in held:
            routes[-1].send(message)
        expect(page.locator('.tile[data-status="all"] .n')).to_have_text(str(total))
        expect(page.locator("#orders tbody tr")).to_have_count(min(500, total))
        expect(loading).to_be_hidden()
    finally:
        server.stop()


def test_dashboard_starts_over_after_a_restored_backup(tmp_path: Path, browser) -> None:
    """The issue's scenario in the browser: a backup, more orders the page shows, a restore, new
    orders past the page's seq; the page (through orderlog.js's anchored resume) gets
    resync_required and shows exactly the restored log, never the lost orders next to the new ones."""
    from playwright.sync_api import expect

    from test_anchor import backup, restore

    db, copy = tmp_path / "orderlog.db", tmp_path / "backup.db"
    server = ServerProcess(db, free_port())
    server.start()
    try:
        send_commands(server.url, "s1", "staff", [("add_stock", None, {"sku": "kibble", "quantity": 1000})])
        send_commands(server.url, "alice", "customer", [("place_order", f"kept-{n}", order("kibble", 1)) for n in range(5)])
        backup(db, copy)  # SQLite's online backup API, while the server runs
        send_commands(server.url, "alice", "customer", [("place_order", f"lost-{n}", order("kibble", 1)) for n in range(5)])

        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.set_default_timeout(PAGE_TIMEOUT)
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(f"http://127.0.0.1:{server.port}/")
        page.fill("#token", token("s1", "staff"))
        page.click("#sign-in-form button[type=submit]")
        expect(page.locator('tr[data-order-id="lost-4"]')).to_be_visible()
        expect(page.locator('.tile[data-status="all"] .n')).to_have_text("10")
        expect(page.locator('#stock tr[data-sku="kibble"] td').nth(1)).to_have_text("990")

        server.stop()
        expect(page.locator("#connection-text")).to_contain_text("reconnecting in")
        restore(copy, db)
        for n in range(8):  # the restored log grows past the seq the page holds (21)
            place_directly(db, "alice", f"after-{n}")
        server.start()

        expect(page.locator('tr[data-order-id="after-0"]')).to_be_visible()
        expect(page.locator('tr[data-order-id^="lost-"]')).to_have_count(0)
        expect(page.locator('.tile[data-status="all"] .n')).to_have_text("13")
        expect(page.locator('#stock tr[data-sku="kibble"] td').nth(1)).to_have_text("987")
        expect(page.locator("#toast")).to_contain_text("The server's log changed")
        rows = page.locator("#orders tbody tr")
        ids = sorted(rows.nth(i).get_attribute("data-order-id") for i in range(rows.count()))
        assert ids == sorted([f"kept-{n}" for n in range(5)] + [f"after-{n}" for n in range(8)]), ids
        assert "lost-" not in page.locator("#activity").inner_text()
        assert errors == []
    finally:
        server.stop()


def test_orderlog_js_anchors_on_the_newest_event_with_a_hash(tmp_path: Path, browser) -> None:
    """orderlog.js resumes with since = its last event and the anchor of the newest event that had a
    hash (a redacted one has none), with the log_id of what it delivered."""
    from test_anchor import REDACTED_TAIL, RESUME_AFTER_REDACTED, ScriptedFeed

    feed = ScriptedFeed(REDACTED_TAIL)
    ports: list[int] = []
    listening, done = threading.Event(), threading.Event()

    async def run_feed() -> None:
        async with trio.open_nursery() as nursery:
            ports.append((await nursery.start(feed.serve)).port)
            listening.set()
            while not done.is_set():
                await trio.sleep(0.05)
            nursery.cancel_scope.cancel()

    feeder = threading.Thread(target=trio.run, args=(run_feed,), daemon=True)
    feeder.start()
    server = ServerProcess(tmp_path / "orderlog.db", free_port())  # serves /orderlog.js to the page
    server.start()
    try:
        assert listening.wait(10)
        page = browser.new_page(bypass_csp=True)  # the page talks to the stand-in on another port
        page.set_default_timeout(PAGE_TIMEOUT)
        page.goto(f"http://127.0.0.1:{server.port}/")
        page.evaluate("""async (url) => {
            const { OrderlogClient } = await import("/orderlog.js");
            window.seen = [];
            const client = new OrderlogClient(url, "any-token", { backoffStart: 50, backoffCap: 100 });
            client.subscribe("inventory", { since: 0, onEvent: (e) => window.seen.push(e.seq) });
            client.start();
        }""", f"ws://127.0.0.1:{ports[0]}/v1/ws")
        deadline = time.monotonic() + 10
        while (len(feed.subscribes) < 2 or page.evaluate("window.seen.length") < 2) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert page.evaluate("window.seen") == [5, 7]
        first, resumed = feed.subscribes
        assert "anchor" not in first and first["since"] == 0
        assert {k: resumed.get(k) for k in ("since", "log_id", "anchor")} == RESUME_AFTER_REDACTED, resumed
    finally:
        done.set()
        server.stop()
        feeder.join(10)


def test_orderlog_js_token_provider_refreshes_and_resumes_with_a_fresh_token(tmp_path: Path, browser) -> None:
    """orderlog.js with an async token provider of short-lived tokens: it refreshes in band (the
    connection outlives the first token), and after a restart that comes once the last token
    expired it connects with a fresh one and resumes from its last seq without gap."""
    ttl = 4.0
    db = tmp_path / "orderlog.db"
    server = ServerProcess(db, free_port())
    server.start()
    issued: list[float] = []

    def fresh_token() -> str:
        issued.append(time.time())
        return mint("s1", "staff", ttl, time.time(), SECRET, "HS256")

    def wait_until(condition: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not page.evaluate(condition):
            assert time.monotonic() < deadline, f"not within {timeout} s: {condition}"
            page.wait_for_timeout(50)  # lets the page's calls to fresh_token through

    try:
        send_commands(server.url, "s1", "staff", [("add_stock", None, {"sku": "kibble", "quantity": 100})])
        page = browser.new_page()
        page.set_default_timeout(PAGE_TIMEOUT)
        page.expose_function("freshToken", fresh_token)
        page.goto(f"http://127.0.0.1:{server.port}/")
        page.evaluate("""async (url) => {
            const { OrderlogClient } = await import("/orderlog.js");
            window.seen = [];
            window.texts = [];
            const client = new OrderlogClient(url, async () => await window.freshToken(), {
              backoffStart: 100, backoffCap: 300, onStatus: (s) => window.texts.push(s.text) });
            client.subscribe("orders", { since: 0, onEvent: (e) => window.seen.push([e.seq, e.prev, e.stream]) });
            client.start();
            window.client = client;
        }""", server.url)
        wait_until("window.texts.includes('connected')")
        page.wait_for_timeout(ttl * 1500)  # beyond the first token's life, on one connection
        assert len(issued) >= 2
        assert page.evaluate("window.texts") == ["connecting…", "connected"]
        send_commands(server.url, "bob", "customer", [("place_order", "o-1", order())])
        wait_until("window.seen.length === 1")
        [[first_seq, _, _]] = page.evaluate("window.seen")

        server.stop()
        place_directly(db, "carol", "o-while-down")
        page.wait_for_timeout((ttl + 0.5) * 1000)  # every token issued before the stop has expired
        issued_before = len(issued)
        server.start()
        wait_until("window.seen.length === 2", 15)
        [_, [seq, prev, stream]] = page.evaluate("window.seen")
        assert stream == "order:o-while-down" and prev == first_seq
        assert len(issued) > issued_before
        assert f"resumed from seq {first_seq}" in page.evaluate("window.texts")
        assert page.evaluate("window.client.status.state") == "resumed"
        page.evaluate("window.client.close()")
    finally:
        server.stop()


def test_orderlog_js_rotates_through_several_urls_and_resumes_on_the_next(tmp_path: Path, browser) -> None:
    """orderlog.js given two URLs: it skips the first while nothing answers there, connects to the
    second, and once that server is gone moves back to the first, where the same log now runs,
    resuming without gap or duplicate."""
    db = tmp_path / "orderlog.db"
    first, second = ServerProcess(db, free_port()), ServerProcess(db, free_port())
    second.start()
    try:
        send_commands(second.url, "s1", "staff", [("add_stock", None, {"sku": "kibble", "quantity": 10})])
        page = browser.new_page(bypass_csp=True)  # the page stays while its own server goes away
        page.set_default_timeout(PAGE_TIMEOUT)
        page.goto(f"http://127.0.0.1:{second.port}/")
        page.evaluate("""async ([urls, token]) => {
            const { OrderlogClient } = await import("/orderlog.js");
            window.events = [];
            window.client = new OrderlogClient(urls, token, { backoffStart: 50, backoffCap: 200 });
            window.client.subscribe("orders", { since: 0, onEvent: (e) => window.events.push([e.seq, e.prev, e.stream]) });
            window.client.start();
        }""", [[first.url, second.url], token("s2", "staff")])
        refused = page.evaluate("""async () => {
            const { OrderlogClient } = await import("/orderlog.js");
            return [[], [""], [42], ""].map((urls) => {
                try { new OrderlogClient(urls, "t"); return "accepted"; } catch (e) { return e.name; }
            });
        }""")
        assert refused == ["TypeError"] * 4
        send_commands(second.url, "c1", "customer", [("place_order", "o-1", order("kibble", 1))])
        page.wait_for_function("window.events.length === 1")
        assert page.evaluate("window.client.url") == second.url
        second.stop()
        place_directly(db, "c2", "o-2")
        first.start()
        page.wait_for_function("window.events.length === 2")
        (seq1, _, stream1), (seq2, prev2, stream2) = page.evaluate("window.events")
        assert (stream1, stream2) == ("order:o-1", "order:o-2") and prev2 == seq1 < seq2
        assert page.evaluate("window.client.url") == first.url
    finally:
        first.stop()
        second.stop()
