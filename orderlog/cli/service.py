"""The service's subcommands: `serve`, `token` and `tail`, registered into the main CLI.

Settings come from flags, then `ORDERLOG_*` environment variables, then the settings file
(`--config FILE`, see `config`), then the defaults in `service.settings.Settings`. Errors in them are one
line and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import secrets
import sys
import time
from functools import partial
from typing import Any, Callable

from .. import auth
from ..auth import ALGORITHMS, Keys
from ..domain import Role
from ..service import gcpolicy, logs
from ..service.settings import Settings
from ..store import StoreError, is_postgres, open_store
from . import DEFAULT_DB, UsageError, config
from .files import UntrustedFile, check_trusted, read_private, write_private

SECRET_SUFFIX = ".secret"  # the generated HS256 secret lives next to the database
MIN_SECRET_BYTES = 32
BACKOFF_CAP = 30.0  # seconds, for `tail`'s reconnects


# -- settings ------------------------------------------------------------------------------


def _env(name: str) -> str | None:
    value = os.environ.get("ORDERLOG_" + name)
    return value if value not in (None, "") else None


def _pick(flag: Any, env: str, convert: Callable[[str], Any] = str, default: Any = None) -> Any:
    """flag > ORDERLOG_<env> > default, converting the environment's text."""
    if flag is not None:
        return flag
    text = _env(env)
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


_positive_int = _number("positive_int", int, 1, float("inf"), "must be a whole number >= 1")
_positive_float = _number("positive_float", float, 5e-324, float("inf"), "must be a number > 0")
_seq = _number("seq", int, 0, float("inf"), "a seq is a whole number >= 0")
_port = _number("port", int, 0, 65535, "must be a port number from 0 to 65535")
_share = _number("share", float, 0.001, 0.9, "must be a fraction from 0.001 to 0.9")

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


_synchronous = _one_of("synchronous", SYNCHRONOUS_MODES)
_log_level = _one_of("log_level", LOG_LEVELS)


def _namer(sources: dict[str, str] | None) -> Callable[..., str]:
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


