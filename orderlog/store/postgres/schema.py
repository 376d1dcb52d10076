"""The PostgreSQL side of opening a log: connecting, and the numbered migrations of
migrations/postgresql/ (applied in one transaction, under an advisory lock, so that several
nodes starting at once apply each exactly once)."""

from __future__ import annotations

import secrets
from datetime import datetime, timezone

import psycopg

from ...canonical import format_time
from .. import schema as sqlite_schema
from ..backend import display_name as display_url
from ..schema import StoreError

MIGRATIONS_PACKAGE = "orderlog.migrations.postgresql"
MIGRATE_LOCK = 0x6F72_6465_726C_6F67  # pg_advisory_xact_lock key taken while migrating ("orderlog")
CONNECT_TIMEOUT = 5  # seconds for one connection attempt


def migrations() -> list[tuple[int, str, str]]:
    """The numbered PostgreSQL SQL files, in order: (number, file name, SQL)."""
    return sqlite_schema.migrations(MIGRATIONS_PACKAGE)


def connect(url: str) -> psycopg.Connection:
    """One autocommit connection, or StoreError with libpq's one-line reason."""
    try:
        return psycopg.connect(url, autocommit=True, connect_timeout=CONNECT_TIMEOUT)
    except psycopg.Error as exc:
        raise StoreError(f"{display_url(url)}: cannot connect to PostgreSQL ({reason(exc)})") from None


def reason(exc: BaseException) -> str:
    """The first line of a psycopg error, without libpq's "connection to server at ..." preamble."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[-1] if lines else type(exc).__name__
    return text.removeprefix("FATAL:").strip()


def tables(conn: psycopg.Connection) -> set[str]:
    """The tables of the current schema (search_path's first)."""
    rows = conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()").fetchall()
    return {r[0] for r in rows}


def applied(conn: psycopg.Connection) -> int:
    return conn.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchone()[0]


def check_orderlog(conn: psycopg.Connection, name: str, require: bool) -> None:
    """Raise StoreError unless the schema holds an orderlog (or, when not `require`, nothing)."""
    found = tables(conn)
    if not found and not require:
        return
    if not found:
        raise StoreError(f"{name}: no orderlog here (create one with `orderlog migrate --db {name}`)")
    foreign = StoreError(f"{name}: a PostgreSQL database, but not an orderlog (it has other tables)")
    if "schema_migrations" not in found:
        raise foreign
    columns = {r[0] for r in conn.execute(
        "SELECT column_name FROM information_schema.columns "
        "WHERE table_schema = current_schema() AND table_name = 'schema_migrations'")}
    if columns != {"version", "name", "applied_at"}:
        raise foreign
    if (applied(conn) >= 1 or require) and not {"meta", "events", "log_head"} <= found:
        raise foreign
    current, known = applied(conn), len(migrations())
    if current > known:
        raise StoreError(f"{name}: written by a newer orderlog (schema {current}, this one knows {known}); "
                         "upgrade orderlog")


def migrate(conn: psycopg.Connection, name: str) -> list[str]:
    """Apply the migrations this database lacks, each exactly once; return their names."""
    known = migrations()
    done = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATE_LOCK,))  # another node may be migrating
        check_orderlog(conn, name, require=False)
        if "schema_migrations" not in tables(conn):
            conn.execute("CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text NOT NULL, "
                         "applied_at text NOT NULL)")
        for number, file_name, sql in known[applied(conn):]:
            conn.execute(sql.encode())  # several statements, no parameters: sent as one simple query
            if number == 1:
                conn.execute("INSERT INTO meta (key, value) VALUES ('log_id', %s), ('projection_seq', '0')",
                             (secrets.token_hex(16),))
            conn.execute("INSERT INTO schema_migrations (version, name, applied_at) VALUES (%s, %s, %s)",
                         (number, file_name, format_time(datetime.now(timezone.utc))))
            done.append(file_name)
    return done


def schema_version_of(url: str) -> int:
    """The schema version of the database at `url`, 0 when it holds no orderlog (or cannot be reached)."""
    try:
        with psycopg.connect(url, autocommit=True, connect_timeout=CONNECT_TIMEOUT) as conn:
            if "schema_migrations" not in tables(conn):
                return 0
            return applied(conn)
    except psycopg.Error:
        return 0
