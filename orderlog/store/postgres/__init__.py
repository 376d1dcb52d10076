"""The PostgreSQL backend: `--db postgresql://...`. Several `orderlog serve` nodes share one
database; see log.py for how appends keep seq order equal to commit order, listen.py for the
cross-node wake-up, schema.py for migrations/postgresql/.

Needs psycopg 3 and psycopg_pool (`pip install 'orderlog[postgresql]'`); imported only when a
PostgreSQL URL is opened, so the SQLite-only install does not need them.
"""

from .log import PgStore
from .schema import migrations, schema_version_of

__all__ = ["PgStore", "migrations", "schema_version_of"]
