"""The client's sans-IO session without sockets: a stand-in server (the protocol's resume rules,
in a few lines) and a wire that drops, duplicates and cuts frames; the caller never sees a gap,
a duplicate event or a doubled command."""

from __future__ import annotations

import random
from collections import Counter, deque

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orderlog.session import (
    AuthenticationFailed, Deliver, Reply, ResyncRequired, Session, Status, SubscriptionEnded, backoff_delay,
)

WELCOME = {"type": "welcome", "user": "s1", "role": "staff", "log_id": "log-1", "expires_at": "2026-12-03T10:00:00Z"}


class StandInServer:
    """The server's side of the resume rules: `orders` carries every event, `inventory` only some
    (a filtered feed, with holes in its seqs); a subscribe replaces the channel's subscription
    and replays after `since`; a command id is applied once."""

    def __init__(self) -> None:
        self.log: list[dict] = []  # {seq, channels, command_id}
        self.acks: dict[str, dict] = {}
        self.subs: dict[str, int] = {}  # channel -> the seq of the last event sent on it
        self.wire: deque[dict] = deque()  # server -> client, on the current connection
        self.command_frames: dict[str, list[dict]] = {}  # every command frame received, by id
        self.sent_on_connection: Counter = Counter()

    @property
    def head(self) -> int:
        return len(self.log)

    def connect(self) -> dict:
        self.subs.clear()
        self.wire.clear()
        self.sent_on_connection.clear()
        return dict(WELCOME, head=self.head)

    def append(self, inventory: bool, command_id: str | None = None) -> dict:
        event = {"seq": self.head + 1, "channels": {"orders", "inventory"} if inventory else {"orders"},
                 "command_id": command_id}
        self.log.append(event)
        for channel in self.subs:
            if channel in event["channels"]:
                self._send_event(channel, event)
        return event

    def _send_event(self, channel: str, event: dict) -> None:
        self.wire.append({"type": "order-created", "channel": channel, "seq": event["seq"],
                          "prev": self.subs[channel], "hash": f"h{event['seq']}"})
        self.subs[channel] = event["seq"]

    def handle(self, frame: dict) -> None:
        kind = frame["type"]
        if kind == "subscribe":
            channel, since = frame["channel"], frame.get("since", self.head)
            assert since <= self.head
            if "anchor" in frame:
                assert frame["anchor"] == {"seq": frame["anchor"]["seq"], "hash": f"h{frame['anchor']['seq']}"}
                assert frame["anchor"]["seq"] <= since
            self.subs[channel] = since
            self.wire.append({"type": "subscribed", "id": frame["id"], "channel": channel, "since": since,
                              "head": self.head})
            for event in self.log[since:]:
                if channel in event["channels"]:
                    self._send_event(channel, event)
        elif kind == "unsubscribe":
            self.subs.pop(frame["channel"], None)
        elif kind == "command":
            self.command_frames.setdefault(frame["id"], []).append(frame)
            self.sent_on_connection[frame["id"]] += 1
            if frame["id"] in self.acks:
                self.wire.append(dict(self.acks[frame["id"]], duplicate=True))
            else:
                event = self.append(frame["data"]["inventory"], frame["id"])
                self.acks[frame["id"]] = {"type": "ack", "id": frame["id"], "seq": event["seq"], "duplicate": False}
                self.wire.append(self.acks[frame["id"]])
        elif kind == "auth":
            self.wire.append(dict(WELCOME, id=frame["id"], head=self.head))


class Caller:
    """What the session's caller sees."""

    def __init__(self, session: Session, server: StandInServer) -> None:
        self.session, self.server = session, server
        self.events: dict[str, list[dict]] = {"orders": [], "inventory": []}
        self.replies: Counter = Counter()
        self.ended: list[SubscriptionEnded] = []
        self.started: dict[str, int] = {}

    def take(self, outputs) -> None:
        for out in outputs:
            if isinstance(out, Deliver):
                self.events[out.channel].append(out.frame)
            elif isinstance(out, Reply):
                self.replies[out.request_id] += 1
            elif isinstance(out, SubscriptionEnded):
                self.ended.append(out)
        for frame in self.session.frames_to_send():
            self.server.handle(frame)

    def receive(self, frame: dict) -> None:
        if frame["type"] == "subscribed":  # a live-only subscription starts at the first one it gets
            self.started.setdefault(frame["channel"], frame["since"])
        self.take(self.session.receive(frame))


