"""The client's sans-IO session: what a resuming orderlog client knows and decides, without I/O.

Rules of this module: no sockets, no event loop (trio or asyncio), no clock (times come in as
arguments). The caller (a shell: `orderlog.client` on trio, `orderlog.client.asyncio` on asyncio)
owns the connection and the time. It tells the session what happened (`connection_made` with
the `welcome`, `receive` for every later frame, `connection_lost` with the close code), asks it
what to do (`frames_to_send`, `reconnect_delay`, `refresh_due`) and hands the events it returns
to its callers, in the style of h11 and wsproto.

Theory of operation. The session holds, per subscribed channel, the last seq it delivered (the
resume cursor), the newest delivered event with a hash (the anchor) and the log it came from;
and the table of requests not answered yet. On every connect it resubscribes each channel after
its cursor and resends each unanswered request with the same id (the server applies a command
id at most once). An event is delivered only when its `prev` is the cursor: a seq at or below it
is a duplicate and is dropped; any other `prev` is a hole that may hide an event meant for this
user, so the session resubscribes from the cursor (once, until the `subscribed` that answers it).
A request's first reply is delivered and the request leaves the table, so a resent command is
never answered twice. The caller therefore never sees a gap, a duplicate or a doubled command.
"""

from __future__ import annotations

import itertools
import random
from datetime import datetime
from typing import Any

import attrs

from .domain import ErrorCode

BACKOFF_START = 1.0
BACKOFF_CAP = 30.0
STABLE_AFTER = 10.0  # seconds connected before the backoff starts over
MAX_ATTEMPT = 30  # the backoff exponent stops growing here (the cap is reached long before)
REFRESH_LEAD = 30.0  # a provider's new token is sent this long before expiry at the latest ...
REFRESH_SHARE = 0.2  # ... or after 80 % of the lifetime the token had at welcome, if shorter
SUB_ID = "sub-"  # subscribe requests carry id "sub-N" so that a refusal finds its subscription
AUTH_ID = "auth-"  # in-band refreshes carry id "auth-N": their welcome is not a new connection
AUTH_CLOSE_CODE = 4001
TOKEN_EXPIRED = "token expired"  # the close reason after which a provider's fresh token may help


def backoff_delay(attempt: int, start: float = BACKOFF_START, cap: float = BACKOFF_CAP,
                  rng: random.Random | None = None) -> float:
    """The wait after `attempt` + 1 failed connects in a row: drawn uniformly between half and
    all of min(cap, start * 2**attempt) (the jitter spreads reconnects after a server restart)."""
    ceiling = min(cap, start * 2 ** attempt)
    return (rng or random).uniform(ceiling / 2, ceiling)


