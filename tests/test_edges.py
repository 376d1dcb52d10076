"""Rough edges a new user hits (issue 18): what the docs promise, tried against the real thing.

Each test starts the real `orderlog serve` (in-process or as a subprocess) or the real CLI and
talks to it over real sockets or through its exit code and stderr.
"""

from __future__ import annotations

import json
import os
import re
import random
import shutil
import socket
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st
from trio_websocket import ConnectionClosed

from conftest import REPO, cli_env
from orderlog import protocol
from orderlog.canonical import format_time, parse_time
from orderlog.client import backoff_delay, tail
from orderlog.store import Store
from test_crash import ServerProcess
from test_http import http_get
from wsclient import connect, decode, recv_json, running_server, session, token

BURST = 3000  # commands one client pipelines while the server is told to stop


# -- shutdown: the last batch's acks go out before 1001 ---------------------------------------


async def test_sigterm_sends_the_acks_of_every_committed_command_before_1001(tmp_path):
    """On SIGTERM amid a burst, every command the log holds was acked on the socket before the 1001 close."""
    db = tmp_path / "burst.db"
    with ServerProcess(db, "--rate-limit", "1000000", "--user-rate-limit", "1000000") as server:
        url = await server.started()
        acked: set[str] = set()
        refused: dict[str, str] = {}
        close_code: list[int] = []
        async with connect(url, token("s1", "staff")) as ws:
            welcome = await recv_json(ws)
            assert welcome["type"] == "welcome", welcome
            signalled = trio.Event()

            async def send() -> None:
                try:
                    for i in range(BURST):
                        await ws.send_message(json.dumps({
                            "type": "command", "id": f"c-{i}", "name": "add_stock",
                            "data": {"sku": "kibble", "quantity": 1}}))
                except ConnectionClosed:
                    pass

            async def receive() -> None:
                while True:
                    try:
                        frame = decode(await ws.get_message())
                    except ConnectionClosed as exc:
                        close_code.append(exc.reason.code)
                        return
                    if frame["type"] == "ack":
                        acked.add(frame["id"])
                    else:
                        assert frame["type"] == "error", frame
                        refused[frame["id"]] = frame["code"]
                    if len(acked) >= 200 and not signalled.is_set():
                        signalled.set()
                        server.proc.send_signal(15)

            with trio.fail_after(30):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(send)
                    nursery.start_soon(receive)
        rc = await trio.to_thread.run_sync(server.proc.wait, 15)
        assert close_code == [1001], server.stderr
        assert rc == 0, server.stderr
    store = Store.open(str(db), readonly=True)
    try:
        committed = {e.command_id for e in store.read_events(limit=None)}
    finally:
        store.close()
    assert acked <= committed
    missing = committed - acked
    assert not missing, f"{len(missing)} committed commands got no ack before the close, e.g. {sorted(missing)[:5]}"
    assert set(refused.values()) <= {"unavailable"}, refused
    assert not set(refused) & committed


# -- the command line: --db where the README says, strict log levels and sync modes ------------


def test_tail_and_bench_refuse_db_with_a_pointer(cli, tmp_path):
    """`tail --db` and `bench --db` exit 2 saying what to use instead (the README lists who takes --db)."""
    tail = cli("tail", "--db", "x.db", "--token", "t")
    assert tail.returncode == 2
    assert tail.stderr.strip() == ("orderlog: error: tail reads a running server's feed (--url), not a database "
                                   "file: for the file itself, use `orderlog events --db x.db`")
    bench = cli("bench", "commands", "--db", "x.db")
    assert bench.returncode == 2
    assert "bench starts its own servers" in bench.stderr and "it takes no --db" in bench.stderr
    assert not (tmp_path / "x.db").exists()


