"""The writing roles of the worker processes: closed-loop command clients (`commands_role`) and
the fan-out driver (`driver_role`), plus the set-up calls the scenarios make (`setup_stock`,
`ping_head`). See `workers` for how a worker talks to the parent."""

from __future__ import annotations

import time
from array import array
from typing import Any

from .workers import DRAIN_TIMEOUT, SETUP_TIMEOUT, SKU, Mailbox, loop_errors
from .ws import EVENT_RE, Chain, Conn, Loop, client_frame, parse_reply


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
              "outstanding": state["outstanding"], "rejected": state["rejected"], "errors": loop_errors(loop, errors)}
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
    pipe.send(("ready", {"errors": loop_errors(loop, errors)}))
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
              "expected_total": sum(per_customer.values()), "errors": loop_errors(loop, errors),
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