def _seconds(text: str) -> float:
    """A duration: 30, 30s, 15m, 1h, 2d."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", str(text))
    if not match:
        raise ValueError(f"not a duration: {text!r} (use e.g. 30s, 15m, 1h, 2d)")
    value = float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
    if value <= 0:
        raise ValueError("a duration must be > 0")
    return value


def _arg(convert: Callable[[str], Any]) -> Callable[[str], Any]:
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


def _read_key(path: str, what: str) -> str:
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
    name = _namer(sources)
    algorithm = _pick(args.jwt_algorithm, "JWT_ALGORITHM", str, "HS256").upper()
    if algorithm not in ALGORITHMS:
        raise UsageError(f"{name('jwt_algorithm')} must be one of {', '.join(ALGORITHMS)}, not {algorithm!r}")
    audience = _pick(args.jwt_audience, "JWT_AUDIENCE")
    issuer = _pick(args.jwt_issuer, "JWT_ISSUER")
    public_key_file = _pick(args.jwt_public_key, "JWT_PUBLIC_KEY")
    secret = _pick(args.jwt_secret, "JWT_SECRET")
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
    pem = _read_key(public_key_file, name("jwt_public_key"))
    try:
        from cryptography.hazmat.primitives.serialization import load_pem_public_key

        key = load_pem_public_key(pem.encode())
    except (ValueError, TypeError) as exc:
        raise UsageError(f"{name('jwt_public_key')} {public_key_file}: not a PEM public key ({exc})") from None
    return Keys(algorithm, key, audience, issuer), None


def _log_format(text: str) -> str:
    """A --log-format value: text or json (any case)."""
    value = str(text).strip().lower()
    if value not in logs.FORMATS:
        raise ValueError(f"must be {' or '.join(logs.FORMATS)}, not {text!r}")
    return value


def log_format_from(args: argparse.Namespace) -> str:
    """--log-format > ORDERLOG_LOG_FORMAT > (file) > text, checked."""
    return _pick(args.log_format, "LOG_FORMAT", _log_format, logs.TEXT)


def settings_from(args: argparse.Namespace, load_secret: bool = True,
                  sources: dict[str, str] | None = None) -> tuple[Settings, str | None]:
    """The server's settings from flags > environment > (file, already applied to `args`) >
    defaults; UsageError naming the flag, variable or file and key at fault."""
    defaults = Settings()
    name = _namer(sources)
    db = _pick(args.db, "DB", str, DEFAULT_DB)
    keys, note = resolve_keys(args, db, create_secret=True, load_secret=load_secret, sources=sources)
    origins = args.allow_origin or [o.strip() for o in (_env("ALLOW_ORIGIN") or "").split(",") if o.strip()]
    tls_cert = _pick(args.tls_cert, "TLS_CERT")
    tls_key = _pick(args.tls_key, "TLS_KEY")
    if bool(tls_cert) != bool(tls_key):
        given, missing = ("tls_cert", "tls_key") if tls_cert else ("tls_key", "tls_cert")
        raise UsageError(f"{name(given)} is set without {name(missing, given)}: the certificate and its key go together")
    for key, path in (("tls_cert", tls_cert), ("tls_key", tls_key)):
        if path and not os.path.isfile(path):
            raise UsageError(f"{name(key)}: {path}: no such file")
    synchronous = _pick(args.synchronous, "SYNCHRONOUS", _synchronous, defaults.synchronous)
    settings = Settings(
        db=db,
        host=_pick(args.host, "HOST", str, defaults.host),
        port=_pick(args.port, "PORT", _port, defaults.port),
        keys=keys,
        allow_origins=tuple(origins),
        tls_cert=tls_cert,
        tls_key=tls_key,
        max_message_size=_pick(args.max_message_size, "MAX_MESSAGE_SIZE", _positive_int, defaults.max_message_size),
        auth_timeout=_pick(args.auth_timeout, "AUTH_TIMEOUT", _seconds, defaults.auth_timeout),
        ping_interval=_pick(args.ping_interval, "PING_INTERVAL", _seconds, defaults.ping_interval),
        max_connections=_pick(args.max_connections, "MAX_CONNECTIONS", _positive_int, defaults.max_connections),
        rate_limit=_pick(args.rate_limit, "RATE_LIMIT", _positive_float, defaults.rate_limit),
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

    path = _pick(args.checkpoint_key, "CHECKPOINT_KEY")
    every = _pick(args.checkpoint_every, "CHECKPOINT_EVERY", _positive_int, defaults.checkpoint_every)
    if path is None:
        if args.checkpoint_every is not None or _env("CHECKPOINT_EVERY") is not None:
            raise UsageError(f"{name('checkpoint_every')} goes with {name('checkpoint_key', 'checkpoint_every')} "
                             "FILE (the key that signs)")
        return {}
    return {"checkpoint_key": load_private_key(path, name("checkpoint_key")) if load_key else None,
            "checkpoint_every": every}


def _user_limits(args: argparse.Namespace, defaults: Settings) -> dict[str, Any]:
    """The per-user limits (orderlog.limits); their bursts follow from the rates (Settings)."""
    return {
        "max_user_connections": _pick(args.max_user_connections, "MAX_USER_CONNECTIONS", _positive_int,
                                      defaults.max_user_connections),
        "user_rate_limit": _pick(args.user_rate_limit, "USER_RATE_LIMIT", _positive_float, defaults.user_rate_limit),
        "user_replay_rate": _pick(args.user_replay_rate, "USER_REPLAY_RATE", _positive_float,
                                  defaults.user_replay_rate),
        "handshake_share": _pick(args.handshake_share, "HANDSHAKE_SHARE", _share, defaults.handshake_share),
    }


# -- the settings file ---------------------------------------------------------------------

# How a file value becomes a flag value: the same checks as the flag's (None: taken as is).
FILE_CONVERT: dict[str, Callable[[str], Any] | None] = {
    "port": _port, "max_message_size": _positive_int, "max_connections": _positive_int,
    "rate_limit": _positive_float, "auth_timeout": _seconds, "ping_interval": _seconds,
    "synchronous": _synchronous, "log_level": _log_level, "log_format": _log_format,
    "checkpoint_every": _positive_int,
    "max_user_connections": _positive_int, "user_rate_limit": _positive_float, "user_replay_rate": _positive_float,
    "handshake_share": _share,
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
        elif _env(key.upper()) is not None:
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
    return _pick(args.log_level, "LOG_LEVEL", _log_level, "INFO")


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
        "jwt_public_key": _pick(args.jwt_public_key, "JWT_PUBLIC_KEY"),
        "jwt_audience": keys.audience, "jwt_issuer": keys.issuer,
        "allow_origin": list(settings.allow_origins) or None,
        "tls_cert": settings.tls_cert, "tls_key": settings.tls_key,
        "max_message_size": settings.max_message_size, "auth_timeout": settings.auth_timeout,
        "ping_interval": settings.ping_interval, "max_connections": settings.max_connections,
        "rate_limit": settings.rate_limit, "synchronous": settings.synchronous,
        "checkpoint_key": _pick(args.checkpoint_key, "CHECKPOINT_KEY"),
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


# -- serve ---------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    import trio

    from ..service.server import serve

    sources = apply_config(args, tuple(config.KEYS))
    if args.print_config:
        print(effective_config(args, sources))
        return 0
    level = log_level_from(args)
    log_format = log_format_from(args)
    # Check every setting, then the database, and only then create the secret next to it: a
    # file that is not an orderlog must not leave an `X.db.secret` behind.
    settings, _ = settings_from(args, load_secret=False, sources=sources)
    _check_database(settings)
    settings, note = settings_from(args, sources=sources)
    _setup_logging(level, log_format)
    logger = logging.getLogger("orderlog")
    if note:
        logger.info("event=secret note=%r", note)
    started: dict[str, str] = {}

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            url = await nursery.start(partial(serve, settings))
            started["url"] = url
            if settings.keys.algorithm == "HS256" and args.jwt_secret is None and _env("JWT_SECRET") is None:
                print(f"orderlog is serving {url}\n"
                      f"  mint a token:  orderlog token --db {settings.db} --sub alice --role customer --ttl 1h\n"
                      f"  then connect:  {url}?token=TOKEN\n"
                      f"  or open the dashboard at {_http_url(url)} and paste the token", flush=True)

    # Full passes of the cyclic garbage collector stop the whole server; keep them short
    # (gcpolicy.py: what survives a pass is frozen; closed connections hand it back).
    gcpolicy.install()
    try:
        trio.run(main)
    except BaseException as raised:  # trio wraps errors from tasks in exception groups
        exc = _first_leaf(raised)
        if isinstance(exc, KeyboardInterrupt):
            return 130  # a second Ctrl-C during shutdown: stop quietly
        if isinstance(exc, StoreError):
            raise UsageError(str(exc)) from None
        if isinstance(exc, OSError) and "url" not in started:
            raise UsageError(f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}") from None
        raise
    return 0


def _check_database(settings: Settings) -> None:
    """Open (creating or migrating) the database as the server will, then close it; UsageError
    with the store's one-line reason if it cannot be."""
    try:
        open_store(settings.db, create=True, synchronous=settings.synchronous).close()
    except StoreError as exc:
        raise UsageError(str(exc)) from None