@pytest.mark.parametrize("args, env, conf, message", [
    (["--log-level", "verbose"], {}, "", "argument --log-level: must be DEBUG, INFO, WARNING or ERROR, not 'verbose'"),
    ([], {"ORDERLOG_LOG_LEVEL": "trace"}, "", "ORDERLOG_LOG_LEVEL='trace': must be DEBUG, INFO, WARNING or ERROR"),
    ([], {}, 'log_level = "TRACE"\n', '{conf}: log_level = "TRACE": must be DEBUG, INFO, WARNING or ERROR'),
    (["--synchronous", "sometimes"], {}, "", "argument --synchronous: must be FULL, NORMAL, OFF or EXTRA"),
    ([], {"ORDERLOG_SYNCHRONOUS": "fast"}, "", "ORDERLOG_SYNCHRONOUS='fast': must be FULL, NORMAL, OFF or EXTRA"),
    ([], {}, 'synchronous = "FAST"\n', '{conf}: synchronous = "FAST": must be FULL, NORMAL, OFF or EXTRA'),
])
def test_bad_log_level_or_synchronous_exits_2_naming_where(cli, tmp_path, args, env, conf, message):
    """A log level or synchronous mode outside the documented ones exits 2, naming the flag, variable or file key."""
    path = tmp_path / "orderlog.toml"
    path.write_text(conf)
    for extra in ([], ["--print-config"]):
        done = cli("serve", "--config", path, "--port", "0", *args, *extra, env=cli_env(**env), timeout=30)
        assert done.returncode == 2, done.stderr
        assert message.format(conf=path) in done.stderr
        assert len(done.stderr.splitlines()) == 1 and "Traceback" not in done.stderr
    assert not list(tmp_path.glob("orderlog.db*"))


def test_documented_log_levels_and_sync_modes_are_accepted_in_any_case(cli, tmp_path):
    """EXTRA and lower-case values are accepted and shown upper-case by --print-config."""
    done = cli("serve", "--synchronous", "extra", "--log-level", "warning", "--print-config")
    assert done.returncode == 0, done.stderr
    shown = {line.split("=")[0].strip(): line.split("=", 1)[1].split("#")[0].strip()
             for line in done.stdout.splitlines() if "=" in line and not line.startswith("#")}
    assert shown["synchronous"] == '"EXTRA"' and shown["log_level"] == '"WARNING"'  # whatever the column width


# -- error messages -----------------------------------------------------------------------------


@pytest.mark.parametrize("conf, message", [
    ('tls_cert = "cert.pem"\n', "{conf}: tls_cert is set without tls_key"),
    ('tls_key = "key.pem"\n', "{conf}: tls_key is set without tls_cert"),
    ('tls_cert = "nope.pem"\ntls_key = "key.pem"\n', "{conf}: tls_cert: {dir}/nope.pem: no such file"),
    ('jwt_algorithm = "HS512"\n', "{conf}: jwt_algorithm must be one of HS256, RS256, ES256, not 'HS512'"),
    ('jwt_public_key = "key.pem"\n', "{conf}: jwt_public_key goes with jwt_algorithm RS256 or ES256"),
    ('jwt_algorithm = "RS256"\n', "{conf}: jwt_algorithm RS256 needs jwt_public_key FILE"),
    ('jwt_algorithm = "RS256"\njwt_public_key = "cert.pem"\n', "{conf}: jwt_public_key {dir}/cert.pem: not a PEM"),
])
def test_settings_file_errors_name_the_file_and_key(cli, tmp_path, conf, message):
    """An inconsistent settings file exits 2 naming the file and its key, not a flag the user never typed."""
    (tmp_path / "cert.pem").write_text("not a certificate\n")
    (tmp_path / "key.pem").write_text("not a key\n")
    path = tmp_path / "orderlog.toml"
    path.write_text(conf)
    done = cli("serve", "--config", path, "--port", "0", timeout=30)
    assert done.returncode == 2, done.stderr
    assert message.format(conf=path, dir=tmp_path) in done.stderr, done.stderr
    assert "--tls" not in done.stderr and "--jwt" not in done.stderr


def test_flag_errors_still_name_the_flags(cli, tmp_path):
    """The same mistake made with flags names the flags."""
    (tmp_path / "cert.pem").write_text("x")
    done = cli("serve", "--tls-cert", "cert.pem", "--port", "0", timeout=30)
    assert done.returncode == 2
    assert "orderlog: error: --tls-cert is set without --tls-key" in done.stderr


def test_serve_on_a_bad_database_creates_no_secret(cli, tmp_path):
    """`serve` on a file that is not an orderlog exits 2 and leaves no `X.db.secret` behind."""
    (tmp_path / "notes.db").write_text("shopping list\n")
    done = cli("serve", "--db", "notes.db", "--port", "0", timeout=30)
    assert done.returncode == 2
    assert "orderlog: error: notes.db: not a SQLite database" in done.stderr
    assert not (tmp_path / "notes.db.secret").exists()
    assert (tmp_path / "notes.db").read_text() == "shopping list\n"


async def test_cannot_connect_always_says_why():
    """With no server at the address, the client's and `tail`'s `cannot connect:` line carries the reason."""
    with socket.socket() as holder:  # a port that was free a moment ago: nothing listens there
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]
    notes: list[str] = []
    with trio.move_on_after(0.5):
        await tail(f"ws://127.0.0.1:{port}/v1/ws", "t", "orders", None, notes.append, notes.append)
    failures = [n for n in notes if n.startswith("cannot connect:")]
    assert failures, notes
    assert failures[0] == f"cannot connect: all attempts to connect to 127.0.0.1:{port} failed (Connection refused)"


