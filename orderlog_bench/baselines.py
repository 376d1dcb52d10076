"""Baseline servers for `orderlog bench --baseline`: the transports' own ceilings.

Two minimal servers speak just enough of the protocol for every bench scenario, with no
storage, no auth check and no per-subscriber cursor:

- `trio`: trio-websocket (the transport orderlog itself uses), one unbounded outbox and one
  sender task per connection;
- `websockets`: the asyncio `websockets` library with `websockets.broadcast()` (the optional
  `bench` extra: `pip install -e '.[bench]'`).

Both: the handshake's `?token=` is decoded (never verified) for `sub` and `role`; `welcome` at
once; `subscribe` answers `subscribed` then `live` (with `"bench_replay": N` it first sends
N events, the replay ceiling); every `command` is acked at once (the commands ceiling), and a
`place_order` becomes one ~250-byte event frame with seq/prev, sent to every staff subscriber
of `orders` and to the order's customer's own `orders` subscribers (the fan-out ceiling).
`--fault gap` drops event 3 from the staff feeds, so the bench's checker can be shown to catch
it. Run: `python -m orderlog_bench.baselines trio|websockets [--port 0]`; it logs
`event=listening url=ws://...` on stderr like `orderlog serve`.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import re
import sys
import time
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

ID_RE = re.compile(r'"id":"([^"]*)"')
NAME_RE = re.compile(r'"name":"([^"]*)"')
ORDER_RE = re.compile(r'"order_id":"([^"]*)"')
CUSTOMER_RE = re.compile(r'"customer":"([^"]*)"')
NOTE_RE = re.compile(r'"note":"([^"]*)"')
CHANNEL_RE = re.compile(r'"channel":"([^"]*)"')
REPLAY_RE = re.compile(r'"bench_replay":(\d+)')
HASH = "0" * 64
AT = "2026-01-01T00:00:00.000Z"


def claims(path: str) -> tuple[str, str]:
    """(sub, role) from the handshake's `?token=`, decoded without checking the signature."""
    token = (parse_qs(urlsplit(path).query).get("token") or [""])[0]
    try:
        payload = token.split(".")[1]
        data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return str(data.get("sub", "anon")), str(data.get("role", "customer"))
    except (IndexError, ValueError):
        return "anon", "customer"


def event_frame(seq: int, prev: int, channel: str, order_id: str, actor: str, command_id: str, customer: str,
                note: str, at: str = AT) -> str:
    return (f'{{"type":"order-created","channel":"{channel}","seq":{seq},"prev":{prev},"stream":"order:{order_id}",'
            f'"version":1,"at":"{at}","actor":"{actor}","command_id":"{command_id}","data":{{"customer":"{customer}",'
            f'"items":[{{"sku":"bench-kibble","quantity":1}}],"note":"{note}"}},"hash":"{HASH}"}}')


