"""One port for everything: WebSocket upgrades go to trio-websocket, plain HTTP is served here.

Each TCP connection's request head is read with h11 (bounded in size and time, so slow or
oversized handshakes are dropped). A WebSocket upgrade is handed to trio-websocket together
with the bytes already read (`sockets.WriterStream` replays them); anything else gets a small HTTP/1.1 answer:
`/healthz`, `/metrics`, the dashboard and the browser client, or 404 / 405 / 426.
"""

from __future__ import annotations

import importlib.resources
from typing import Awaitable, Callable

import attrs
import h11
import trio

MAX_REQUEST_HEAD_BYTES = 16 * 1024  # a request head larger than this gets 431
RECEIVE_CHUNK = 16 * 1024

# Sent with every response. The dashboard has buttons that change orders, so no other site may
# frame it (clickjacking): `frame-ancestors 'none'` and, for older browsers, X-Frame-Options.
# Its scripts, styles and WebSocket are all on this origin ('self' covers ws:/wss: on it).
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                           "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = [("Content-Security-Policy", CONTENT_SECURITY_POLICY), ("X-Frame-Options", "DENY"),
                    ("Referrer-Policy", "no-referrer")]

STATIC_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
# Public paths of the files in orderlog/static/.
STATIC_ROUTES = {"/": "dashboard.html", "/dashboard": "dashboard.html", "/orderlog.js": "orderlog.js",
                 "/dashboard.js": "dashboard.js", "/dashboard.css": "dashboard.css"}


@attrs.frozen
class RequestHead:
    method: str
    target: str
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "
    raw: bytes  # every byte read so far (the head and anything after it)

    @property
    def is_websocket(self) -> bool:
        return "websocket" in self.headers.get("upgrade", "").lower()


class BadRequestHead(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


async def read_request_head(stream: trio.abc.Stream) -> RequestHead | None:
    """Read one HTTP request head; None if the peer went away before sending one."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD_BYTES)
    raw = b""
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise BadRequestHead(exc.error_status_hint, "malformed HTTP request") from None
        if event is h11.NEED_DATA:
            data = await stream.receive_some(RECEIVE_CHUNK)
            if not data:
                return None
            raw += data
            conn.receive_data(data)
            continue
        if isinstance(event, h11.Request):
            headers: dict[str, str] = {}
            for name, value in event.headers:
                key = name.decode("latin-1").lower()
                text = value.decode("latin-1")
                headers[key] = f"{headers[key]}, {text}" if key in headers else text
            return RequestHead(event.method.decode("latin-1"), event.target.decode("latin-1"), headers, raw)
        raise BadRequestHead(400, "expected an HTTP request")


def response(status: int, body: bytes, content_type: str = "text/plain; charset=utf-8",
             extra: list[tuple[str, str]] | None = None) -> bytes:
    """A complete HTTP/1.1 response that closes the connection."""
    reason = {200: "OK", 400: "Bad Request", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed", 426: "Upgrade Required",
              431: "Request Header Fields Too Large", 503: "Service Unavailable"}.get(status, "Error")
    lines = [f"HTTP/1.1 {status} {reason}", f"Content-Type: {content_type}", f"Content-Length: {len(body)}",
             "Connection: close", "Cache-Control: no-store", "X-Content-Type-Options: nosniff"]
    lines += [f"{k}: {v}" for k, v in SECURITY_HEADERS + (extra or [])]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def without_body(answer: bytes) -> bytes:
    """The answer to a HEAD request: the same status and headers (Content-Length included, as
    RFC 9110 section 9.3.2 allows), no body."""
    end = answer.find(b"\r\n\r\n")
    return answer if end < 0 else answer[:end + 4]


def static_file(name: str) -> bytes | None:
    try:
        return importlib.resources.files("orderlog.static").joinpath(name).read_bytes()
    except (FileNotFoundError, ModuleNotFoundError, IsADirectoryError):
        return None


Route = Callable[[RequestHead], Awaitable[bytes]]


async def answer_http(request_head: RequestHead, routes: dict[str, Route], ws_path: str) -> bytes:
    """The whole response for a plain HTTP request (without a body for HEAD)."""
    answer = await _answer(request_head, routes, ws_path)
    return without_body(answer) if request_head.method == "HEAD" else answer


async def _answer(request_head: RequestHead, routes: dict[str, Route], ws_path: str) -> bytes:
    path = request_head.target.split("?", 1)[0]
    if path == ws_path:
        return response(426, b"this is the WebSocket endpoint: connect with a WebSocket client\n",
                        extra=[("Upgrade", "websocket")])
    if request_head.method not in ("GET", "HEAD"):
        return response(405, b"only GET and HEAD\n", extra=[("Allow", "GET, HEAD")])
    if path in routes:
        return await routes[path](request_head)
    name = STATIC_ROUTES.get(path)
    if name is not None:
        body = static_file(name)
        if body is not None:
            suffix = name[name.rfind("."):]
            return response(200, body, STATIC_TYPES.get(suffix, "application/octet-stream"))
    return response(404, b"not found\n")
