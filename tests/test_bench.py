"""`orderlog bench` smoke tests: every scenario at a tiny size against a real server passes its
checks, and a feed with a gap is caught (by the checker alone, and end to end)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from orderlog_bench.ws import EVENT_RE, Chain, client_frame, unmask

from conftest import cli_env

TINY = ["--clients", "6", "--subscribers", "20", "--events", "3000", "--connections", "40", "--rounds", "1",
        "--stall-events", "3000", "--stall-seconds", "1", "--duration", "1", "--warmup", "0.3", "--drain", "10",
        "--procs", "2", "--quiet", "--json"]


def bench(tmp_path: Path, *args: str, timeout: float = 120) -> tuple[int, dict, str]:
    done = subprocess.run([sys.executable, "-m", "orderlog.cli", "bench", *args, "--cache-dir", str(tmp_path),
                           "--scratch", str(tmp_path)], cwd=tmp_path, env=cli_env(), capture_output=True, text=True,
                          timeout=timeout)
    try:
        report = json.loads(done.stdout)
    except ValueError:
        report = {}
    return done.returncode, report, done.stderr


def test_chain_catches_gap_duplicate_and_reorder() -> None:
    """A chain accepts prev == last seq held with seq > prev, and names anything else."""
    chain = Chain("orders", 10)
    assert chain.feed(12, 10) and chain.feed(15, 12)
    assert chain.error is None and chain.count == 2
    gap = Chain("orders", 10)
    assert gap.feed(12, 10) and not gap.feed(20, 17)
    assert "gap" in gap.error and "prev 17" in gap.error
    duplicate = Chain("orders", 0)
    assert duplicate.feed(1, 0) and duplicate.feed(2, 1) and not duplicate.feed(2, 1)
    assert "duplicate" in duplicate.error
    backwards = Chain("orders", 5)
    assert not backwards.feed(5, 5)


def test_frames_are_masked_and_events_parse() -> None:
    """Client frames carry a mask that undoes to the payload; the event regex reads seq and prev."""
    payload = b'{"type":"ping"}' * 20
    frame = client_frame(payload)
    assert frame[0] == 0x81 and frame[1] == 0x80 | 126
    assert unmask(frame[4:]) == payload
    event = bytearray(b'xx{"type":"order-created","channel":"orders","seq":124,"prev":97,"stream":"order:o-1","v":1}')
    m = EVENT_RE.match(event, 2, len(event))
    assert m and int(m.group(3)) == 124 and int(m.group(4)) == 97 and m.group(5) == b"order:o-1"


def test_every_scenario_passes_at_a_tiny_size(tmp_path: Path) -> None:
    """commands, fanout, replay, connections and stall finish against a real server, checks passing."""
    code, report, stderr = bench(tmp_path, "all", *TINY)
    assert code == 0, stderr[-2000:]
    assert set(report["scenarios"]) == {"commands", "fanout", "replay", "connections", "stall"}
    for name, scenario in report["scenarios"].items():
        ours = scenario["targets"]["orderlog"]
        assert scenario["ok"] and ours["ok"], (name, ours["runs"])
    assert report["scenarios"]["commands"]["targets"]["orderlog"]["median"]["acks_per_s"] > 0
    assert report["scenarios"]["fanout"]["targets"]["orderlog"]["median"]["deliveries_per_s"] > 0
    replay = report["scenarios"]["replay"]["targets"]["orderlog"]["runs"][0]
    assert replay["events"] == replay["head"] >= 3000


@pytest.mark.parametrize("scenario", ["fanout", "replay"])
def test_a_feed_with_a_gap_fails_the_scenario(tmp_path: Path, scenario: str) -> None:
    """Baselines told to drop event 3 are reported FAILED (exit 1); orderlog itself still passes."""
    code, report, stderr = bench(tmp_path, scenario, "--baseline", "--fault", "gap", *TINY)
    assert code == 1, stderr[-2000:]
    targets = report["scenarios"][scenario]["targets"]
    assert targets["orderlog"]["ok"]
    for name in ("trio", "websockets"):
        assert not targets[name]["ok"]
        problems = " ".join(targets[name]["runs"][0]["problems"])
        assert "gap" in problems or "never arrived" in problems, problems


def test_fanout_at_a_fixed_rate_where_most_customers_get_nothing(tmp_path: Path) -> None:
    """At a slow --rate most customers have no order: they must expect, and get, no event."""
    code, report, stderr = bench(tmp_path, "fanout", *TINY, "--rate", "4", "--subscribers", "40")
    assert code == 0, stderr[-2000:]
    run = report["scenarios"]["fanout"]["targets"]["orderlog"]["runs"][0]
    assert run["ok"] and 0 < run["commands"] < run["customers"], run


def test_the_server_starts_with_a_secret_that_looks_like_a_flag(tmp_path: Path) -> None:
    """secrets.token_urlsafe starts with "-" once in 64 runs: it must still reach --jwt-secret
    (it used to be taken for a flag, so serve exited and the bench printed a traceback)."""
    from orderlog_bench import start_server

    target = start_server("orderlog", tmp_path, "-Xy9" + "a" * 40, db=str(tmp_path / "flag.db"))
    try:
        assert target.alive() and target.url.startswith("ws://")
    finally:
        target.stop()


def test_a_server_that_does_not_start_is_a_failed_run(tmp_path: Path) -> None:
    """If orderlog cannot start (here its database path is a folder), the run is reported as
    FAILED with serve's own message, and the other targets and scenarios go on: no traceback."""
    from orderlog_bench import Tokens, parse_args, run_scenario

    args = parse_args(["commands", *TINY])
    (tmp_path / "commands-0.db").mkdir()  # where the bench puts this run's database
    runs = run_scenario("commands", args, Tokens("s" * 43), tmp_path, lambda line: None)
    [result] = runs["orderlog"]
    assert not result["ok"]
    problems = " ".join(result["problems"])
    assert "did not start listening" in problems and "directory" in problems, problems


