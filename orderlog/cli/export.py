"""`orderlog events`: the log exported as JSONL (the protocol's EVENT objects), CSV or a table,
page by page through the store's read path."""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from typing import Callable, Iterator, Sequence, TextIO

import attrs

from ..canonical import dumps, event_json, time_bound
from ..domain import EVENT_TYPES, Event
from ..records import Filter
from ..store import Store, open_store
from . import UsageError, db_path

EXPORT_PAGE = 5000  # events read per query while exporting
CSV_COLUMNS = ("seq", "stream", "version", "type", "at", "actor", "command_id", "data", "hash")


def register(subparsers: "argparse._SubParsersAction", db: argparse.ArgumentParser,
             non_negative: Callable[[str], int], positive: Callable[[str], int]) -> None:
    """Add `events` to the CLI."""
    p = subparsers.add_parser(
        "events", parents=[db], help="export events (JSONL, CSV or a table)",
        description="Print the events that match every given filter, in seq order. Reads through a "
        "read-only connection, so it may run while a server writes: it prints a committed prefix "
        "of the log (up to the head when it started). JSONL lines are the EVENT objects of the "
        "protocol, from which every hash can be recomputed.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  orderlog events --order o-17 --format table\n"
        "  orderlog events --type order-created --type order-cancelled --from-time 2026-11-01T00:00:00Z\n"
        "  orderlog events --after 1000 --limit 1000 > page.jsonl",
    )
    p.add_argument("--stream", help="only this stream (order:ID or sku:SKU)")
    p.add_argument("--order", metavar="ORDER_ID", help="only events about this order (its own and its stock moves)")
    p.add_argument("--type", dest="types", action="append", choices=EVENT_TYPES, metavar="TYPE",
                   help="only this event type (repeatable): " + ", ".join(EVENT_TYPES))
    p.add_argument("--actor", metavar="USER", help="only events written by this user's commands")
    p.add_argument("--after", type=non_negative, default=0, metavar="SEQ", help="only events with seq > SEQ")
    p.add_argument("--until", type=non_negative, default=None, metavar="SEQ", help="only events with seq <= SEQ")
    p.add_argument("--from-time", metavar="TIME", help="only events at or after TIME (RFC 3339 with offset)")
    p.add_argument("--to-time", metavar="TIME", help="only events before TIME (RFC 3339 with offset)")
    p.add_argument("--limit", type=positive, default=None, metavar="N", help="at most N events (default: all)")
    p.add_argument("--format", choices=("jsonl", "csv", "table"), default="jsonl",
                   help="jsonl (default): one EVENT object per line; csv: a header row, data as JSON "
                   "text; table: aligned columns for a terminal")
    p.set_defaults(func=cmd_events)


def event_filter(args: argparse.Namespace) -> Filter:
    """The Filter for `events`' flags; UsageError for a malformed time."""
    times = {}
    for flag, value in (("--from-time", args.from_time), ("--to-time", args.to_time)):
        if value is not None:
            try:
                times[flag] = time_bound(value)
            except ValueError:
                raise UsageError(
                    f"{flag}: {value!r} is not an RFC 3339 time with an offset (e.g. 2026-11-25T17:03:00Z)"
                ) from None
    return Filter(
        stream=args.stream,
        order_id=args.order,
        types=tuple(args.types) if args.types else None,
        actor=args.actor,
        after=args.after,
        until=args.until,
        from_time=times.get("--from-time"),
        to_time=times.get("--to-time"),
    )


def iter_export(store: Store, filt: Filter, limit: int | None = None, page: int = EXPORT_PAGE) -> Iterator[list[Event]]:
    """Pages of matching events up to the head as it is now (a committed prefix), at most `limit`."""
    head = store.head()
    until = head if filt.until is None else min(filt.until, head)
    filt = attrs.evolve(filt, until=until)
    remaining = limit
    after = filt.after
    while remaining is None or remaining > 0:
        size = page if remaining is None else min(page, remaining)
        batch = store.read_events(attrs.evolve(filt, after=after), limit=size)
        if batch:
            yield batch
        if len(batch) < size:
            return
        after = batch[-1].seq
        if remaining is not None:
            remaining -= len(batch)


def jsonl_line(event: Event) -> str:
    """One JSONL line: the EVENT object, UTF-8 as is."""
    return json.dumps(event_json(event), ensure_ascii=False, separators=(",", ":"))


def write_events(pages: Iterator[list[Event]], fmt: str, out: TextIO) -> int:
    """Write pages of events to `out` in `fmt`; return how many."""
    count = 0
    if fmt == "jsonl":
        for batch in pages:
            out.write("".join(jsonl_line(e) + "\n" for e in batch))
            count += len(batch)
    elif fmt == "csv":
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for batch in pages:
            writer.writerows(
                (e.seq, e.stream, e.version, e.type, e.at, e.actor, e.command_id, dumps(e.data), e.hash) for e in batch
            )
            count += len(batch)
    else:
        count = _write_table(pages, out)
    return count


TABLE_HEADER = ("SEQ", "AT", "STREAM", "VER", "TYPE", "ACTOR", "COMMAND", "DATA")


def _table_row(e: Event) -> tuple[str, ...]:
    return (str(e.seq), e.at, e.stream, str(e.version), e.type, e.actor, e.command_id,
            json.dumps(e.data, ensure_ascii=False, separators=(", ", ": ")))


def _write_table(pages: Iterator[list[Event]], out: TextIO) -> int:
    """Aligned columns; widths come from the first page (streaming: later rows may overflow)."""
    widths: list[int] | None = None
    numeric = {0, 3}
    count = 0
    for batch in pages:
        rows = [_table_row(e) for e in batch]
        if widths is None:
            widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(TABLE_HEADER)]
            out.write(_table_line(TABLE_HEADER, widths, set()) + "\n")
        out.write("".join(_table_line(r, widths, numeric) + "\n" for r in rows))
        count += len(rows)
    if widths is None:
        out.write("(no events)\n")
    return count


def _table_line(cells: Sequence[str], widths: Sequence[int], numeric: set[int]) -> str:
    parts = [c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(cells[:-1], widths))]
    return "  ".join(parts + [cells[-1]])


def utf8_stdout(fmt: str) -> None:
    """JSONL and CSV are UTF-8 whatever the locale says; a table is for this terminal's encoding."""
    if not isinstance(sys.stdout, io.TextIOWrapper):
        return
    if fmt == "table":
        sys.stdout.reconfigure(errors="replace")
    elif sys.stdout.encoding.lower().replace("-", "") != "utf8":
        sys.stdout.reconfigure(encoding="utf-8")


def cmd_events(args: argparse.Namespace) -> int:
    """`orderlog events`: stream the matching events to stdout in the chosen format."""
    filt = event_filter(args)
    store = open_store(db_path(args), readonly=True)
    utf8_stdout(args.format)
    try:
        write_events(iter_export(store, filt, args.limit), args.format, sys.stdout)
        sys.stdout.flush()
    finally:
        store.close()
    return 0
