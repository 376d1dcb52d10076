"""The numbered SQL migrations, shipped inside the package as ``orderlog.migrations``."""
