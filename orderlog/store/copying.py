"""`orderlog copy`: a whole log from one database to another, either backend to either, unchanged.

Every row of the four tables is copied as stored: the events (seq, hashes, the derived
order_id and owner), the idempotency records, and the projections; and the `log_id` and
`projection_seq` with them. So the copy is the same log: `orderlog verify` passes on it, its
JSONL export is byte-identical, and clients resume against it. The source is read in one
snapshot (a server may keep writing it meanwhile); the destination is written in one
transaction and must hold no log yet.
"""

from __future__ import annotations

from typing import Any, Iterator

import attrs

from ..feed import FEED_COLUMNS
from .projections import ORDER_COLUMNS, STOCK_COLUMNS

COMMAND_COLUMNS = "actor, command_id, seq, version, events"
# The tables of a log, in the order they are copied, with their columns (constants: safe in SQL).
LOG_TABLES: tuple[tuple[str, str], ...] = (
    ("events", FEED_COLUMNS),
    ("commands", COMMAND_COLUMNS),
    ("orders", ORDER_COLUMNS),
    ("stock", STOCK_COLUMNS),
)


@attrs.frozen
class CopyReport:
    """What `copy_log` copied."""

    log_id: str
    head: int
    rows: dict[str, int]


class _Counted:
    """An iterator of rows that counts them and keeps the last one."""

    def __init__(self, rows: Iterator[tuple]):
        self._rows = rows
        self.count = 0
        self.last: tuple | None = None

    def __iter__(self) -> "_Counted":
        return self

    def __next__(self) -> tuple:
        row = next(self._rows)
        self.count += 1
        self.last = row
        return row


def copy_log(source: Any, destination: Any) -> CopyReport:
    """Copy every table of `source` into the empty log `destination` (a Store or a PgStore each).

    Raises StoreError (nothing written) when the destination already holds events, commands or
    projections.
    """
    with source.read_snapshot():
        head = source.head()
        projection_seq = source.projection_seq()
        tables = [(name, columns, _Counted(source.table_rows(name, columns))) for name, columns in LOG_TABLES]
        destination.load_log(source.log_id, projection_seq, tables)
    return CopyReport(source.log_id, head, {name: rows.count for name, _, rows in tables})
