"""`orderlog bench`: load scenarios over real sockets, from separate processes, with checks.

Theory of operation. The bench starts the server itself (`python -m orderlog.cli serve --port 0
...` on a fresh database in a scratch folder; it reads the URL from the `event=listening` log
line) unless `--url` is given, and with `--baseline` it also starts the two baseline servers
of `orderlog.bench_baselines` and runs the very same load against them, one after the other,
so each figure comes with a ratio measured minutes apart on the same machine.

The load comes from worker processes (`orderlog.bench_workers`), each a selectors loop over
raw non-blocking sockets with a hand-written WebSocket client (`orderlog.bench_ws`), so the
client stays cheap. Every scenario checks what it received: on each subscription `prev` must
equal the seq received before and seqs must increase; the expected number of events must
arrive; customers must see only their own orders; replays must cover every seq up to the head
exactly once. A failed check marks the scenario FAILED and the command exits 1.

Server cost is read from /proc/<pid>/stat (utime + stime, all threads) and /proc/<pid>/status
(VmRSS) before and after the measured window.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import re
import resource
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from array import array
from pathlib import Path
from typing import Any, Callable

SCENARIOS = ("commands", "fanout", "replay", "connections", "stall")
BASELINES = ("trio", "websockets")
START_TIMEOUT = 60.0  # seconds for a server to log that it listens
STOP_TIMEOUT = 15.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
LISTENING_RE = re.compile(rb"event=listening url=(\S+)")
TOKEN_TTL = 6 * 3600.0
STALL_RCVBUF = 64 * 1024  # the stalled subscriber's socket receive buffer

# Per scenario: (key, column label, format, which way is better: +1 higher, -1 lower).
METRICS: dict[str, list[tuple[str, str, str, int]]] = {
    "commands": [("acks_per_s", "acks/s", "{:,.0f}", 1), ("p50_ms", "p50 ms", "{:.2f}", -1),
                 ("p99_ms", "p99 ms", "{:.2f}", -1), ("p999_ms", "p99.9 ms", "{:.2f}", -1),
                 ("cpu_us_per_ack", "cpu µs/ack", "{:.1f}", -1)],
    "fanout": [("deliveries_per_s", "deliveries/s", "{:,.0f}", 1), ("commands_per_s", "commands/s", "{:,.1f}", 1),
               ("p50_ms", "p50 ms", "{:.2f}", -1), ("p99_ms", "p99 ms", "{:.2f}", -1),
               ("p999_ms", "p99.9 ms", "{:.2f}", -1), ("cpu_us_per_delivery", "cpu µs/delivery", "{:.2f}", -1)],
    "replay": [("events", "events", "{:,.0f}", 0), ("seconds", "seconds", "{:.2f}", -1),
               ("events_per_s", "events/s", "{:,.0f}", 1), ("cpu_us_per_event", "cpu µs/event", "{:.2f}", -1)],
    "connections": [("connections", "connections", "{:,.0f}", 0), ("open_seconds", "open s", "{:.1f}", -1),
                    ("rss_per_conn_kb", "RSS KB/conn", "{:.1f}", -1), ("all_received_ms", "all got it ms", "{:.0f}", -1),
                    ("all_received_max_ms", "worst ms", "{:.0f}", -1)],
    "stall": [("events", "events", "{:,.0f}", 0), ("append_seconds", "append s", "{:.1f}", 0),
              ("rss_before_mb", "RSS before MB", "{:.1f}", 0), ("rss_peak_mb", "RSS peak MB", "{:.1f}", -1),
              ("rss_growth_mb", "growth MB", "{:.1f}", -1), ("catchup_seconds", "catch-up s", "{:.1f}", -1),
              ("catchup_events_per_s", "catch-up ev/s", "{:,.0f}", 1)],
}
TARGETS_NOTE = {
    "commands": "target: orderlog acks/s >= 0.6x the trio-websocket echo baseline",
    "fanout": "compare deliveries/s and cpu µs/delivery with the websockets broadcast baseline",
    "replay": "target: >= 200,000 events/s to one client",
    "connections": "targets: RSS growth <= 30 KB per connection; every connection receives a new event within 1 s",
    "stall": "target: the server's memory stays bounded while the subscriber does not read",
}


class BenchError(Exception):
    """The bench could not run a scenario (a server did not start, a worker crashed...)."""


# -- servers ------------------------------------------------------------------------------------


class Target:
    """A server under load: orderlog or a baseline, started by us (or given with --url)."""

    def __init__(self, name: str, url: str, pid: int | None, proc: subprocess.Popen | None, log: Path | None,
                 db: str | None = None):
        self.name = name
        self.url = url
        self.pid = pid
        self.proc = proc
        self.log = log
        self.db = db

    def cpu(self) -> float | None:
        """Seconds of CPU (user + system, all threads) the server used so far."""
        if self.pid is None:
            return None
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / CLK_TCK
        except (OSError, IndexError, ValueError):
            return None

    def status(self, key: str) -> int | None:
        """A /proc/<pid>/status size (VmRSS, VmHWM) in bytes."""
        if self.pid is None:
            return None
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith(key + ":"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def rss(self) -> int | None:
        return self.status("VmRSS")

    def alive(self) -> bool:
        return self.proc is None or self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORDERLOG_")}
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    return env


def start_server(name: str, workdir: Path, secret: str, *, db: str | None = None, args: list[str] = (),
                 fault: str | None = None) -> Target:
    """Start orderlog (`name` == "orderlog") or a baseline on port 0 and wait for its URL."""
    log = workdir / f"{name}-{time.time_ns()}.log"
    if name == "orderlog":
        command = [sys.executable, "-m", "orderlog.cli", "serve", "--db", db, "--host", "127.0.0.1", "--port", "0",
                   f"--jwt-secret={secret}", *args]  # one argument: a secret may start with "-"
    else:
        command = [sys.executable, "-m", "orderlog_bench.baselines", name, "--port", "0"]
        if fault:
            command += ["--fault", fault]
    with open(log, "wb") as err:
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                env=_clean_env(), start_new_session=True)
    deadline = time.time() + START_TIMEOUT
    while time.time() < deadline:
        found = LISTENING_RE.search(log.read_bytes())
        if found:
            return Target(name, found.group(1).decode(), proc.pid, proc, log, db)
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    if proc.poll() is None:
        proc.kill()
        proc.wait(5)
    tail = log.read_bytes()[-2000:].decode("utf-8", "replace")
    raise BenchError(f"{name} did not start listening:\n{tail}")


# -- worker processes ---------------------------------------------------------------------------------


class Pool:
    """Worker processes (forked) and their pipes; every wait bounded."""

    def __init__(self) -> None:
        self.context = multiprocessing.get_context("fork")
        self.workers: list[tuple[Any, Any]] = []

    def start(self, role: Callable, config: dict) -> int:
        from .workers import run_worker

        parent, child = self.context.Pipe()
        process = self.context.Process(target=run_worker, args=(role, config, child), daemon=True)
        process.start()
        child.close()
        self.workers.append((process, parent))
        return len(self.workers) - 1

    def receive(self, index: int, kind: str, timeout: float) -> dict:
        process, pipe = self.workers[index]
        if not pipe.poll(timeout):
            raise BenchError(f"worker {index} sent no {kind!r} within {timeout:.0f} s")
        try:
            got, payload = pipe.recv()
        except EOFError:
            raise BenchError(f"worker {index} exited before sending {kind!r}") from None
        if got == "error":
            raise BenchError(f"worker {index} crashed: {payload}")
        if got != kind:
            raise BenchError(f"worker {index} sent {got!r}, expected {kind!r}")
        return payload

    def gather(self, kind: str, timeout: float, indices: list[int] | None = None) -> list[dict]:
        deadline = time.time() + timeout
        return [self.receive(i, kind, max(0.1, deadline - time.time()))
                for i in (range(len(self.workers)) if indices is None else indices)]

    def send(self, message: tuple, indices: list[int] | None = None) -> None:
        for i in range(len(self.workers)) if indices is None else indices:
            try:
                self.workers[i][1].send(message)
            except (BrokenPipeError, OSError):
                pass

    def close(self) -> None:
        for process, pipe in self.workers:
            process.join(5)
            if process.is_alive():
                process.terminate()
                process.join(5)
            pipe.close()
        self.workers = []

    def __enter__(self) -> "Pool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# -- helpers ------------------------------------------------------------------------------------------


class Tokens:
    def __init__(self, secret: str):
        self.secret = secret
        self._cache: dict[tuple[str, str], str] = {}

    def __call__(self, sub: str, role: str = "customer") -> str:
        from orderlog.auth import mint

        key = (sub, role)
        if key not in self._cache:
            self._cache[key] = mint(sub, role, TOKEN_TTL, time.time(), self.secret, "HS256")
        return self._cache[key]


def percentiles(blobs: list[bytes]) -> dict[str, float | None]:
    values = array("d")
    for blob in blobs:
        values.frombytes(blob)
    if not values:
        return {"p50_ms": None, "p99_ms": None, "p999_ms": None, "samples": 0}
    ordered = sorted(values)
    n = len(ordered)

    def at(q: float) -> float:
        return ordered[min(n - 1, int(math.ceil(q * n)) - 1)] * 1000

    return {"p50_ms": at(0.5), "p99_ms": at(0.99), "p999_ms": at(0.999), "samples": n}


def split(items: list, parts: int) -> list[list]:
    return [chunk for chunk in (items[i::parts] for i in range(parts)) if chunk]


def sleep_until(when: float) -> None:
    delay = when - time.time()
    if delay > 0:
        time.sleep(delay)


def _cpu_delta(target: Target, before: float | None) -> float | None:
    after = target.cpu()
    return None if before is None or after is None else after - before


def _per(cpu: float | None, count: int) -> float | None:
    return cpu * 1e6 / count if cpu is not None and count else None


def _problems(*lists: Any) -> list[str]:
    """The problems of every list, each distinct text once (with how often it came)."""
    counts: dict[str, int] = {}
    for items in lists:
        for item in items or []:
            if item:
                counts[str(item)] = counts.get(str(item), 0) + 1
    return [text if n == 1 else f"{text} (x{n})" for text, n in counts.items()]


# -- scenarios ------------------------------------------------------------------------------------------


def scenario_commands(target: Target, o: argparse.Namespace, tokens: Tokens) -> dict:
    from .workers import DRAIN_TIMEOUT, SETUP_TIMEOUT, commands_role, setup_stock

    setup_stock(target.url, tokens("bench-staff", "staff"))
    tag = f"k{time.time_ns() % 10**10}"
    clients = [(i, (tokens(f"cc-{i}", "customer"), tokens(f"cs-{i % 8}", "staff"))) for i in range(o.clients)]
    with Pool() as pool:
        for chunk in split(clients, o.procs):
            pool.start(commands_role, {"url": target.url, "tag": tag, "clients": chunk})
        ready = pool.gather("ready", SETUP_TIMEOUT + 30)
        problems = _problems(*(r["errors"] for r in ready))
        if problems:
            return {"ok": False, "problems": problems}
        start = time.time() + 0.3
        window = (start + o.warmup, start + o.warmup + o.duration)
        pool.send(("go", {"window": window}))
        sleep_until(window[0])
        cpu0 = target.cpu()
        sleep_until(window[1])
        cpu = _cpu_delta(target, cpu0)
        results = pool.gather("result", DRAIN_TIMEOUT + 30)
    acks = sum(r["in_window"] for r in results)
    problems = _problems(*(r["errors"] for r in results))
    outstanding = sum(r["outstanding"] for r in results)
    if outstanding:
        problems.append(f"{outstanding} commands were never answered")
    out = {"clients": o.clients, "acks": acks, "acks_per_s": acks / o.duration, "cpu_us_per_ack": _per(cpu, acks),
           "rejected": sum(r["rejected"] for r in results)}
    out.update(percentiles([r["latencies"] for r in results]))
    out["ok"] = not problems
    out["problems"] = problems[:10]
    return out


def scenario_fanout(target: Target, o: argparse.Namespace, tokens: Tokens) -> dict:
    from .workers import DRAIN_TIMEOUT, SETUP_TIMEOUT, driver_role, setup_stock, subscriber_role

    setup_stock(target.url, tokens("bench-staff", "staff"))
    staff = round(o.subscribers * o.staff_share)
    customers = [f"fc-{j}" for j in range(o.subscribers - staff)]
    subs = [(tokens(f"fs-{i}", "staff"), f"fs-{i}", "staff", "orders", None) for i in range(staff)]
    subs += [(tokens(user, "customer"), user, "customer", "orders", f"order:{user}.") for user in customers]
    tag = f"f{time.time_ns() % 10**10}"
    with Pool() as pool:
        subscriber_ids = [pool.start(subscriber_role, {"url": target.url, "subs": chunk, "latency": True})
                          for chunk in split(subs, o.procs)]
        ready = pool.gather("ready", SETUP_TIMEOUT + 30, subscriber_ids)
        problems = _problems(*(r["errors"] for r in ready))
        driver = pool.start(driver_role, {"url": target.url, "token": tokens("fan-driver", "staff"),
                                          "customers": customers or ["fc-nobody"], "tag": tag, "rate": o.rate,
                                          "window": o.window})
        problems += _problems(pool.receive(driver, "ready", SETUP_TIMEOUT)["errors"])
        if problems:
            pool.send(("go", {"window": (0, 0), "start": 0}))
            return {"ok": False, "problems": problems[:10]}
        start = time.time() + 0.3
        window = (start + o.warmup, start + o.warmup + o.duration)
        pool.send(("go", {"window": window, "start": start, "timeout": o.warmup + o.duration + 600}))
        sleep_until(window[0])
        cpu0 = target.cpu()
        sleep_until(window[1])
        cpu = _cpu_delta(target, cpu0)
        driven = pool.receive(driver, "result", DRAIN_TIMEOUT + 30)
        expected = dict(driven["per_customer"])
        expected["*"] = driven["expected_total"]
        pool.send(("stop", {"expected": expected, "drain": o.drain}), subscriber_ids)
        results = pool.gather("result", o.drain + 30, subscriber_ids)
    deliveries = sum(r["in_window"] for r in results)
    problems = _problems(driven["errors"], [driven["driver_chain_error"]],
                         *(r["errors"] for r in results), *(r["chain_errors"] for r in results),
                         *(r["incomplete_examples"] for r in results))
    incomplete = sum(r["incomplete"] for r in results)
    if incomplete:
        problems.insert(0, f"{incomplete} subscriptions did not receive every event within {o.drain:.0f} s")
    foreign = sum(r["foreign"] for r in results)
    if foreign:
        problems.insert(0, f"customers received {foreign} events of other customers' orders")
    out = {"subscribers": o.subscribers, "staff": staff, "customers": len(customers), "rate": o.rate,
           "deliveries": deliveries, "deliveries_per_s": deliveries / o.duration,
           "commands_per_s": driven["sent_in_window"] / o.duration, "commands": driven["sent"],
           "cpu_us_per_delivery": _per(cpu, deliveries), "total_deliveries": sum(r["total"] for r in results)}
    out.update(percentiles([r["latencies"] for r in results]))
    out["ok"] = not problems
    out["problems"] = problems[:10]
    return out


def scenario_replay(target: Target, o: argparse.Namespace, tokens: Tokens) -> dict:
    from .workers import catchup_role, ping_head

    token = tokens("replayer", "staff")
    if target.name == "orderlog":
        head = ping_head(target.url, token)
        requests = [{"type": "subscribe", "channel": "orders", "since": 0},
                    {"type": "subscribe", "channel": "inventory", "since": 0}]
    else:
        head = o.events
        requests = [{"type": "subscribe", "channel": "orders", "since": 0, "bench_replay": head},
                    {"type": "subscribe", "channel": "inventory", "since": 0}]
    with Pool() as pool:
        pool.start(catchup_role, {"url": target.url, "token": token, "requests": requests})
        problems = _problems(pool.gather("ready", 60)[0]["errors"])
        if problems:
            return {"ok": False, "problems": problems}
        cpu0 = target.cpu()
        pool.send(("go", {"head": head, "timeout": o.replay_timeout}))
        result = pool.gather("result", o.replay_timeout + 60)[0]
        cpu = _cpu_delta(target, cpu0)
    problems = _problems(result["errors"], result["chain_errors"])
    if not result["finished"]:
        problems.append(f"the replay did not finish within {o.replay_timeout:.0f} s")
    if result["missing"] or result["duplicated"]:
        problems.append(f"of seqs 1..{head}: {result['missing']} never arrived, {result['duplicated']} arrived twice")
    received = result["received"]
    out = {"head": head, "events": received, "seconds": result["seconds"],
           "events_per_s": received / result["seconds"] if result["seconds"] else None,
           "cpu_us_per_event": _per(cpu, received), "ok": not problems, "problems": problems[:10]}
    return out


def scenario_connections(target: Target, o: argparse.Namespace, tokens: Tokens) -> dict:
    from .workers import DRAIN_TIMEOUT, driver_role, setup_stock, subscriber_role

    setup_stock(target.url, tokens("bench-staff", "staff"))
    time.sleep(0.5)
    rss0 = target.rss()
    token = tokens("idle-watcher", "staff")
    subs = [(token, f"idle-{i}", "staff", "orders", None) for i in range(o.connections)]
    setup = max(120.0, o.connections / 50)
    started = time.time()
    with Pool() as pool:
        ids = [pool.start(subscriber_role, {"url": target.url, "subs": chunk, "latency": False, "notes": True,
                                            "setup_timeout": setup}) for chunk in split(subs, o.procs)]
        ready = pool.gather("ready", setup + 30, ids)
        opened = time.time() - started
        problems = _problems(*(r["errors"] for r in ready))
        subscribed = sum(r["subscribed"] for r in ready)
        if problems or subscribed < o.connections:
            pool.send(("go", {"window": (0, 0)}), ids)
            return {"ok": False, "problems": [f"only {subscribed} of {o.connections} subscribed", *problems][:10]}
        time.sleep(o.settle)
        rss1 = target.rss()
        driver = pool.start(driver_role, {"url": target.url, "token": tokens("idle-driver", "staff"),
                                          "customers": ["idle-customer"], "tag": f"c{time.time_ns() % 10**10}",
                                          "rate": 0, "window": 1, "count": o.rounds, "gap": 1.0})
        problems += _problems(pool.receive(driver, "ready", 60)["errors"])
        start = time.time() + 0.3
        end = start + o.rounds * 1.0 + 10
        pool.send(("go", {"window": (start, end), "start": start, "timeout": end - start + 600}))
        driven = pool.receive(driver, "result", end - start + DRAIN_TIMEOUT + 30)
        pool.send(("stop", {"expected": {"*": driven["expected_total"]}, "drain": o.drain}), ids)
        results = pool.gather("result", o.drain + 60, ids)
    problems += _problems(driven["errors"], *(r["errors"] for r in results), *(r["chain_errors"] for r in results),
                          *(r["incomplete_examples"] for r in results))
    notes: dict[str, list] = {}
    for r in results:
        for note, (count, first, last) in r["notes"].items():
            entry = notes.setdefault(note, [0, first, last])
            entry[0] += count
            entry[1] = min(entry[1], first)
            entry[2] = max(entry[2], last)
    delays = []
    for note, (count, first, last) in sorted(notes.items()):
        if count != o.connections:
            problems.append(f"the event sent at {note} reached {count} of {o.connections} connections")
        delays.append((last - float(note)) * 1000)
    if len(notes) != o.rounds:
        problems.append(f"{len(notes)} distinct events arrived, {o.rounds} were sent")
    growth = rss1 - rss0 if rss0 is not None and rss1 is not None else None
    out = {"connections": o.connections, "open_seconds": opened, "rss_before_mb": rss0 / 2**20 if rss0 else None,
           "rss_after_mb": rss1 / 2**20 if rss1 else None,
           "rss_per_conn_kb": growth / o.connections / 1024 if growth is not None else None,
           "all_received_ms": statistics.median(delays) if delays else None,
           "all_received_max_ms": max(delays) if delays else None, "rounds": delays}
    out["ok"] = not problems
    out["problems"] = problems[:10]
    return out


def scenario_stall(target: Target, o: argparse.Namespace, tokens: Tokens) -> dict:
    from .workers import catchup_role, ping_head

    if target.db is None:
        raise BenchError("stall needs a server started by the bench (it appends to its database)")
    token = tokens("staller", "staff")
    requests = [{"type": "subscribe", "channel": "orders", "since": 0},
                {"type": "subscribe", "channel": "inventory", "since": 0}]
    commands = max(100, int(o.stall_events / 1.85))
    with Pool() as pool:
        pool.start(catchup_role, {"url": target.url, "token": token, "requests": requests, "stall": True,
                                  "rcvbuf": STALL_RCVBUF, "capacity": o.stall_events})
        problems = _problems(pool.gather("ready", 60)[0]["errors"])
        if problems:
            return {"ok": False, "problems": problems}
        time.sleep(0.5)
        rss0 = target.rss() or 0
        pool.send(("go", {"timeout": o.stall_seconds * 4 + 900}))
        began = time.time()
        appender = subprocess.Popen(
            [sys.executable, "-m", "orderlog.cli", "seed", "--db", target.db, "--commands", str(commands),
             "--seed", "3", "--synchronous", "OFF"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            env=_clean_env())
        peak = rss0
        appended_at = None
        db_head = None
        deadline = began + max(o.stall_seconds, 30) + 1200
        while time.time() < deadline:
            peak = max(peak, target.rss() or 0)
            if appended_at is None and appender.poll() is not None:
                appended_at = time.time()
                if appender.returncode != 0:
                    raise BenchError(f"seed failed: {appender.stderr.read().decode()[-500:]}")
                db_head = _db_head(target.db)
            if appended_at is not None and time.time() >= began + o.stall_seconds:
                if ping_head(target.url, tokens("stall-probe", "staff")) >= db_head:
                    break
            time.sleep(0.25)
        else:
            appender.kill()
            raise BenchError("the append did not finish in time")
        appender.stderr.close()
        stalled = time.time() - began
        peak = max(peak, target.rss() or 0)
        pool.send(("resume", {"head": db_head}))
        result = pool.gather("result", o.stall_seconds * 4 + 900)[0]
        rss_after = target.rss()
    problems = _problems(result["errors"], result["chain_errors"])
    if not result["finished"]:
        problems.append("the subscriber did not catch up in time")
    if result["missing"] or result["duplicated"]:
        problems.append(f"of seqs 1..{db_head}: {result['missing']} never arrived, {result['duplicated']} arrived twice")
    out = {"events": db_head, "append_seconds": appended_at - began, "stalled_seconds": stalled,
           "rss_before_mb": rss0 / 2**20, "rss_peak_mb": peak / 2**20, "rss_growth_mb": (peak - rss0) / 2**20,
           "rss_after_mb": rss_after / 2**20 if rss_after else None,
           "catchup_seconds": result["seconds"], "catchup_events": result["caught_up"],
           "catchup_events_per_s": result["caught_up"] / result["seconds"] if result["seconds"] else None,
           "ok": not problems, "problems": problems[:10]}
    return out


RUNNERS: dict[str, Callable[[Target, argparse.Namespace, Tokens], dict]] = {
    "commands": scenario_commands, "fanout": scenario_fanout, "replay": scenario_replay,
    "connections": scenario_connections, "stall": scenario_stall,
}


def _db_head(path: str) -> int:
    from orderlog.store import Store

    store = Store.open(path, readonly=True)
    try:
        return store.head()
    finally:
        store.close()


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The flags of `orderlog bench ARGS...` (see `register`)."""
    parser = argparse.ArgumentParser(prog="orderlog")
    register(parser.add_subparsers())
    return parser.parse_args(["bench", *argv])