def test_a_lone_surrogate_in_id_says_so():
    """An `id` holding a lone surrogate escape is refused for that, not for its length."""
    with pytest.raises(protocol.ClientError) as raised:
        protocol.parse_request('{"type":"ping","id":"a\\ud800"}')
    assert raised.value.code == "bad_request"
    assert raised.value.message == "id must be valid Unicode (no lone surrogate escapes such as \\ud800)"


# -- the rate limit's burst follows the rate ---------------------------------------------------


async def test_the_burst_follows_the_rate_limit(tmp_path):
    """With rate_limit 5 a connection gets two seconds' worth (10 commands) at once, not 1,000."""
    async with running_server(tmp_path, rate_limit=5.0) as (url, _, _):
        async with session(url, "s1", "staff") as staff:
            for i in range(40):
                await staff.send({"type": "command", "id": f"b-{i}", "name": "add_stock",
                                  "data": {"sku": "kibble", "quantity": 1}})
            replies = [await staff.recv() for _ in range(40)]
    acked = [r for r in replies if r["type"] == "ack"]
    limited = [r for r in replies if r["type"] == "error" and r["code"] == "rate_limited"]
    assert 10 <= len(acked) <= 12 and len(acked) + len(limited) == 40, replies


async def test_the_endpoint_over_plain_http_tells_a_refused_origin(tmp_path):
    """Plain HTTP to /v1/ws answers 403 for an Origin the handshake would refuse (what the dashboard asks), else 426."""
    async with running_server(tmp_path, allow_origins=("https://shop.example",)) as (url, _, _):
        refused, _, body = await http_get(url, "/v1/ws", {"Origin": "http://127.0.0.1:1"})
        allowed, _, _ = await http_get(url, "/v1/ws", {"Origin": "https://shop.example"})
        bare, _, _ = await http_get(url, "/v1/ws")
    assert (refused, body) == (403, b"origin not allowed\n")
    assert allowed == bare == 426


# -- the client's backoff, as documented --------------------------------------------------------


@given(attempt=st.integers(0, 40), seed=st.integers(0, 2**32))
def test_backoff_waits_between_half_and_all_of_a_doubling_ceiling(attempt, seed):
    """The wait after n failed connects is in [c/2, c], c = min(30 s, 1 s x 2^(n-1)) (README: 0.5-1 s, 1-2 s ... 15-30 s)."""
    ceiling = min(30.0, 2.0 ** attempt)
    delay = backoff_delay(attempt, rng=random.Random(seed))
    assert ceiling / 2 <= delay <= ceiling


def test_backoff_documented_ranges():
    """The ranges the README and `tail --help` state are the ones backoff_delay draws from."""
    ranges = [(0.5, 1), (1, 2), (2, 4), (4, 8), (8, 16), (15, 30), (15, 30)]
    rng = random.Random(1)
    for attempt, (low, high) in enumerate(ranges):
        waits = [backoff_delay(attempt, rng=rng) for _ in range(200)]
        assert low <= min(waits) and max(waits) <= high
        assert min(waits) < low + (high - low) / 10 and max(waits) > high - (high - low) / 10
    readme = (REPO / "README.md").read_text()
    assert "0.5-1 s, then 1-2 s, 2-4 s, 4-8 s, 8-16 s, then 15-30 s" in readme


# -- operations: backup with the secret, and the documented restore ------------------------------


