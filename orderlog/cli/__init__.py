"""The `orderlog` command line: the auditor's and operator's tools over one SQLite file.

A thin shell: each subcommand parses its flags, opens the store (read-only whenever it only
reads, so it may run next to a live server), calls into `store`, `audit` or `seed` and
prints. Errors the user can fix (a missing or foreign file, a malformed flag) are one line on
stderr, `orderlog: error: ...`, exit 2; Ctrl-C exits 130 and a closed pipe exits quietly.
The service subcommands (serve, token, tail, bench) come from `cli.service`; none of the
subcommands here loads trio.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from typing import Any, NoReturn, Sequence


from .. import __version__
from ..canonical import parse_time
from ..checkpoint import BadCheckpoint
from ..protocol import MAX_SEQ
from ..store import (
    StoreError,
    Unavailable,
    audit,
    copying,
    database_errors,
    display_name,
    is_postgres,
    known_migrations,
    open_store,
    schema_version_of,
)
from ..store.seeding import DEFAULT_SEED_BATCH, SeedError, run_seed
from .progress import Progress

DEFAULT_DB = "orderlog.db"
DB_ENV = "ORDERLOG_DB"
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # what a shell reports for a process killed by SIGPIPE


class UsageError(Exception):
    """A mistake the user can fix that argparse cannot check by itself (a malformed time, a bad
    environment value or key file): one line on stderr, exit 2 (`main`)."""


class Parser(argparse.ArgumentParser):
    """argparse, with usage errors as one line that points at --help."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"orderlog: error: {message} (see `{self.prog} --help`)\n")


# -- entry point ------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `orderlog` command line; return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["bench"]:
            return _bench(argv[1:])
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        return args.func(args) or 0
    except SystemExit as exc:  # argparse's --help and usage errors
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    except (StoreError, UsageError) as exc:
        return _fail(str(exc))
    except Unavailable as exc:  # the database went away meanwhile (PostgreSQL restarting, say)
        return _fail(f"{display_name(_db_path_of(argv))}: unavailable: {exc}")
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        silence_stdout()
        return EXIT_BROKEN_PIPE
    except Exception as exc:
        if not isinstance(exc, database_errors()):
            raise
        return _fail(f"{display_name(_db_path_of(argv))}: database error: {exc}")


def _bench(argv: list[str]) -> int:
    """`orderlog bench`: the load generator is a separate package (orderlog_bench), outside the
    product's import graph, loaded only for this subcommand."""
    if any(arg == "--db" or arg.startswith("--db=") for arg in argv):
        return _fail("bench starts its own servers on scratch databases (--scratch DIR) or measures a "
                     "running one (--url); it takes no --db")
    try:
        bench = importlib.import_module("orderlog_bench")
    except ImportError:
        return _fail("`orderlog bench` needs the orderlog_bench package (installed with orderlog from a source checkout)")
    return bench.main(argv)


def _fail(message: str) -> int:
    sys.stderr.write(f"orderlog: error: {message}\n")
    return EXIT_USAGE