def main(argv: list[str]) -> int:
    """`orderlog bench ARGS...`: the CLI hands the arguments over."""
    args = parse_args(argv)
    return args.func(args)


# -- the replay log cache ---------------------------------------------------------------------------


def ensure_log(cache_dir: Path, events: int, say: Callable[[str], None]) -> Path:
    """A log of at least `events` events, built once with the seed generator and cached by size."""
    from orderlog.store import Store
    from orderlog.store.seeding import run_seed

    path = cache_dir / f"orderlog-bench-replay-{events}.db"
    if path.exists():
        return path
    building = cache_dir / f"orderlog-bench-replay-{events}.{os.getpid()}.building.db"
    say(f"building a {events:,}-event log in {path} (once; reused by later runs) ...")
    started = time.time()
    store = Store.open(str(building), create=True, synchronous="OFF")
    try:
        while store.head() < events:
            run_seed(store, max(1000, int((events - store.head()) / 1.85)), 1, 2000)
        store.checkpoint()
    finally:
        store.close()
    for suffix in ("-wal", "-shm"):
        leftover = Path(str(building) + suffix)
        if leftover.exists() and leftover.stat().st_size and suffix == "-wal":
            raise BenchError(f"{leftover} is not empty after the checkpoint")
        leftover.unlink(missing_ok=True)
    os.replace(building, path)
    say(f"built in {time.time() - started:.0f} s")
    return path


