"""Where `serve`'s settings come from: flags, then `ORDERLOG_*` environment variables, then the
settings file (`--config FILE`, see `config`), then the defaults in `service.settings.Settings`;
and the token keys (the generated HS256 secret next to the database, or key files). Errors in
them are one line and exit code 2."""


import argparse
import logging
import os
import re
import secrets
from typing import Any, Callable

from ..auth import ALGORITHMS, Keys
from ..service import logs
from ..service.settings import Settings
from ..store import is_postgres
from . import DEFAULT_DB, UsageError, config
from .files import UntrustedFile, check_trusted, read_private, write_private

SECRET_SUFFIX = ".secret"  # the generated HS256 secret lives next to the database
MIN_SECRET_BYTES = 32


# -- settings ------------------------------------------------------------------------------


def env_setting(name: str) -> str | None:
    value = os.environ.get("ORDERLOG_" + name)
    return value if value not in (None, "") else None


def pick_setting(flag: Any, env: str, convert: Callable[[str], Any] = str, default: Any = None) -> Any:
    """flag > ORDERLOG_<env> > default, converting the environment's text."""
    if flag is not None:
        return flag
    text = env_setting(env)
    if text is None:
        return default
    try:
        return convert(text)
    except ValueError as exc:
        raise UsageError(f"ORDERLOG_{env}={text!r}: {exc}") from None


def _number(name: str, convert: Callable[[str], Any], low: float, high: float, message: str) -> Callable[[str], Any]:
    """A parser of numbers in [low, high] whose ValueError says `message` (`name` for argparse)."""

    def parse(text: str) -> Any:
        value = convert(text)
        if not low <= value <= high:
            raise ValueError(message)
        return value

    parse.__name__ = name
    return parse


positive_int = _number("positive_int", int, 1, float("inf"), "must be a whole number >= 1")
positive_float = _number("positive_float", float, 5e-324, float("inf"), "must be a number > 0")
seq_flag = _number("seq", int, 0, float("inf"), "a seq is a whole number >= 0")
port_flag = _number("port", int, 0, 65535, "must be a port number from 0 to 65535")
share_flag = _number("share", float, 0.001, 0.9, "must be a fraction from 0.001 to 0.9")

SYNCHRONOUS_MODES = ("FULL", "NORMAL", "OFF", "EXTRA")  # SQLite's PRAGMA synchronous
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _one_of(name: str, choices: tuple[str, ...]) -> Callable[[str], str]:
    """A parser of one of `choices` (any case), whose ValueError lists them."""

    def parse(text: str) -> str:
        value = str(text).strip().upper()
        if value not in choices:
            raise ValueError(f"must be {', '.join(choices[:-1])} or {choices[-1]}, not {text!r}")
        return value

    parse.__name__ = name
    return parse


synchronous_flag = _one_of("synchronous", SYNCHRONOUS_MODES)
log_level_flag = _one_of("log_level", LOG_LEVELS)


def source_namer(sources: dict[str, str] | None) -> Callable[..., str]:
    """How to name a setting in an error: the flag, the environment variable, or the file and key
    it came from (`sources` as apply_config returns them)."""

    def name(key: str, like: str | None = None) -> str:
        source = (sources or {}).get(like or key, "")
        if source.startswith("file "):
            return f"{source[5:]}: {key}" if like is None else key
        if source.startswith("env "):
            return config.env_name(key)
        return "--" + key.replace("_", "-")

    return name


