"""Which backend a `--db` value names, and opening it: the one place that chooses.

A `postgresql://` (or `postgres://`) URL is a PostgreSQL database (orderlog.store.postgres,
imported only then: psycopg is an optional dependency); anything else is a SQLite file path.
The CLI and the service open every log through `open_store`, and see one interface.
"""

from __future__ import annotations

import sqlite3
import sys
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from .log import Store
from .schema import StoreError, Unavailable
from .schema import migrations as _sqlite_migrations
from .schema import schema_version_of as _sqlite_schema_version_of

POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def is_postgres(db: str) -> bool:
    """Whether `db` names a PostgreSQL database rather than a SQLite file."""
    return db.startswith(POSTGRES_SCHEMES)


def display_name(db: str) -> str:
    """`db` as messages and logs show it: a URL without its password."""
    if not is_postgres(db):
        return db
    parts = urlsplit(db)
    if parts.password is None:
        return db
    userinfo, _, host = parts.netloc.rpartition("@")
    return urlunsplit(parts._replace(netloc=f"{userinfo.partition(':')[0]}:***@{host}"))


def _postgres() -> Any:
    try:
        from . import postgres
    except ImportError as exc:
        raise StoreError(f"a PostgreSQL --db needs psycopg 3 and psycopg_pool (pip install 'orderlog[postgresql]'): "
                         f"{exc}") from None
    return postgres


def open_store(db: str, **options: Any) -> Any:
    """Open the log `db` names (Store.open's options: create, readonly, synchronous, migrate_schema)."""
    if is_postgres(db):
        return _postgres().PgStore.open(db, **options)
    return Store.open(db, **options)


def schema_version_of(db: str) -> int:
    """The schema version of an existing log, 0 when there is none yet."""
    if is_postgres(db):
        return _postgres().schema_version_of(db)
    return _sqlite_schema_version_of(db)


def database_errors() -> tuple[type[BaseException], ...]:
    """What the databases raise for a problem no check foresaw: the CLI turns it into one line.

    psycopg's errors only once psycopg is loaded (by opening a PostgreSQL log): importing it
    costs about 0.1 s, which a SQLite-only command need not pay.
    """
    psycopg = sys.modules.get("psycopg")
    return (sqlite3.DatabaseError,) if psycopg is None else (sqlite3.DatabaseError, psycopg.Error)


def known_migrations(db: str) -> int:
    """How many migrations this orderlog knows for the backend `db` names."""
    if is_postgres(db):
        return len(_postgres().migrations())
    return len(_sqlite_migrations())


def lost_database_errors() -> tuple[type[BaseException], ...]:
    """What a read raises when the database went away under it (PostgreSQL restarting or failing
    over, the connection terminated; a write already says `Unavailable`): the service ends the
    connection with 1013 "try again later", logged in one line, and the client resumes. Never a
    bug's error: those keep their traceback."""
    psycopg = sys.modules.get("psycopg")
    return (Unavailable,) if psycopg is None else (Unavailable, psycopg.OperationalError)

