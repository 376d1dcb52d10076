"""Reading the feed from the log: the catch-up and read-back queries, with the events encoded
by SQLite itself (the same bytes as `orderlog.feed.feed_event`; tests/test_feed_encoding.py).

Blocking SQLite queries: the service calls these from a worker thread.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from ..domain import Role
from ..feed import Channel, FeedEvent, channel_frames
from ..wire import frame_header

# The same encoding as feed_event, done by SQLite while it reads (catch-up reads many events):
# json_quote escapes a string exactly as json.encoder.encode_basestring does (tests/test_feed_encoding.py).
_TAIL_SQL = """CAST(',"stream":"' || stream || '","version":' || version || ',"at":"' || at || '","actor":' || json_quote(actor)
         || ',"command_id":' || json_quote(command_id) || ',"data":' || data || ',"hash":"' || hash || '"}' AS BLOB)"""
FEED_SQL = f"""seq, stream, type, owner, order_id, substr(stream, 1, 6) = 'order:',
    CAST('{{"type":"' || type || '","channel":' AS BLOB),
    CAST(',"seq":' || seq || ',"prev":' AS BLOB),
    {_TAIL_SQL}, hash"""
# For catch-up frames of one channel: the text up to "prev": (channel name bound as the first
# parameter) and the tail. Three columns instead of nine, and no FeedEvent: about half the cost.
_FRAME_SQL = f"""seq, CAST('{{"type":"' || type || '","channel":' || ? || ',"seq":' || seq || ',"prev":' AS BLOB),
    {_TAIL_SQL}"""



def channel_where(channel: Channel) -> tuple[str, list[Any]]:
    """The WHERE clause (beyond the seq range) selecting this channel's visible events."""
    if channel.name == "orders":
        if channel.principal.role == Role.CUSTOMER:
            return "owner = ? AND substr(stream, 1, 6) = 'order:'", [channel.principal.user]
        return "substr(stream, 1, 6) = 'order:'", []
    if channel.name == "inventory":
        return "substr(stream, 1, 4) = 'sku:'", []
    return "stream = ?", [channel.name]



def read_feed(conn: sqlite3.Connection, channel: Channel | None, after: int, until: int, limit: int) -> list[FeedEvent]:
    """Committed events with after < seq <= until that `channel` sees (all if None), in order."""
    where, params = channel_where(channel) if channel is not None else ("1", [])
    rows = conn.execute(
        f"SELECT {FEED_SQL} FROM events WHERE seq > ? AND seq <= ? AND {where} ORDER BY seq LIMIT ?",
        [after, until, *params, limit],
    )
    return [FeedEvent(*r) for r in rows]


def read_frames(conn: sqlite3.Connection, channel: Channel, after: int, until: int, limit: int,
                prev: int) -> tuple[list[bytes], int]:
    """The WebSocket frames `channel` gets for its events with after < seq <= until (at most
    `limit` of them), the first one's `prev` being `prev`; and the last one's seq (`prev` if none)."""
    if channel.may_redact:
        return channel_frames(channel, read_feed(conn, channel, after, until, limit), prev)
    name = channel.json_name
    where, params = channel_where(channel)
    rows = conn.execute(
        f"SELECT {_FRAME_SQL} FROM events WHERE seq > ? AND seq <= ? AND {where} ORDER BY seq LIMIT ?",
        [name.decode(), after, until, *params, limit],
    )
    frames = []
    append = frames.append
    for seq, head, tail in rows:
        prev_bytes = str(prev).encode()
        append(b"".join((frame_header(len(head) + len(prev_bytes) + len(tail)), head, prev_bytes, tail)))
        prev = seq
    return frames, prev