# -- running and reporting ------------------------------------------------------------------------------


def server_args(scenario: str, o: argparse.Namespace) -> list[str]:
    args = ["--rate-limit", "1000000000", "--synchronous", o.synchronous,
            "--max-connections", str(max(10_000, o.connections + 1000))]
    if scenario == "stall":
        args += ["--ping-interval", f"{int(o.stall_seconds * 4 + 900)}s"]
    return args


def run_scenario(scenario: str, o: argparse.Namespace, tokens: Tokens, workdir: Path,
                 say: Callable[[str], None]) -> dict[str, list[dict]]:
    targets = []
    if o.baseline and scenario != "stall":
        targets += list(BASELINES)
    targets.append("orderlog")
    runs: dict[str, list[dict]] = {t: [] for t in targets}
    replay_db = ensure_log(o.cache_dir, o.events, say) if scenario == "replay" and not o.url else None
    for attempt in range(o.repeat):
        for name in targets:
            target: Target | None = None
            try:  # a server that does not start is a FAILED run too, not a traceback
                if name == "orderlog" and o.url:
                    target = Target("orderlog", o.url, o.server_pid, None, None)
                else:
                    db = str(replay_db) if replay_db else str(workdir / f"{scenario}-{attempt}.db")
                    target = start_server(name, workdir, tokens.secret, db=db, args=server_args(scenario, o),
                                          fault=o.fault if name != "orderlog" else None)
                say(f"{scenario} run {attempt + 1}/{o.repeat} against {name} ({target.url}) ...")
                result = RUNNERS[scenario](target, o, tokens)
            except BenchError as exc:
                result = {"ok": False, "problems": [str(exc)]}
            finally:
                if target is not None:
                    target.stop()
                    if target.proc is not None and db_is_scratch(target, replay_db):
                        for suffix in ("", "-wal", "-shm"):
                            Path(target.db + suffix).unlink(missing_ok=True)
            result["target"] = name
            runs[name].append(result)
            if not result.get("ok"):
                say(f"  FAILED: {'; '.join(result.get('problems') or [])[:600]}")
    return runs