def silence_stdout() -> None:
    """After the reader closed the pipe, point stdout at /dev/null so the exit flush is quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _db_path_of(argv: Sequence[str] | None) -> str:
    args = list(sys.argv[1:] if argv is None else argv)
    for i, arg in enumerate(args):
        if arg == "--db" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--db="):
            return arg[5:]
    return os.environ.get(DB_ENV) or DEFAULT_DB


def build_parser() -> argparse.ArgumentParser:
    """The `orderlog` parser with every subcommand (ours, then the service's)."""
    parser = Parser(
        prog="orderlog",
        description="An event-sourced pet-store order service on one SQLite file: "
        "tools to create, inspect, audit and seed the log.",
    )
    parser.add_argument("--version", action="version", version=f"orderlog {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")

    db = Parser(add_help=False)
    db.add_argument(
        "--db", metavar="PATH", default=None,
        help=f"the database file, or a postgresql:// URL (default: ${DB_ENV}, else ./{DEFAULT_DB})",
    )

    p = subparsers.add_parser(
        "migrate", parents=[db], help="create the database if missing and apply migrations",
        description="Create the database file if it does not exist and apply the schema migrations "
        "it lacks, each exactly once. Prints what was applied.",
    )
    p.set_defaults(func=cmd_migrate)

    from . import export  # its commands need this module whole: imported once it is

    export.register(subparsers, db, _non_negative, _positive)

    p = subparsers.add_parser(
        "verify", parents=[db], help="check the hash chain, seq/version continuity and projections",
        description="Recompute the hash chain of the whole log, check that seq numbers run 1, 2, 3 ... "
        "and every stream's versions 1, 2, 3 ..., then check that the stored projections equal a "
        "fresh fold of the log. Exit 0 with a one-line summary if all hold; otherwise exit 1 and "
        "name the first bad seq (or order/sku). With --checkpoint (signed elsewhere, see `orderlog "
        "checkpoint`), also prove that the log holds the checkpoint's event with exactly its hash: a "
        "history rewritten and rehashed before it fails, naming the checkpoint's seq.",
    )
    p.add_argument("--checkpoint", action="append", metavar="JWS",
                   help="a signed checkpoint the log must hold (repeatable; with --public-key)")
    p.add_argument("--public-key", metavar="FILE", help="the PEM public key that signed the checkpoints")
    p.add_argument("--export", metavar="FILE", help="check this JSONL export (`orderlog events`) instead of "
                   "the database: the chain and the checkpoints, not the projections")
    p.set_defaults(func=cmd_verify)

    p = subparsers.add_parser(
        "rebuild", parents=[db], help="recompute the projections from the log",
        description="Fold the whole log into fresh projections (orders and stock) and replace the "
        "stored ones in one transaction. Safe while a server runs; the log itself is never changed.",
    )
    p.set_defaults(func=cmd_rebuild)

    p = subparsers.add_parser(
        "stats", parents=[db], help="head, counts by type and status, stock summary, file size",
        description="Summarize the database: head seq, log_id, schema version, event counts by type, "
        "orders by status, stock summary and the file size (database + WAL).",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=cmd_stats)

    p = subparsers.add_parser(
        "seed", parents=[db], help="write a realistic pet-store history through the command path",
        description="Generate a deterministic pet-store history (staff restock; customers place, "
        "update and cancel orders; staff approve, ship, deliver and cancel; some commands are "
        "rejected for stock or state, as in real life) and append it through the real command "
        "path in group-committed batches. The same --seed on a new database gives the same "
        "commands and outcomes. Creates the database if missing; running it again adds a new run.",
    )
    p.add_argument("--commands", type=_positive, required=True, metavar="N", help="how many commands to send")
    p.add_argument("--seed", type=int, default=1, metavar="S", help="random seed (default 1)")
    p.add_argument("--days", type=_days, default=30.0, metavar="D",
                   help="spread the commands' `at` evenly over the D days up to --until, never before the "
                   "log's newest event (default 30; 0 stamps each batch with the time it is written)")
    p.add_argument("--until", type=_rfc3339, default=None, metavar="TIME",
                   help="when the simulated history ends, RFC 3339 (default now; with it the same --seed "
                   "on a new database gives the same log, times included)")
    p.add_argument("--batch", type=_positive, default=DEFAULT_SEED_BATCH, metavar="B",
                   help=f"commands per transaction (default {DEFAULT_SEED_BATCH})")
    p.add_argument("--synchronous", type=str.upper, choices=("FULL", "NORMAL", "OFF"), default="FULL",
                   help="SQLite's synchronous setting for the writes (default FULL: durable at every commit)")
    p.set_defaults(func=cmd_seed)

    p = subparsers.add_parser(
        "copy", help="copy a whole log to a new database (SQLite <-> PostgreSQL)",
        description="Copy every event, idempotency record and projection, with the log_id, from "
        "one database to another: a SQLite file or a postgresql:// URL on either side. The copy is "
        "the same log (same seqs, hashes and log_id; `orderlog verify` passes on it). The source "
        "is read in one snapshot, so a server may keep running on it; the destination is created "
        "if missing and must not hold a log yet.",
    )
    p.add_argument("--from", dest="source", required=True, metavar="DB", help="the log to copy (file or URL)")
    p.add_argument("--to", dest="destination", required=True, metavar="DB", help="the new log (file or URL)")
    p.set_defaults(func=cmd_copy)

    from . import checkpoints, service, state

    state.register(subparsers, db, _non_negative)

    checkpoints.register(subparsers, db)
    service.register(subparsers)
    return parser


def _non_negative(text: str) -> int:
    value = int(text)  # ValueError: argparse reports "invalid _non_negative value"
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, not {value}")
    if value > MAX_SEQ:  # SQLite's integers are 64-bit
        raise argparse.ArgumentTypeError(f"must be at most {MAX_SEQ}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, not {value}")
    if value > MAX_SEQ:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_SEQ}")
    return value