def _first_leaf(exc: BaseException) -> BaseException:
    """The first non-group exception inside (possibly nested) exception groups."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def _http_url(ws_url: str) -> str:
    """The dashboard's address on the same port: ws://host:port/v1/ws -> http://host:port/."""
    scheme, rest = ws_url.split("://", 1)
    return ("https" if scheme == "wss" else "http") + "://" + rest.split("/", 1)[0] + "/"


def _setup_logging(level: str, log_format: str = "text") -> None:
    logs.install(getattr(logging, level), log_format, sys.stderr)
    # trio-websocket logs every frame at DEBUG and handshake noise at INFO; keep ours.
    logging.getLogger("trio-websocket").setLevel(logging.WARNING)


# -- token ---------------------------------------------------------------------------------


def cmd_token(args: argparse.Namespace) -> int:
    sources = apply_config(args, TOKEN_FILE_KEYS)
    db = _pick(args.db, "DB", str, DEFAULT_DB)
    algorithm = _pick(args.jwt_algorithm, "JWT_ALGORITHM", str, "HS256").upper()
    if algorithm not in ALGORITHMS:
        raise UsageError(f"{_namer(sources)('jwt_algorithm')} must be one of {', '.join(ALGORITHMS)}, "
                         f"not {algorithm!r}")
    if algorithm == "HS256":
        key = _pick(args.jwt_secret, "JWT_SECRET")
        if key is None:
            key, _ = load_or_create_secret(db, create=False)
    else:
        if not args.jwt_private_key:
            raise UsageError(f"{algorithm} tokens need --jwt-private-key FILE (a PEM private key)")
        key = _read_key(args.jwt_private_key, "--jwt-private-key")
    try:
        token = auth.mint(args.sub, args.role, args.ttl, time.time(), key, algorithm,
                          _pick(args.jwt_audience, "JWT_AUDIENCE"), _pick(args.jwt_issuer, "JWT_ISSUER"))
    except (ValueError, TypeError) as exc:
        raise UsageError(f"cannot sign the token: {exc}") from None
    print(token)
    return 0


# -- tail ----------------------------------------------------------------------------------


