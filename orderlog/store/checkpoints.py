"""The log's head hash and the signed checkpoints kept with the log (table `checkpoints`).

Blocking SQLite calls: the service calls these from the writer's worker thread.
"""

from __future__ import annotations

import sqlite3

from .log import Store


def head(store: Store) -> tuple[int, str | None]:
    """(seq, hash) of the newest committed event; (0, None) for an empty log."""
    row = store.conn.execute("SELECT seq, hash FROM events ORDER BY seq DESC LIMIT 1").fetchone()
    return (row[0], row[1]) if row else (0, None)


def save(store: Store, seq: int, jws: str) -> None:
    """Keep the checkpoint of `seq` (one per seq: signing the same seq again keeps the first)."""
    with store.conn:
        store.conn.execute("INSERT OR IGNORE INTO checkpoints (seq, jws) VALUES (?, ?)", (seq, jws))


def latest(store: Store) -> tuple[int, str] | None:
    """(seq, jws) of the newest kept checkpoint, if any (None too for a file older than the table)."""
    try:
        row = store.conn.execute("SELECT seq, jws FROM checkpoints ORDER BY seq DESC LIMIT 1").fetchone()
    except sqlite3.OperationalError:  # no such table: a read-only look at a file of schema 2
        return None
    return (row[0], row[1]) if row else None
