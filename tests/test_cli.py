"""The `orderlog` command line, run for real as a subprocess on SQLite files in tmp_path."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import signal
import sqlite3
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import cli_env

EVENT_KEYS = {"type", "seq", "stream", "version", "at", "actor", "command_id", "data", "hash"}
SUBCOMMANDS = ("migrate", "events", "verify", "rebuild", "stats", "seed")


def export(cli, db, *flags):
    """The parsed JSONL export of `orderlog events` with `flags`."""
    done = cli("events", "--db", db, *flags)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def assert_one_line_error(done, *fragments):
    """Exit 2, exactly one line on stderr starting `orderlog: error:`, no traceback."""
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("orderlog: error: ")
    for fragment in fragments:
        assert fragment in lines[0]


# -- help and migrate --------------------------------------------------------------------------


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_has_help(cli, command):
    """`orderlog COMMAND --help` exits 0 and documents --db."""
    done = cli(command, "--help")
    assert done.returncode == 0
    assert "--db" in done.stdout and "usage: orderlog" in done.stdout


def test_migrate_creates_the_database_and_reports_what_it_applied(cli, db_path):
    """migrate creates a missing file, names the applied migration, and is a no-op the second time."""
    first = cli("migrate", "--db", db_path)
    assert first.returncode == 0, first.stderr
    assert "applied 0001_event_log.sql" in first.stdout
    second = cli("migrate", "--db", db_path)
    assert second.returncode == 0
    assert "applied" not in second.stdout and "up to date" in second.stdout


def test_db_defaults_to_env_then_cwd_and_the_flag_wins(cli, tmp_path, seeded_db):
    """Without --db the file comes from $ORDERLOG_DB, else ./orderlog.db; --db overrides both."""
    cli("migrate", "--db", tmp_path / "other.db")
    from_cwd = cli("stats", "--json")  # seeded_db is ./orderlog.db in the cli's cwd
    assert json.loads(from_cwd.stdout)["head"] > 0
    from_env = cli("stats", "--json", env=cli_env(ORDERLOG_DB=str(tmp_path / "other.db")))
    assert json.loads(from_env.stdout)["head"] == 0
    flag_wins = cli("stats", "--json", "--db", seeded_db, env=cli_env(ORDERLOG_DB=str(tmp_path / "other.db")))
    assert json.loads(flag_wins.stdout)["head"] > 0


# -- seed ---------------------------------------------------------------------------------------


def without_clock(events):
    return [{k: v for k, v in e.items() if k not in ("at", "hash")} for e in events]


def test_seed_is_deterministic_for_a_seed(cli, tmp_path):
    """The same seed on new databases gives the same events apart from `at` and `hash`; another seed differs."""
    runs = {}
    for name, seed, batch in (("a", 3, 500), ("b", 3, 37), ("c", 4, 500)):
        db = tmp_path / f"{name}.db"
        done = cli("seed", "--db", db, "--commands", 300, "--seed", seed, "--batch", batch)
        assert done.returncode == 0, done.stderr
        runs[name] = without_clock(export(cli, db))
    assert runs["a"] == runs["b"]
    assert runs["a"] != runs["c"]


def test_seed_reports_rate_and_outcomes_with_some_rejections(cli, db_path):
    """seed prints commands/s and accepted/rejected counts; a realistic history has rejections."""
    done = cli("seed", "--db", db_path, "--commands", 600, "--seed", 1, "--synchronous", "normal")
    assert done.returncode == 0, done.stderr
    assert "commands/s" in done.stdout
    summary = done.stdout.splitlines()[1]
    accepted = int(summary.split("accepted ")[1].split(",")[0].replace(",", ""))
    rejected = int(summary.split("rejected ")[1].split(" ")[0].replace(",", ""))
    assert accepted + rejected == 600 and accepted > 500 and rejected > 0
    assert "differed" not in done.stdout  # on a fresh log the generator's model is exact
    types = {e["type"] for e in export(cli, db_path)}
    assert types == {
        "stock-added", "order-created", "stock-reserved", "order-updated", "order-approved",
        "order-shipped", "stock-shipped", "order-delivered", "order-cancelled", "stock-released",
    }


def test_seed_twice_on_the_same_database_adds_a_second_run(cli, seeded_db):
    """A second seed run on a used log does not collide with the first and leaves a sound log."""
    before = len(export(cli, seeded_db))
    done = cli("seed", "--db", seeded_db, "--commands", 200, "--seed", 7)
    assert done.returncode == 0, done.stderr
    assert "differed" not in done.stdout
    after = export(cli, seeded_db)
    assert len(after) > before
    assert cli("verify", "--db", seeded_db).returncode == 0


# -- events -----------------------------------------------------------------------------------


def test_jsonl_lines_are_events_whose_hashes_recompute_from_the_export_alone(cli, seeded_db):
    """Every JSONL line is an EVENT object, and the hash chain recomputes from the lines alone."""
    events = export(cli, seeded_db)
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    prev = bytes(32)
    for e in events:
        assert set(e) == EVENT_KEYS
        body = {k: e[k] for k in ("seq", "stream", "version", "type", "at", "actor", "command_id", "data")}
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        assert hashlib.sha256(prev + canonical).hexdigest() == e["hash"]
        prev = bytes.fromhex(e["hash"])


def test_events_filters_match_a_filter_over_the_full_export(cli, seeded_db):
    """--stream, --order, --type, --actor, --after, --until and --limit select what they say."""
    everything = export(cli, seeded_db)
    order_id = next(e["stream"][6:] for e in everything if e["type"] == "order-shipped")
    actor = everything[50]["actor"]
    cases = [
        (("--stream", "sku:dog-food-2kg"), lambda e: e["stream"] == "sku:dog-food-2kg"),
        (("--order", order_id),
         lambda e: e["stream"] == f"order:{order_id}" or e["data"].get("order_id") == order_id),
        (("--type", "order-created", "--type", "order-cancelled"),
         lambda e: e["type"] in ("order-created", "order-cancelled")),
        (("--actor", actor), lambda e: e["actor"] == actor),
        (("--after", 100, "--until", 250), lambda e: 100 < e["seq"] <= 250),
        (("--type", "stock-reserved", "--after", 40, "--limit", 7), None),
    ]
    for flags, keep in cases:
        got = export(cli, seeded_db, *flags)
        if keep is None:
            want = [e for e in everything if e["type"] == "stock-reserved" and e["seq"] > 40][:7]
        else:
            want = [e for e in everything if keep(e)]
        assert got == want, flags
        assert got, flags
    assert {e["type"] for e in export(cli, seeded_db, "--order", order_id)} >= {"order-created", "stock-shipped"}


def test_time_filters_compare_instants_whatever_the_offset(cli, db_path):
    """--from-time is inclusive and --to-time exclusive, as instants, with any offset."""
    for _ in range(3):  # three seed runs, so that the log holds several distinct times
        assert cli("seed", "--db", db_path, "--commands", 60, "--batch", 20).returncode == 0
        time.sleep(0.01)
    everything = export(cli, db_path)
    times = sorted({e["at"] for e in everything})
    assert len(times) >= 3
    middle = datetime.fromisoformat(times[1].replace("Z", "+00:00"))
    in_paris = middle.astimezone(timezone(timedelta(hours=2))).isoformat(timespec="milliseconds")
    got_from = export(cli, db_path, "--from-time", in_paris)
    assert got_from == [e for e in everything if e["at"] >= times[1]]
    got_to = export(cli, db_path, "--to-time", in_paris)
    assert got_to == [e for e in everything if e["at"] < times[1]]


def test_csv_has_a_header_and_data_as_json_text(cli, seeded_db):
    """--format csv prints a header row, then one row per event with data as JSON text."""
    events = export(cli, seeded_db, "--limit", 50)
    done = cli("events", "--db", seeded_db, "--limit", 50, "--format", "csv")
    assert done.returncode == 0
    rows = list(csv.DictReader(io.StringIO(done.stdout)))
    assert list(rows[0]) == ["seq", "stream", "version", "type", "at", "actor", "command_id", "data", "hash"]
    assert len(rows) == 50
    for row, event in zip(rows, events):
        assert int(row["seq"]) == event["seq"] and row["hash"] == event["hash"]
        assert json.loads(row["data"]) == event["data"]


def test_table_aligns_columns_for_a_terminal(cli, seeded_db):
    """--format table prints a header and aligned columns, one row per event."""
    done = cli("events", "--db", seeded_db, "--limit", 30, "--format", "table")
    assert done.returncode == 0
    lines = done.stdout.splitlines()
    assert lines[0].split()[:5] == ["SEQ", "AT", "STREAM", "VER", "TYPE"]
    assert len(lines) == 31
    type_column = lines[0].index("TYPE")
    assert all(line[type_column:].split()[0] in ("stock-added", "order-created", "stock-reserved",
                                                   "order-approved", "order-shipped", "stock-shipped",
                                                   "order-updated", "order-delivered", "order-cancelled",
                                                   "stock-released") for line in lines[1:])
    empty = cli("events", "--db", seeded_db, "--after", 10**9, "--format", "table")
    assert empty.returncode == 0 and "no events" in empty.stdout


def test_events_export_a_committed_prefix_while_another_process_writes(cli, db_path):
    """Exports taken while seed appends are sound, growing prefixes of the log."""
    assert cli("migrate", "--db", db_path).returncode == 0
    writer = subprocess.Popen(
        [sys.executable, "-m", "orderlog.cli", "seed", "--db", str(db_path), "--commands", "4000", "--batch", "50"],
        env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        exports = []
        while writer.poll() is None and len(exports) < 6:
            exports.append(export(cli, db_path))
    finally:
        writer.wait(timeout=60)
    assert writer.returncode == 0, writer.stderr.read()
    final = export(cli, db_path)
    for partial in exports:
        assert final[: len(partial)] == partial
    assert cli("verify", "--db", db_path).returncode == 0


def test_a_closed_pipe_ends_the_export_quietly(seeded_db):
    """`orderlog events | head -1`: no traceback when the reader goes away."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "orderlog.cli", "events", "--db", str(seeded_db)],
        env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0,
    )
    proc.stdout.readline()
    proc.stdout.close()
    _, err = proc.communicate(timeout=30)
    assert b"Traceback" not in err and err == b""
    assert proc.returncode != 1


