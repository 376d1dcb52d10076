"""The load generator's worker processes: one function per role, each running a `Loop`.

This module holds what every role shares and the reading roles (subscribers, catch-up);
`writers` holds the writing ones (command clients, the fan-out driver).

A worker talks to the parent through a multiprocessing pipe: it sends `("ready", info)` once
its connections are open and subscribed, waits for `("go", params)`, runs, and on
`("stop", params)` (or its own deadline) drains and sends `("result", payload)`. Every wait is
bounded by a deadline, so a server that hangs makes the scenario fail, not the bench hang.

Times are `time.time()` in every process (one machine, one clock), so a latency can start in
the driver process and end in a subscriber process.
"""

from __future__ import annotations

import traceback
from array import array
from collections import deque
from typing import Any, Callable

import time

from .ws import EVENT_RE, NOTE_RE, Chain, Conn, Loop, parse_reply

SKU = "bench-kibble"
SETUP_TIMEOUT = 120.0  # seconds for connections to open and subscribe
DRAIN_TIMEOUT = 30.0  # seconds to wait for outstanding acks or deliveries after the load stops


class Mailbox:
    """Messages from the parent, read whenever the pipe is readable inside the loop."""

    def __init__(self, pipe: Any, loop: Loop):
        self.pipe = pipe
        self.messages: deque = deque()
        loop.watch(pipe, self._read)

    def _read(self) -> None:
        while self.pipe.poll():
            self.messages.append(self.pipe.recv())

    def take(self, kind: str) -> dict | None:
        for i, (k, payload) in enumerate(self.messages):
            if k == kind:
                del self.messages[i]
                return payload
        return None

    def wait(self, loop: Loop, kind: str, timeout: float) -> dict:
        found: list = []

        def done() -> bool:
            payload = self.take(kind)
            if payload is not None:
                found.append(payload)
            return bool(found)

        if not loop.run_until(done, time.time() + timeout):
            raise TimeoutError(f"no {kind!r} from the bench within {timeout:.0f} s")
        return found[0]


def run_worker(role: Callable, config: dict, pipe: Any) -> None:
    """Process entry point: run `role(config, pipe)` and report any crash to the parent."""
    try:
        role(config, pipe)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which fails the scenario
        try:
            pipe.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=4)}"))
        except Exception:
            pass
    finally:
        pipe.close()


def loop_errors(loop: Loop, extra: list[str]) -> list[str]:
    return (extra + loop.errors)[:20]


# -- subscribers (fanout, connections, replay, stall) ---------------------------------------------


class Subscribers:
    """Subscribed connections and what they received: chains, counts, latencies, notes."""

    def __init__(self, loop: Loop):
        self.loop = loop
        self.errors: list[str] = []
        self.subscribed = 0
        self.wanted = 0
        self.total = 0
        self.window = (0.0, 0.0)
        self.in_window = 0
        self.latencies = array("d")
        self.keep_latency = True
        self.foreign = 0
        self.by_note: dict[bytes, list] = {}  # note -> [count, first receipt, last receipt]
        self.track_notes = False
        self.seen: bytearray | None = None  # replay/stall: which seqs arrived (over all channels)
        self.live = 0
        self.timed = True  # count deliveries in the window, latencies, notes (off for catch-up)

    def open(self, token: str, user: str, role: str, requests: list[dict], own_prefix: bytes | None = None) -> Conn:
        self.wanted += len(requests)

        def on_open(conn: Conn) -> None:
            for request in requests:
                conn.send_json(request)

        return self.loop.open(token, self.on_text, on_open, data=own_prefix, user=user)

    def on_text(self, conn: Conn, buf: bytearray, start: int, end: int) -> None:
        m = EVENT_RE.match(buf, start, end)
        if m is not None:  # the hot path: keep it lean (it bounds the client's events/s)
            channel, seq, prev, stream = m.group(2, 3, 4, 5)
            chain = conn.chains.get(channel)
            if chain is None:
                self.errors.append(f"event on {channel!r}, which this connection did not subscribe")
                return
            seq = int(seq)
            prev = int(prev)
            if prev == chain.last and seq > prev:
                chain.last = seq
                chain.count += 1
            else:
                chain.feed(seq, prev)
            self.total += 1
            if conn.data is not None and not stream.startswith(conn.data):
                self.foreign += 1
                if self.foreign <= 3:
                    self.errors.append(f"{conn.user} received {stream.decode()}, an order that is not theirs")
            seen = self.seen
            if seen is not None:
                if seq < len(seen):
                    seen[seq] = 2 if seen[seq] else 1
                elif len(self.errors) < 5:
                    self.errors.append(f"seq {seq} is beyond the head the bench expected")
            if not self.timed:
                return
            now = time.time()
            lo, hi = self.window
            if lo <= now < hi:
                self.in_window += 1
                if self.keep_latency:
                    note = NOTE_RE.search(buf, m.end(), end)
                    if note is not None:
                        self.latencies.append(now - float(note.group(1)))
            if self.track_notes:
                note = NOTE_RE.search(buf, m.end(), end)
                if note is not None:
                    entry = self.by_note.get(note.group(1))
                    if entry is None:
                        self.by_note[note.group(1)] = [1, now, now]
                    else:
                        entry[0] += 1
                        entry[2] = now
            return
        reply = parse_reply(buf, start, end)
        kind = reply.get("type")
        if kind == "subscribed":
            conn.chains[reply["channel"].encode()] = Chain(reply["channel"], reply["since"])
            self.subscribed += 1
        elif kind == "live":
            chain = conn.chains.get(str(reply.get("channel")).encode())
            if chain is not None:
                chain.live = reply.get("seq")
                self.live += 1
        elif kind == "error":
            self.errors.append(f"{conn.user}: error {reply.get('code')}: {reply.get('message')}")
        elif kind not in ("welcome", "pong", "ack"):
            self.errors.append(f"{conn.user}: unexpected frame {str(reply)[:200]}")

    def ready(self) -> bool:
        return self.subscribed >= self.wanted or bool(self.loop.errors) or bool(self.errors)

    def chains(self) -> list[tuple[Conn, Chain]]:
        return [(conn, chain) for conn in self.loop.conns for chain in conn.chains.values()]

    def chain_errors(self) -> list[str]:
        return [chain.error for _, chain in self.chains() if chain.error]


