"""The projection feed's pure side (PROTOCOL.md section 6, "Snapshot, then live"; "State as of
a seq"): `snapshot` frames cut from a stream of row JSON texts, and the state of one stream or
of the whole log right after a seq, folded from the log's prefix with the domain's `evolve`.

Rules of this file: no I/O, no clock; rows come in as already encoded JSON objects (bytes) in
key order, and frames go out as JSON texts (bytes) ready for `wire.text_frame`. The SQL that
reads the rows lives in `orderlog.store.snapshots`.

Theory of operation. A snapshot at seq N is the projection as of N, sent as a series of
frames `{"type":"snapshot","channel":C,"seq":N[,"total":T],"rows":[...],"last":B}`. The pager
holds back the frame it is filling until a row does not fit (or the rows end), so the final
frame is the one that carries `last: true`; it may hold no rows only when the snapshot is empty.
"""

from __future__ import annotations

import json
from typing import Iterable, Iterator

from .domain import Event, Order, State, Stock, evolve_order, evolve_stock, fold

MAX_ROWS = 1000  # rows per snapshot frame (PROTOCOL.md section 6)
MAX_FRAME_BYTES = 256 * 1024  # bytes of JSON text per snapshot frame


class SnapshotPager:
    """Cut row texts into `snapshot` frames of at most MAX_ROWS rows and MAX_FRAME_BYTES bytes.

    `add(rows)` takes single rows, `add_group(text, count)` `count` rows already joined with
    commas (as the store reads them); each returns the frames completed (never the last one).
    `finish()` returns the final frame (`last: true`). The first frame carries `total`.
    """

    def __init__(self, channel: str, seq: int, total: int, *, max_rows: int = MAX_ROWS,
                 max_bytes: int = MAX_FRAME_BYTES):
        self._prefix = b'{"type":"snapshot","channel":' + json.dumps(channel).encode() + b',"seq":' + str(seq).encode()
        self._total = b',"total":' + str(total).encode()
        self._first = True
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self._parts: list[bytes] = []
        self._count = 0  # rows held
        self._size = 0  # bytes of the parts held, with their separating commas

    def _overhead(self) -> int:
        return len(self._prefix) + (len(self._total) if self._first else 0) + len(b',"rows":[],"last":false}')

    def _frame(self, last: bool) -> bytes:
        head = self._prefix + (self._total if self._first else b"") + b',"rows":['
        text = b"".join((head, b",".join(self._parts), b'],"last":true}' if last else b'],"last":false}'))
        self._first = False
        self._parts = []
        self._count = self._size = 0
        return text

    def fits(self, size: int, count: int) -> bool:
        """Whether `count` rows of `size` bytes (joined) fit in an empty frame."""
        return count <= self.max_rows and self._overhead() + size <= self.max_bytes

    def add_group(self, text: bytes, count: int) -> list[bytes]:
        out = []
        grown = self._size + len(text) + (1 if self._parts else 0)
        if self._parts and (self._count + count > self.max_rows or self._overhead() + grown > self.max_bytes):
            out.append(self._frame(False))
            grown = len(text)
        if not self.fits(grown, self._count + count):
            raise ValueError(f"{count} snapshot rows of {len(text)} bytes cannot fit in one frame")
        self._parts.append(text)
        self._count += count
        self._size = grown
        return out

    def add(self, rows: Iterable[bytes]) -> list[bytes]:
        out = []
        for row in rows:
            out += self.add_group(row, 1)
        return out

    def add_pieces(self, pieces: Iterable[tuple[bytes, int]]) -> list[bytes]:
        """`add_group` for each (text, count)."""
        out = []
        for text, count in pieces:
            out += self.add_group(text, count)
        return out

    def finish(self) -> bytes:
        return self._frame(True)


def row_json(row: Order | Stock) -> bytes:
    """One snapshot row: the `order` or `stock` shape as compact JSON (what `get` returns)."""
    return json.dumps(row.to_json(), separators=(",", ":"), ensure_ascii=False).encode()


# -- state as of a seq -----------------------------------------------------------------------


def order_as_of(events: Iterable[Event]) -> Order | None:
    """One order as it was after `events` (its stream's events up to a seq, in order)."""
    order = None
    for event in events:
        order = evolve_order(order, event)
    return order


def stock_as_of(events: Iterable[Event]) -> Stock | None:
    """One stock level as it was after `events` (its stream's events up to a seq, in order)."""
    stock = None
    for event in events:
        stock = evolve_stock(stock, event)
    return stock


def state_as_of(events: Iterable[Event]) -> State:
    """Every order and stock level after `events` (the log's prefix up to a seq, in order)."""
    return fold(events)


def sorted_rows(state: State) -> Iterator[Order | Stock]:
    """The orders by order_id, then the stock levels by sku (the order `orderlog state` prints)."""
    for key in sorted(state.orders):
        yield state.orders[key]
    for key in sorted(state.stock):
        yield state.stock[key]