async def test_backup_with_its_secret_restores_as_documented(tmp_path):
    """docs/operations.md: an online copy plus DB.secret, restored by stop / replace / remove -wal,-shm / start,
    serves the copy's log, and tokens signed before still work (here and on another machine)."""
    live = tmp_path / "var" / "orderlog.db"
    live.parent.mkdir()
    backup = tmp_path / "backup"
    backup.mkdir()
    with ServerProcess(live, secret=None) as server:  # the server makes orderlog.db.secret itself
        url = await server.started()
        secret = (live.parent / "orderlog.db.secret").read_text().strip()
        async with session(url, "s1", "staff", secret=secret) as staff:
            await staff.ok("add_stock", data={"sku": "kibble", "quantity": 5})
            copy = subprocess.run([sys.executable, "-c", "import sqlite3,sys; sqlite3.connect(sys.argv[1])"
                                   ".backup(sqlite3.connect(sys.argv[2]))", str(live), str(backup / "orderlog.db")],
                                  capture_output=True, text=True, timeout=30)
            assert copy.returncode == 0, copy.stderr
            shutil.copy(live.parent / "orderlog.db.secret", backup / "orderlog.db.secret")
            await staff.ok("add_stock", data={"sku": "kibble", "quantity": 7})  # after the backup: lost
        server.kill()  # as after a crash

    # In place: replace the file, remove the stale -wal and -shm, start.
    shutil.copy(backup / "orderlog.db", live)
    for suffix in ("-wal", "-shm"):
        (live.parent / f"orderlog.db{suffix}").unlink(missing_ok=True)
    # Elsewhere: the copy and its secret.
    elsewhere = tmp_path / "new" / "orderlog.db"
    elsewhere.parent.mkdir()
    shutil.copy(backup / "orderlog.db", elsewhere)
    shutil.copy(backup / "orderlog.db.secret", elsewhere.parent / "orderlog.db.secret")
    for db in (live, elsewhere):
        with ServerProcess(db, secret=None) as server:
            url = await server.started()
            async with session(url, "s1", "staff", secret=secret) as staff:  # a token signed before the backup
                assert staff.welcome["head"] == 1
                stock = await staff.request({"type": "get", "sku": "kibble"})
                assert stock["stock"]["available"] == 5
            assert await trio.to_thread.run_sync(server.stop) == 0


# -- 9: the seed spreads its history over simulated days -------------------------------------

def _events(cli, *args) -> list[dict]:
    done = cli("events", "--db", "s.db", *args)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_the_seed_spreads_its_history_over_days_deterministically(cli, tmp_path):
    """`seed --days D --until T`: `at` never goes back, spans the D days before T, is the same for the
    same --seed (times included), the time filters select a part of it, and the chain verifies."""
    seeded = cli("seed", "--db", "s.db", "--commands", "400", "--seed", "3", "--days", "10",
                 "--until", "2026-03-11T00:00:00Z")
    assert seeded.returncode == 0, seeded.stderr
    events = _events(cli)
    times = [e["at"] for e in events]
    assert times == sorted(times)
    assert times[0] == "2026-03-01T00:00:00.000Z" and times[-1] == "2026-03-11T00:00:00.000Z"
    assert len(set(times)) > 300
    middle = _events(cli, "--from-time", "2026-03-04T00:00:00Z", "--to-time", "2026-03-06T00:00:00Z")
    assert 0 < len(middle) < len(events) / 3
    assert all("2026-03-04T" <= e["at"] < "2026-03-06T" for e in middle)
    assert cli("verify", "--db", "s.db").returncode == 0
    # The same seed and end on a new database: the same log, byte for byte.
    (tmp_path / "again").mkdir()
    again = cli("seed", "--db", "again/s.db", "--commands", "400", "--seed", "3", "--days", "10",
                "--until", "2026-03-11T00:00:00Z")
    assert again.returncode == 0, again.stderr
    assert cli("events", "--db", "again/s.db").stdout == cli("events", "--db", "s.db").stdout
    # A second run on the same log starts no earlier than its newest event: `at` still never goes back.
    more = cli("seed", "--db", "s.db", "--commands", "100", "--seed", "4", "--days", "30",
               "--until", "2026-03-20T00:00:00Z")
    assert more.returncode == 0, more.stderr
    later = [e["at"] for e in _events(cli, "--limit", "100000")]
    assert later == sorted(later) and later[-1] > times[-1]


async def test_query_time_filters_select_a_day_of_a_seeded_history(cli, tmp_path):
    """The protocol's query, on the server, selects the same part of a seeded history as `events`."""
    seeded = await trio.to_thread.run_sync(lambda: cli(
        "seed", "--db", "s.db", "--commands", "300", "--seed", "5", "--days", "5", "--until", "2026-06-06T00:00:00Z"))
    assert seeded.returncode == 0, seeded.stderr
    window = ("--from-time", "2026-06-03T00:00:00Z", "--to-time", "2026-06-04T00:00:00+00:00")
    exported = await trio.to_thread.run_sync(lambda: _events(cli, *window))
    everything = await trio.to_thread.run_sync(lambda: _events(cli))
    assert 0 < len(exported) < len(everything) / 3
    async with running_server(tmp_path, db=tmp_path / "s.db") as (url, _, _):
        async with session(url, "audit-1", "auditor") as auditor:
            reply = await auditor.request({"type": "query", "limit": 1000, "filter": {
                "from_time": window[1], "to_time": window[3]}})
    assert [e["seq"] for e in reply["events"]] == [e["seq"] for e in exported]
    assert all("2026-06-03T" <= e["at"] < "2026-06-04T" for e in reply["events"])


