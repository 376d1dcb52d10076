"""Per-user limits (PROTOCOL.md section 6): a connection cap per user (1008 `too many connections`),
a command rate summed over the user's connections (`rate_limited`), a replay rate that slows
replays down but never refuses or cuts them, and a share of max_connections kept for handshakes.

The rules (orderlog.limits) are tested alone with a hand-driven clock, then over real sockets.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st
from trio_websocket import ConnectionClosed, ConnectionRejected

from conftest import cli_env
from orderlog.limits import Slots, TokenBucket, UserLimits
from wsclient import TIMEOUT, connect, recv_json, running_server, send_json, session, token

# -- the rules alone ---------------------------------------------------------------------------


@given(st.lists(st.tuples(st.floats(0, 2), st.integers(1, 50)), max_size=60))
def test_a_bucket_never_grants_more_than_its_burst_plus_its_rate(steps):
    """Whatever the pattern of requests, what was granted up to time t is at most burst + rate * t."""
    bucket = TokenBucket.full(rate=10, burst=20, now=0.0)
    now = granted = 0.0
    for gap, count in steps:
        now += gap
        if bucket.take(now, count):
            granted += count
        assert granted <= 20 + 10 * now + 1e-9


@given(st.lists(st.tuples(st.floats(0, 1), st.integers(0, 500)), max_size=60))
def test_replay_pauses_keep_a_user_within_its_rate_and_never_refuse(steps):
    """Pausing as told after each page keeps what was sent by time t within burst + rate * t (plus the page in
    hand); every page is sent."""
    limits = UserLimits(1, 1, 1, replay_rate=1000, replay_burst=2000)
    now = sent = 0.0
    for gap, events in steps:
        now += gap
        sent += events  # the page goes out whatever the budget
        now += limits.replay_delay("u", events, now)
        assert sent <= 2000 + 1000 * now + 1e-6


def test_the_connection_cap_counts_per_user_and_frees_on_disconnect():
    limits = UserLimits(max_connections=2, command_rate=1, command_burst=1, replay_rate=1, replay_burst=1)
    assert limits.connect("a", 0) and limits.connect("a", 0)
    assert not limits.connect("a", 0)
    assert limits.connect("b", 0)
    limits.disconnect("a", 0)
    assert limits.connect("a", 0) and limits.connections("a") == 2


def test_commands_are_counted_per_user_and_survive_a_reconnect():
    limits = UserLimits(max_connections=5, command_rate=1, command_burst=3, replay_rate=1, replay_burst=1)
    limits.connect("a", 0)
    assert [limits.take_command("a", 0) for _ in range(4)] == [True, True, True, False]
    assert limits.take_command("b", 0)  # another user has its own budget
    limits.disconnect("a", 0)
    limits.connect("a", 0)  # reconnecting does not refill the bucket
    assert not limits.take_command("a", 0)
    assert limits.take_command("a", 1.0)


def test_idle_users_are_forgotten_once_their_buckets_are_full():
    limits = UserLimits(max_connections=5, command_rate=10, command_burst=10, replay_rate=10, replay_burst=10)
    for i in range(50):
        limits.connect(f"u{i}", 0)
        limits.disconnect(f"u{i}", 0)
    assert len(limits) == 0
    limits.connect("busy", 0)
    limits.take_command("busy", 0)
    limits.disconnect("busy", 0)
    assert len(limits) == 1  # its bucket is not full yet
    limits.disconnect("busy", 5)
    limits._prune(5)
    assert len(limits) == 0


def test_slots_split_max_connections_between_handshakes_and_users():
    slots = Slots(10, 0.2)
    assert (slots.handshake_slots, slots.user_slots) == (2, 8)
    assert slots.open() and slots.open() and not slots.open()  # handshakes hold their share only
    assert slots.authenticate() and slots.open()
    for _ in range(7):
        assert slots.authenticate() or slots.open()
    assert slots.authenticated == 8 and not slots.authenticate()  # users hold theirs only
    slots.close(True)
    assert slots.authenticate()


# -- over real sockets -------------------------------------------------------------------------

UNLIMITED_PER_CONNECTION = {"rate_limit": 1e9, "rate_burst": 10**9}


async def _closed(url: str, user: str) -> tuple[int, str] | None:
    """Log in as `user`: None if welcomed (and the connection closed again), else the close."""
    try:
        async with connect(url, token(user)) as ws:
            first = await recv_json(ws)
            assert first["type"] == "welcome", first
            return None
    except ConnectionClosed as exc:
        return exc.reason.code, exc.reason.reason


async def test_a_user_beyond_its_connection_cap_is_closed_with_1008(tmp_path):
    """max_user_connections 3: alice's fourth connection is closed with 1008 `too many connections` after it
    authenticated; bob is not affected; when one of alice's leaves, she fits again."""
    async with running_server(tmp_path, max_user_connections=3) as (url, _, _):
        async with session(url, "alice") as a1, session(url, "alice") as a2:
            async with session(url, "alice") as a3:
                assert await _closed(url, "alice") == (1008, "too many connections")
                # By the auth message too, not only by a handshake token.
                async with connect(url) as ws:
                    await send_json(ws, {"type": "auth", "token": token("alice")})
                    with pytest.raises(ConnectionClosed) as closed:
                        await recv_json(ws)
                    assert (closed.value.reason.code, closed.value.reason.reason) == (1008, "too many connections")
                assert await _closed(url, "bob") is None
                for client in (a1, a2, a3):
                    assert (await client.ping())["type"] == "pong"
            with trio.fail_after(TIMEOUT):
                while await _closed(url, "alice") is not None:  # the server notices a3's close a moment later
                    await trio.sleep(0.05)