def db_is_scratch(target: Target, replay_db: Path | None) -> bool:
    return target.name == "orderlog" and target.db is not None and (replay_db is None or target.db != str(replay_db))


def summarize(scenario: str, runs: dict[str, list[dict]]) -> dict:
    targets: dict[str, dict] = {}
    for name, results in runs.items():
        median: dict[str, float | None] = {}
        for key, *_ in METRICS[scenario]:
            values = [r[key] for r in results if r.get(key) is not None and r.get("ok")]
            median[key] = statistics.median(values) if values else None
        targets[name] = {"ok": all(r.get("ok") for r in results) and bool(results), "median": median,
                         "runs": [{k: v for k, v in r.items() if k != "rounds" or True} for r in results]}
    ratios: dict[str, dict] = {}
    paired: dict[str, dict] = {}
    ours = targets.get("orderlog", {}).get("median", {})
    our_runs = runs.get("orderlog", [])
    for name in runs:
        if name == "orderlog":
            continue
        theirs = targets[name]["median"]
        ratios[f"orderlog/{name}"] = {
            key: (ours[key] / theirs[key] if ours.get(key) is not None and theirs.get(key) else None)
            for key, _, _, better in METRICS[scenario] if better
        }
        # The median of per-repeat ratios: each pair ran minutes apart, so it cancels slow drifts.
        pairs: dict[str, float | None] = {}
        for key, _, _, better in METRICS[scenario]:
            if not better:
                continue
            values = [a[key] / b[key] for a, b in zip(our_runs, runs[name])
                      if a.get("ok") and b.get("ok") and a.get(key) is not None and b.get(key)]
            pairs[key] = statistics.median(values) if values else None
        paired[f"orderlog/{name}"] = pairs
    return {"ok": all(t["ok"] for t in targets.values()), "targets": targets, "ratios": ratios,
            "paired_ratios": paired}