def subscriber_role(config: dict, pipe: Any) -> None:
    """fanout / connections: open the subscriptions, report ready, count deliveries until stopped.

    config: url, subs [(token, user, role, channel, own_prefix|None)], latency (bool), notes (bool).
    On stop: {"expected": {user: n, "*": n}} waits (bounded) until each subscription got its
    expected count of events, then reports.
    """
    loop = Loop(config["url"])
    mailbox = Mailbox(pipe, loop)
    subs = Subscribers(loop)
    subs.keep_latency = config.get("latency", True)
    subs.track_notes = config.get("notes", False)
    started = time.time()
    for token, user, role, channel, prefix in config["subs"]:
        subs.open(token, user, role, [{"type": "subscribe", "channel": channel}],
                  prefix.encode() if prefix else None)
    loop.run_until(subs.ready, started + config.get("setup_timeout", SETUP_TIMEOUT))
    opened = time.time() - started
    problems = subs.errors + loop.errors
    pipe.send(("ready", {"subscribed": subs.subscribed, "wanted": subs.wanted, "seconds": opened,
                         "errors": problems[:10]}))
    if problems or subs.subscribed < subs.wanted:
        return
    go = mailbox.wait(loop, "go", config.get("go_timeout", 600))
    subs.window = (go["window"][0], go["window"][1])
    stop = mailbox.wait(loop, "stop", go.get("timeout", 600))
    expected = stop["expected"]

    def want_of(conn: Conn) -> int:
        # Customers (who have an own-orders prefix) expect their own orders' events; staff all.
        return expected.get(conn.user, 0) if conn.data is not None else expected.get("*", 0)

    def complete() -> bool:
        for conn, chain in subs.chains():
            want = want_of(conn)
            if chain.count < want and not chain.error and not conn.closed:
                return False
        return True

    loop.run_until(complete, time.time() + stop.get("drain", DRAIN_TIMEOUT))
    short = []
    for conn, chain in subs.chains():
        want = want_of(conn)
        if chain.count != want:
            short.append(f"{conn.user} {chain.channel}: received {chain.count} events, expected {want}")
    result = {
        "total": subs.total, "in_window": subs.in_window, "latencies": subs.latencies.tobytes(),
        "chain_errors": subs.chain_errors()[:10], "incomplete": len(short), "incomplete_examples": short[:5],
        "foreign": subs.foreign, "errors": loop_errors(loop, subs.errors), "subscriptions": len(subs.chains()),
        "notes": {k.decode(): v for k, v in subs.by_note.items()},
    }
    loop.close()
    pipe.send(("result", result))


def catchup_role(config: dict, pipe: Any) -> None:
    """replay / stall: one connection subscribes from `since` to its channels, and must receive
    every event 1..head exactly once over them (checked with a per-seq table).

    config: url, token, requests [subscribe...], head, stall (bool): pause reading on go and
    resume on `resume`; then wait until every seq up to `head` (from the resume message) arrived.
    """
    loop = Loop(config["url"], rcvbuf=config.get("rcvbuf"))
    mailbox = Mailbox(pipe, loop)
    subs = Subscribers(loop)
    subs.keep_latency = False
    subs.timed = False
    stall = config.get("stall", False)
    requests = config["requests"]
    if stall:
        conn = subs.open(config["token"], "catchup", "staff", requests)
        subs.seen = bytearray(config.get("capacity", 1) + 1)
        loop.run_until(subs.ready, time.time() + SETUP_TIMEOUT)
    else:
        conn = subs.open(config["token"], "catchup", "staff", [])
        loop.run_until(lambda: conn.state == "open" or conn.closed, time.time() + SETUP_TIMEOUT)
    pipe.send(("ready", {"errors": loop_errors(loop, subs.errors)}))
    go = mailbox.wait(loop, "go", 600)
    timeout = go.get("timeout", 600)
    if stall:
        loop.pause(conn)
        resume = mailbox.wait(loop, "resume", timeout)
        head = resume["head"]
        if len(subs.seen) < head + 1:
            subs.seen.extend(bytes(head + 1 - len(subs.seen)))
        started = time.time()
        loop.resume(conn)
        received_before = subs.total
    else:
        head = go["head"]
        subs.seen = bytearray(head + 1)
        subs.wanted = len(requests)
        started = time.time()
        for request in requests:
            conn.send_json(request)
        received_before = 0

    def complete() -> bool:
        if conn.closed or subs.errors:
            return True
        if stall:
            return subs.total >= head
        return subs.live >= len(requests)

    finished = loop.run_until(complete, started + timeout)
    seconds = time.time() - started
    part = subs.seen[1 : head + 1]
    missing = part.count(0)
    duplicated = part.count(2)
    result = {
        "received": subs.total, "caught_up": subs.total - received_before, "seconds": seconds,
        "finished": finished, "head": head, "missing": missing, "duplicated": duplicated,
        "chain_errors": subs.chain_errors()[:10], "errors": loop_errors(loop, subs.errors),
        "lives": {chain.channel: chain.live for _, chain in subs.chains()},
    }
    loop.close()
    pipe.send(("result", result))