class OrderlogError(Exception):
    """An `error` reply: `code` is its error code (`domain.ErrorCode`, docs/protocol.md section 2)."""

    def __init__(self, code: str, message: str, details: dict | None = None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.details = details or {}


class ResyncRequired(OrderlogError):
    """A subscription's history is not this server's log (another log, a restored backup, a
    failover): drop what was folded from it and subscribe again from since 0."""


class AuthenticationFailed(OrderlogError):
    """The server closed with 4001; reconnecting with the same token cannot help."""


class TokenUnavailable(Exception):
    """The token provider failed (raised, or returned no token) before the first connect."""


def error_from(message: dict) -> OrderlogError:
    """The exception for an `error` reply."""
    kind = ResyncRequired if message.get("code") == ErrorCode.RESYNC_REQUIRED else OrderlogError
    return kind(message.get("code", ErrorCode.INTERNAL), message.get("message", ""), message.get("details"))


# -- what the session tells its shell ----------------------------------------------------------


@attrs.frozen
class Deliver:
    """Give `frame` (an event, or a `snapshot` frame) to the caller reading `channel`."""

    channel: str
    frame: dict


@attrs.frozen
class Reply:
    """The answer to request `request_id` (an `error` frame included): it left the table."""

    request_id: str
    frame: dict


@attrs.frozen
class SubscriptionEnded:
    """The subscription on `channel` is over: `error` says why (e.g. ResyncRequired)."""

    channel: str
    error: OrderlogError


@attrs.frozen
class Status:
    """A line for the user: connected, resumed, reconnecting, a refreshed token, ..."""

    text: str


@attrs.frozen
class ServerError:
    """An `error` frame that answers nothing the session waits for (worth a warning in a log)."""

    frame: dict


Output = Deliver | Reply | SubscriptionEnded | Status | ServerError


@attrs.define
class Subscription:
    channel: str
    request_id: str
    snapshot: bool = False  # start from the rows as of a seq (v1.2), while `last` is None
    last: int | None = None  # the last seq delivered to the caller (None: live only, until `subscribed`)
    anchor: dict | None = None  # {seq, hash}: the newest event delivered with its hash
    log_id: str | None = None  # the log that the delivered history comes from (a welcome's log_id)
    snapshot_seq: int | None = None  # the seq of the snapshot being received
    snapshot_hash: str | None = None  # the hash of event snapshot_seq, if this user's feeds carry it
    resubscribing: bool = False  # a resubscribe after a hole is on its way: wait for its `subscribed`
    resumed: bool = False  # the next `subscribed` answers the resubscribe after a reconnect

    def frame(self) -> dict:
        """The `subscribe` request that resumes after what was delivered (or starts afresh)."""
        frame: dict[str, Any] = {"type": "subscribe", "id": self.request_id, "channel": self.channel}
        if self.last is not None:
            frame["since"] = self.last
            if self.log_id is not None:
                frame["log_id"] = self.log_id
            if self.anchor is not None:
                frame["anchor"] = self.anchor
        elif self.snapshot:
            frame["snapshot"] = True
            self.snapshot_seq = None
        return frame


def rfc3339_seconds(text: Any) -> float | None:
    """A welcome's `expires_at` as seconds since the epoch (None if absent or malformed)."""
    if not isinstance(text, str):
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


class Session:
    """One client's state across its connections (see the module's theory of operation).

    `refreshable`: the shell has a token provider, so a token is refreshed in band before it
    expires, and a close for an expired token is worth a reconnect with a fresh one.
    """

    def __init__(self, *, backoff_start: float = BACKOFF_START, backoff_cap: float = BACKOFF_CAP,
                 refreshable: bool = False, rng: random.Random | None = None):
        self.backoff_start = backoff_start
        self.backoff_cap = backoff_cap
        self.refreshable = refreshable
        self.rng = rng
        self.subscriptions: dict[str, Subscription] = {}
        self.pending: dict[str, dict] = {}  # request id -> the request, resent on every connect
        self.welcome: dict | None = None
        self.log_id: str | None = None
        self.connected = False
        self.started = False  # a first connection was made
        self.fatal: OrderlogError | None = None
        self._outbox: list[dict] = []
        self._ids = itertools.count(1)
        self._attempt = 0
        self._connected_at: float | None = None
        self._expires_at: float | None = None
        self._refresh_at: float | None = None  # None: no refresh due on this connection
        self._refresh_id: str | None = None

    # the caller's side ------------------------------------------------------------------

    def request(self, frame: dict) -> str:
        """Put a request in the table (sent now if connected, else on connect); returns its id."""
        frame = dict(frame)
        frame.setdefault("id", f"r{next(self._ids)}")
        self.pending[frame["id"]] = frame
        self._send(frame)
        return frame["id"]

    def forget(self, request_id: str) -> None:
        """The caller stopped waiting for request `request_id` (it is not resent any more)."""
        self.pending.pop(request_id, None)

    def subscribe(self, channel: str, since: int | None = None, snapshot: bool = False, *,
                  anchor: dict | None = None, log_id: str | None = None) -> Subscription:
        """Open a subscription (the request is sent now if connected, else on connect)."""
        if channel in self.subscriptions:
            raise ValueError(f"already subscribed to {channel}")
        if snapshot and since is not None:
            raise ValueError("snapshot and since exclude each other")
        sub = Subscription(channel, f"{SUB_ID}{next(self._ids)}", snapshot and since is None, since, anchor, log_id)
        self.subscriptions[channel] = sub
        self._send(sub.frame())
        return sub

    def unsubscribe(self, channel: str, tell_server: bool = True) -> None:
        """Close the subscription on `channel` (an `unsubscribe` goes out if connected)."""
        if self.subscriptions.pop(channel, None) is not None and tell_server:
            self._send({"type": "unsubscribe", "channel": channel})

    def frames_to_send(self) -> list[dict]:
        """The frames the shell must send now, in order (each once)."""
        frames, self._outbox = self._outbox, []
        return frames

    # the connection's side --------------------------------------------------------------

    def connection_made(self, welcome: dict, now: float) -> list[Output]:
        """The connection is up and `welcome` is its first frame: resubscribe and resend."""
        if not isinstance(welcome, dict) or welcome.get("type") != "welcome":
            kind = welcome.get("type") if isinstance(welcome, dict) else type(welcome).__name__
            raise OrderlogError(ErrorCode.INTERNAL, f"expected welcome, got {kind!r}")
        out: list[Output] = []
        if self.log_id is not None and welcome.get("log_id") != self.log_id:
            out.append(Status(f"the server's log changed (log_id {welcome.get('log_id')}); resubscribing "
                              "will be refused with resync_required"))
        self._welcome(welcome)
        self.connected = True
        self._connected_at = now
        self._outbox = []
        for sub in self.subscriptions.values():
            sub.resubscribing = False
            sub.resumed = self.started and sub.last is not None
            self._send(sub.frame())
        for frame in self.pending.values():
            self._send(frame)
        self.started = True
        return out

    def connection_lost(self, now: float, code: int | None = None, reason: str | None = None) -> list[Output]:
        """The connection is gone (`code`: its close code, None without a close frame).

        A 4001 is final (`fatal` is set, every request and subscription fails), unless the
        token only expired, a provider can give a fresh one and this connection was welcomed.
        """
        welcomed = self.connected
        self.connected = False
        self._outbox = []
        self._expires_at = self._refresh_at = None
        self._refresh_id = None
        if code == AUTH_CLOSE_CODE:
            if self.refreshable and welcomed and reason == TOKEN_EXPIRED:
                return [Status("token expired: reconnecting with a fresh one")]
            return self.fail(AuthenticationFailed("unauthorized", reason or "authentication failed"))
        return [Status(f"disconnected ({code if code is not None else 'no close frame'})")]

    def fail(self, error: OrderlogError) -> list[Output]:
        """End everything with `error`: every waiting request and every subscription."""
        self.fatal = error
        frame = {"type": "error", "code": error.code, "message": error.message}
        out: list[Output] = [Reply(request_id, dict(frame, id=request_id)) for request_id in self.pending]
        out += [SubscriptionEnded(channel, error) for channel in self.subscriptions]
        self.pending.clear()
        self.subscriptions.clear()
        return out

    def reconnect_delay(self, now: float) -> float:
        """How long to wait before the next connect (exponential backoff with jitter; it starts
        over after a connection that stayed up STABLE_AFTER seconds)."""
        if self._connected_at is not None and now - self._connected_at >= STABLE_AFTER:
            self._attempt = 0
        self._connected_at = None
        delay = backoff_delay(self._attempt, self.backoff_start, self.backoff_cap, self.rng)
        self._attempt = min(self._attempt + 1, MAX_ATTEMPT)
        return delay

    def refresh_due(self, now: float) -> float | None:
        """Seconds until a fresh token should be sent in band (0: now); None: none due. The
        shell asks after every frame; the first ask after a welcome fixes the time of the
        refresh: REFRESH_LEAD before expiry, or after 80 % of the remaining lifetime if shorter."""
        if not self.connected or self._expires_at is None or self._refresh_id is not None:
            return None
        if self._refresh_at is None:
            lifetime = max(0.0, self._expires_at - now)
            self._refresh_at = self._expires_at - min(REFRESH_LEAD, lifetime * REFRESH_SHARE)
        return max(0.0, self._refresh_at - now)

    def refresh(self, token: str) -> None:
        """Send `token` in band (`auth`); its `welcome` moves the next refresh."""
        if self.connected:
            self._refresh_id = f"{AUTH_ID}{next(self._ids)}"
            self._send({"type": "auth", "id": self._refresh_id, "token": token})

    def refresh_failed(self) -> None:
        """The provider had no fresh token: no more refreshes on this connection (the server
        closes it with `token expired`, and the reconnect asks the provider again)."""
        self._expires_at = self._refresh_at = None

    def receive(self, message: Any) -> list[Output]:
        """One frame from the server (decoded JSON) -> what to tell the caller; frames to send
        (a resubscribe after a hole) wait in `frames_to_send`."""
        if not isinstance(message, dict):
            return [ServerError({"type": "error", "code": ErrorCode.INTERNAL, "message": "not a JSON object"})]
        kind = message.get("type")
        channel = message.get("channel")
        if "seq" in message and "prev" in message and isinstance(channel, str):
            return self._event(message)
        if kind == "snapshot":
            return self._snapshot(message)
        request_id = message.get("id")
        if kind == "welcome":
            if request_id is not None and request_id == self._refresh_id:
                self._refresh_id = None
            self._welcome(message)
            return [Status(f"token refreshed (expires {message.get('expires_at')})")]
        if isinstance(request_id, str) and request_id.startswith(SUB_ID):
            return self._subscribe_reply(request_id, message)
        if isinstance(request_id, str) and request_id in self.pending:
            del self.pending[request_id]
            return [Reply(request_id, message)]
        if kind == "error":
            return [ServerError(message)]
        return []

    # inside ---------------------------------------------------------------------------

    def _send(self, frame: dict) -> None:
        if self.connected:
            self._outbox.append(frame)

    def _welcome(self, welcome: dict) -> None:
        self.welcome = welcome
        self.log_id = welcome.get("log_id", self.log_id)
        self._expires_at = rfc3339_seconds(welcome.get("expires_at")) if self.refreshable else None
        self._refresh_at = None  # set by the next refresh_due, from its clock

    def _subscribe_reply(self, request_id: str, message: dict) -> list[Output]:
        sub = next((s for s in self.subscriptions.values() if s.request_id == request_id), None)
        if sub is None:
            return []
        kind = message.get("type")
        if kind == "subscribed":
            sub.resubscribing = False
            sub.log_id = self.log_id  # what follows comes from this connection's log
            if message.get("snapshot") is True:
                sub.snapshot_seq = message.get("since")  # rows first; `last` once they are all here
                sub.snapshot_hash = message.get("hash")
            elif sub.last is None:
                # Live only: the feed starts after `since` (the head), so a reconnect before the
                # first event must resume from there, not from a new head.
                sub.last = message.get("since")
            if sub.resumed:
                sub.resumed = False
                return [Status(f"resumed {sub.channel} from seq {message.get('since')}")]
            return []
        if kind == "error":
            # A (re)subscribe refused, e.g. resync_required: the caller must start over.
            del self.subscriptions[sub.channel]
            error = error_from(message)
            out: list[Output] = []
            if isinstance(error, ResyncRequired):
                out.append(Status(f"resync required on {sub.channel}: {error.message}"))
            return out + [SubscriptionEnded(sub.channel, error)]
        return []

    def _snapshot(self, frame: dict) -> list[Output]:
        sub = self.subscriptions.get(frame.get("channel"))  # type: ignore[arg-type]
        if sub is None or sub.last is not None or sub.snapshot_seq is None or sub.snapshot_seq != frame.get("seq"):
            return []
        if frame.get("last"):
            sub.last = frame["seq"]  # complete: from now on, resume after it, anchored on it
            if isinstance(sub.snapshot_hash, str):
                sub.anchor = {"seq": frame["seq"], "hash": sub.snapshot_hash}
        return [Deliver(sub.channel, frame)]

    def _event(self, event: dict) -> list[Output]:
        sub = self.subscriptions.get(event["channel"])
        if sub is None or sub.last is None:
            return []
        seq, prev = event["seq"], event["prev"]
        if not isinstance(seq, int) or seq <= sub.last:
            return []  # already delivered (before a reconnect, or a replay overlapping the feed)
        if prev != sub.last:
            # A hole that may hide an event meant for us: resume from what we hold (once: the
            # events still in flight from the replaced subscription would ask again).
            if not sub.resubscribing:
                sub.resubscribing = True
                self._send(sub.frame())
            return []
        sub.last = seq
        if isinstance(event.get("hash"), str) and not event.get("redacted"):
            sub.anchor = {"seq": seq, "hash": event["hash"]}
        return [Deliver(sub.channel, event)]
