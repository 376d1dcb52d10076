"""Isolation between customers, as a property: for random multi-customer histories, nothing a
customer can read or provoke tells it anything about another customer's orders.

For each history, from each customer's side: its `orders` feed (live, and replayed from SQLite)
is exactly its own orders' events; its `inventory` feed is every stock move, with the moves of
other customers' orders redacted (no actor, command id, hash or order id); and `get`, `subscribe
order:<id>` and every command on another customer's order answer word for word as for an id
nobody used (only the id in the message differs), except `place_order`, which answers the
same `conflict` for every used id (docs/protocol.md section 4).

The server runs in-process in a thread (its own trio loop) with a tiny feed window, so that a
replay from `since` reads SQLite while live delivery reads the window; each example uses new
user names and order ids on the same server.
"""

from __future__ import annotations

import itertools
import threading
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orderlog.auth import Keys
from orderlog.service.server import serve
from orderlog.service.settings import Settings
from wsclient import EVENT_TYPES, SECRET, Session, assert_quiet, next_id, redacted, session

ORDERS = 5  # order ids per example
SKUS = ("bone", "ball")
NAMES = ("a", "b", "c")  # customers of an example (prefixed per example)


class ThreadServer:
    """The real server in a thread with its own trio loop, so sync (hypothesis) tests can share it."""

    def __init__(self, config: Settings):
        self.config = config
        self.url: str | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # reported by stop()
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        async with trio.open_nursery() as nursery:
            self.url = await nursery.start(lambda task_status: serve(self.config, stop=self._stop,
                                                                     handle_signals=False, task_status=task_status))
            self._ready.set()

    def __enter__(self) -> "ThreadServer":
        self._thread.start()
        assert self._ready.wait(20) and self.url is not None, f"the server did not start: {self._error!r}"
        return self

    def __exit__(self, *exc: Any) -> None:
        trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join(15)
        assert not self._thread.is_alive(), "the server did not stop"
        assert self._error is None, self._error


@pytest.fixture(scope="module")
def isolated_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("isolation")
    config = Settings(db=str(folder / "isolation.db"), port=0, keys=Keys("HS256", SECRET), window=8,
                      rate_limit=100_000.0, rate_burst=100_000, user_rate_limit=100_000.0)
    with ThreadServer(config) as server:
        yield server.url


# -- histories --------------------------------------------------------------------------------------

actors = st.sampled_from([*NAMES, "staff"])
order_index = st.integers(0, ORDERS - 1)
steps = st.one_of(
    st.tuples(st.just("place_order"), actors, order_index, st.sampled_from(SKUS), st.integers(1, 3),
              st.sampled_from([None, *NAMES])),
    st.tuples(st.just("update_order"), actors, order_index, st.sampled_from([None, 0, 1, 2, 3])),
    st.tuples(st.just("cancel_order"), actors, order_index),
    st.tuples(st.sampled_from(["approve_order", "ship_order", "deliver_order"]), st.just("staff"), order_index),
)
histories = st.lists(steps, min_size=1, max_size=20)

_examples = itertools.count(1)


def _normal(reply: dict, order_id: str, unused: str) -> dict:
    """A reply with the request id dropped and the order id asked for replaced by the unused one."""
    reply = {k: v for k, v in reply.items() if k != "id"}
    if "message" in reply:
        reply["message"] = reply["message"].replace(repr(order_id), repr(unused))
    return reply


def _strip(frame: dict) -> dict:
    return {k: v for k, v in frame.items() if k not in ("channel", "prev")}


async def _query_all(staff: Session, after: int) -> list[dict]:
    events: list[dict] = []
    while True:
        reply = await staff.request({"type": "query", "filter": {"after": after}, "limit": 1000})
        assert reply["type"] == "result", reply
        events += reply["events"]
        if reply["next"] is None:
            return events
        after = reply["next"]


async def _feed(client: Session, channel: str, count: int) -> list[dict]:
    """Exactly `count` events of `channel`, then nothing more of it (checked with a ping)."""
    events = await client.events(channel, count)
    await client.ping()
    extra = [f for f in client.inbox if f.get("channel") == channel and f["type"] in EVENT_TYPES]
    assert not extra, f"{channel} carried more than expected: {extra}"
    return events