def now_at() -> str:
    """The current time as an event's `at` (UTC, milliseconds), for the `at` -> receipt latency."""
    ms = int(time.time() * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"


class BaselineHub:
    """The baseline's whole state: a seq counter and who subscribed to `orders`."""

    def __init__(self, fault: str | None):
        self.seq = 0
        self.fault = fault
        self.staff: set = set()
        self.customers: dict[str, set] = {}
        self.last_by_customer: dict[str, int] = {}
        self.last_staff = 0

    def subscribe(self, conn: Any, user: str, role: str) -> None:
        # One frame goes to every subscriber of a group, so its `prev` is shared: a group's
        # subscribers must all join at the same head (the bench subscribes before any load).
        if role == "customer":
            if not self.customers.get(user):
                self.last_by_customer[user] = self.seq
            self.customers.setdefault(user, set()).add(conn)
        else:
            if not self.staff:
                self.last_staff = self.seq
            self.staff.add(conn)

    def drop(self, conn: Any, user: str) -> None:
        self.staff.discard(conn)
        subs = self.customers.get(user)
        if subs is not None:
            subs.discard(conn)

    def command(self, text: str, user: str, role: str, broadcast: Callable[[set, str], None]) -> str:
        """Ack the command; a place_order also becomes one event on the `orders` feeds."""
        found = ID_RE.search(text)
        command_id = found.group(1) if found else "?"
        found = NAME_RE.search(text)
        name = found.group(1) if found else "?"
        self.seq += 1
        seq = self.seq
        if name == "place_order":
            order_id = (ORDER_RE.search(text) or _NONE).group(1)
            customer = (CUSTOMER_RE.search(text) or _NONE).group(1) if role != "customer" else user
            customer = customer or user
            note = (NOTE_RE.search(text) or _NONE).group(1)
            at = now_at()  # stamped just before the broadcast, as orderlog stamps before its commit
            if not (self.fault == "gap" and seq == 3):
                broadcast(self.staff, event_frame(seq, self.last_staff, "orders", order_id, user, command_id, customer,
                                                  note, at))
            self.last_staff = seq
            subs = self.customers.get(customer)
            if subs:
                broadcast(subs, event_frame(seq, self.last_by_customer.get(customer, 0), "orders", order_id, user,
                                            command_id, customer, note, at))
            self.last_by_customer[customer] = seq
            events = '["order-created","stock-reserved"]'
        else:
            events = '["%s"]' % name.replace("_order", "").replace("_", "-")
        return f'{{"type":"ack","id":"{command_id}","seq":{seq},"version":1,"events":{events},"duplicate":false}}'

    def replay_frames(self, count: int):
        """`count` events from seq 1, as a catching-up subscriber would get them."""
        skip = 3 if self.fault == "gap" else -1
        prev = 0
        for seq in range(1, count + 1):
            if seq == skip:
                continue
            yield event_frame(seq, prev, "orders", f"replay.{seq}", "staff", f"c{seq}", "replay", "r")
            prev = seq


class _NoMatch:
    def group(self, _: int) -> str:
        return ""


_NONE = _NoMatch()


def welcome(user: str, role: str, head: int) -> str:
    return json.dumps({"type": "welcome", "user": user, "role": role, "head": head, "log_id": "baseline",
                       "expires_at": "2099-01-01T00:00:00Z"}, separators=(",", ":"))


def subscribed(text: str, head: int) -> tuple[str, str, int]:
    channel = (CHANNEL_RE.search(text) or _NONE).group(1)
    found = REPLAY_RE.search(text)
    replay = int(found.group(1)) if found and channel == "orders" else 0
    since = 0 if replay else head
    return channel, json.dumps({"type": "subscribed", "channel": channel, "since": since, "head": head},
                               separators=(",", ":")), replay


def live(channel: str, seq: int) -> str:
    return json.dumps({"type": "live", "channel": channel, "seq": seq}, separators=(",", ":"))


# -- trio-websocket ------------------------------------------------------------------------------


def run_trio(host: str, port: int, fault: str | None) -> None:
    import trio
    from trio_websocket import ConnectionClosed, serve_websocket

    hub = BaselineHub(fault)

    def broadcast(conns: set, frame: str) -> None:
        for outbox in conns:
            outbox.send_nowait(frame)

    async def handler(request) -> None:
        user, role = claims(request.path)
        ws = await request.accept()
        send, receive = trio.open_memory_channel[Any](math.inf)

        async def sender() -> None:
            try:
                async for frame in receive:
                    if isinstance(frame, int):  # a replay: frames as fast as the transport takes them
                        for event in hub.replay_frames(frame):
                            await ws.send_message(event)
                    else:
                        await ws.send_message(frame)
            except ConnectionClosed:
                pass

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sender)
                send.send_nowait(welcome(user, role, hub.seq))
                try:
                    while True:
                        text = await ws.get_message()
                        if text.startswith('{"type":"command"'):
                            send.send_nowait(hub.command(text, user, role, broadcast))
                        elif text.startswith('{"type":"subscribe"'):
                            channel, reply, replay = subscribed(text, hub.seq)
                            send.send_nowait(reply)
                            if replay:
                                send.send_nowait(replay)
                            if channel == "orders":
                                hub.subscribe(send, user, role)
                            send.send_nowait(live(channel, replay or hub.seq))
                        elif text.startswith('{"type":"ping"'):
                            send.send_nowait('{"type":"pong","head":%d}' % hub.seq)
                except ConnectionClosed:
                    pass
                finally:
                    hub.drop(send, user)
                    nursery.cancel_scope.cancel()
        except* ConnectionClosed:
            pass

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(serve_websocket, handler, host, port, None)
            _listening(host, server.port)

    trio.run(main)


# -- websockets (asyncio) -------------------------------------------------------------------------


def run_websockets(host: str, port: int, fault: str | None) -> None:
    import asyncio

    from websockets.asyncio.server import broadcast, serve
    from websockets.exceptions import ConnectionClosed

    hub = BaselineHub(fault)

    async def handler(ws) -> None:
        user, role = claims(ws.request.path)
        try:
            await ws.send(welcome(user, role, hub.seq))
            async for text in ws:
                if text.startswith('{"type":"command"'):
                    await ws.send(hub.command(text, user, role, broadcast))
                elif text.startswith('{"type":"subscribe"'):
                    channel, reply, replay = subscribed(text, hub.seq)
                    await ws.send(reply)
                    for frame in hub.replay_frames(replay):
                        await ws.send(frame)
                    if channel == "orders":
                        hub.subscribe(ws, user, role)
                    await ws.send(live(channel, replay or hub.seq))
                elif text.startswith('{"type":"ping"'):
                    await ws.send('{"type":"pong","head":%d}' % hub.seq)
        except ConnectionClosed:
            pass
        finally:
            hub.drop(ws, user)

    async def main() -> None:
        async with serve(handler, host, port, compression=None, max_size=2**20, max_queue=64) as server:
            _listening(host, server.sockets[0].getsockname()[1])
            await asyncio.Future()

    asyncio.run(main())


def _listening(host: str, port: int) -> None:
    print(f"event=listening url=ws://{host}:{port}/v1/ws", file=sys.stderr, flush=True)


SERVERS: dict[str, Callable[[str, int, str | None], None]] = {"trio": run_trio, "websockets": run_websockets}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orderlog_bench.baselines", description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=sorted(SERVERS))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--fault", choices=["gap"], help="deliberately drop event 3 from staff feeds and replays")
    args = parser.parse_args(argv)
    try:
        SERVERS[args.kind](args.host, args.port, args.fault)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
