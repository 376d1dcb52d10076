"""Opening an orderlog database: file checks, pragmas, migrations, schema version, errors.

`connect` is the one way to get a SQLite connection to an orderlog: it refuses files that are
missing, not SQLite, not an orderlog or of a newer schema with a one-line `StoreError`, sets the
pragmas (WAL, synchronous, cache) and applies the migrations a writer lacks.
"""

from __future__ import annotations

import errno
import importlib.resources
import os
import re
import secrets
import sqlite3
from datetime import datetime, timezone
from urllib.parse import quote

from ..canonical import format_time

SYNCHRONOUS_MODES = ("OFF", "NORMAL", "FULL", "EXTRA")
BUSY_TIMEOUT_MS = 10_000  # how long a connection waits for another writer's lock
WRITER_CACHE_KIB = 32 * 1024  # page cache of the writer (a bounded share of RSS; the hot index pages stay in memory)
# WAL pages between automatic checkpoints (SQLite's default is 1000): each checkpoint copies
# the hot index pages back into the file, so doing it less often makes appends much cheaper.
WAL_AUTOCHECKPOINT_PAGES = 10_000


class StoreError(Exception):
    """The database cannot be used: missing, not SQLite, not an orderlog, too new. One line."""


class Unavailable(Exception):
    """A write could not be committed (disk full, read-only file, lock timeout); nothing was written."""


def sqlite_reason(exc: BaseException) -> str:
    """A SQLite error as one short line for an operator."""
    text = str(exc)
    if "file is not a database" in text:
        return "not a SQLite database"
    if "readonly" in text or "read-only" in text:
        return "the database file is read-only"
    if "full" in text:
        return "the disk is full"
    if "locked" in text or "busy" in text:
        return "the database is locked by another writer"
    if "unable to open" in text:
        return "cannot open the database file"
    return text


# -- migrations -------------------------------------------------------------------------------


def migrations(package: str = "orderlog.migrations") -> list[tuple[int, str, str]]:
    """The numbered SQL files of `package` (SQLite's; PostgreSQL's are in
    orderlog.migrations.postgresql), in order: (number, file name, SQL)."""
    found = []
    for entry in importlib.resources.files(package).iterdir():
        match = re.match(r"^(\d+)_.*\.sql$", entry.name)
        if match:
            found.append((int(match.group(1)), entry.name, entry.read_text(encoding="utf-8")))
    found.sort()
    numbers = [n for n, _, _ in found]
    if numbers != list(range(1, len(numbers) + 1)):
        raise RuntimeError(f"migrations are not numbered 1..N without gaps: {numbers}")
    return found


def _tables(conn: sqlite3.Connection) -> set[str]:
    return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def applied(conn: sqlite3.Connection) -> int:
    """The number of the newest migration applied (0 for none)."""
    row = conn.execute("SELECT max(version) FROM schema_migrations").fetchone()
    return row[0] or 0


def _check_orderlog(conn: sqlite3.Connection, path: str, require: bool) -> None:
    """Raise StoreError unless the database is an orderlog (or, when not `require`, empty)."""
    tables = _tables(conn)
    if not tables and not require:
        return
    foreign = StoreError(f"{path}: a SQLite database, but not an orderlog")
    if "schema_migrations" not in tables:
        raise foreign
    columns = {r[1] for r in conn.execute("PRAGMA table_info(schema_migrations)")}
    if columns != {"version", "name", "applied_at"}:
        raise foreign
    if conn.execute("SELECT count(*) FROM schema_migrations WHERE typeof(version) != 'integer'").fetchone()[0]:
        raise foreign
    if (applied(conn) >= 1 or require) and not {"meta", "events"} <= tables:
        raise foreign