def test_the_seed_never_goes_back_in_time(cli):
    """A history that would end before the log's newest event is refused, the log untouched; by
    default it spans the 30 days before now."""
    assert cli("seed", "--db", "s.db", "--commands", "50").returncode == 0
    times = [e["at"] for e in _events(cli)]
    now = datetime.now(timezone.utc)
    assert now - timedelta(days=30, minutes=5) < parse_time(times[0]) < now - timedelta(days=29, hours=23)
    assert now - timedelta(days=2) < parse_time(times[-1]) <= now  # the last command or one of the last
    before = cli("seed", "--db", "s.db", "--commands", "50", "--until", "2020-01-01T00:00:00Z")
    assert before.returncode == 2 and "Traceback" not in before.stderr
    assert before.stderr.startswith("orderlog: error: s.db: the history cannot end at 2020-01-01T00:00:00.000Z, "
                                    f"before the log's newest event (seq {len(times)}, at {times[-1]})")
    assert [e["at"] for e in _events(cli)] == times


@given(st.datetimes(timezones=st.just(timezone.utc)), st.datetimes(timezones=st.just(timezone.utc)))
def test_stored_times_sort_as_the_instants_do(a, b):
    """`at` and the time filters' bounds compare as text: format_time's order is time's order,
    years before 1000 included (strftime wrote 987-..., after every 2026-...)."""
    ms = timedelta(milliseconds=1)
    epoch = datetime(1970, 1, 1, tzinfo=timezone.utc)
    assert (format_time(a) < format_time(b)) == ((a - epoch) // ms < (b - epoch) // ms)
    assert parse_time(format_time(a)) == epoch + (a - epoch) // ms * ms


def test_a_time_filter_before_the_year_1000_selects_from_then(cli):
    assert cli("seed", "--db", "s.db", "--commands", "20").returncode == 0
    everything = _events(cli)
    assert _events(cli, "--from-time", "0987-01-01T00:00:00Z") == everything
    assert _events(cli, "--to-time", "0987-01-01T00:00:00Z") == []


@pytest.mark.parametrize("args, message", [
    (["--days", "nan"], "argument --days: must be between 0 and 36500, not nan"),
    (["--days", "-1"], "argument --days: must be between 0 and 36500, not -1"),
    (["--until", "yesterday"], "argument --until: not an RFC 3339 time with an offset: 'yesterday'"),
    (["--until", "0001-01-01T00:00:00Z"], "argument --until: must be between the years 200 and 9999"),
])
def test_seed_refuses_bad_days_and_until(cli, args, message):
    done = cli("seed", "--db", "s.db", "--commands", "10", *args)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr


# -- 10: the hint for a first start goes to stdout, the log to stderr -------------------------

def test_serve_prints_its_hint_on_stdout_and_logs_on_stderr(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "orderlog.cli", "serve", "--db", "h.db", "--port", "0"],
                            cwd=tmp_path, env=cli_env(), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline()
        assert first.startswith("orderlog is serving ws://127.0.0.1:"), first
        assert "orderlog token --db h.db" in proc.stdout.readline()
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
    assert "listening" in err and "is serving" not in err
    assert proc.returncode == 0


async def test_serve_serves_on_when_nobody_reads_its_stdout(tmp_path):
    """`orderlog serve | true`: the hint meets a closed pipe; it is dropped, the server serves on
    (it stopped with a BrokenPipeError traceback)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    proc = subprocess.Popen([sys.executable, "-m", "orderlog.cli", "serve", "--db", "h.db", "--port", "0"],
                            cwd=tmp_path, env=cli_env(), stdin=subprocess.DEVNULL,
                            stdout=write_end, stderr=subprocess.PIPE, text=True)
    os.close(write_end)
    try:
        listening = ""
        while "event=listening" not in listening:  # after the note of the secret it created
            listening = await trio.to_thread.run_sync(proc.stderr.readline)
            assert listening, "serve stopped"
        url = re.search(r"url=(ws://\S+)", listening).group(1)
        for _ in range(2):  # the hint is written as soon as the server listens, before these
            status, _, _ = await http_get(url, "/v1/checkpoint")
            assert status == 404
            await trio.sleep(0.1)
    finally:
        proc.terminate()
        _, err = await trio.to_thread.run_sync(lambda: proc.communicate(timeout=30))
    assert proc.returncode == 0 and "Traceback" not in err, err
