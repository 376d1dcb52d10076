"""The numbered PostgreSQL migrations, shipped inside the package as ``orderlog.migrations.postgresql``."""