def render(scenario: str, summary: dict, o: argparse.Namespace) -> str:
    columns = METRICS[scenario]
    header = ["target"] + [label for _, label, _, _ in columns] + ["check"]
    rows = []
    for name, data in summary["targets"].items():
        row = [name]
        for key, _, fmt, _ in columns:
            value = data["median"].get(key)
            row.append("-" if value is None else fmt.format(value))
        row.append("ok" if data["ok"] else "FAILED")
        rows.append(row)
    for label, ratios in (("", summary["ratios"]), (" paired", summary.get("paired_ratios", {}))):
        if label and o.repeat < 2:
            continue
        for name, ratio in ratios.items():
            row = [name + label]
            for key, _, _, better in columns:
                value = ratio.get(key)
                row.append("" if not better else ("-" if value is None else f"{value:.2f}x"))
            row.append("")
            rows.append(row)
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    lines = [f"== {scenario}: {describe(scenario, o)} (medians of {o.repeat} run(s))"]
    for r in [header] + rows:
        lines.append("  " + "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in
                                       enumerate(zip(r, widths))))
    for name, data in summary["targets"].items():
        for i, run in enumerate(data["runs"]):
            if not run.get("ok"):
                lines.append(f"  FAILED {name} run {i + 1}: {'; '.join(run.get('problems') or [])[:800]}")
    if o.repeat > 1 and summary["ratios"]:
        lines.append("  (ratios: of the medians; 'paired': the median of the per-repeat ratios)")
    lines.append(f"  ({TARGETS_NOTE[scenario]})")
    return "\n".join(lines)