def cmd_tail(args: argparse.Namespace) -> int:
    import trio

    from ..client import tail

    if args.db is not None:
        raise UsageError("tail reads a running server's feed (--url), not a database file: "
                         f"for the file itself, use `orderlog events --db {args.db}`")
    token = args.token or _env("TOKEN")
    if not token:
        raise UsageError("tail needs --token (or ORDERLOG_TOKEN)")
    if args.snapshot and args.since is not None:
        raise UsageError("--snapshot and --since exclude each other (--since resumes; --snapshot starts afresh)")

    def emit(line: str) -> None:
        print(line, flush=True)

    def note(line: str) -> None:
        print(f"orderlog tail: {line}", file=sys.stderr, flush=True)

    try:
        return trio.run(partial(tail, args.url, token, args.channel, args.since, emit, note, args.count,
                                args.snapshot))
    except BrokenPipeError:
        return 0


# -- registration ------------------------------------------------------------------------------


def _jwt_flags(parser: argparse.ArgumentParser, private: bool) -> None:
    group = parser.add_argument_group("tokens")
    group.add_argument("--jwt-secret", help="HS256 shared secret (env ORDERLOG_JWT_SECRET); default: the "
                       "random secret kept next to the database in DB.secret, created on first start")
    if private:
        group.add_argument("--jwt-private-key", metavar="FILE", help="PEM private key to sign RS256/ES256 tokens")
    else:
        group.add_argument("--jwt-public-key", metavar="FILE", help="PEM public key for RS256/ES256 "
                           "(env ORDERLOG_JWT_PUBLIC_KEY)")
    group.add_argument("--jwt-algorithm", help="HS256 (default), RS256 or ES256; only this one is accepted "
                       "(env ORDERLOG_JWT_ALGORITHM)")
    group.add_argument("--jwt-audience", help="required `aud` claim (env ORDERLOG_JWT_AUDIENCE)")
    group.add_argument("--jwt-issuer", help="required `iss` claim (env ORDERLOG_JWT_ISSUER)")


