"""The real PostgreSQL the PostgreSQL tests run against, and a fresh database per test.

Where: $ORDERLOG_TEST_POSTGRES (a URL of a database to connect to for CREATE DATABASE), else
postgresql://postgres@127.0.0.1:5432/test. Each test gets a database of its own with a unique
name, dropped afterwards, so parallel runs do not clash.

When PostgreSQL cannot be reached the tests are skipped with one line saying how to enable
them, except under CI ($CI or $ORDERLOG_REQUIRE_POSTGRES set, as .ci/run does), where they fail.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from typing import Iterator
from urllib.parse import urlsplit, urlunsplit

import pytest

ADMIN_URL = os.environ.get("ORDERLOG_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
REQUIRED = bool(os.environ.get("ORDERLOG_REQUIRE_POSTGRES") or os.environ.get("CI"))

_reason: str | None = None
_checked = False


def unreachable() -> str | None:
    """Why PostgreSQL cannot be used for tests (None when it can); checked once per session."""
    global _reason, _checked
    if not _checked:
        _checked = True
        try:
            import psycopg

            with psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=5) as conn:
                conn.execute("SELECT 1")
        except ImportError:
            _reason = "psycopg is not installed (pip install -e '.[test]')"
        except Exception as exc:  # any failure to connect: say it in one line
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            _reason = f"cannot connect to {ADMIN_URL}: {lines[-1] if lines else type(exc).__name__}"
    return _reason


def require_postgres() -> None:
    """Skip (or, under CI, fail) the calling test when PostgreSQL is not reachable."""
    problem = unreachable()
    if problem is None:
        return
    if REQUIRED:
        pytest.fail(f"PostgreSQL is required here (CI) but {problem}", pytrace=False)
    pytest.skip(f"PostgreSQL tests need a server: {problem}; set ORDERLOG_TEST_POSTGRES to a URL to enable them")


def url_of(database: str, **options: str) -> str:
    """ADMIN_URL with another database name (and libpq options in the query string)."""
    parts = urlsplit(ADMIN_URL)
    query = "&".join(f"{k}={v}" for k, v in options.items())
    return urlunsplit(parts._replace(path="/" + database, query=query))


@contextlib.contextmanager
def fresh_database(prefix: str = "orderlog_test") -> Iterator[str]:
    """A new, empty database with a unique name; yields its URL and drops it afterwards."""
    import psycopg

    name = f"{prefix}_{os.getpid()}_{secrets.token_hex(4)}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield url_of(name)
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def fresh_schema(url: str) -> Iterator[str]:
    """A new schema in the database at `url` (cheaper than a database, for hypothesis examples);
    yields a URL whose search_path is that schema, and drops it afterwards."""
    import psycopg

    name = f"s_{secrets.token_hex(6)}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {name}")
    try:
        yield f"{url}{'&' if '?' in url else '?'}options=-csearch_path%3D{name}"
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {name} CASCADE")


@pytest.fixture
def pg_url() -> Iterator[str]:
    """The URL of a fresh PostgreSQL database of this test's own."""
    require_postgres()
    with fresh_database() as url:
        yield url
