"""`orderlog bench`: load scenarios over real sockets, from separate processes, with checks.

Theory of operation. The bench starts the server itself (`python -m orderlog.cli serve --port 0
...` on a fresh database in a scratch folder; it reads the URL from the `event=listening` log
line) unless `--url` is given, and with `--baseline` it also starts the two baseline servers
of `orderlog_bench.baselines` and runs the very same load against them, one after the other,
so each figure comes with a ratio measured minutes apart on the same machine.

The load comes from worker processes (`orderlog_bench.workers`), each a selectors loop over
raw non-blocking sockets with a hand-written WebSocket client (`orderlog_bench.ws`), so the
client stays cheap. Every scenario checks what it received: on each subscription `prev` must
equal the seq received before and seqs must increase; the expected number of events must
arrive; customers must see only their own orders; replays must cover every seq up to the head
exactly once. A failed check marks the scenario FAILED and the command exits 1.

Server cost is read from /proc/<pid>/stat (utime + stime, all threads) and /proc/<pid>/status
(VmRSS) before and after the measured window.

Modules: `processes` (servers under load, worker processes, tokens), `scenarios` (the load and
its checks), `report` (medians, ratios, tables), `workers` and `ws` (inside the worker
processes), `baselines` (the baseline servers). This one is the command line.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

from .processes import BenchError, Pool, Target, Tokens, git_commit, raise_fd_limit, start_server
from .report import METRICS, TARGETS_NOTE, describe, render, summarize
from .scenarios import BASELINES, SCENARIOS, run_scenario

__all__ = ["BASELINES", "METRICS", "SCENARIOS", "TARGETS_NOTE", "BenchError", "Pool", "Target", "Tokens", "describe",
           "main", "parse_args", "register", "render", "run_scenario", "start_server", "summarize"]


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The flags of `orderlog bench ARGS...` (see `register`)."""
    parser = argparse.ArgumentParser(prog="orderlog")
    register(parser.add_subparsers())
    return parser.parse_args(["bench", *argv])


def main(argv: list[str]) -> int:
    """`orderlog bench ARGS...`: the CLI hands the arguments over."""
    args = parse_args(argv)
    return args.func(args)