def migrate(conn: sqlite3.Connection, path: str) -> list[str]:
    """Apply the migrations this database lacks, each exactly once; return their names."""
    known = migrations()
    tables = _tables(conn)
    if "schema_migrations" not in tables:
        if tables:
            raise StoreError(f"{path}: a SQLite database, but not an orderlog (it has other tables)")
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(
            "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
        )
        conn.execute("COMMIT")
    current = applied(conn)
    if current > len(known):
        raise StoreError(
            f"{path}: written by a newer orderlog (schema {current}, this one knows {len(known)}); upgrade orderlog"
        )
    done = []
    for number, name, sql in known[current:]:
        conn.execute("BEGIN IMMEDIATE")
        try:
            if applied(conn) >= number:  # another process got there first
                conn.execute("ROLLBACK")
                continue
            for statement in _split_sql(sql):
                conn.execute(statement)
            if number == 1:
                conn.execute("INSERT INTO meta (key, value) VALUES ('log_id', ?)", (secrets.token_hex(16),))
                conn.execute("INSERT INTO meta (key, value) VALUES ('projection_seq', '0')")
            conn.execute(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                (number, name, format_time(datetime.now(timezone.utc))),
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        done.append(name)
    return done


def _split_sql(sql: str) -> list[str]:
    """Split a migration into statements (sqlite3.complete_statement knows about triggers)."""
    statements, current = [], ""
    for line in sql.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            if current.strip():
                statements.append(current.strip())
            current = ""
    if current.strip() and not all(l.strip().startswith("--") or not l.strip() for l in current.splitlines()):
        raise RuntimeError(f"incomplete SQL statement at the end of a migration: {current[:80]!r}")
    return statements


def schema_version_of(path: str) -> int:
    """The schema version of an existing file, 0 when it has none (Store.open reports the rest)."""
    try:
        conn = sqlite3.connect(f"file:{os.path.abspath(path)}?mode=ro", uri=True)
        try:
            return conn.execute("SELECT max(version) FROM schema_migrations").fetchone()[0] or 0
        finally:
            conn.close()
    except sqlite3.Error:
        return 0


# -- opening ----------------------------------------------------------------------------------


def create_private_file(path: str) -> None:
    """Create `path` empty with mode 0600 (whatever the umask), unless something is there by now.

    The database holds customers' addresses, so only its owner may read it; SQLite creates the
    `-wal` and `-shm` files with the mode of the database file. Never follows a symbolic link.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        if os.path.islink(path) and not os.path.exists(path):
            raise StoreError(f"{path}: a symbolic link to a missing file; refusing to create the database "
                             "where it points") from None
        return  # another process created it first: opened as an existing database
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise StoreError(f"{path}: a symbolic link appeared while creating the database") from None
        raise StoreError(f"{path}: cannot create the database file ({exc.strerror})") from None
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def _is_sqlite_file(path: str) -> bool:
    with open(path, "rb") as f:
        header = f.read(16)
    return header == b"SQLite format 3\x00" or header == b""


def connect(path: str, *, create: bool, readonly: bool, synchronous: str, migrate_schema: bool) -> sqlite3.Connection:
    """A connection to the orderlog at `path` (see Store.open), migrated when a writer may."""
    synchronous = synchronous.upper()
    if synchronous not in SYNCHRONOUS_MODES:
        raise StoreError(f"synchronous must be one of {', '.join(SYNCHRONOUS_MODES)}, not {synchronous!r}")
    exists = os.path.exists(path)
    if not exists and os.path.islink(path):
        raise StoreError(f"{path}: a symbolic link to a missing file; refusing to create the database "
                         "where it points (remove the link, or point it at the database)")
    if not exists and (readonly or not create):
        raise StoreError(f"{path}: no such database file (create one with `orderlog migrate --db {path}`)")
    if exists:
        if os.path.isdir(path):
            raise StoreError(f"{path}: is a directory, not a database file")
        try:
            if not _is_sqlite_file(path):
                raise StoreError(f"{path}: not a SQLite database")
        except PermissionError:
            raise StoreError(f"{path}: permission denied") from None
    elif create:
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise StoreError(f"{path}: the folder {parent} does not exist")
        create_private_file(path)  # SQLite gives -wal and -shm the database file's mode
    try:
        if readonly:
            uri = "file:" + quote(os.path.abspath(path)) + "?mode=ro"
            conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
        else:
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        # Refuse someone else's database before changing anything in it (even its journal mode).
        _check_orderlog(conn, path, require=readonly or not migrate_schema)
        if not readonly:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise StoreError(f"{path}: cannot switch to WAL mode (got {mode})")
            conn.execute(f"PRAGMA synchronous = {synchronous}")
            conn.execute(f"PRAGMA cache_size = -{WRITER_CACHE_KIB}")
            conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT_PAGES}")
        conn.execute("PRAGMA foreign_keys = ON")
        tables = _tables(conn)
        if readonly or not migrate_schema:
            if "schema_migrations" not in tables or "events" not in tables or "meta" not in tables:
                raise StoreError(f"{path}: a SQLite database, but not an orderlog")
            current, known = applied(conn), len(migrations())
            if current > known:
                raise StoreError(
                    f"{path}: written by a newer orderlog (schema {current}, this one knows {known}); upgrade orderlog"
                )
        else:
            migrate(conn, path)
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"{path}: {sqlite_reason(exc)}") from None
    return conn
