"""Clients for orderlog that survive disconnects: a sans-IO core and two thin shells.

    # trio (trio-websocket, installed with orderlog)
    from orderlog.client import connect
    # asyncio (the `websockets` package: pip install 'orderlog[asyncio]')
    from orderlog.client.asyncio import connect

    async with connect(url, token) as c:   # token: a JWT, or a provider function (sync or async)
        ack = await c.command("place_order", order_id="o-1", data={"items": [{"sku": "kibble", "quantity": 1}]})
        async for event in c.subscribe("orders", since=0):
            print(event["seq"], event["type"])
        async for item in c.subscribe("orders", snapshot=True):  # the rows as of N, then the events
            if item["type"] == "snapshot":
                rows = item["rows"]

Both reconnect on their own with exponential backoff and jitter (`backoff_delay`: the n-th wait in
a row is drawn between half and all of min(30 s, 1 s x 2^(n-1)), so 0.5-1 s, 1-2 s, 2-4 s, ...
15-30 s; it starts over after a connection that stayed up 10 s), resubscribe every channel after
the last seq they delivered (with the log's id and an anchor, the newest event delivered with its
hash, so that another log, or this one after a restore or a failover that lost events it
delivered, is refused instead of replayed), and resend unacknowledged commands with the same
command id, so the server applies each at most once. A caller never sees a gap, a duplicate event
or a double-applied command across a reconnect, nor a mix of two histories: when the server's log
is not the one the caller folded, the subscription ends with ResyncRequired, and the caller
starts over (subscribe again from since 0).

The rules live in `orderlog.session` (sans-IO: no sockets, no event loop, no clock), shared by
`orderlog.client.trio` and `orderlog.client.asyncio`. A token provider is called before every
connect and before the token expires (its new token goes in band, `{"type":"auth"}`); a provider
that fails before the first connect raises TokenUnavailable.

This package's names come from the trio shell (`connect`, `Client`, `tail`), loaded on first use,
so that `orderlog.client.asyncio` does not load trio.
"""

from __future__ import annotations

from typing import Any

from ..session import (
    BACKOFF_CAP, BACKOFF_START, STABLE_AFTER, AuthenticationFailed, OrderlogError, ResyncRequired, TokenUnavailable,
    backoff_delay,
)
from .common import TokenSource, why

_TRIO = ("Client", "connect", "tail", "EVENT_BUFFER")


def __getattr__(name: str) -> Any:
    if name in _TRIO:
        from . import trio as shell

        return getattr(shell, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["BACKOFF_CAP", "BACKOFF_START", "STABLE_AFTER", "AuthenticationFailed", "Client", "OrderlogError",
           "ResyncRequired", "TokenSource", "TokenUnavailable", "backoff_delay", "connect", "tail", "why"]