def _days(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 36_500:  # also refuses nan and inf
        raise argparse.ArgumentTypeError(f"must be between 0 and 36500, not {text}")
    return value


def _rfc3339(text: str):
    try:
        moment = parse_time(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if not 200 <= moment.year <= 9999:  # --days back from it must stay a valid date
        raise argparse.ArgumentTypeError(f"must be between the years 200 and 9999, not {text}")
    return moment


_non_negative.__name__ = "integer"  # argparse names the type in its message
_positive.__name__ = "integer"
_days.__name__ = "number of days"
_rfc3339.__name__ = "time"


def db_path(args: argparse.Namespace) -> str:
    """The database: --db, else $ORDERLOG_DB, else ./orderlog.db (a file path, or a
    postgresql:// URL)."""
    return args.db or os.environ.get(DB_ENV) or DEFAULT_DB


# -- migrate ----------------------------------------------------------------------------------


def cmd_migrate(args: argparse.Namespace) -> int:
    """`orderlog migrate`: create the file if missing, apply migrations, print what was applied."""
    path = db_path(args)
    before = schema_version_of(path) if is_postgres(path) or os.path.exists(path) else -1  # -1: no file yet
    store = open_store(path, create=True)
    try:
        applied = store.applied_migrations(after=max(before, 0))
        current = store.schema_version()
    finally:
        store.close()
    if before == -1 or (before == 0 and is_postgres(path)):
        print(f"created {store.path} (log_id {store.log_id})")
    for _, name in applied:
        print(f"applied {name}")
    if not applied:
        print(f"{store.path}: up to date (schema {current}, {known_migrations(path)} known)")
    return 0


# -- verify, rebuild, stats -------------------------------------------------------------------


def cmd_verify(args: argparse.Namespace) -> int:
    """`orderlog verify`: exit 0 with a summary if the log and projections hold, else 1 and the problem."""
    from .checkpoints import describe, verified_checkpoints

    path = args.export or db_path(args)
    try:
        points = verified_checkpoints(args)
    except BadCheckpoint as exc:
        print(f"FAILED {path}: {exc}")
        return 1
    if args.export:
        return _verify_export(args.export, points)
    store = open_store(path, readonly=True)
    chain_bar, fold_bar = Progress("verify: hash chain "), Progress("verify: projections")
    started = time.perf_counter()
    try:
        result = audit.verify_store(store, chain_bar, fold_bar, points)
    finally:
        chain_bar.clear()
        fold_bar.clear()
        store.close()
    elapsed = time.perf_counter() - started
    if not result.ok:
        print(f"FAILED {display_name(path)}: {result.problem}")
        if result.events:
            print(f"  (seq 1..{result.events} are sound, last good hash {result.last_hash})")
        return 1
    print(
        f"ok {display_name(path)}: {result.events:,} events, hash chain intact (head {result.head}, "
        f"last hash {result.last_hash[:16] or '-'}), projections of {result.orders:,} orders and "
        f"{result.skus:,} skus match the log ({elapsed:.1f} s)"
        + (f"; {describe(points)}" if points else "")
    )
    return 0


def _verify_export(path: str, points: list) -> int:
    """`verify --export FILE`: the chain of a JSONL export, and the checkpoints in it."""
    from .checkpoints import describe

    try:
        with open(path, encoding="utf-8") as f:
            report = audit.check_chain(audit.exported_events(f), checkpoints=points)
    except OSError as exc:
        raise UsageError(f"--export {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        report = audit.ChainReport(0, 0, "", "not UTF-8 text")
    if report.problem is not None:
        print(f"FAILED {path}: {report.problem}")
        if report.count:
            print(f"  (seq 1..{report.count} are sound, last good hash {report.last_hash})")
        return 1
    logs = sorted({p.log_id for p in points})
    print(f"ok {path}: {report.count:,} events, hash chain intact (head {report.last_seq}, last hash "
          f"{report.last_hash[:16] or '-'})" + (f"; {describe(points)}; an export does not name its log: the "
                                                 f"checkpoints are of log {', '.join(logs)}" if points else ""))
    return 0


def cmd_rebuild(args: argparse.Namespace) -> int:
    """`orderlog rebuild`: recompute the projections from the log."""
    path = db_path(args)
    store = open_store(path)
    bar = Progress("rebuild")
    started = time.perf_counter()
    try:
        last = store.rebuild(bar)
        bar.clear()
        projections = store.stored_projections()
    finally:
        bar.clear()
        store.close()
    elapsed = time.perf_counter() - started
    print(
        f"rebuilt the projections of {display_name(path)} from {last:,} events in {elapsed:.1f} s "
        f"({len(projections.orders):,} orders, {len(projections.stock):,} skus)"
    )
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    """`orderlog stats`: print the summary of `audit.stats`, as text or JSON."""
    store = open_store(db_path(args), readonly=True)
    try:
        info = audit.stats(store)
    finally:
        store.close()
    if args.json:
        print(json.dumps(info, indent=2, ensure_ascii=False))
        return 0
    print(format_stats(info))
    return 0


def format_stats(info: dict[str, Any]) -> str:
    """The text form of `audit.stats`."""
    lines = [
        f"database        {info['path']}",
        f"log_id          {info['log_id']}",
        f"schema version  {info['schema_version']}",
        f"head seq        {info['head']:,}",
        f"projections at  {info['projection_seq']:,}",
        f"file size       {_bytes(info['file']['total_bytes'])} "
        f"(db {_bytes(info['file']['db_bytes'])} + wal {_bytes(info['file']['wal_bytes'])})",
        "events by type",
    ]
    lines += [f"  {t:<17} {n:>12,}" for t, n in info["events_by_type"].items()] or ["  (none)"]
    lines.append(f"orders by status ({info['orders']:,} orders)")
    lines += [f"  {s:<17} {n:>12,}" for s, n in info["orders_by_status"].items()] or ["  (none)"]
    stock = info["stock"]
    lines.append(f"stock           {stock['skus']:,} skus, {stock['available']:,} units available, "
                 f"{stock['reserved']:,} reserved")
    return "\n".join(lines)


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


# -- copy -------------------------------------------------------------------------------------


def cmd_copy(args: argparse.Namespace) -> int:
    """`orderlog copy --from SRC --to DST`: the whole log into a new database."""
    started = time.perf_counter()
    source = open_store(args.source, readonly=True)
    try:
        destination = open_store(args.destination, create=True)
        try:
            report = copying.copy_log(source, destination)
        finally:
            destination.close()
    finally:
        source.close()
    rows = report.rows
    print(f"copied {display_name(args.source)} to {display_name(args.destination)}: {rows['events']:,} events "
          f"(head {report.head}, log_id {report.log_id}), {rows['commands']:,} commands, {rows['orders']:,} orders, "
          f"{rows['stock']:,} skus in {time.perf_counter() - started:.1f} s")
    return 0


# -- seed -------------------------------------------------------------------------------------


def cmd_seed(args: argparse.Namespace) -> int:
    """`orderlog seed`: append a generated history and report its rate and outcomes."""
    path = db_path(args)
    store = open_store(path, create=True, synchronous=args.synchronous)
    bar = Progress("seed")
    try:
        report = run_seed(store, args.commands, args.seed, args.batch, bar, days=args.days, until=args.until)
    except SeedError as exc:
        raise UsageError(f"{display_name(path)}: {exc}; give a later --until") from None
    finally:
        bar.clear()
        store.close()
    rejected = sum(report.rejected.values())
    detail = ", ".join(f"{code} {n:,}" for code, n in sorted(report.rejected.items()))
    print(
        f"seeded {display_name(path)}: {report.commands:,} commands in {report.seconds:.2f} s "
        f"({report.rate:,.0f} commands/s, synchronous={args.synchronous}, batch {args.batch})"
    )
    print(f"  accepted {report.accepted:,}, rejected {rejected:,}" + (f" ({detail})" if detail else ""))
    print(f"  {report.events:,} events appended, head {report.head:,}")
    if report.surprises:
        print(f"  {report.surprises:,} outcomes differed from the generator's model (another writer?)")
    return 0
