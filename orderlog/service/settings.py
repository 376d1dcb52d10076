"""What `orderlog serve` can be told, with its defaults. Plain data: the CLI builds it without
loading trio."""

from __future__ import annotations

from typing import Any

import attrs

from ..auth import Keys


@attrs.frozen
class Settings:
    """Everything `orderlog serve` can be told; defaults live here."""

    db: str = "orderlog.db"
    host: str = "127.0.0.1"
    port: int = 8765
    keys: Keys | None = None
    allow_origins: tuple[str, ...] = ()
    tls_cert: str | None = None
    tls_key: str | None = None
    max_message_size: int = 64 * 1024  # larger frames close with 1009
    auth_timeout: float = 10.0
    ping_interval: float = 20.0
    max_connections: int = 10_000
    max_subscriptions: int = 16  # per connection
    rate_limit: float = 500.0  # commands per second per connection (token bucket)
    # commands a connection may send at once: two seconds' worth of the rate, at least 1
    rate_burst: float = attrs.field(default=attrs.Factory(lambda self: max(1.0, 2 * self.rate_limit),
                                                          takes_self=True))
    # Per user, over all its connections (orderlog.limits):
    max_user_connections: int = 64  # authenticated connections; one more closes with 1008
    user_rate_limit: float = 1000.0  # commands per second; beyond it `rate_limited`
    # commands a user may send at once: two seconds' worth, as for a connection
    user_rate_burst: float = attrs.field(default=attrs.Factory(lambda self: max(1.0, 2 * self.user_rate_limit),
                                                               takes_self=True))
    user_replay_rate: float = 20_000.0  # replayed events per second; beyond it replays slow down
    # events replayed at once: five seconds' worth
    user_replay_burst: float = attrs.field(default=attrs.Factory(lambda self: max(1.0, 5 * self.user_replay_rate),
                                                                 takes_self=True))
    handshake_share: float = 0.1  # of max_connections, kept for handshakes not authenticated yet
    handshake_timeout: float = 10.0  # slow handshakes are dropped after this
    synchronous: str = "FULL"
    window: int = 10_000  # recent events kept in memory (feed.DEFAULT_WINDOW)
    checkpoint_key: Any = None  # an Ed25519 private key: sign a checkpoint every `checkpoint_every` events
    checkpoint_every: int = 1000
    snapshot_page: int = 4000  # projection rows read per step of a snapshot (one short read each 1,000)
