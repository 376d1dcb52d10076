"""The storage layer: the only code that holds SQL and sqlite3.

- `log`: the event log (`Store`): migrations, group-committed appends, reads, projections.
- `feedreads`: the feed's catch-up and read-back queries.
- `audit`: verify and stats.
- `seeding`: the bulk load of `orderlog seed`.
"""

import sqlite3

from .log import Store, StoreError, Unavailable, migrations, schema_version_of

# What a database raises for a problem no check foresaw (a damaged page, say): the CLI turns it
# into one line instead of a traceback.
DatabaseError = sqlite3.DatabaseError

__all__ = ["DatabaseError", "Store", "StoreError", "Unavailable", "migrations", "schema_version_of"]