async def _flood(url: str, user: str, count: int, codes: dict[str, int]) -> None:
    async with connect(url, token(user), queue=count + 16) as ws:
        assert (await recv_json(ws))["type"] == "welcome"
        for i in range(count):
            await send_json(ws, {"type": "command", "id": f"{user}-{i}-{time.monotonic_ns()}", "name": "approve_order",
                                 "order_id": "nope"})
        for _ in range(count):
            reply = await recv_json(ws, timeout=30)
            code = reply.get("code", reply["type"])
            codes[code] = codes.get(code, 0) + 1


async def test_the_command_rate_is_summed_over_a_users_connections(tmp_path):
    """user_rate_limit 50/s, burst 100, no limit per connection: four connections of one user get at most the
    burst plus the rate's worth through, the rest `rate_limited`; another user keeps its own budget."""
    async with running_server(tmp_path, user_rate_limit=50, user_rate_burst=100, **UNLIMITED_PER_CONNECTION) as (
            url, _, _):
        codes: dict[str, int] = {}
        started = time.monotonic()
        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(_flood, url, "mallory", 150, codes)
        elapsed = time.monotonic() - started
        through = sum(n for code, n in codes.items() if code != "rate_limited")
        assert sum(codes.values()) == 600
        assert 100 <= through <= 100 + 50 * elapsed + 1, (codes, elapsed)
        assert codes["rate_limited"] == 600 - through
        other: dict[str, int] = {}
        await _flood(url, "bob", 50, other)
        assert "rate_limited" not in other, other


@pytest.fixture(scope="module")
def replay_log(tmp_path_factory) -> str:
    """A log of a few thousand events (`orderlog seed`)."""
    path = tmp_path_factory.mktemp("replay") / "replay.db"
    done = subprocess.run([sys.executable, "-m", "orderlog.cli", "seed", "--db", str(path), "--commands", "2500",
                           "--seed", "5", "--synchronous", "OFF"], env=cli_env(), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return str(path)


async def _replay(url: str, user: str, role: str) -> list[int]:
    """Subscribe to orders from 0; the seqs up to `live`."""
    async with session(url, user, role) as client:
        await client.subscribe("orders", since=0)
        events, live = await client.live("orders", timeout=60)
        seqs = [e["seq"] for e in events]
        assert [e["prev"] for e in events] == [0, *seqs[:-1]]  # no gap, nothing cut
        assert live["seq"] >= (seqs[-1] if seqs else 0)
        return seqs


async def test_replays_beyond_the_users_rate_are_slowed_never_cut(tmp_path, replay_log):
    """user_replay_rate 2000/s, burst 1000: two concurrent replays by one user deliver every event, and take at
    least as long as the shared budget allows; a replay by another user gets every event too."""
    async with running_server(tmp_path, db=replay_log, user_replay_rate=2000, user_replay_burst=1000) as (url, _, _):
        full = await _replay(url, "fresh", "auditor")  # the budget of another user
        assert len(full) > 2000
        results: dict[str, list[int]] = {}

        async def one(name: str) -> None:
            results[name] = await _replay(url, "reader", "staff")

        started = time.monotonic()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(one, "first")
            nursery.start_soon(one, "second")
        elapsed = time.monotonic() - started
        assert results["first"] == results["second"] == full
        page = 500  # connection.CATCHUP_PAGE / WINDOW_PAGE: a page goes out before its pause
        assert elapsed >= (2 * len(full) - 1000 - 2 * page) / 2000, elapsed


async def test_paging_through_query_is_paced_as_a_replay(tmp_path, replay_log):
    """An auditor paging through the whole log with `query` gets every event, at the user's replay rate."""
    async with running_server(tmp_path, db=replay_log, user_replay_rate=4000, user_replay_burst=1000) as (url, _, _):
        async with session(url, "pager", "auditor") as client:
            seqs: list[int] = []
            after = 0
            started = time.monotonic()
            while True:
                reply = await client.request({"type": "query", "filter": {"after": after}, "limit": 1000}, timeout=30)
                assert reply["type"] == "result", reply
                seqs += [e["seq"] for e in reply["events"]]
                if reply["next"] is None:
                    break
                after = reply["next"]
            elapsed = time.monotonic() - started
        assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) > 4000
        assert elapsed >= (len(seqs) - 1000 - 1000) / 4000, elapsed  # the last page goes out before its pause