@pytest.fixture(scope="module")
def node_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One `npm ci` of the Node.js client for the module (it reaches the npm registry)."""
    return tmp_path_factory.mktemp("node-cache")


NODE_SMALL = ["--subscribers", "6", "--rate", "10", "--duration", "1.5", "--warmup", "0.5", "--drain", "10",
              "--procs", "1", "--quiet", "--json"]


def test_the_node_client_reports_both_clients_side_by_side(tmp_path: Path, node_cache: Path) -> None:
    """--client both: the Python workers and the Node.js `ws` client measure orderlog and the
    websockets baseline; every run passes its checks and the figures are sane."""
    code, report, stderr = bench(tmp_path, "fanout", "--baseline", "--client", "both", *NODE_SMALL,
                                 "--cache-dir", str(node_cache), timeout=240)
    assert code == 0, stderr[-2000:]
    fanout = report["scenarios"]["fanout"]
    for name in ("orderlog", "websockets", "orderlog@node", "websockets@node"):
        target = fanout["targets"][name]
        run = target["runs"][0]
        assert target["ok"] and run["client"] == ("node" if "@" in name else "python"), (name, run)
        median = target["median"]
        assert median["deliveries_per_s"] > 0, (name, median)
        assert run["samples"] > 0 and 0 <= median["p50_ms"] <= median["p99_ms"] <= median["max_ms"] < 30_000, median
        assert run["total_deliveries"] >= run["deliveries"] > 0, run
    assert fanout["ratios"]["orderlog@node/websockets"]["p99_ms"] > 0
    assert fanout["ratios"]["orderlog/websockets"]["p99_ms"] > 0


def test_the_node_client_fails_a_feed_with_a_gap(tmp_path: Path, node_cache: Path) -> None:
    """A baseline that drops event 3 fails under the Node.js client too (exit 1); orderlog passes."""
    code, report, stderr = bench(tmp_path, "fanout", "--baseline", "--client", "node", "--fault", "gap",
                                 *NODE_SMALL, "--cache-dir", str(node_cache), timeout=240)
    assert code == 1, stderr[-2000:]
    targets = report["scenarios"]["fanout"]["targets"]
    assert set(targets) == {"trio@node", "websockets@node", "orderlog@node"}
    assert targets["orderlog@node"]["ok"]
    for name in ("trio@node", "websockets@node"):
        assert not targets[name]["ok"]
        problems = " ".join(targets[name]["runs"][0]["problems"])
        assert "gap" in problems, problems


def test_the_node_client_without_npm_is_a_clear_error(tmp_path: Path) -> None:
    """No npm on the PATH: a one-line error and exit 2, not a traceback."""
    env = {**cli_env(), "PATH": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "orderlog.cli", "bench", "fanout", "--client", "node"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "needs node and npm" in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_bad_baselines_and_scratch_are_clear_errors(tmp_path: Path) -> None:
    """--baselines names only known baselines; a --scratch folder that cannot be made is one line,
    exit 2, never a traceback."""
    for args, expected in ((["--baselines", "trio,nginx"], "expected a comma-separated list of trio and websockets"),
                           (["--scratch", str(tmp_path / "no" / "such")], "cannot make the scratch folder")):
        done = subprocess.run([sys.executable, "-m", "orderlog.cli", "bench", "fanout", "--baseline", *args],
                              cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and expected in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_only_the_named_baseline_runs(tmp_path: Path) -> None:
    """--baselines websockets runs that baseline and orderlog, not the trio one."""
    code, report, err = bench(tmp_path, "fanout", *TINY, "--baseline", "--baselines", "websockets", timeout=300)
    assert code == 0, err[-3000:]
    targets = set(report["scenarios"]["fanout"]["targets"])
    assert targets == {"websockets", "orderlog"}, targets


# -- the scripts under bin/ that measure snapshots and the dashboard ----------------------------

HERE = Path(__file__).resolve().parents[1]


def test_bench_snapshot_runs_end_to_end_on_a_small_log(seeded_db: Path) -> None:
    """bin/bench_snapshot on the seeded log, at a tiny size: every figure is printed, the snapshot
    held every order, and commands went through in all three phases."""
    done = subprocess.run([sys.executable, str(HERE / "bin" / "bench_snapshot"), "--db", str(seeded_db), "--repeat", "1",
                           "--seconds", "0.5", "--clients", "3"], env=cli_env(), capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    run = next(line for line in done.stdout.splitlines() if line.startswith("run 1: "))
    figures = dict(part.rsplit(" ", 1) for part in run[len("run 1: "):].split(", "))
    rows = float(figures["rows"].replace(",", ""))
    assert rows > 0 and float(figures["commands_per_s_alone"].replace(",", "")) > 0
    assert float(figures["commands_per_s_with_snapshots"].replace(",", "")) > 0
    # Trio names a worker thread after the job it runs at the moment, so which names appear varies.
    cpu = next(line for line in done.stdout.splitlines() if "CPU s over 0.5 s, with snapshots:" in line)
    assert "server " in cpu and "command clients" in cpu and "snapshot taker" in cpu, cpu
    assert "median ratio:" in done.stdout


def test_bench_dashboard_runs_end_to_end_on_a_small_log(seeded_db: Path, chromium: str) -> None:
    """bin/bench_dashboard on the seeded log, in Debian's chromium: the page loads every count
    (the script waits for them), the live order shows, and both replays count every event."""
    done = subprocess.run([sys.executable, str(HERE / "bin" / "bench_dashboard"), "--db", str(seeded_db), "--repeat",
                           "1"], env=cli_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    run = next(line for line in done.stdout.splitlines() if line.startswith("run 1: "))
    figures = dict(part.rsplit(" ", 1) for part in run[len("run 1: "):].split(", "))
    assert float(figures["replay_events"].replace(",", "")) > 0
    for key in ("loaded_s", "live_s", "replay_events_per_s", "bare_replay_messages_per_s"):
        assert float(figures[key].replace(",", "")) > 0, key
