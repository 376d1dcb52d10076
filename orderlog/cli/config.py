"""The settings file of `orderlog serve`: TOML, one key per serve flag.

    # orderlog.toml
    db = "/var/lib/orderlog/orderlog.db"
    host = "0.0.0.0"
    port = 8765
    allow_origin = ["https://shop.example"]
    auth_timeout = "10s"

A key is the flag's name without the dashes, with underscores (`--max-message-size` is
`max_message_size`). Precedence, highest first: flags, `ORDERLOG_*` environment variables,
this file, the defaults. Relative paths in the file are relative to the file's directory
(`db` may also be a `postgresql://` URL).

This module only reads and type-checks the file (pure apart from the one read); the value
rules (port range, durations, ...) are the flags' own, applied by `cli.service`.
"""

from __future__ import annotations

import os
import tomllib
from typing import Any

# The kinds of value a key may hold in the file.
STRING, INTEGER, NUMBER, DURATION, STRINGS = "a string", "an integer", "a number", "a duration", "a list of strings"

KEYS: dict[str, str] = {
    "db": STRING,
    "host": STRING,
    "port": INTEGER,
    "jwt_secret": STRING,
    "jwt_public_key": STRING,
    "jwt_algorithm": STRING,
    "jwt_audience": STRING,
    "jwt_issuer": STRING,
    "allow_origin": STRINGS,
    "tls_cert": STRING,
    "tls_key": STRING,
    "max_message_size": INTEGER,
    "auth_timeout": DURATION,
    "ping_interval": DURATION,
    "max_connections": INTEGER,
    "rate_limit": NUMBER,
    "max_user_connections": INTEGER,
    "user_rate_limit": NUMBER,
    "user_replay_rate": NUMBER,
    "handshake_share": NUMBER,
    "synchronous": STRING,
    "log_level": STRING,
    "checkpoint_key": STRING,
    "checkpoint_every": INTEGER,
    "log_format": STRING,
}
SECRET_KEYS = frozenset({"jwt_secret"})  # never printed
PATH_KEYS = frozenset({"db", "jwt_public_key", "tls_cert", "tls_key", "checkpoint_key"})  # relative to the file's directory
ENV_PREFIX = "ORDERLOG_"
CONFIG_ENV = "ORDERLOG_CONFIG"


class ConfigError(Exception):
    """The file is missing, not TOML, or has an unknown key or a value of the wrong type."""


def env_name(key: str) -> str:
    """The environment variable of a key: `max_message_size` -> ORDERLOG_MAX_MESSAGE_SIZE."""
    return ENV_PREFIX + key.upper()


def load(path: str) -> dict[str, Any]:
    """Read and type-check a settings file; ConfigError with a one-line message."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    base = os.path.dirname(os.path.abspath(path))
    values: dict[str, Any] = {}
    for key, value in data.items():
        kind = KEYS.get(key)
        if kind is None:
            hint = f" (did you mean {key.replace('-', '_')!r}?)" if key.replace("-", "_") in KEYS else ""
            raise ConfigError(f"{path}: unknown key {key!r}{hint}; known keys: {', '.join(KEYS)}")
        if not _is(kind, value):
            raise ConfigError(f"{path}: {key} must be {kind}, not {_describe(value)}")
        if key in PATH_KEYS and value and not os.path.isabs(value) and "://" not in value:  # a URL is no path
            value = os.path.join(base, value)
        values[key] = value
    return values


def _is(kind: str, value: Any) -> bool:
    if kind == STRING:
        return isinstance(value, str)
    if kind == INTEGER:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == NUMBER:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == DURATION:  # seconds as a number, or text such as "30s", "15m"
        return isinstance(value, (int, float, str)) and not isinstance(value, bool)
    if kind == STRINGS:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    raise AssertionError(kind)


def _describe(value: Any) -> str:
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, str):
        return f"a string ({value!r})"
    if isinstance(value, int):
        return f"an integer ({value})"
    if isinstance(value, float):
        return f"a number ({value})"
    if isinstance(value, list):
        return "a list" if all(isinstance(v, str) for v in value) else "a list holding non-strings"
    if isinstance(value, dict):
        return "a table"
    return type(value).__name__


def toml_value(value: Any) -> str:
    """A TOML literal for a str, int, float, bool or list of them."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        escaped = "".join(c if c >= " " and c != "\x7f" else f"\\u{ord(c):04x}" for c in escaped)
        return f'"{escaped}"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {type(value).__name__}")


def render(entries: list[tuple[str, Any, str]]) -> str:
    """The effective settings as a TOML file: (key, value or None, where it came from) per key."""
    width = max(len(key) for key, _, _ in entries)
    pairs = []
    for key, value, source in entries:
        if value is None:
            pairs.append((f"# {key:<{width}} is not set", source))
        else:
            shown = '"***"' if key in SECRET_KEYS else toml_value(value)
            pairs.append((f"{key:<{width}} = {shown}", source))
    column = max(len(text) for text, _ in pairs) + 2
    lines = ["# orderlog serve: effective settings (flags > environment > file > defaults)"]
    lines += [f"{text:<{column}}# {source}" for text, source in pairs]
    return "\n".join(lines)