async def _probe(client: Session, order_id: str, unused: str) -> list[dict]:
    """Every request a customer can make about `order_id`, normalized for comparison with `unused`."""
    requests: list[dict] = [
        {"type": "get", "order_id": order_id},
        {"type": "subscribe", "channel": f"order:{order_id}", "since": 0},
        {"type": "command", "name": "update_order", "order_id": order_id, "data": {"note": "x"}},
        {"type": "command", "name": "update_order", "order_id": order_id, "data": {"note": "x"}, "expected_version": 1},
        {"type": "command", "name": "update_order", "order_id": order_id, "data": {"note": "x"}, "expected_version": 0},
        {"type": "command", "name": "cancel_order", "order_id": order_id},
        {"type": "command", "name": "cancel_order", "order_id": order_id, "expected_version": 2},
        {"type": "command", "name": "approve_order", "order_id": order_id},
        {"type": "command", "name": "update_order", "order_id": order_id, "data": {}},  # bad_request first
    ]
    replies = []
    for request in requests:
        reply = await client.request({**request, "id": next_id("p")})
        replies.append(_normal(reply, order_id, unused))
    return replies


async def _check_history(url: str, history: list[tuple]) -> None:
    n = next(_examples)
    users = {name: f"i{n}{name}" for name in NAMES}
    order_ids = [f"i{n}-order-{i}" for i in range(ORDERS)]
    unused = f"i{n}-order-9"
    with trio.fail_after(60):
        async with session(url, f"i{n}staff", "staff") as staff:
            for sku in SKUS:
                await staff.ok("add_stock", data={"sku": sku, "quantity": 1000})
            head0 = (await staff.ping())["head"]
            async with session(url, users["a"]) as a, session(url, users["b"]) as b, session(url, users["c"]) as c:
                clients = {"a": a, "b": b, "c": c, "staff": staff}
                for name in NAMES:
                    for channel in ("orders", "inventory"):
                        await clients[name].subscribe(channel, since=head0)
                # The history, one command at a time.
                for step in history:
                    name, actor, index = step[0], step[1], step[2]
                    data: dict[str, Any] = {}
                    expected = None
                    if name == "place_order":
                        data = {"items": [{"sku": step[3], "quantity": step[4]}]}
                        if actor == "staff" and step[5] is not None:
                            data["customer"] = users[step[5]]
                    elif name == "update_order":
                        data, expected = {"note": f"note {index}"}, step[3]
                    reply = await clients[actor].command(name, order_ids[index], data, expected_version=expected)
                    assert reply["type"] in ("ack", "error"), reply
                truth = await _query_all(staff, head0)
                owner = {e["stream"][6:]: e["data"]["customer"] for e in truth if e["type"] == "order-created"}
                for name in NAMES:
                    user, client = users[name], clients[name]
                    mine = [e for e in truth if e["stream"].startswith("order:") and owner[e["stream"][6:]] == user]
                    # orders: exactly its own orders' events, live (window) and replayed (SQLite).
                    live = await _feed(client, "orders", len(mine))
                    assert [_strip(f) for f in live] == mine
                    async with session(url, user) as again:
                        await again.subscribe("orders", since=head0)
                        replayed, _ = await again.live("orders")
                        assert [_strip(f) for f in replayed] == mine
                    # inventory: every stock move; other customers' orders without data.order_id.
                    moves = [e for e in truth if e["stream"].startswith("sku:")]
                    got = await _feed(client, "inventory", len(moves))
                    for frame, event in zip(got, moves):
                        order_id = event["data"].get("order_id")
                        if order_id is not None and owner.get(order_id) != user:
                            event = redacted(event)
                        assert _strip(frame) == event
                    # Every request about another's order answers as for an id nobody used.
                    blank = await _probe(client, unused, unused)
                    assert [r["code"] for r in blank if r["type"] == "error"][:2] == ["not_found", "not_found"], blank
                    conflict = None
                    for order_id in order_ids:
                        if order_id in owner and owner[order_id] != user:
                            assert await _probe(client, order_id, unused) == blank, order_id
                        if order_id in owner:
                            reply = await client.command("place_order", order_id,
                                                         {"items": [{"sku": "bone", "quantity": 1}]})
                            reply = _normal(reply, order_id, unused)
                            if owner[order_id] != user:
                                assert reply["type"] == "error" and reply["code"] == "conflict", reply
                                assert conflict in (None, reply), (conflict, reply)
                                conflict = reply
                    await assert_quiet(client.ws, 0.05)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
@given(history=histories)
def test_customers_learn_nothing_of_each_others_orders(isolated_server, history):
    """For any history, a customer's orders feed, inventory feed, gets, subscribes and command errors reveal
    nothing about other customers' orders."""
    trio.run(_check_history, isolated_server, history)


@pytest.mark.slow
@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
@given(history=st.lists(steps, min_size=10, max_size=40))
def test_customers_learn_nothing_of_each_others_orders_long_histories(isolated_server, history):
    """The same isolation property over more and longer histories."""
    trio.run(_check_history, isolated_server, history)
