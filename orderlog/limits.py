"""Per-user limits and the split of connection slots (PROTOCOL.md section 6, "Per-user limits").

Pure: no I/O, and the clock comes in as `now` (seconds, monotonic). The service asks and obeys:

- `UserLimits.connect(user, now)`: False when the user already holds `max_connections`
  authenticated connections (the new one is closed with 1008 `too many connections`);
- `UserLimits.take_command(user, now)`: False beyond the user's command rate, summed over all
  its connections (`error rate_limited`);
- `UserLimits.replay_delay(user, events, now)`: how long to pause after sending `events`
  replayed events so that the user's replays stay within their rate. Replays are slowed, never
  refused or truncated: the events are always sent, the pause comes after them.
- `Slots`: `max_connections` split in two shares. Handshakes that have not authenticated yet
  may hold at most `handshake_slots` of them and authenticated connections the rest, so a crowd
  of authenticated users cannot starve new logins, and a flood of handshakes that never
  authenticate cannot starve the users.

A user's entry lives while it has connections, and after that until its buckets are full again
(so closing and reopening a connection does not reset its rates); idle entries are dropped on
the way, so memory follows the active users.
"""

from __future__ import annotations

import math

import attrs

PRUNE_EVERY = 1024  # connects between sweeps for idle users


@attrs.define
class TokenBucket:
    """`rate` tokens per second, at most `burst` saved."""

    rate: float
    burst: float
    tokens: float
    stamp: float

    @classmethod
    def full(cls, rate: float, burst: float, now: float) -> "TokenBucket":
        return cls(rate, burst, burst, now)

    def _refill(self, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now

    def take(self, now: float, count: float = 1) -> bool:
        """Take `count` tokens if there are that many; False (and take none) otherwise."""
        self._refill(now)
        if self.tokens < count:
            return False
        self.tokens -= count
        return True

    def borrow(self, now: float, count: float) -> float:
        """Take `count` tokens even if that runs into debt; return the seconds until the debt is
        paid back (0 when there was enough)."""
        self._refill(now)
        self.tokens -= count
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate

    def is_full(self, now: float) -> bool:
        self._refill(now)
        return self.tokens >= self.burst


@attrs.define
class _User:
    connections: int
    commands: TokenBucket
    replays: TokenBucket


class UserLimits:
    """The per-user connection cap, command rate and replay rate (see the module docstring)."""

    def __init__(self, max_connections: int, command_rate: float, command_burst: float, replay_rate: float,
                 replay_burst: float):
        if min(max_connections, command_rate, command_burst, replay_rate, replay_burst) <= 0:
            raise ValueError("every per-user limit must be > 0")
        self.max_connections = max_connections
        self.command_rate, self.command_burst = command_rate, command_burst
        self.replay_rate, self.replay_burst = replay_rate, replay_burst
        self._users: dict[str, _User] = {}
        self._connects = 0

    def _user(self, user: str, now: float) -> _User:
        entry = self._users.get(user)
        if entry is None:
            entry = self._users[user] = _User(0, TokenBucket.full(self.command_rate, self.command_burst, now),
                                              TokenBucket.full(self.replay_rate, self.replay_burst, now))
        return entry

    def connect(self, user: str, now: float) -> bool:
        """Count one more connection of `user`; False (nothing counted) if it holds its cap already."""
        self._connects += 1
        if self._connects % PRUNE_EVERY == 0:
            self._prune(now)
        entry = self._user(user, now)
        if entry.connections >= self.max_connections:
            return False
        entry.connections += 1
        return True

    def disconnect(self, user: str, now: float) -> None:
        entry = self._users.get(user)
        if entry is None:
            return
        entry.connections = max(0, entry.connections - 1)
        if entry.connections == 0 and entry.commands.is_full(now) and entry.replays.is_full(now):
            del self._users[user]

    def connections(self, user: str) -> int:
        entry = self._users.get(user)
        return entry.connections if entry else 0

    def take_command(self, user: str, now: float) -> bool:
        """One command of `user`: False beyond its rate (summed over its connections)."""
        return self._user(user, now).commands.take(now)

    def replay_delay(self, user: str, events: int, now: float) -> float:
        """`user` just sent `events` replayed events: the seconds to pause before the next ones."""
        return self._user(user, now).replays.borrow(now, events) if events else 0.0

    def _prune(self, now: float) -> None:
        for user, entry in list(self._users.items()):
            if entry.connections == 0 and entry.commands.is_full(now) and entry.replays.is_full(now):
                del self._users[user]

    def __len__(self) -> int:
        return len(self._users)


class Slots:
    """`total` connection slots: `handshake_slots` for connections not authenticated yet, the
    rest (at least one) for authenticated ones."""

    def __init__(self, total: int, handshake_share: float):
        if not 0 < handshake_share < 1:
            raise ValueError("handshake_share must be between 0 and 1")
        self.handshake_slots = max(1, math.ceil(total * handshake_share))
        self.user_slots = max(1, total - self.handshake_slots)
        self.pending = 0  # handshakes accepted, not authenticated yet
        self.authenticated = 0

    def open(self) -> bool:
        """A new handshake: False (HTTP 503) when the handshakes' share is full."""
        if self.pending >= self.handshake_slots:
            return False
        self.pending += 1
        return True

    def authenticate(self) -> bool:
        """A handshake authenticated: move it to the users' share; False (it stays a handshake)
        when that share is full."""
        if self.authenticated >= self.user_slots:
            return False
        self.pending -= 1
        self.authenticated += 1
        return True

    def close(self, authenticated: bool) -> None:
        if authenticated:
            self.authenticated -= 1
        else:
            self.pending -= 1