def test_ctrl_c_exits_130_quietly(cli, db_path):
    """SIGINT during a long seed exits 130 with nothing on stderr."""
    assert cli("migrate", "--db", db_path).returncode == 0
    proc = subprocess.Popen(
        [sys.executable, "-m", "orderlog.cli", "seed", "--db", str(db_path), "--commands", "100000000"],
        env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 20
    conn = sqlite3.connect(db_path)
    while conn.execute("SELECT count(*) FROM events").fetchone()[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    conn.close()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert err == ""


# -- error paths ------------------------------------------------------------------------------


READERS = (("events",), ("verify",), ("stats",), ("rebuild",))


@pytest.mark.parametrize("command", READERS)
def test_a_missing_file_is_a_one_line_error(cli, tmp_path, command):
    """A database that does not exist: one line, exit 2 (only migrate and seed create one)."""
    missing = tmp_path / "nope.db"
    assert_one_line_error(cli(*command, "--db", missing), "no such database file")
    assert not missing.exists()


@pytest.mark.parametrize("command", READERS + (("migrate",), ("seed", "--commands", "5")))
def test_a_text_file_is_a_one_line_error(cli, tmp_path, command):
    """A file that is not SQLite: one line, exit 2, and the file is left alone."""
    text = tmp_path / "notes.txt"
    text.write_text("shopping list: kibble, catnip, a bigger aquarium\n" * 20)
    before = text.read_bytes()
    assert_one_line_error(cli(*command, "--db", text), "not a SQLite database")
    assert text.read_bytes() == before


@pytest.mark.parametrize("command", READERS + (("migrate",), ("seed", "--commands", "5")))
def test_a_foreign_sqlite_database_is_a_one_line_error(cli, tmp_path, command):
    """A SQLite file with other tables: one line naming it not an orderlog, exit 2."""
    foreign = tmp_path / "foreign.db"
    conn = sqlite3.connect(foreign)
    conn.execute("CREATE TABLE x (y)")
    conn.commit()
    conn.close()
    assert_one_line_error(cli(*command, "--db", foreign), "not an orderlog")


@pytest.mark.parametrize("command", READERS + (("migrate",), ("seed", "--commands", "5")))
def test_a_newer_schema_is_a_one_line_error(cli, seeded_db, command):
    """A log written by a newer orderlog (schema 99): one line asking to upgrade, exit 2."""
    conn = sqlite3.connect(seeded_db)
    conn.execute("INSERT INTO schema_migrations VALUES (99, '0099_future.sql', '2030-01-01T00:00:00.000Z')")
    conn.commit()
    conn.close()
    assert_one_line_error(cli(*command, "--db", seeded_db), "newer orderlog", "schema 99")


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (("events", "--after", "abc"), "--after"),
        (("events", "--after", "-1"), "--after"),
        (("events", "--limit", "0"), "--limit"),
        (("events", "--format", "xml"), "--format"),
        (("events", "--type", "order-teleported"), "--type"),
        (("events", "--no-such-flag"), "--no-such-flag"),
        (("seed",), "--commands"),
        (("seed", "--commands", "10", "--synchronous", "sometimes"), "--synchronous"),
        (("frobnicate",), "frobnicate"),
    ],
)
def test_bad_flags_are_a_one_line_usage_error(cli, seeded_db, flags, fragment):
    """A malformed or unknown flag: one line naming it, exit 2, nothing run."""
    assert_one_line_error(cli(*flags, "--db", seeded_db), fragment)