ACTIONS = ["deliver"] * 6 + ["drop", "duplicate", "append", "append", "command", "reconnect"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_drops_duplicates_and_reconnects_never_show_a_gap_a_duplicate_or_a_doubled_command(data) -> None:
    """Whatever the wire drops, duplicates or cuts, each channel's caller gets exactly the
    channel's events after where it started, each once, each `prev` naming the one before; each
    command is applied once and answered once."""
    server, session = StandInServer(), Session(rng=random.Random(0))
    caller = Caller(session, server)
    for _ in range(data.draw(st.integers(0, 4), label="history")):
        server.append(data.draw(st.booleans()))
    session.subscribe("orders", since=data.draw(st.integers(0, server.head), label="since"))
    session.subscribe("inventory")  # live only
    caller.take(session.connection_made(server.connect(), 0.0))
    commands = 0
    for _ in range(data.draw(st.integers(0, 60), label="steps")):
        action = data.draw(st.sampled_from(ACTIONS))
        if action == "append":
            server.append(data.draw(st.booleans()))
        elif action == "command":
            commands += 1
            session.request({"type": "command", "id": f"c{commands}", "name": "place_order",
                             "data": {"inventory": data.draw(st.booleans())}})
            caller.take([])
        elif action == "reconnect":
            caller.take(session.connection_lost(1.0, 1001, "going away"))
            caller.take(session.connection_made(server.connect(), 2.0))
        elif server.wire:
            frame = server.wire.popleft()
            if action == "drop" and "prev" in frame:
                continue  # a hole in the feed
            caller.receive(frame)
            if action == "duplicate" and frame["type"] != "subscribed":
                caller.receive(frame)
    # Settle: a few more events on every channel, every frame delivered.
    for _ in range(2):
        server.append(True)
        while server.wire:
            caller.receive(server.wire.popleft())

    assert not caller.ended
    for channel, got in caller.events.items():
        start = caller.started[channel]
        expected = [e["seq"] for e in server.log if channel in e["channels"] and e["seq"] > start]
        assert [e["seq"] for e in got] == expected, channel
        assert [e["prev"] for e in got] == [start] + expected[:-1], channel
        assert session.subscriptions[channel].last == server.head
        assert session.subscriptions[channel].anchor == {"seq": server.head, "hash": f"h{server.head}"}
    assert caller.replies == Counter({f"c{n}": 1 for n in range(1, commands + 1)})
    assert not session.pending
    applied = Counter(e["command_id"] for e in server.log if e["command_id"] is not None)
    assert all(n == 1 for n in applied.values()) and len(applied) == commands
    for frames in server.command_frames.values():
        assert all(frame == frames[0] for frame in frames)  # resent as it was, with its id


def connected(refreshable: bool = False, expires_at: str = "2026-12-03T10:00:00Z", now: float = 0.0) -> Session:
    session = Session(refreshable=refreshable, rng=random.Random(1))
    session.connection_made(dict(WELCOME, head=0, expires_at=expires_at), now)
    return session


def test_a_request_is_sent_once_per_connection_and_answered_once() -> None:
    """A request made while disconnected goes out on connect; after a reconnect it goes out again
    with its id; a second reply to it (the resend's duplicate ack) reaches nobody."""
    session = Session()
    request_id = session.request({"type": "command", "id": "c-1", "name": "approve_order", "order_id": "o"})
    assert session.frames_to_send() == []
    session.connection_made(dict(WELCOME, head=0), 0.0)
    [frame] = session.frames_to_send()
    assert frame["id"] == request_id == "c-1"
    session.connection_lost(1.0, None)
    session.connection_made(dict(WELCOME, head=0), 2.0)
    assert session.frames_to_send() == [frame]
    ack = {"type": "ack", "id": "c-1", "seq": 3, "duplicate": True}
    assert session.receive(ack) == [Reply("c-1", ack)]
    assert session.receive(ack) == []


def test_a_refused_resubscribe_ends_the_subscription_with_resync_required() -> None:
    """`resync_required` on a resubscribe ends that subscription (the caller starts over), not the others."""
    session = Session()
    sub = session.subscribe("orders", since=5, anchor={"seq": 5, "hash": "h5"}, log_id="log-1")
    session.subscribe("inventory")
    session.connection_made(dict(WELCOME, head=9, log_id="log-2"), 0.0)
    [orders, _] = session.frames_to_send()
    assert orders == {"type": "subscribe", "id": sub.request_id, "channel": "orders", "since": 5,
                      "log_id": "log-1", "anchor": {"seq": 5, "hash": "h5"}}
    outputs = session.receive({"type": "error", "id": sub.request_id, "code": "resync_required", "message": "another log"})
    [ended] = [out for out in outputs if isinstance(out, SubscriptionEnded)]
    assert ended.channel == "orders" and isinstance(ended.error, ResyncRequired)
    assert list(session.subscriptions) == ["inventory"]


def test_a_redacted_event_moves_the_cursor_not_the_anchor() -> None:
    """A customer's redacted event (hash null) is delivered and resumed after, but never anchored on."""
    session = Session()
    session.subscribe("inventory", since=0)
    session.connection_made(dict(WELCOME, head=2), 0.0)
    session.receive({"type": "stock-added", "channel": "inventory", "seq": 1, "prev": 0, "hash": "h1"})
    session.receive({"type": "stock-reserved", "channel": "inventory", "seq": 2, "prev": 1, "hash": None, "redacted": True})
    sub = session.subscriptions["inventory"]
    assert sub.last == 2 and sub.anchor == {"seq": 1, "hash": "h1"}
    session.connection_lost(1.0, None)
    session.connection_made(dict(WELCOME, head=2), 2.0)
    [frame] = session.frames_to_send()
    assert frame["since"] == 2 and frame["anchor"] == {"seq": 1, "hash": "h1"}


def test_the_backoff_grows_to_its_cap_and_starts_over_after_a_stable_connection() -> None:
    """Failed connects in a row wait 0.5-1 s, 1-2 s, ... up to 15-30 s; a connection that stayed
    up 10 s starts the schedule over."""
    session = Session(rng=random.Random(2))
    delays = [session.reconnect_delay(0.0) for _ in range(8)]
    for n, delay in enumerate(delays):
        ceiling = min(30.0, 2.0 ** n)
        assert ceiling / 2 <= delay <= ceiling
    session.connection_made(dict(WELCOME, head=0), 100.0)
    session.connection_lost(111.0, 1001)
    assert 0.5 <= session.reconnect_delay(111.0) <= 1.0
    assert backoff_delay(50, rng=random.Random(3)) <= 30.0


def test_a_provider_token_is_refreshed_before_expiry_and_an_expired_close_reconnects() -> None:
    """With a provider, the refresh falls due 30 s before expiry (or at 80 % of a shorter life),
    its `welcome` moves the next one, and a close with `token expired` is not final; without a
    provider it is."""
    expires = 1_800_000_000.0
    session = connected(refreshable=True, expires_at="2027-01-15T08:00:00Z")
    assert session.refresh_due(expires - 600) == pytest.approx(570)
    assert session.refresh_due(expires - 30) == 0
    session.refresh("NEW")
    [auth] = session.frames_to_send()
    assert auth["type"] == "auth" and auth["token"] == "NEW"
    assert session.refresh_due(expires - 20) is None  # its welcome is on its way
    outputs = session.receive(dict(WELCOME, id=auth["id"], head=4, expires_at="2027-01-15T08:00:10Z"))
    assert [type(out) for out in outputs] == [Status] and session.frames_to_send() == []  # no resubscribe
    assert session.refresh_due(expires - 20) == pytest.approx(24)  # 80 % of the 30 s left
    assert session.connection_lost(expires + 1, 4001, "token expired") == [
        Status("token expired: reconnecting with a fresh one")]
    assert session.fatal is None

    fixed = connected()
    fixed.subscribe("orders", since=0)
    assert fixed.refresh_due(0.0) is None
    outputs = fixed.connection_lost(1.0, 4001, "token expired")
    assert isinstance(fixed.fatal, AuthenticationFailed)
    assert [out.channel for out in outputs if isinstance(out, SubscriptionEnded)] == ["orders"]


def test_a_refused_fresh_token_before_welcome_is_final() -> None:
    """A 4001 before any welcome on this connection (a fresh token refused) ends the client even with a provider."""
    session = connected(refreshable=True)
    session.connection_lost(1.0, 1006)
    session.connection_lost(2.0, 4001, "token expired")
    assert isinstance(session.fatal, AuthenticationFailed)


def test_not_a_welcome_first_is_an_error() -> None:
    """A first frame that is not `welcome` is the server's fault, said precisely."""
    with pytest.raises(Exception, match="expected welcome, got 'pong'"):
        Session().connection_made({"type": "pong"}, 0.0)


def test_a_duplicate_event_is_dropped_without_a_resubscribe_and_a_hole_asks_once() -> None:
    """An event at or below the cursor is dropped quietly; a `prev` that is not the cursor sends
    one resubscribe from it, and the events still in flight do not send another."""
    session = Session()
    session.subscribe("orders", since=0)
    session.connection_made(dict(WELCOME, head=3), 0.0)
    session.frames_to_send()
    first = {"type": "order-created", "channel": "orders", "seq": 1, "prev": 0, "hash": "h1"}
    assert session.receive(first) == [Deliver("orders", first)]
    assert session.receive(first) == [] and session.frames_to_send() == []
    assert session.receive(dict(first, seq=3, prev=2)) == []
    [again] = session.frames_to_send()
    assert again["since"] == 1 and again["anchor"] == {"seq": 1, "hash": "h1"}
    assert session.receive(dict(first, seq=4, prev=3)) == [] and session.frames_to_send() == []
