"""orderlog.client.asyncio against a real `orderlog serve` subprocess that is killed (SIGKILL)
and started again on the same port and file. The tests are plain functions around asyncio.run,
outside trio."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from orderlog.client.asyncio import AuthenticationFailed, TokenUnavailable, connect
from test_client import FAST, free_port, place_directly
from test_crash import ServerProcess
from wsclient import TIMEOUT, token

ORDER = {"items": [{"sku": "kibble", "quantity": 1}]}


def serve(db: Path, port: int) -> ServerProcess:
    server = ServerProcess(db, "--port", str(port))
    server.wait_url()
    return server


async def started(db: Path, port: int) -> ServerProcess:
    return await asyncio.to_thread(serve, db, port)


async def next_events(events, count: int) -> list[dict]:
    async with asyncio.timeout(TIMEOUT):
        return [await anext(events) for _ in range(count)]


async def stock(url: str, quantity: int = 50) -> None:
    async with connect(url, token("s1", "staff"), **FAST) as client:
        await client.command("add_stock", data={"sku": "kibble", "quantity": quantity})


def test_resumes_after_a_kill_and_restart_without_gap_or_duplicate(tmp_path: Path) -> None:
    """After a SIGKILL and a restart, a subscription gets exactly the events it missed, and a
    command sent meanwhile is applied once."""
    db, port = tmp_path / "orderlog.db", free_port()
    url = f"ws://127.0.0.1:{port}/v1/ws"
    notes: list[str] = []

    async def main() -> None:
        server = await started(db, port)
        try:
            await stock(url)
            async with connect(url, token("s1", "staff"), on_status=notes.append, **FAST) as client:
                events = aiter(client.subscribe("orders", since=0))
                await client.command("place_order", order_id="o-before", data=ORDER)
                [before] = await next_events(events, 1)
                assert before["stream"] == "order:o-before"
                server.kill()
                place_directly(db, "carol", "o-while-down")
                async with asyncio.timeout(TIMEOUT):
                    while client.connected:
                        await asyncio.sleep(0.01)
                queued = asyncio.create_task(client.command("place_order", order_id="o-after", command_id="c-after",
                                                            data=ORDER))
                await asyncio.sleep(0.3)
                server = await started(db, port)
                async with asyncio.timeout(TIMEOUT):
                    ack = await queued
                again = await client.command("place_order", order_id="o-after", command_id="c-after", data=ORDER)
                assert ack["duplicate"] is False and again["duplicate"] is True and again["seq"] == ack["seq"]
                got = await next_events(events, 2)
                assert [e["stream"] for e in got] == ["order:o-while-down", "order:o-after"]
                assert got[0]["prev"] == before["seq"] and got[1]["prev"] == got[0]["seq"]
                assert (await client.get_stock("kibble"))["reserved"] == 3
                assert f"resumed orders from seq {before['seq']}" in notes
                assert any(note.startswith("reconnecting in") for note in notes)
        finally:
            server.stop()

    asyncio.run(main())


def test_snapshot_then_live_only_on_asyncio(tmp_path: Path) -> None:
    """subscribe(snapshot=True) yields the rows as of N, then the events after N."""
    db, port = tmp_path / "orderlog.db", free_port()
    url = f"ws://127.0.0.1:{port}/v1/ws"

    async def main() -> None:
        server = await started(db, port)
        try:
            await stock(url)
            async with connect(url, token("a", "auditor"), **FAST) as client:
                items = aiter(client.subscribe("inventory", snapshot=True))
                [frame] = await next_events(items, 1)
                assert frame["type"] == "snapshot" and frame["last"] and [r["sku"] for r in frame["rows"]] == ["kibble"]
                await stock(url, 5)
                [event] = await next_events(items, 1)
                assert event["type"] == "stock-added" and event["prev"] == frame["seq"]
        finally:
            server.stop()

    asyncio.run(main())


def test_refused_token_raises_and_a_failing_provider_says_why(tmp_path: Path) -> None:
    """A token the server refuses raises AuthenticationFailed; a provider that fails before the
    first connect raises TokenUnavailable with its reason."""
    db, port = tmp_path / "orderlog.db", free_port()
    url = f"ws://127.0.0.1:{port}/v1/ws"

    def broken() -> str:
        raise RuntimeError("the vault is sealed")

    async def main() -> None:
        server = await started(db, port)
        try:
            with pytest.raises(AuthenticationFailed, match="invalid token"):
                async with asyncio.timeout(TIMEOUT):
                    async with connect(url, token("alice", secret="not-the-server-secret-0123456789-abc"), **FAST):
                        pass
            with pytest.raises(TokenUnavailable, match="the vault is sealed"):
                async with connect(url, broken, **FAST):
                    pass
        finally:
            server.stop()

    asyncio.run(main())


TTL = 4.0  # seconds: the tokens of the provider test (refreshed 0.8 s before expiry; the sweep checks every 0.25 s)


def test_a_token_provider_refreshes_in_band_and_reconnects_after_expiry_with_a_fresh_token(tmp_path: Path) -> None:
    """A short-lived token from an async provider is refreshed in band (the connection outlives
    it); after a restart that comes once the last token expired, the client connects with a
    fresh one and resumes without gap."""
    db, port = tmp_path / "orderlog.db", free_port()
    url = f"ws://127.0.0.1:{port}/v1/ws"
    notes: list[str] = []
    issued: list[float] = []

    async def provider() -> str:
        issued.append(time.time())
        return token("s1", "staff", ttl=TTL)

    async def main() -> None:
        server = await started(db, port)
        try:
            await stock(url)
            async with connect(url, provider, on_status=notes.append, **FAST) as client:
                events = aiter(client.subscribe("orders", since=0))
                await asyncio.sleep(TTL * 1.5)  # beyond the first token's life, on one connection
                assert len(issued) >= 2 and not any(n.startswith("disconnected") for n in notes), notes
                assert any(n.startswith("token refreshed") for n in notes)
                await client.command("place_order", order_id="o-1", data=ORDER)
                [first] = await next_events(events, 1)
                server.kill()
                place_directly(db, "carol", "o-while-down")
                await asyncio.sleep(TTL + 0.5)  # every token issued so far has expired
                expired_before = len(issued)
                server = await started(db, port)
                [missed] = await next_events(events, 1)
                assert missed["stream"] == "order:o-while-down" and missed["prev"] == first["seq"]
                assert len(issued) > expired_before
        finally:
            server.stop()

    asyncio.run(main())


def test_tail_token_command_gets_a_fresh_token_after_a_restart_past_expiry(tmp_path: Path) -> None:
    """`orderlog tail --token-command CMD` runs CMD for every connect: the server comes back
    after the last token expired, and tail resumes with a fresh one, without gap."""
    import subprocess
    import sys

    from conftest import cli_env
    from wsclient import SECRET

    db, port = tmp_path / "orderlog.db", free_port()
    url = f"ws://127.0.0.1:{port}/v1/ws"
    mint = f"{sys.executable} -m orderlog.cli token --sub s1 --role staff --ttl 4s --jwt-secret {SECRET}"
    server = serve(db, port)
    tail = None
    try:
        asyncio.run(stock(url))
        tail = subprocess.Popen([sys.executable, "-m", "orderlog.cli", "tail", "--url", url, "--token-command", mint,
                                 "--channel", "inventory", "--since", "0", "--count", "2"],
                                env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert tail.stdout is not None
        first = json.loads(tail.stdout.readline())
        assert first["seq"] == 1
        server.kill()
        time.sleep(4.5)  # the token tail holds has expired
        server = serve(db, port)
        asyncio.run(stock(url, 5))
        # tail's waits while the server was down (0.5-1, 1-2, 2-4 s) may have put it into a 4-8 s
        # wait that ends only after the restart: allow that wait plus one network wait
        out, err = tail.communicate(timeout=8 + TIMEOUT)
        second = json.loads(out)
        assert second["seq"] == 2 and second["prev"] == 1, err
        assert tail.returncode == 0, err
        assert "resumed inventory from seq 1" in err
    finally:
        if tail is not None and tail.poll() is None:
            tail.kill()
            tail.wait()
        server.stop()


def test_tail_token_command_that_fails_says_which_and_why(cli) -> None:
    """A --token-command that fails, or prints no single token, is one precise line and exit 1;
    with --token as well, exit 2."""
    failed = cli("tail", "--url", "ws://127.0.0.1:9/v1/ws", "--token-command", "echo vault sealed >&2; exit 3")
    assert failed.returncode == 1
    assert failed.stderr.strip() == ("orderlog tail: error: --token-command 'echo vault sealed >&2; exit 3' "
                                     "failed (exit 3): vault sealed")
    empty = cli("tail", "--url", "ws://127.0.0.1:9/v1/ws", "--token-command", "true")
    assert empty.returncode == 1
    assert empty.stderr.strip() == "orderlog tail: error: --token-command 'true' printed 0 words, not one token"
    both = cli("tail", "--token", "t", "--token-command", "true")
    assert both.returncode == 2 and "--token and --token-command exclude each other" in both.stderr


def test_the_asyncio_client_loads_no_trio() -> None:
    """`import orderlog.client.asyncio` loads neither trio nor trio-websocket (an asyncio service need not)."""
    import subprocess
    import sys

    from conftest import cli_env

    code = ("import sys, orderlog.client.asyncio\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('trio', 'trio_websocket')))")
    done = subprocess.run([sys.executable, "-c", code], env=cli_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_several_urls_are_rotated_through_and_the_feed_resumes_on_the_next_one(tmp_path: Path) -> None:
    """Given two URLs, the client skips the first while nothing answers there, connects to the
    second, and after that server is killed moves back to the first, where the same log now
    runs: it resumes there without gap or duplicate."""
    db, first, second = tmp_path / "orderlog.db", free_port(), free_port()
    urls = [f"ws://127.0.0.1:{port}/v1/ws" for port in (first, second)]
    notes: list[str] = []

    async def main() -> None:
        server = await started(db, second)
        try:
            await stock(urls[1])
            async with connect(urls, token("s1", "staff"), on_status=notes.append, **FAST) as client:
                assert client.url == urls[1] and any(n.startswith("cannot connect") for n in notes)
                events = aiter(client.subscribe("orders", since=0))
                await client.command("place_order", order_id="o-1", data=ORDER)
                [before] = await next_events(events, 1)
                server.kill()
                place_directly(db, "carol", "o-2")
                server = await started(db, first)
                [after] = await next_events(events, 1)
                assert client.url == urls[0] and f"connected to {urls[0]}" in " ".join(notes)
                assert after["stream"] == "order:o-2" and after["prev"] == before["seq"]
                assert any(n.endswith(f"s to {urls[0]}") for n in notes if n.startswith("reconnecting in"))
        finally:
            server.stop()

    asyncio.run(main())