@pytest.mark.parametrize("url, fragment", [
    ("", "non-empty"),
    ("127.0.0.1:8765", "not a ws:// or wss:// URL"),
    ("http://127.0.0.1:8765/v1/ws", "not a ws:// or wss:// URL"),
    ("ws://", "names no host"),
    ("ws://127.0.0.1:99999/v1/ws", "Port out of range"),
    ("ws://127.0.0.1:99999999999999999999999999/v1/ws", "Port out of range"),
    ("ws://h:abc/v1/ws", "not a URL"),
    ("ws://[::1/v1/ws", "Invalid IPv6 URL"),
    ("ws://" + "a" * 70 + ".example/v1/ws", "cannot be encoded"),
    ("ws://h\udcff/v1/ws", "cannot be encoded"),  # a lone surrogate: the byte 0xff in argv
])
def test_a_bad_tail_url_is_a_one_line_usage_error(url, fragment):
    """Each --url (there may be several, one per node) is checked before anything connects: a
    malformed one is one line naming the flag, exit 2, not a traceback from the reconnect loop."""
    done = subprocess.run([sys.executable, "-m", "orderlog.cli", "tail", "--url", "ws://127.0.0.1:1/v1/ws",
                           "--url", url, "--token", "x", "--channel", "orders"],
                          env=cli_env(), capture_output=True, text=True, errors="surrogateescape", timeout=60)
    assert_one_line_error(done, "--url", fragment)