def seconds_flag(text: str) -> float:
    """A duration: 30, 30s, 15m, 1h, 2d."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", str(text))
    if not match:
        raise ValueError(f"not a duration: {text!r} (use e.g. 30s, 15m, 1h, 2d)")
    value = float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
    if value <= 0:
        raise ValueError("a duration must be > 0")
    return value


def flag_type(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse type whose ValueError message reaches the user."""

    def parse(text: str) -> Any:
        try:
            return convert(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = convert.__name__.strip("_")
    return parse


def secret_path(db: str) -> str:
    return db + SECRET_SUFFIX


def load_or_create_secret(db: str, create: bool) -> tuple[str, bool]:
    """The HS256 secret stored next to the database (mode 0600); created if `create`.

    An existing file is used only if this user alone controls it (`files.read_private`): a
    secret planted by someone else would let them mint staff tokens. A PostgreSQL log has no
    file to keep it next to, and its nodes must all check tokens with the same key: there the
    secret is always given (--jwt-secret or ORDERLOG_JWT_SECRET).
    """
    if is_postgres(db):
        raise UsageError("with a PostgreSQL --db, give every node the same secret: --jwt-secret or "
                         "ORDERLOG_JWT_SECRET (or RS256/ES256 keys with --jwt-public-key)")
    path = secret_path(db)
    try:
        secret = read_private(path).strip()
        if len(secret) < MIN_SECRET_BYTES:
            raise UsageError(f"{path}: the secret is shorter than {MIN_SECRET_BYTES} characters")
        return secret, False
    except UntrustedFile as exc:
        raise UsageError(f"refusing the JWT secret: {exc}") from None
    except FileNotFoundError:
        if not create:
            raise UsageError(
                f"no JWT secret: {path} does not exist (start `orderlog serve --db {db}` once, or pass --jwt-secret)"
            ) from None
    except OSError as exc:
        raise UsageError(f"{path}: {exc.strerror}") from None
    try:
        write_private(path, secrets.token_urlsafe(48) + "\n")
    except FileExistsError:  # another process created it first (or a link appeared): read it, checked
        return load_or_create_secret(db, create=False)
    except OSError as exc:
        raise UsageError(f"cannot create {path}: {exc.strerror}") from None
    return load_or_create_secret(db, create=False)[0], True


def _check_trusted(path: str, what: str) -> None:
    """UsageError unless only this user (or root) may change `path` (files.check_trusted);
    a missing file is left to the reader's own message."""
    try:
        check_trusted(path)
    except UntrustedFile as exc:
        raise UsageError(f"refusing {what}: {exc}") from None
    except OSError:
        pass


def read_key_file(path: str, what: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as exc:
        raise UsageError(f"{what} {path}: {exc.strerror}") from None


def resolve_keys(args: argparse.Namespace, db: str, create_secret: bool,
                 load_secret: bool = True, sources: dict[str, str] | None = None) -> tuple[Keys, str | None]:
    """The token-checking keys from flags/environment; returns (keys, note for the user).

    With `load_secret` False, a missing HS256 secret is left as None instead of being read
    from (or created next to) the database: for `--print-config`, which touches no file.
    Errors name each setting where it came from (`sources`, see apply_config).
    """
    name = source_namer(sources)
    algorithm = pick_setting(args.jwt_algorithm, "JWT_ALGORITHM", str, "HS256").upper()
    if algorithm not in ALGORITHMS:
        raise UsageError(f"{name('jwt_algorithm')} must be one of {', '.join(ALGORITHMS)}, not {algorithm!r}")
    audience = pick_setting(args.jwt_audience, "JWT_AUDIENCE")
    issuer = pick_setting(args.jwt_issuer, "JWT_ISSUER")
    public_key_file = pick_setting(args.jwt_public_key, "JWT_PUBLIC_KEY")
    secret = pick_setting(args.jwt_secret, "JWT_SECRET")
    note = None
    if algorithm == "HS256":
        if public_key_file:
            raise UsageError(f"{name('jwt_public_key')} goes with {name('jwt_algorithm', 'jwt_public_key')} "
                             "RS256 or ES256, not HS256")
        if secret is None and not load_secret:
            return Keys("HS256", None, audience, issuer), None
        if secret is None:
            secret, created = load_or_create_secret(db, create_secret)
            note = f"{'created' if created else 'using'} the JWT secret in {secret_path(db)}"
        elif len(secret.encode()) < MIN_SECRET_BYTES:
            logging.getLogger("orderlog").warning(
                "event=secret.short advice='use a secret of at least %d bytes'", MIN_SECRET_BYTES)
        return Keys("HS256", secret, audience, issuer), note
    if secret is not None:
        raise UsageError(f"{name('jwt_secret')} goes with HS256; {name('jwt_algorithm')} {algorithm} needs "
                         f"{name('jwt_public_key', 'jwt_algorithm')} FILE instead")
    if not public_key_file:
        raise UsageError(f"{name('jwt_algorithm')} {algorithm} needs {name('jwt_public_key', 'jwt_algorithm')} FILE "
                         "(a PEM public key)")
    _check_trusted(public_key_file, name("jwt_public_key"))
    pem = read_key_file(public_key_file, name("jwt_public_key"))
    try:
        from cryptography.hazmat.primitives.serialization import load_pem_public_key

        key = load_pem_public_key(pem.encode())
    except (ValueError, TypeError) as exc:
        raise UsageError(f"{name('jwt_public_key')} {public_key_file}: not a PEM public key ({exc})") from None
    return Keys(algorithm, key, audience, issuer), None


def log_format_flag(text: str) -> str:
    """A --log-format value: text or json (any case)."""
    value = str(text).strip().lower()
    if value not in logs.FORMATS:
        raise ValueError(f"must be {' or '.join(logs.FORMATS)}, not {text!r}")
    return value


def log_format_from(args: argparse.Namespace) -> str:
    """--log-format > ORDERLOG_LOG_FORMAT > (file) > text, checked."""
    return pick_setting(args.log_format, "LOG_FORMAT", log_format_flag, logs.TEXT)


def settings_from(args: argparse.Namespace, load_secret: bool = True,
                  sources: dict[str, str] | None = None) -> tuple[Settings, str | None]:
    """The server's settings from flags > environment > (file, already applied to `args`) >
    defaults; UsageError naming the flag, variable or file and key at fault."""
    defaults = Settings()
    name = source_namer(sources)
    db = pick_setting(args.db, "DB", str, DEFAULT_DB)
    keys, note = resolve_keys(args, db, create_secret=True, load_secret=load_secret, sources=sources)
    origins = args.allow_origin or [o.strip() for o in (env_setting("ALLOW_ORIGIN") or "").split(",") if o.strip()]
    tls_cert = pick_setting(args.tls_cert, "TLS_CERT")
    tls_key = pick_setting(args.tls_key, "TLS_KEY")
    if bool(tls_cert) != bool(tls_key):
        given, missing = ("tls_cert", "tls_key") if tls_cert else ("tls_key", "tls_cert")
        raise UsageError(f"{name(given)} is set without {name(missing, given)}: the certificate and its key go together")
    for key, path in (("tls_cert", tls_cert), ("tls_key", tls_key)):
        if path and not os.path.isfile(path):
            raise UsageError(f"{name(key)}: {path}: no such file")
    synchronous = pick_setting(args.synchronous, "SYNCHRONOUS", synchronous_flag, defaults.synchronous)
    settings = Settings(
        db=db,
        host=pick_setting(args.host, "HOST", str, defaults.host),
        port=pick_setting(args.port, "PORT", port_flag, defaults.port),
        keys=keys,
        allow_origins=tuple(origins),
        tls_cert=tls_cert,
        tls_key=tls_key,
        max_message_size=pick_setting(args.max_message_size, "MAX_MESSAGE_SIZE", positive_int, defaults.max_message_size),
        auth_timeout=pick_setting(args.auth_timeout, "AUTH_TIMEOUT", seconds_flag, defaults.auth_timeout),
        ping_interval=pick_setting(args.ping_interval, "PING_INTERVAL", seconds_flag, defaults.ping_interval),
        max_connections=pick_setting(args.max_connections, "MAX_CONNECTIONS", positive_int, defaults.max_connections),
        rate_limit=pick_setting(args.rate_limit, "RATE_LIMIT", positive_float, defaults.rate_limit),
        synchronous=synchronous,
        **_checkpoint_settings(args, load_secret, defaults, name),
        **_user_limits(args, defaults),
    )
    if settings.checkpoint_key is not None and is_postgres(db):
        # DB.checkpoints is a file next to a SQLite database; a URL has no "next to".
        raise UsageError(f"{name('checkpoint_key')}: signed checkpoints are kept next to a SQLite file; "
                         "not yet with a PostgreSQL --db (sign with `orderlog checkpoint` instead)")
    return settings, note


def _checkpoint_settings(args: argparse.Namespace, load_key: bool, defaults: Settings,
                         name: Callable[..., str]) -> dict[str, Any]:
    """`--checkpoint-key FILE` (read only if `load_key`) and `--checkpoint-every N`."""
    from .checkpoints import load_private_key

    path = pick_setting(args.checkpoint_key, "CHECKPOINT_KEY")
    every = pick_setting(args.checkpoint_every, "CHECKPOINT_EVERY", positive_int, defaults.checkpoint_every)
    if path is None:
        if args.checkpoint_every is not None or env_setting("CHECKPOINT_EVERY") is not None:
            raise UsageError(f"{name('checkpoint_every')} goes with {name('checkpoint_key', 'checkpoint_every')} "
                             "FILE (the key that signs)")
        return {}
    return {"checkpoint_key": load_private_key(path, name("checkpoint_key")) if load_key else None,
            "checkpoint_every": every}


def _user_limits(args: argparse.Namespace, defaults: Settings) -> dict[str, Any]:
    """The per-user limits (orderlog.limits); their bursts follow from the rates (Settings)."""
    return {
        "max_user_connections": pick_setting(args.max_user_connections, "MAX_USER_CONNECTIONS", positive_int,
                                      defaults.max_user_connections),
        "user_rate_limit": pick_setting(args.user_rate_limit, "USER_RATE_LIMIT", positive_float, defaults.user_rate_limit),
        "user_replay_rate": pick_setting(args.user_replay_rate, "USER_REPLAY_RATE", positive_float,
                                  defaults.user_replay_rate),
        "handshake_share": pick_setting(args.handshake_share, "HANDSHAKE_SHARE", share_flag, defaults.handshake_share),
    }


# -- the settings file ---------------------------------------------------------------------

# How a file value becomes a flag value: the same checks as the flag's (None: taken as is).
FILE_CONVERT: dict[str, Callable[[str], Any] | None] = {
    "port": port_flag, "max_message_size": positive_int, "max_connections": positive_int,
    "rate_limit": positive_float, "auth_timeout": seconds_flag, "ping_interval": seconds_flag,
    "synchronous": synchronous_flag, "log_level": log_level_flag, "log_format": log_format_flag,
    "checkpoint_every": positive_int,
    "max_user_connections": positive_int, "user_rate_limit": positive_float, "user_replay_rate": positive_float,
    "handshake_share": share_flag,
}
TOKEN_FILE_KEYS = ("db", "jwt_secret", "jwt_algorithm", "jwt_audience", "jwt_issuer")


def apply_config(args: argparse.Namespace, keys: tuple[str, ...] | list[str]) -> dict[str, str]:
    """Fill the flags not given from the settings file, unless the environment sets them.

    The file is `--config FILE` or $ORDERLOG_CONFIG. Only `keys` are applied (the file may hold
    keys of other subcommands). Returns where each key's value comes from, for --print-config.
    """
    path = getattr(args, "config", None) or os.environ.get(config.CONFIG_ENV) or None
    if path:
        _check_trusted(path, "--config")
    try:
        values = config.load(path) if path else {}
    except config.ConfigError as exc:
        raise UsageError(str(exc)) from None
    sources: dict[str, str] = {}
    for key in keys:
        if getattr(args, key, None) is not None:
            sources[key] = "flag"
        elif env_setting(key.upper()) is not None:
            sources[key] = f"env {config.env_name(key)}"
        elif key in values:
            value = values[key]
            convert = FILE_CONVERT.get(key)
            if convert is not None:
                try:
                    value = convert(str(value))
                except ValueError as exc:
                    raise UsageError(f"{path}: {key} = {config.toml_value(value)}: {exc}") from None
            setattr(args, key, value)
            sources[key] = f"file {path}"
        else:
            sources[key] = "default"
    return sources


def log_level_from(args: argparse.Namespace) -> str:
    """--log-level > ORDERLOG_LOG_LEVEL > (file) > INFO, checked."""
    return pick_setting(args.log_level, "LOG_LEVEL", log_level_flag, "INFO")


def effective_config(args: argparse.Namespace, sources: dict[str, str]) -> str:
    """`serve --print-config`: the settings `serve` would run with, as TOML, secrets masked."""
    settings, _ = settings_from(args, load_secret=False, sources=sources)
    keys = settings.keys
    secret_note = (f"the secret kept in {secret_path(settings.db)} is used" if keys.algorithm == "HS256"
                   else f"{keys.algorithm} checks tokens with jwt_public_key")
    values: dict[str, Any] = {
        "db": settings.db, "host": settings.host, "port": settings.port,
        "jwt_algorithm": keys.algorithm,
        "jwt_secret": keys.verify_key if keys.algorithm == "HS256" else None,
        "jwt_public_key": pick_setting(args.jwt_public_key, "JWT_PUBLIC_KEY"),
        "jwt_audience": keys.audience, "jwt_issuer": keys.issuer,
        "allow_origin": list(settings.allow_origins) or None,
        "tls_cert": settings.tls_cert, "tls_key": settings.tls_key,
        "max_message_size": settings.max_message_size, "auth_timeout": settings.auth_timeout,
        "ping_interval": settings.ping_interval, "max_connections": settings.max_connections,
        "rate_limit": settings.rate_limit, "synchronous": settings.synchronous,
        "checkpoint_key": pick_setting(args.checkpoint_key, "CHECKPOINT_KEY"),
        "checkpoint_every": settings.checkpoint_every,
        "max_user_connections": settings.max_user_connections, "user_rate_limit": settings.user_rate_limit,
        "user_replay_rate": settings.user_replay_rate, "handshake_share": settings.handshake_share,
        "log_level": log_level_from(args),
        "log_format": log_format_from(args),
    }
    entries = []
    for key in config.KEYS:
        source = sources.get(key, "default")
        if key == "jwt_secret" and values[key] is None:
            source = secret_note
        elif key == "allow_origin" and values[key] is None:
            source = "any origin is allowed"
        entries.append((key, values[key], source))
    return config.render(entries)


seconds_flag.__name__ = "seconds"  # argparse and flag_type name the type in their messages
log_format_flag.__name__ = "log_format"