def _baselines(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    unknown = [name for name in names if name not in BASELINES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {' and '.join(BASELINES)}, got {text!r}")
    return names


def cmd_bench(args: argparse.Namespace) -> int:
    scenarios = list(SCENARIOS) if "all" in args.scenarios else list(dict.fromkeys(args.scenarios))
    if args.url and not args.jwt_secret:
        print("orderlog: error: --url needs --jwt-secret (the bench mints its own tokens)", file=sys.stderr)
        return 2
    if args.url and "stall" in scenarios:
        print("orderlog: error: stall needs a server started by the bench (drop --url)", file=sys.stderr)
        return 2
    if args.baseline:
        try:
            import websockets  # noqa: F401
        except ImportError:
            print("orderlog: error: --baseline needs the websockets package: pip install -e '.[bench]'",
                  file=sys.stderr)
            return 2
    args.client_now = "python"
    if args.client != "python" and "fanout" in scenarios:
        from .nodeclient import missing_tools

        lacking = missing_tools()
        if lacking:
            print(f"orderlog: error: {lacking}", file=sys.stderr)
            return 2
    limit = raise_fd_limit()
    if "connections" in scenarios and limit < args.connections + 1100:
        print(f"orderlog: error: --connections {args.connections} needs more open files than RLIMIT_NOFILE "
              f"allows ({limit})", file=sys.stderr)
        return 2
    args.cache_dir = Path(args.cache_dir)
    args.cache_dir.mkdir(parents=True, exist_ok=True)

    def say(line: str) -> None:
        if not args.quiet:
            print(f"orderlog bench: {line}", file=sys.stderr, flush=True)

    tokens = Tokens(args.jwt_secret or secrets.token_urlsafe(32))
    report: dict[str, Any] = {**git_commit(), "cpus": os.cpu_count(), "python": sys.version.split()[0],
                              "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                                          if k not in ("func", "jwt_secret", "client_now")}, "scenarios": {}}
    say(f"commit {report['commit']}{' (with local changes in ' + ', '.join(report['dirty_files']) + ')' if report['dirty_files'] else ''}")
    try:
        workdir = Path(tempfile.mkdtemp(prefix="orderlog-bench-", dir=args.scratch))
    except OSError as exc:
        print(f"orderlog: error: --scratch {args.scratch}: cannot make the scratch folder there: "
              f"{exc.strerror or exc}", file=sys.stderr)
        return 2
    args.workdir = workdir
    ok = True
    try:
        if args.client != "python" and "fanout" in scenarios:
            from .nodeclient import ensure_installed

            try:
                args.node_modules = ensure_installed(args.cache_dir, say)
            except BenchError as exc:
                print(f"orderlog: error: {exc}", file=sys.stderr)
                return 2
        for scenario in scenarios:
            summary = summarize(scenario, run_scenario(scenario, args, tokens, workdir, say))
            report["scenarios"][scenario] = summary
            ok = ok and summary["ok"]
            if not args.json:
                print(render(scenario, summary, args), flush=True)
    finally:
        if args.keep:
            say(f"kept the scratch folder {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        print(json.dumps(report, indent=1, default=str))
    return 0 if ok else 1


def _positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError("must be > 0")
        return value

    parse.__name__ = kind.__name__
    return parse


def _pids(text: str) -> str:
    """--server-pid: one pid or several, comma-separated."""
    if not all(part.strip().isdigit() for part in text.split(",")):
        raise argparse.ArgumentTypeError(f"not a pid or a list of pids: {text!r}")
    return text


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def register(subparsers: "argparse._SubParsersAction") -> None:
    """Add `orderlog bench` to the CLI."""
    p = subparsers.add_parser(
        "bench", help="load scenarios over real sockets, with integrity checks and baselines",
        description="Run load scenarios against a server the bench starts (a fresh database in a scratch "
        "folder) or one given with --url, from several client processes, and check everything received "
        "(no gap, no duplicate, only one's own orders). --baseline runs the same load against a minimal "
        "trio-websocket server and a minimal `websockets` broadcast server too and reports ratios. "
        "A failed check reports FAILED and exits 1.",
    )
    p.add_argument("scenarios", nargs="+", choices=[*SCENARIOS, "all"], metavar="SCENARIO",
                   help="commands, fanout, replay, connections, stall, or all")
    p.add_argument("--url", help="bench a running server instead (needs --jwt-secret; no CPU/RSS unless --server-pid); "
                   "several nodes of one log as URL1,URL2,...: fanout spreads its subscriber processes over them")
    p.add_argument("--jwt-secret", help="the server's HS256 secret, with --url")
    p.add_argument("--server-pid", type=_pids, help="with --url: the server's pid (PID1,PID2,... for several nodes: "
                   "CPU is summed), for CPU and RSS figures")
    p.add_argument("--baseline", action="store_true", help="also run the baselines (needs the `bench` extra)")
    p.add_argument("--baselines", type=_baselines, default=BASELINES, metavar="NAME[,NAME]",
                   help="with --baseline: which ones, of trio and websockets (default both)")
    p.add_argument("--repeat", type=_positive(int), default=1, help="runs per target; medians are reported (default 1)")
    p.add_argument("--procs", type=_positive(int), default=2, help="client processes (default 2)")
    p.add_argument("--duration", type=_positive(float), default=10.0, help="measured seconds per run (default 10)")
    p.add_argument("--warmup", type=_non_negative, default=2.0, help="unmeasured seconds before (default 2)")
    p.add_argument("--synchronous", default="FULL", choices=["FULL", "NORMAL", "OFF"],
                   help="the server's SQLite durability (default FULL)")
    g = p.add_argument_group("commands")
    g.add_argument("--clients", type=_positive(int), default=200, help="closed-loop clients (default 200)")
    g = p.add_argument_group("fanout")
    g.add_argument("--subscribers", type=_positive(int), default=1000, help="subscribers (default 1000)")
    g.add_argument("--staff-share", type=float, default=0.5,
                   help="share of subscribers that are staff on `orders`; the rest are customers on their own "
                   "orders (default 0.5)")
    g.add_argument("--rate", type=_non_negative, default=0.0,
                   help="commands/s (each is one delivery to every staff subscriber and to one customer); "
                   "0 = flat out (default)")
    g.add_argument("--window", type=_positive(int), default=16,
                   help="commands the driver may be ahead of its own feed (default 16)")
    g.add_argument("--drain", type=_positive(float), default=60.0,
                   help="seconds allowed after the load for every subscriber to get everything (default 60)")
    g.add_argument("--client", choices=["python", "node", "both"], default="python",
                   help="who subscribes: the Python workers (default), one Node.js process using the `ws` "
                   "package (installed with npm into --cache-dir on first use; latency = event `at` -> receipt), "
                   "or both, reported side by side")
    g = p.add_argument_group("replay and stall")
    g.add_argument("--events", type=_positive(int), default=1_000_000, help="replay log size (default 1,000,000)")
    g.add_argument("--replay-timeout", type=_positive(float), default=600.0, help="(default 600 s)")
    g.add_argument("--stall-events", type=_positive(int), default=1_000_000,
                   help="events appended while the subscriber stalls (default 1,000,000)")
    g.add_argument("--stall-seconds", type=_positive(float), default=60.0,
                   help="at least this long without reading (default 60)")
    g = p.add_argument_group("connections")
    g.add_argument("--connections", type=_positive(int), default=10_000, help="idle connections (default 10,000)")
    g.add_argument("--rounds", type=_positive(int), default=3, help="new events sent to them, 1 s apart (default 3)")
    g.add_argument("--settle", type=_non_negative, default=2.0, help="seconds before reading RSS (default 2)")
    g = p.add_argument_group("output and files")
    g.add_argument("--json", action="store_true", help="print one JSON report instead of tables")
    g.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    g.add_argument("--cache-dir", default=tempfile.gettempdir(), help="where replay logs are cached (default /tmp)")
    g.add_argument("--scratch", default=None, help="parent of the scratch folder (default the system temp dir)")
    g.add_argument("--keep", action="store_true", help="keep the scratch folder (server logs)")
    g.add_argument("--fault", choices=["gap"], help=argparse.SUPPRESS)  # baselines misbehave: tests the checker
    p.set_defaults(func=cmd_bench)
