"""The load generator's worker processes: one function per role, each running a `Loop`.

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

from .ws import EVENT_RE, NOTE_RE, Chain, Conn, Loop, client_frame, parse_reply

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


def _errors(loop: Loop, extra: list[str]) -> list[str]:
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
        "foreign": subs.foreign, "errors": _errors(loop, subs.errors), "subscriptions": len(subs.chains()),
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
    pipe.send(("ready", {"errors": _errors(loop, subs.errors)}))
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
        "chain_errors": subs.chain_errors()[:10], "errors": _errors(loop, subs.errors),
        "lives": {chain.channel: chain.live for _, chain in subs.chains()},
    }
    loop.close()
    pipe.send(("result", result))


# -- command clients ----------------------------------------------------------------------------------


class LoadClient:
    """One closed-loop client of the commands scenario: a customer connection and a staff one.

    Cycle k: place_order (customer), approve_order (staff), then ship_order (staff), or
    cancel_order (staff) every fourth cycle; one command outstanding at a time.
    """

    __slots__ = ("number", "customer", "staff", "step", "cycle", "outstanding", "sent_at", "last_seq", "welcomed",
                 "tag")

    def __init__(self, number: int, tag: str):
        self.number = number
        self.tag = tag
        self.customer: Conn | None = None
        self.staff: Conn | None = None
        self.step = 0
        self.cycle = 0
        self.outstanding: str | None = None
        self.sent_at = 0.0
        self.last_seq = 0
        self.welcomed = 0

    def send_next(self) -> None:
        order_id = f"{self.tag}-{self.number}-{self.cycle}"
        command_id = f"{order_id}-{self.step}"
        if self.step == 0:
            conn = self.customer
            body = (f'{{"type":"command","id":"{command_id}","name":"place_order","order_id":"{order_id}",'
                    f'"data":{{"items":[{{"sku":"{SKU}","quantity":1}}]}}}}')
        else:
            conn = self.staff
            name = "approve_order" if self.step == 1 else ("cancel_order" if self.cycle % 4 == 3 else "ship_order")
            body = f'{{"type":"command","id":"{command_id}","name":"{name}","order_id":"{order_id}"}}'
        self.outstanding = command_id
        self.sent_at = time.time()
        conn.send(client_frame(body.encode()))


def commands_role(config: dict, pipe: Any) -> None:
    """commands: closed-loop clients; counts acks and their latency inside the window."""
    loop = Loop(config["url"])
    mailbox = Mailbox(pipe, loop)
    errors: list[str] = []
    clients: list[LoadClient] = []
    state = {"running": False, "window": (0.0, 0.0), "acks": 0, "in_window": 0, "outstanding": 0,
             "stop_at": 0.0, "rejected": 0}
    latencies = array("d")

    def on_text(conn: Conn, buf: bytearray, start: int, end: int) -> None:
        client: LoadClient = conn.data
        reply = parse_reply(buf, start, end)
        kind = reply.get("type")
        if kind == "welcome":
            client.welcomed += 1
            return
        if kind not in ("ack", "error"):
            errors.append(f"unexpected frame {str(reply)[:200]}")
            return
        now = time.time()
        if reply.get("id") != client.outstanding:
            errors.append(f"reply for {reply.get('id')!r}, but the outstanding command is {client.outstanding!r}")
            return
        client.outstanding = None
        state["outstanding"] -= 1
        if kind == "error":
            state["rejected"] += 1
            if state["rejected"] <= 5:
                errors.append(f"command {reply.get('id')} rejected: {reply.get('code')}: {reply.get('message')}")
            client.step, client.cycle = 0, client.cycle + 1
        else:
            seq = reply.get("seq")
            if not isinstance(seq, int) or seq <= client.last_seq or reply.get("duplicate"):
                errors.append(f"ack {reply.get('id')}: seq {seq} after {client.last_seq} (duplicate="
                              f"{reply.get('duplicate')})")
            client.last_seq = seq if isinstance(seq, int) else client.last_seq
            state["acks"] += 1
            lo, hi = state["window"]
            if lo <= now < hi:
                state["in_window"] += 1
                latencies.append(now - client.sent_at)
            client.step += 1
            if client.step == 3:
                client.step, client.cycle = 0, client.cycle + 1
        if state["running"] and now < state["stop_at"]:
            state["outstanding"] += 1
            client.send_next()

    started = time.time()
    for number, (customer_token, staff_token) in config["clients"]:
        client = LoadClient(number, config["tag"])
        client.customer = loop.open(customer_token, on_text, data=client, user=f"customer {number}")
        client.staff = loop.open(staff_token, on_text, data=client, user=f"staff {number}")
        clients.append(client)
    loop.run_until(lambda: all(c.welcomed == 2 for c in clients) or bool(loop.errors) or bool(errors),
                   started + SETUP_TIMEOUT)
    problems = errors + loop.errors
    pipe.send(("ready", {"seconds": time.time() - started, "errors": problems[:10]}))
    if problems:
        return
    go = mailbox.wait(loop, "go", 600)
    state["window"] = (go["window"][0], go["window"][1])
    state["stop_at"] = go["window"][1]
    state["running"] = True
    for client in clients:
        state["outstanding"] += 1
        client.send_next()
    loop.run_until(lambda: time.time() >= state["stop_at"] or bool(loop.errors), state["stop_at"] + 1)
    loop.run_until(lambda: state["outstanding"] <= 0 or bool(loop.errors), time.time() + DRAIN_TIMEOUT)
    result = {"acks": state["acks"], "in_window": state["in_window"], "latencies": latencies.tobytes(),
              "outstanding": state["outstanding"], "rejected": state["rejected"], "errors": _errors(loop, errors)}
    loop.close()
    pipe.send(("result", result))


# -- the fan-out driver ---------------------------------------------------------------------------------


def driver_role(config: dict, pipe: Any) -> None:
    """fanout / connections: one staff connection places orders on behalf of customers, at
    `rate` commands/s or flat out, never more than `window` commands ahead of its own `orders`
    feed; each order carries its send time in `data.note`.

    config: url, token, customers [user...], tag, rate (0 = flat out), window, count (stop
    after so many commands; 0 = until the window ends), gap (seconds between commands when count
    is set).
    """
    loop = Loop(config["url"])
    mailbox = Mailbox(pipe, loop)
    errors: list[str] = []
    st = {"welcome": False, "sent": 0, "in_window": 0, "acks": 0, "seen": 0, "chain": None, "rejected": 0, "head": 0}
    per_customer: dict[str, int] = {}
    sent_customer: dict[str, str] = {}
    send_times: list[float] = []

    def on_text(conn: Conn, buf: bytearray, start: int, end: int) -> None:
        m = EVENT_RE.match(buf, start, end)
        if m is not None:
            st["chain"].feed(int(m.group(3)), int(m.group(4)))
            st["seen"] += 1
            return
        reply = parse_reply(buf, start, end)
        kind = reply.get("type")
        if kind == "welcome":
            st["welcome"] = True
        elif kind == "subscribed":
            st["chain"] = Chain("driver orders", reply["since"])
        elif kind == "ack":
            st["acks"] += 1
            customer = sent_customer.pop(reply.get("id"), None)
            if customer is None:
                errors.append(f"ack for an unknown command {reply.get('id')!r}")
                return
            created = sum(1 for t in reply.get("events", ()) if str(t).startswith("order-"))
            per_customer[customer] = per_customer.get(customer, 0) + created
            st["head"] = max(st["head"], reply.get("seq") or 0)
        elif kind == "error":
            st["rejected"] += 1
            sent_customer.pop(reply.get("id"), None)
            if st["rejected"] <= 5:
                errors.append(f"command {reply.get('id')} rejected: {reply.get('code')}: {reply.get('message')}")
        elif kind not in ("live", "pong"):
            errors.append(f"unexpected frame {str(reply)[:200]}")

    conn = loop.open(config["token"], on_text, on_open=lambda c: c.send_json({"type": "subscribe",
                                                                             "channel": "orders"}))
    loop.run_until(lambda: st["chain"] is not None or bool(loop.errors), time.time() + SETUP_TIMEOUT)
    pipe.send(("ready", {"errors": _errors(loop, errors)}))
    if loop.errors:
        return
    go = mailbox.wait(loop, "go", 600)
    start_at, stop_at = go["start"], go["window"][1]
    lo, hi = go["window"]
    rate, window, count = config["rate"], config["window"], config.get("count", 0)
    customers = config["customers"]
    tag = config["tag"]

    def send_one() -> None:
        i = st["sent"]
        customer = customers[i % len(customers)]
        now = time.time()
        command_id = f"{tag}-{i}"
        body = (f'{{"type":"command","id":"{command_id}","name":"place_order","order_id":"{customer}.{tag}{i}",'
                f'"data":{{"customer":"{customer}","items":[{{"sku":"{SKU}","quantity":1}}],'
                f'"note":"t={now:.6f}"}}}}')
        sent_customer[command_id] = customer
        send_times.append(now)
        if lo <= now < hi:
            st["in_window"] += 1
        conn.send(client_frame(body.encode()))
        st["sent"] += 1

    def tick() -> float | None:
        now = time.time()
        if now < start_at or now >= stop_at or (count and st["sent"] >= count):
            return None
        if count:  # connections: one command every `gap` seconds
            due = start_at + st["sent"] * config["gap"]
            if now >= due:
                send_one()
                return config["gap"]
            return due - now
        while st["sent"] - st["seen"] < window:
            if rate:
                due = start_at + st["sent"] / rate
                if now < due:
                    return due - now
            send_one()
        return None

    def done() -> bool:
        return bool(loop.errors) or time.time() >= stop_at or (count and st["acks"] + st["rejected"] >= count)

    loop.run_until(done, stop_at + 1, tick)
    loop.run_until(lambda: st["acks"] + st["rejected"] >= st["sent"] or bool(loop.errors),
                   time.time() + DRAIN_TIMEOUT)
    sent_in_window = st["sent"]
    result = {"sent": sent_in_window, "sent_in_window": st["in_window"], "acks": st["acks"], "rejected": st["rejected"], "per_customer": per_customer,
              "expected_total": sum(per_customer.values()), "errors": _errors(loop, errors),
              "driver_chain_error": st["chain"].error if st["chain"] else None, "send_times": send_times[:1000],
              "last_seq": st["head"], "first_send": send_times[0] if send_times else None,
              "last_send": send_times[-1] if send_times else None}
    loop.close()
    pipe.send(("result", result))


def setup_stock(url: str, token: str, quantity: int = 900_000_000, timeout: float = 20.0) -> None:
    """Give the bench's sku enough stock for any run (a staff `add_stock`, waited for)."""
    loop = Loop(url)
    got: list = []

    def on_text(conn: Conn, buf: bytearray, start: int, end: int) -> None:
        reply = parse_reply(buf, start, end)
        if reply.get("type") in ("ack", "error"):
            got.append(reply)

    loop.open(token, on_text, on_open=lambda c: c.send_json(
        {"type": "command", "id": f"stock-{time.time_ns()}", "name": "add_stock",
         "data": {"sku": SKU, "quantity": quantity}}))
    try:
        if not loop.run_until(lambda: bool(got) or bool(loop.errors), time.time() + timeout):
            raise RuntimeError("add_stock was not acknowledged in time")
        if loop.errors:
            raise RuntimeError(f"add_stock: {loop.errors[0]}")
        if got[0].get("type") != "ack":
            raise RuntimeError(f"add_stock rejected: {got[0]}")
    finally:
        loop.close()


def ping_head(url: str, token: str, timeout: float = 20.0) -> int:
    """The server's head seq (from `pong`)."""
    loop = Loop(url)
    got: list = []

    def on_text(conn: Conn, buf: bytearray, start: int, end: int) -> None:
        reply = parse_reply(buf, start, end)
        if reply.get("type") == "pong":
            got.append(reply["head"])

    loop.open(token, on_text, on_open=lambda c: c.send_json({"type": "ping"}))
    try:
        if not loop.run_until(lambda: bool(got) or bool(loop.errors), time.time() + timeout):
            raise RuntimeError("no pong in time")
        if loop.errors:
            raise RuntimeError(loop.errors[0])
        return got[0]
    finally:
        loop.close()