async def test_a_handshake_share_keeps_slots_for_logins_and_for_users(tmp_path):
    """max_connections 10 with a 0.2 handshake share: two handshakes that never authenticate fill their share
    (the next handshake gets 503) but not the users'; eight users fill theirs (the next login is closed with
    1013 `server busy`) but not the handshakes'."""
    async with running_server(tmp_path, max_connections=10, handshake_share=0.2) as (url, _, _):
        async with connect(url), connect(url):  # two handshakes without a token
            with pytest.raises(ConnectionRejected) as refused:
                async with connect(url, token("late")):
                    pass
            assert refused.value.status_code == 503
        async with trio.open_nursery() as nursery:
            done = trio.Event()

            async def hold(i: int, task_status=trio.TASK_STATUS_IGNORED) -> None:
                with trio.fail_after(TIMEOUT):
                    while True:  # the server frees the two handshake slots a moment after they close
                        try:
                            async with session(url, f"u{i}") as client:
                                task_status.started()
                                await done.wait()
                                assert (await client.ping())["type"] == "pong"
                                return
                        except ConnectionRejected:
                            await trio.sleep(0.05)

            for i in range(8):
                await nursery.start(hold, i)
            assert await _closed(url, "ninth") == (1013, "server busy")
            async with connect(url) as ws:  # a handshake still gets in (and may send its auth)
                await send_json(ws, {"type": "ping"})
                with pytest.raises(ConnectionClosed) as closed:
                    await recv_json(ws)
                assert closed.value.reason.code == 4001
            done.set()


def test_each_limit_is_a_serve_flag_and_a_settings_file_key(cli, tmp_path):
    """--max-user-connections, --user-rate-limit, --user-replay-rate and --handshake-share, or their TOML keys,
    reach the effective settings; out-of-range values are a one-line error with exit code 2."""
    config = tmp_path / "orderlog.toml"
    config.write_text("max_user_connections = 7\nuser_rate_limit = 12.5\nuser_replay_rate = 3000\n"
                      "handshake_share = 0.25\n")
    done = cli("serve", "--config", config, "--print-config", "--user-rate-limit", "99")
    assert done.returncode == 0, done.stderr
    lines = {line.split("=")[0].strip(): line for line in done.stdout.splitlines() if "=" in line}
    assert "= 7 " in lines["max_user_connections"] and "# file" in lines["max_user_connections"]
    assert "= 99.0 " in lines["user_rate_limit"] and "# flag" in lines["user_rate_limit"]
    assert "= 3000.0 " in lines["user_replay_rate"] and "= 0.25 " in lines["handshake_share"]
    defaults = {line.split("=")[0].strip(): line.split("=", 1)[1].split("#")[0].strip()
                for line in cli("serve", "--print-config").stdout.splitlines() if "=" in line}
    assert [defaults[k] for k in ("max_user_connections", "user_rate_limit", "user_replay_rate", "handshake_share")] == [
        "64", "1000.0", "20000.0", "0.1"]
    for flag, value in (("--handshake-share", "0.95"), ("--max-user-connections", "0"), ("--user-replay-rate", "-1")):
        bad = cli("serve", flag, value, "--print-config")
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and flag in bad.stderr, bad.stderr