def describe(scenario: str, o: argparse.Namespace) -> str:
    if scenario == "commands":
        return (f"{o.clients} closed-loop clients (customer places, staff approves and ships or cancels), "
                f"synchronous={o.synchronous}, {o.duration:g} s")
    if scenario == "fanout":
        staff = round(o.subscribers * o.staff_share)
        pace = f"{o.rate:g} commands/s" if o.rate else f"flat out (<= {o.window} commands ahead of delivery)"
        return (f"{o.subscribers} subscribers ({staff} staff on orders, {o.subscribers - staff} customers on "
                f"their own orders), {pace}, {o.duration:g} s; latency = driver send -> subscriber receipt")
    if scenario == "replay":
        return f"one staff client subscribes to orders + inventory from since 0 on a {o.events:,}-event log"
    if scenario == "connections":
        return f"{o.connections:,} idle subscribed connections, then {o.rounds} new events 1 s apart"
    return (f"one subscriber stops reading while ~{o.stall_events:,} events are appended (>= {o.stall_seconds:g} s), "
            "then catches up")


def git_commit() -> dict:
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "orderlog"], cwd=root, capture_output=True,
                               text=True, timeout=10).stdout
        return {"commit": commit, "dirty_files": [line[3:] for line in dirty.splitlines()]}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty_files": []}


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else 1 << 20
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


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
                                          if k not in ("func", "jwt_secret")}, "scenarios": {}}
    say(f"commit {report['commit']}{' (with local changes in ' + ', '.join(report['dirty_files']) + ')' if report['dirty_files'] else ''}")
    workdir = Path(tempfile.mkdtemp(prefix="orderlog-bench-", dir=args.scratch))
    ok = True
    try:
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
    p.add_argument("--url", help="bench a running server instead (needs --jwt-secret; no CPU/RSS unless --server-pid)")
    p.add_argument("--jwt-secret", help="the server's HS256 secret, with --url")
    p.add_argument("--server-pid", type=int, help="with --url: the server's pid, for CPU and RSS figures")
    p.add_argument("--baseline", action="store_true", help="also run the baselines (needs the `bench` extra)")
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
