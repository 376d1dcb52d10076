"""What the trio and asyncio shells share and that needs no event loop: the token's types, the
server URLs a client rotates through, a command's frame, the reason of a failed connect, and
`orderlog tail`'s printing."""

from __future__ import annotations

import inspect
import json
import uuid
from typing import Any, AsyncIterator, Awaitable, Callable, Sequence, Union
from urllib.parse import urlsplit

from ..session import TokenUnavailable

# A JWT, or a provider: a function, sync or async, that returns a fresh one (called before every
# connect, and before the token expires: the shell sends the new one in band).
TokenSource = Union[str, Callable[[], str], Callable[[], Awaitable[str]]]


def check_url(url: object) -> str:
    """`url` when it is a ws:// or wss:// URL with a host (and a port in range); else ValueError
    saying what is wrong, in one line (`orderlog tail --url` shows it as a usage error)."""
    if not isinstance(url, str) or not url:
        raise ValueError(f"a server URL must be a non-empty string, not {url!r}")
    try:
        parts = urlsplit(url)
        parts.port  # raises for a port out of range or not a number
    except ValueError as exc:
        raise ValueError(f"{url!r} is not a URL: {exc}") from None
    if parts.scheme not in ("ws", "wss"):
        raise ValueError(f"{url!r} is not a ws:// or wss:// URL")
    if not parts.hostname:
        raise ValueError(f"{url!r} names no host")
    try:
        url.encode("utf-8")
        parts.hostname.encode("idna")  # what connecting does with it
    except UnicodeError:
        raise ValueError(f"{url!r} is not a URL: its host or text cannot be encoded") from None
    return url


class Urls:
    """The server URLs of one log (several nodes behind no load balancer, or a fallback): a client
    stays on the current one while it works and moves to the next after every failed connect or
    lost connection, in a circle; a single URL is simply retried."""

    def __init__(self, url: str | Sequence[str]) -> None:
        self.all = [check_url(u) for u in ([url] if isinstance(url, str) else url)]
        if not self.all:
            raise ValueError("a client needs at least one server URL")
        self._index = 0

    @property
    def current(self) -> str:
        return self.all[self._index]

    def next(self) -> None:
        """The connection to the current URL failed or ended: the next reconnect tries the next one."""
        self._index = (self._index + 1) % len(self.all)


class Requests:
    """The request methods of both shells' Client, on top of their `request(frame)`."""

    async def request(self, frame: dict) -> dict:
        raise NotImplementedError

    async def command(self, name: str, order_id: str | None = None, data: dict | None = None,
                      expected_version: int | None = None, command_id: str | None = None) -> dict:
        """Send a command; return its `ack` (a dict) or raise OrderlogError with the code."""
        frame: dict[str, Any] = {"type": "command", "id": command_id or uuid.uuid4().hex, "name": name}
        if order_id is not None:
            frame["order_id"] = order_id
        if data is not None:
            frame["data"] = data
        if expected_version is not None:
            frame["expected_version"] = expected_version
        return await self.request(frame)

    async def get_order(self, order_id: str) -> dict:
        return (await self.request({"type": "get", "order_id": order_id}))["order"]

    async def get_stock(self, sku: str) -> dict:
        return (await self.request({"type": "get", "sku": sku}))["stock"]

    async def query(self, filter: dict | None = None, limit: int = 100) -> dict:
        return await self.request({"type": "query", "filter": filter or {}, "limit": limit})


async def fresh_token(source: TokenSource) -> str:
    """The token to connect (or refresh) with: `source` itself, or what its provider returns."""
    value: Any = source
    if callable(value):
        value = value()
        if inspect.isawaitable(value):
            value = await value
    if not isinstance(value, str) or not value:
        raise TokenUnavailable(f"the token provider returned {type(value).__name__}, not a token")
    return value


async def tail_lines(items: AsyncIterator[dict], channel: str, emit: Callable[[str], None],
                     note: Callable[[str], None], count: int | None) -> int:
    """Print a subscription as `orderlog tail` does: snapshot rows as `{"order"|"stock": ROW}`
    lines, events as they are; stop after `count` events. Returns 0."""
    printed = 0
    kind = "stock" if channel == "inventory" else "order"
    async for event in items:
        if event["type"] == "snapshot":
            if "total" in event:
                note(f"snapshot of {channel} as of seq {event['seq']}: {event['total']} rows")
            for row in event["rows"]:
                emit(json.dumps({kind: row}, ensure_ascii=False, separators=(",", ":")))
            continue
        emit(json.dumps(event, ensure_ascii=False, separators=(",", ":")))
        printed += 1
        if count is not None and printed >= count:
            return 0
    return 0


def why(exc: BaseException) -> str:
    """A failed connect's reason, never empty: trio-websocket raises an empty HandshakeError whose
    cause (an OSError, itself caused by a group of one error per address) says what happened."""
    messages: list[str] = []
    strerror = None
    seen: set[int] = set()
    error: BaseException | None = exc
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, BaseExceptionGroup) and error.exceptions:
            error = error.exceptions[0]
            continue
        if str(error):
            messages.append(str(error))
        if isinstance(error, OSError) and error.strerror and strerror is None:
            strerror = error.strerror.rsplit(": ", 1)[-1]  # trio's: "Error connecting to (...): Connection refused"
        error = error.__cause__ or error.__context__
    text = messages[0] if messages else type(exc).__name__
    if strerror and strerror not in text:
        text = f"{text} ({strerror})"
    return text


def single(group: BaseExceptionGroup) -> BaseException:
    """The one exception inside (nested) one-member groups, else the group itself."""
    error: BaseException = group
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error
