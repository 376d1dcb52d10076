"""The service's subcommands: `serve`, `token` and `tail`, registered into the main CLI.

Their settings are resolved by `cli.settings` (flags, then `ORDERLOG_*` environment variables, then
the settings file, then the defaults); errors in them are one line and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from functools import partial

from .. import auth
from ..auth import ALGORITHMS
from ..client.common import check_url
from ..domain import Role
from ..service import gcpolicy, logs
from ..service.settings import Settings
from ..store import StoreError, open_store
from . import DEFAULT_DB, UsageError, config, silence_stdout
from .settings import (
    TOKEN_FILE_KEYS,
    flag_type,
    env_setting,
    log_format_flag,
    log_level_flag,
    source_namer,
    pick_setting,
    port_flag,
    positive_float,
    positive_int,
    read_key_file,
    seconds_flag,
    seq_flag,
    share_flag,
    synchronous_flag,
    apply_config,
    effective_config,
    load_or_create_secret,
    log_format_from,
    log_level_from,
    settings_from,
)



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
            if settings.keys.algorithm == "HS256" and args.jwt_secret is None and env_setting("JWT_SECRET") is None:
                _hint(f"orderlog is serving {url}\n"
                      f"  mint a token:  orderlog token --db {settings.db} --sub alice --role customer --ttl 1h\n"
                      f"  then connect:  {url}?token=TOKEN\n"
                      f"  or open the dashboard at {_http_url(url)} and paste the token")

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


def _hint(text: str) -> None:
    """The start-up hint on stdout. A courtesy: when nobody reads stdout (`orderlog serve | true`,
    a closed pipe) it is dropped, stdout goes to /dev/null, and the server serves on."""
    try:
        print(text, flush=True)
    except OSError:  # BrokenPipeError; EIO from a terminal that hung up
        silence_stdout()


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
    db = pick_setting(args.db, "DB", str, DEFAULT_DB)
    algorithm = pick_setting(args.jwt_algorithm, "JWT_ALGORITHM", str, "HS256").upper()
    if algorithm not in ALGORITHMS:
        raise UsageError(f"{source_namer(sources)('jwt_algorithm')} must be one of {', '.join(ALGORITHMS)}, "
                         f"not {algorithm!r}")
    if algorithm == "HS256":
        key = pick_setting(args.jwt_secret, "JWT_SECRET")
        if key is None:
            key, _ = load_or_create_secret(db, create=False)
    else:
        if not args.jwt_private_key:
            raise UsageError(f"{algorithm} tokens need --jwt-private-key FILE (a PEM private key)")
        key = read_key_file(args.jwt_private_key, "--jwt-private-key")
    try:
        token = auth.mint(args.sub, args.role, args.ttl, time.time(), key, algorithm,
                          pick_setting(args.jwt_audience, "JWT_AUDIENCE"), pick_setting(args.jwt_issuer, "JWT_ISSUER"))
    except (ValueError, TypeError) as exc:
        raise UsageError(f"cannot sign the token: {exc}") from None
    print(token)
    return 0


# -- tail ----------------------------------------------------------------------------------


TOKEN_COMMAND_TIMEOUT = 30.0  # seconds a --token-command may take


def token_command(command: str):
    """A token provider that runs `command` in the shell and returns its stdout (one token):
    called before every connect and before the token expires. A command that fails, hangs or
    prints no token raises TokenUnavailable naming it, with its exit code and last stderr line."""
    import trio

    from ..client import TokenUnavailable

    async def provider() -> str:
        try:
            with trio.fail_after(TOKEN_COMMAND_TIMEOUT):
                done = await trio.run_process(command, shell=True, capture_stdout=True, capture_stderr=True,
                                              check=False, stdin=b"")
        except trio.TooSlowError:
            raise TokenUnavailable(f"--token-command {command!r} did not finish within {TOKEN_COMMAND_TIMEOUT:g} s") from None
        except OSError as exc:
            raise TokenUnavailable(f"--token-command {command!r} could not run: {exc}") from None
        errors = done.stderr.decode("utf-8", "replace").strip().splitlines()
        said = f": {errors[-1]}" if errors else ""
        if done.returncode != 0:
            raise TokenUnavailable(f"--token-command {command!r} failed (exit {done.returncode}){said}")
        lines = done.stdout.decode("utf-8", "replace").split()
        if len(lines) != 1:
            raise TokenUnavailable(f"--token-command {command!r} printed {len(lines)} words, not one token{said}")
        return lines[0]

    return provider


DEFAULT_TAIL_URL = "ws://127.0.0.1:8765/v1/ws"


def cmd_tail(args: argparse.Namespace) -> int:
    import trio

    from ..client import tail

    if args.db is not None:
        raise UsageError("tail reads a running server's feed (--url), not a database file: "
                         f"for the file itself, use `orderlog events --db {args.db}`")
    if args.token is not None and args.token_command is not None:
        raise UsageError("--token and --token-command exclude each other")
    token = token_command(args.token_command) if args.token_command else (args.token or env_setting("TOKEN"))
    if not token:
        raise UsageError("tail needs --token, --token-command or ORDERLOG_TOKEN")
    if args.snapshot and args.since is not None:
        raise UsageError("--snapshot and --since exclude each other (--since resumes; --snapshot starts afresh)")

    def emit(line: str) -> None:
        print(line, flush=True)

    def note(line: str) -> None:
        print(f"orderlog tail: {line}", file=sys.stderr, flush=True)

    try:
        return trio.run(partial(tail, args.url or [DEFAULT_TAIL_URL], token, args.channel, args.since, emit, note, args.count,
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
    serve.add_argument("--port", type=flag_type(port_flag), help="port, 0 for any free one (env ORDERLOG_PORT; default 8765)")
    _jwt_flags(serve, private=False)
    serve.add_argument("--allow-origin", action="append", metavar="ORIGIN",
                       help="allowed browser Origin, repeatable (env ORDERLOG_ALLOW_ORIGIN, comma-separated); "
                       "default: any. Handshakes without Origin are always allowed")
    serve.add_argument("--tls-cert", metavar="FILE", help="PEM certificate: serve wss:// (with --tls-key)")
    serve.add_argument("--tls-key", metavar="FILE", help="PEM private key for --tls-cert")
    serve.add_argument("--max-message-size", type=flag_type(positive_int), metavar="BYTES",
                       help="larger frames close the connection with 1009 (default 65536)")
    serve.add_argument("--auth-timeout", type=flag_type(seconds_flag), metavar="DURATION",
                       help="time allowed for the auth message when the handshake had no token (default 10s)")
    serve.add_argument("--ping-interval", type=flag_type(seconds_flag), metavar="DURATION",
                       help="keep-alive ping period; unanswered pings close the connection (default 20s)")
    serve.add_argument("--max-connections", type=flag_type(positive_int), metavar="N",
                       help="handshakes beyond this get HTTP 503 (default 10000)")
    serve.add_argument("--rate-limit", type=flag_type(positive_float), metavar="PER_SECOND",
                       help="commands per second per connection before `rate_limited` (default 500)")
    serve.add_argument("--checkpoint-key", metavar="FILE",
                       help="Ed25519 private key (`orderlog keygen`): sign a checkpoint of the log every "
                       "--checkpoint-every events, served at GET /v1/checkpoint (env ORDERLOG_CHECKPOINT_KEY)")
    serve.add_argument("--checkpoint-every", type=flag_type(positive_int), metavar="N",
                       help="events between two signed checkpoints (default 1000)")
    serve.add_argument("--max-user-connections", type=flag_type(positive_int), metavar="N",
                       help="authenticated connections per user; one more closes with 1008 `too many connections` "
                       "(default 64)")
    serve.add_argument("--user-rate-limit", type=flag_type(positive_float), metavar="PER_SECOND",
                       help="commands per second per user, over all its connections, before `rate_limited` "
                       "(default 1000, burst 2 s worth)")
    serve.add_argument("--user-replay-rate", type=flag_type(positive_float), metavar="EVENTS_PER_SECOND",
                       help="replayed (catch-up) events per second per user; faster replays are slowed down, never "
                       "refused (default 20000, burst 5 s worth)")
    serve.add_argument("--handshake-share", type=flag_type(share_flag), metavar="FRACTION",
                       help="share of --max-connections kept for handshakes not authenticated yet; the rest is "
                       "for authenticated connections (default 0.1)")
    serve.add_argument("--synchronous", type=flag_type(synchronous_flag), help="SQLite synchronous mode: FULL (default, "
                       "durable on power loss), NORMAL, OFF or EXTRA (env ORDERLOG_SYNCHRONOUS)")
    serve.add_argument("--log-level", type=flag_type(log_level_flag), help="DEBUG, INFO (default), WARNING or ERROR "
                       "(env ORDERLOG_LOG_LEVEL)")
    serve.add_argument("--log-format", type=flag_type(log_format_flag), help="text (default: key=value, every value "
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
    token.add_argument("--ttl", type=flag_type(seconds_flag), default=3600.0, metavar="DURATION",
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
    tail.add_argument("--url", action="append", metavar="URL", type=flag_type(check_url),
                      help=f"server URL (default {DEFAULT_TAIL_URL}); repeat it for several nodes of one log: "
                      "after a failed connect or a lost connection, tail moves to the next one and resumes there")
    tail.add_argument("--token", help="JWT (env ORDERLOG_TOKEN)")
    tail.add_argument("--token-command", metavar="CMD",
                      help="a shell command that prints a fresh JWT; run before every connect and before the "
                      "token expires (sent in band), e.g. \"orderlog token --sub s1 --role staff --ttl 15m\"")
    tail.add_argument("--channel", default="orders", help="orders (default), inventory or order:<order_id>")
    tail.add_argument("--since", type=flag_type(seq_flag), metavar="SEQ",
                      help="replay events after this seq first (default: live only)")
    tail.add_argument("--count", type=flag_type(positive_int), metavar="N", help="exit after N events")
    tail.add_argument("--db", help=argparse.SUPPRESS)  # refused with a pointer to `events`
    tail.add_argument("--snapshot", action="store_true",
                      help="print the channel's rows as of the head first ({\"order\": ROW} or {\"stock\": ROW} "
                      "lines, as `orderlog state` prints them), then the events after it")
    tail.set_defaults(func=cmd_tail)

    subparsers.add_parser(
        "bench", add_help=False,
        help="load scenarios over real sockets, with integrity checks and baselines (see `orderlog bench --help`)")

