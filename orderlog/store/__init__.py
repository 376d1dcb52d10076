"""The storage layer: the only code that holds SQL, sqlite3 and psycopg.

- `backend`: which backend a `--db` names; `open_store` opens either (one interface).
- `log`: the SQLite event log (`Store`): migrations, group-committed appends, reads, projections.
- `postgres`: the same log on PostgreSQL (`PgStore`), shared by several nodes.
- `feedreads`: the feed's catch-up and read-back queries (SQLite).
- `audit`: verify and stats.
- `seeding`: the bulk load of `orderlog seed`.
"""

from .backend import database_errors, display_name, lost_database_errors, is_postgres, known_migrations, open_store, schema_version_of
from .log import Store, StoreError, Unavailable, migrations

__all__ = ["database_errors", "lost_database_errors", "Store", "StoreError", "Unavailable", "display_name", "is_postgres", "known_migrations",
           "migrations", "open_store", "schema_version_of"]
