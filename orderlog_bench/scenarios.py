"""The scenarios: each drives one target with worker processes, checks what they received and
returns its figures (`run_scenario` runs one scenario against every target, `--repeat` times)."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import subprocess
import sys
import time
from array import array
from pathlib import Path
from typing import Any, Callable

from .processes import BenchError, Pool, Target, Tokens, clean_env, start_server

SCENARIOS = ("commands", "fanout", "replay", "connections", "stall")
BASELINES = ("trio", "websockets")
CLIENTS = {"python": ("python",), "node": ("node",), "both": ("python", "node")}
STALL_RCVBUF = 64 * 1024  # the stalled subscriber's socket receive buffer


# -- helpers ------------------------------------------------------------------------------------------


def percentiles(blobs: list[bytes]) -> dict[str, float | None]:
    values = array("d")
    for blob in blobs:
        values.frombytes(blob)
    if not values:
        return {"p50_ms": None, "p99_ms": None, "p999_ms": None, "max_ms": None, "samples": 0}
    ordered = sorted(values)
    n = len(ordered)

    def at(q: float) -> float:
        return ordered[min(n - 1, int(math.ceil(q * n)) - 1)] * 1000

    return {"p50_ms": at(0.5), "p99_ms": at(0.99), "p999_ms": at(0.999), "max_ms": ordered[-1] * 1000, "samples": n}


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
    from .workers import DRAIN_TIMEOUT, SETUP_TIMEOUT
    from .writers import commands_role, setup_stock

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
    from .workers import DRAIN_TIMEOUT, SETUP_TIMEOUT, subscriber_role
    from .writers import driver_role, setup_stock

    setup_stock(target.url, tokens("bench-staff", "staff"))
    staff = round(o.subscribers * o.staff_share)
    customers = [f"fc-{j}" for j in range(o.subscribers - staff)]
    subs = [(tokens(f"fs-{i}", "staff"), f"fs-{i}", "staff", "orders", None) for i in range(staff)]
    subs += [(tokens(user, "customer"), user, "customer", "orders", f"order:{user}.") for user in customers]
    tag = f"f{time.time_ns() % 10**10}"
    with Pool() as pool, contextlib.ExitStack() as stack:
        nodes: list = []
        if getattr(o, "client_now", "python") == "node":
            from .nodeclient import NodeSubscribers

            # One Node.js process per server node (one, unless --url names several nodes of one log).
            nodes = [stack.enter_context(NodeSubscribers(o.node_modules, [url], chunk, o.workdir, SETUP_TIMEOUT))
                     for url, chunk in zip(target.urls, split(subs, len(target.urls)))]
        if not nodes:
            # With several nodes (--url A,B,C) each client process subscribes through one of them.
            subscriber_ids = [pool.start(subscriber_role, {"url": target.urls[i % len(target.urls)], "subs": chunk,
                                                           "latency": True})
                              for i, chunk in enumerate(split(subs, o.procs))]
            ready = pool.gather("ready", SETUP_TIMEOUT + 30, subscriber_ids)
        else:
            subscriber_ids = []
            ready = [node.receive("ready", SETUP_TIMEOUT + 30) for node in nodes]
        problems = _problems(*(r["errors"] for r in ready))
        for r in ready if nodes else ():
            if r["subscribed"] < r["wanted"]:
                problems.append(f"the Node.js client subscribed {r['subscribed']} of {r['wanted']}")
        driver = pool.start(driver_role, {"url": target.url, "token": tokens("fan-driver", "staff"),
                                          "customers": customers or ["fc-nobody"], "tag": tag, "rate": o.rate,
                                          "window": o.window})
        problems += _problems(pool.receive(driver, "ready", SETUP_TIMEOUT)["errors"])
        if problems:
            pool.send(("go", {"window": (0, 0), "start": 0}))
            return {"ok": False, "problems": problems[:10]}
        start = time.time() + 0.3
        window = (start + o.warmup, start + o.warmup + o.duration)
        for node in nodes:
            node.send({"kind": "go", "window": window})
        pool.send(("go", {"window": window, "start": start, "timeout": o.warmup + o.duration + 600}))
        sleep_until(window[0])
        cpu0 = target.cpu()
        sleep_until(window[1])
        cpu = _cpu_delta(target, cpu0)
        driven = pool.receive(driver, "result", DRAIN_TIMEOUT + 30)
        expected = dict(driven["per_customer"])
        expected["*"] = driven["expected_total"]
        if nodes:
            for node in nodes:
                node.send({"kind": "stop", "expected": expected, "drain": o.drain})
            results = [node.receive("result", o.drain + 30) for node in nodes]
        else:
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
    from .workers import catchup_role
    from .writers import ping_head

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
    from .workers import DRAIN_TIMEOUT, subscriber_role
    from .writers import driver_role, setup_stock

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
    from .workers import catchup_role
    from .writers import ping_head

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
            env=clean_env())
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

# -- running ------------------------------------------------------------------------------------------


def server_args(scenario: str, o: argparse.Namespace) -> list[str]:
    # No rate, handshake-share or per-user limit in the way (1,000 subscribers open at once): the
    # bench measures the server, not its limits (one
    # token may hold thousands of idle connections; the replay scenario reads as fast as it can).
    args = ["--rate-limit", "1000000000", "--synchronous", o.synchronous,
            "--max-connections", str(max(10_000, o.connections + 1000)), "--handshake-share", "0.5",
            "--max-user-connections", "1000000", "--user-rate-limit", "1000000000",
            "--user-replay-rate", "1000000000"]
    if scenario == "stall":
        args += ["--ping-interval", f"{int(o.stall_seconds * 4 + 900)}s"]
    return args


def run_scenario(scenario: str, o: argparse.Namespace, tokens: Tokens, workdir: Path,
                 say: Callable[[str], None]) -> dict[str, list[dict]]:
    targets = []
    if o.baseline and scenario != "stall":
        targets += list(getattr(o, "baselines", BASELINES))
    targets.append("orderlog")
    # --client: who subscribes in the fan-out (the other scenarios always use the Python workers).
    clients = CLIENTS[o.client] if scenario == "fanout" else ("python",)
    runs: dict[str, list[dict]] = {run_name(t, c): [] for c in clients for t in targets}
    replay_db = ensure_log(o.cache_dir, o.events, say) if scenario == "replay" and not o.url else None
    for attempt in range(o.repeat):
        for client in clients:
            o.client_now = client
            for name in targets:
                label = run_name(name, client)
                target: Target | None = None
                try:  # a server that does not start is a FAILED run too, not a traceback
                    if name == "orderlog" and o.url:
                        urls = o.url.split(",")
                        pids = [int(p) for p in o.server_pid.split(",")] if o.server_pid else []
                        target = Target("orderlog", urls[0], pids[0] if pids else None, None, None, urls=urls,
                                        pids=pids)
                    else:
                        db = str(replay_db) if replay_db else str(workdir / f"{run_name(scenario, client)}-{attempt}.db")
                        target = start_server(name, workdir, tokens.secret, db=db, args=server_args(scenario, o),
                                              fault=o.fault if name != "orderlog" else None)
                    say(f"{scenario} run {attempt + 1}/{o.repeat} against {label} ({target.url}) ...")
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
                result["client"] = client
                runs[label].append(result)
                if not result.get("ok"):
                    say(f"  FAILED: {'; '.join(result.get('problems') or [])[:600]}")
    return runs


def run_name(target: str, client: str) -> str:
    """A target's name in the report: `orderlog`, `websockets`..., with `@node` for the Node.js client."""
    return target if client == "python" else f"{target}@{client}"


def db_is_scratch(target: Target, replay_db: Path | None) -> bool:
    return target.name == "orderlog" and target.db is not None and (replay_db is None or target.db != str(replay_db))
