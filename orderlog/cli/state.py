"""`orderlog state --at SEQ`: every order and stock level (or one) as it was right after event SEQ,
folded from the log itself (never read from the projection tables), so that an auditor can set
any past moment beside what a client was shown (PROTOCOL.md section 6, "State as of a seq").

Exit status: 0, 1 when the one order or sku asked for did not exist at SEQ, 2 for a usage error
(SEQ beyond the head, a missing file).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from typing import Any, Iterable, TextIO

from ..domain import Order, Stock
from ..records import Filter
from ..snapshot import order_as_of, sorted_rows, state_as_of, stock_as_of
from ..store import Store, open_store

EXIT_NOT_FOUND = 1
CSV_COLUMNS = ("kind", "id", "customer", "status", "items", "ship_to", "note", "name", "available", "reserved",
               "version", "created_at", "updated_at", "last_seq")
ORDER_TABLE = ("order_id", "customer", "status", "items", "version", "last_seq", "updated_at", "ship_to", "note")
STOCK_TABLE = ("sku", "available", "reserved", "version", "last_seq", "name")


def register(subparsers: Any, parent: argparse.ArgumentParser, non_negative: Any) -> None:
    p = subparsers.add_parser(
        "state", parents=[parent], help="print every order and stock level as of a seq, folded from the log",
        description="Fold the log up to SEQ (the projection tables are not read) and print every order, "
        "then every stock level, as they were right after event SEQ; or only one of them.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  orderlog state --at 1200\n  orderlog state --at 1200 --order o-17 --format table\n"
        "  orderlog state --at 1200 --sku cat-food --format csv",
    )
    p.add_argument("--at", type=non_negative, required=True, metavar="SEQ", help="the seq to stop after (<= the head)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--order", metavar="ORDER_ID", help="only this order")
    which.add_argument("--sku", metavar="SKU", help="only this stock level")
    p.add_argument("--format", choices=("jsonl", "csv", "table"), default="jsonl",
                   help="jsonl (default): one {\"order\": ...} or {\"stock\": ...} per line, the shapes `get` "
                   "returns; csv: one row each; table: aligned columns")
    p.set_defaults(func=cmd_state)


def rows_at(store: Store, at: int, order_id: str | None = None, sku: str | None = None) -> list[Order | Stock]:
    """The rows as of `at` (<= the head): all of them (orders by id, then stock by sku), or the one
    asked for (an empty list if it did not exist then)."""
    if order_id is not None:
        found: Order | Stock | None = order_as_of(store.iter_events(Filter(stream=f"order:{order_id}", until=at)))
    elif sku is not None:
        found = stock_as_of(store.iter_events(Filter(stream=f"sku:{sku}", until=at)))
    else:
        return list(sorted_rows(state_as_of(store.iter_events(Filter(until=at)))))
    return [found] if found is not None else []


def cmd_state(args: argparse.Namespace) -> int:
    from . import UsageError, db_path
    from .export import utf8_stdout

    store = open_store(db_path(args), readonly=True)
    try:
        head = store.head()
        if args.at > head:
            raise UsageError(f"--at {args.at} is beyond the head {head}")
        rows = rows_at(store, args.at, args.order, args.sku)
    finally:
        store.close()
    if not rows and (args.order or args.sku):
        what = f"order {args.order}" if args.order else f"sku {args.sku}"
        sys.stderr.write(f"orderlog: {what} not found as of seq {args.at}\n")
        return EXIT_NOT_FOUND
    utf8_stdout(args.format)
    write_rows(rows, args.format, sys.stdout)
    sys.stdout.flush()
    return 0


def write_rows(rows: Iterable[Order | Stock], fmt: str, out: TextIO) -> None:
    if fmt == "jsonl":
        for row in rows:
            kind = "order" if isinstance(row, Order) else "stock"
            out.write(json.dumps({kind: row.to_json()}, separators=(",", ":"), ensure_ascii=False) + "\n")
    elif fmt == "csv":
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for row in rows:
            writer.writerow([_csv_cell(row, column) for column in CSV_COLUMNS])
    else:
        rows = list(rows)
        orders = [r for r in rows if isinstance(r, Order)]
        stock = [r for r in rows if isinstance(r, Stock)]
        if orders:
            _table(out, ORDER_TABLE, [_cells(o.to_json(), ORDER_TABLE) for o in orders])
        if stock:
            if orders:
                out.write("\n")
            _table(out, STOCK_TABLE, [_cells(s.to_json(), STOCK_TABLE) for s in stock])
        if not rows:
            out.write("(nothing as of this seq)\n")


def _csv_cell(row: Order | Stock, column: str) -> Any:
    shape = row.to_json()
    if column == "kind":
        return "order" if isinstance(row, Order) else "stock"
    if column == "id":
        return shape.get("order_id", shape.get("sku"))
    value = shape.get(column)
    if column == "items" and value is not None:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return "" if value is None else value


def _cells(shape: dict, columns: tuple[str, ...]) -> list[str]:
    cells = []
    for column in columns:
        value = shape.get(column)
        if column == "items":
            value = " ".join(f"{i['sku']}x{i['quantity']}" for i in value)
        cells.append("" if value is None else str(value).replace("\n", " "))
    return cells


def _table(out: TextIO, header: tuple[str, ...], rows: list[list[str]]) -> None:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]
    for cells in [list(header), *rows]:
        out.write("  ".join(c.ljust(w) for c, w in zip(cells[:-1], widths)) + "  " + cells[-1] + "\n")