def test_several_urls_are_kept_in_order_and_rotated_in_a_circle():
    from orderlog.client.common import Urls

    urls = Urls(["ws://a:8765/v1/ws", "wss://b/v1/ws"])
    seen = []
    for _ in range(5):
        seen.append(urls.current)
        urls.next()
    assert seen == ["ws://a:8765/v1/ws", "wss://b/v1/ws"] * 2 + ["ws://a:8765/v1/ws"]
    assert Urls("ws://a/v1/ws").all == ["ws://a/v1/ws"]
    for bad in ([], ["ws://a/v1/ws", ""], [b"ws://a/v1/ws"], ["ws://a/v1/ws", "http://b/"]):
        with pytest.raises(ValueError):
            Urls(bad)


@given(st.one_of(st.text(), st.builds(lambda s: "ws://" + s, st.text()), st.builds(lambda s: "wss://h:" + s, st.text())))
def test_check_url_returns_the_url_or_raises_value_error_only(url):
    """Whatever text the clients or `tail` are given as a URL: a ValueError or the URL itself."""
    from orderlog.client.common import check_url

    try:
        assert check_url(url) == url
    except ValueError as exc:
        assert str(exc)


@pytest.mark.parametrize("flag", ["--from-time", "--to-time"])
@pytest.mark.parametrize("value", ["yesterday", "2026-11-25T17:03:00", "2026-13-45T99:00:00Z"])
def test_a_malformed_time_is_a_one_line_error(cli, seeded_db, flag, value):
    """A time that is not RFC 3339 with an offset: one line naming the flag, exit 2."""
    assert_one_line_error(cli("events", "--db", seeded_db, flag, value), flag)


def test_exports_are_utf8_whatever_the_locale(cli, db_path):
    """Non-ASCII text is exported as UTF-8 as is, even when Python's stdout encoding is ASCII."""
    from orderlog.domain import Command, Principal
    from orderlog.records import Request
    from orderlog.store import Store

    store = Store.open(str(db_path), create=True)
    store.execute_batch([Request(Principal("staff-1", "staff"),
                                 Command("add_stock", "c-1", None, None, {"sku": "kibble", "quantity": 3, "name": "Müsli 🐹"}),
                                 "2026-11-25T17:03:00.123Z")]).outcomes
    store.close()
    for fmt in ("jsonl", "csv"):
        done = subprocess.run([sys.executable, "-m", "orderlog.cli", "events", "--db", str(db_path), "--format", fmt],
                              env=cli_env(PYTHONIOENCODING="ascii"), capture_output=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert "Müsli 🐹" in done.stdout.decode("utf-8")
    table = cli("events", "--db", db_path, "--format", "table", env=cli_env(PYTHONIOENCODING="ascii"))
    assert table.returncode == 0 and "Traceback" not in table.stderr