def register(subparsers: "argparse._SubParsersAction") -> None:
    """Add the service subcommands to `orderlog`'s parser."""
    serve = subparsers.add_parser(
        "serve", help="run the WebSocket service",
        description="Run the order service: WebSocket endpoint ws://HOST:PORT/v1/ws on one SQLite file. "
        "Every flag can also be set as an ORDERLOG_* environment variable or as a key of the --config "
        "file (flags > environment > file > defaults). With no key "
        "configured, a random HS256 secret is created next to the database (mode 0600) and reused.",
    )
    serve.add_argument("--db", help="database file, created if missing, or a postgresql:// URL "
                       f"(env ORDERLOG_DB; default {DEFAULT_DB})")
    serve.add_argument("--host", help="address to listen on (env ORDERLOG_HOST; default 127.0.0.1)")
    serve.add_argument("--port", type=_arg(_port), help="port, 0 for any free one (env ORDERLOG_PORT; default 8765)")
    _jwt_flags(serve, private=False)
    serve.add_argument("--allow-origin", action="append", metavar="ORIGIN",
                       help="allowed browser Origin, repeatable (env ORDERLOG_ALLOW_ORIGIN, comma-separated); "
                       "default: any. Handshakes without Origin are always allowed")
    serve.add_argument("--tls-cert", metavar="FILE", help="PEM certificate: serve wss:// (with --tls-key)")
    serve.add_argument("--tls-key", metavar="FILE", help="PEM private key for --tls-cert")
    serve.add_argument("--max-message-size", type=_arg(_positive_int), metavar="BYTES",
                       help="larger frames close the connection with 1009 (default 65536)")
    serve.add_argument("--auth-timeout", type=_arg(_seconds), metavar="DURATION",
                       help="time allowed for the auth message when the handshake had no token (default 10s)")
    serve.add_argument("--ping-interval", type=_arg(_seconds), metavar="DURATION",
                       help="keep-alive ping period; unanswered pings close the connection (default 20s)")
    serve.add_argument("--max-connections", type=_arg(_positive_int), metavar="N",
                       help="handshakes beyond this get HTTP 503 (default 10000)")
    serve.add_argument("--rate-limit", type=_arg(_positive_float), metavar="PER_SECOND",
                       help="commands per second per connection before `rate_limited` (default 500)")
    serve.add_argument("--checkpoint-key", metavar="FILE",
                       help="Ed25519 private key (`orderlog keygen`): sign a checkpoint of the log every "
                       "--checkpoint-every events, served at GET /v1/checkpoint (env ORDERLOG_CHECKPOINT_KEY)")
    serve.add_argument("--checkpoint-every", type=_arg(_positive_int), metavar="N",
                       help="events between two signed checkpoints (default 1000)")
    serve.add_argument("--max-user-connections", type=_arg(_positive_int), metavar="N",
                       help="authenticated connections per user; one more closes with 1008 `too many connections` "
                       "(default 64)")
    serve.add_argument("--user-rate-limit", type=_arg(_positive_float), metavar="PER_SECOND",
                       help="commands per second per user, over all its connections, before `rate_limited` "
                       "(default 1000, burst 2 s worth)")
    serve.add_argument("--user-replay-rate", type=_arg(_positive_float), metavar="EVENTS_PER_SECOND",
                       help="replayed (catch-up) events per second per user; faster replays are slowed down, never "
                       "refused (default 20000, burst 5 s worth)")
    serve.add_argument("--handshake-share", type=_arg(_share), metavar="FRACTION",
                       help="share of --max-connections kept for handshakes not authenticated yet; the rest is "
                       "for authenticated connections (default 0.1)")
    serve.add_argument("--synchronous", type=_arg(_synchronous), help="SQLite synchronous mode: FULL (default, "
                       "durable on power loss), NORMAL, OFF or EXTRA (env ORDERLOG_SYNCHRONOUS)")
    serve.add_argument("--log-level", type=_arg(_log_level), help="DEBUG, INFO (default), WARNING or ERROR "
                       "(env ORDERLOG_LOG_LEVEL)")
    serve.add_argument("--log-format", type=_arg(_log_format), help="text (default: key=value, every value "
                       "quoted) or json (one JSON object per line) (env ORDERLOG_LOG_FORMAT)")
    serve.add_argument("--config", metavar="FILE", help="TOML settings file, one key per flag (max_message_size = "
                       "65536, ...); flags and ORDERLOG_* variables win over it (env ORDERLOG_CONFIG)")
    serve.add_argument("--print-config", action="store_true",
                       help="print the effective settings as TOML (secrets masked) and exit")
    serve.set_defaults(func=cmd_serve)

    token = subparsers.add_parser(
        "token", help="mint a JWT for development",
        description="Print a signed JWT for a user and role. By default it signs with the HS256 secret "
        "that `orderlog serve` keeps next to the database.",
    )
    token.add_argument("--db", help=f"database whose secret to use (env ORDERLOG_DB; default {DEFAULT_DB})")
    token.add_argument("--sub", required=True, help="the user id")
    token.add_argument("--role", default=Role.CUSTOMER, choices=auth.ROLES, help="default customer")
    token.add_argument("--ttl", type=_arg(_seconds), default=3600.0, metavar="DURATION",
                       help="lifetime, e.g. 30m, 1h, 7d (default 1h)")
    _jwt_flags(token, private=True)
    token.add_argument("--config", metavar="FILE", help="the serve settings file, for db and the jwt_* keys "
                       "(env ORDERLOG_CONFIG)")
    token.set_defaults(func=cmd_token)

    tail = subparsers.add_parser(
        "tail", help="print a channel's events as JSON lines, resuming after disconnects",
        description="Subscribe to a channel and print every event as one JSON line. On a disconnect it "
        "reconnects with exponential backoff and jitter (waits of 0.5-1 s, 1-2 s, 2-4 s ... up to 15-30 s, "
        "starting over after a connection that stayed up 10 s) and resumes after the last seq it printed.",
    )
    tail.add_argument("--url", default="ws://127.0.0.1:8765/v1/ws", help="server URL (default %(default)s)")
    tail.add_argument("--token", help="JWT (env ORDERLOG_TOKEN)")
    tail.add_argument("--channel", default="orders", help="orders (default), inventory or order:<order_id>")
    tail.add_argument("--since", type=_arg(_seq), metavar="SEQ",
                      help="replay events after this seq first (default: live only)")
    tail.add_argument("--count", type=_arg(_positive_int), metavar="N", help="exit after N events")
    tail.add_argument("--db", help=argparse.SUPPRESS)  # refused with a pointer to `events`
    tail.add_argument("--snapshot", action="store_true",
                      help="print the channel's rows as of the head first ({\"order\": ROW} or {\"stock\": ROW} "
                      "lines, as `orderlog state` prints them), then the events after it")
    tail.set_defaults(func=cmd_tail)

    subparsers.add_parser(
        "bench", add_help=False,
        help="load scenarios over real sockets, with integrity checks and baselines (see `orderlog bench --help`)")

