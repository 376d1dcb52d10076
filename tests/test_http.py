"""Plain HTTP on the WebSocket's port: /healthz, /metrics, the static files, 404 and 426."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import urlsplit

import trio

from orderlog.service.http import STATIC_ROUTES
from wsclient import TIMEOUT, connect, next_id, recv_json, send_json, token
from wsclient import running_server

MAX_RESPONSE = 4 * 1024 * 1024


async def http_get(url: str, path: str, headers: dict[str, str] | None = None,
                   method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request (GET unless told) over a real socket; returns (status, lower-case
    headers, body: every byte after the head, until the server closed)."""
    target = urlsplit(url)
    with trio.fail_after(TIMEOUT):
        stream = await trio.open_tcp_stream(target.hostname, target.port)
        async with stream:
            lines = [f"{method} {path} HTTP/1.1", f"Host: {target.netloc}", "Connection: close"]
            lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
            await stream.send_all(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
            raw = b""
            while chunk := await stream.receive_some(65536):
                raw += chunk
                assert len(raw) < MAX_RESPONSE
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parsed = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        parsed[name.strip().lower()] = value.strip()
    if "content-length" in parsed and method != "HEAD":
        assert len(body) == int(parsed["content-length"])
    return int(status_line.split()[1]), parsed, body


def metric(text: str, name: str, labels: str = "") -> float:
    """The value of one sample line `name{labels} value` in Prometheus text."""
    key = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(key + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no sample {key} in:\n{text}")


async def test_healthz_is_ok_with_the_log_fields(tmp_path: Path) -> None:
    """/healthz answers 200 JSON with status ok, the head, the log_id and the writer's state."""
    async with running_server(tmp_path) as (url, _, _):
        status, headers, body = await http_get(url, "/healthz")
        assert status == 200
        assert headers["content-type"].startswith("application/json")
        health = json.loads(body)
        assert health["status"] == "ok"
        assert health["head"] == 0
        assert isinstance(health["log_id"], str) and health["log_id"]
        assert health["writer"] == "alive"
        assert health["writable"] is True
        assert health["connections"] == 0


async def test_metrics_count_commands_connections_and_the_head(tmp_path: Path) -> None:
    """/metrics is Prometheus text naming connections, commands, head, subscriptions, batches, commit time and lag."""
    async with running_server(tmp_path) as (url, _, _):
        async with connect(url, token("s1", "staff")) as ws:
            await recv_json(ws)  # welcome
            await send_json(ws, {"type": "subscribe", "id": next_id(), "channel": "inventory", "since": 0})
            assert (await recv_json(ws))["type"] == "subscribed"
            await send_json(ws, {"type": "command", "id": next_id("c"), "name": "add_stock",
                                 "data": {"sku": "kibble", "quantity": 5}})
            seen = set()
            with trio.fail_after(TIMEOUT):
                while not {"ack", "stock-added"} <= seen:
                    seen.add((await recv_json(ws))["type"])

            status, headers, body = await http_get(url, "/metrics")
            assert status == 200
            assert headers["content-type"].startswith("text/plain")
            text = body.decode()
            assert metric(text, "orderlog_connections") == 1
            assert metric(text, "orderlog_commands_total", 'name="add_stock",outcome="ack"') == 1
            assert metric(text, "orderlog_head_seq") == 1
            assert metric(text, "orderlog_subscriptions", 'channel="inventory"') == 1
            assert metric(text, "orderlog_batch_size_count") >= 1
            assert metric(text, "orderlog_commit_seconds_count") >= 1
            assert metric(text, "orderlog_subscriber_lag_events") == 0
            for name in ("orderlog_batch_size", "orderlog_commit_seconds"):
                assert f"# TYPE {name} histogram" in text


async def test_unknown_paths_get_404(tmp_path: Path) -> None:
    """A path that is neither an endpoint nor a static file gets 404."""
    async with running_server(tmp_path) as (url, _, _):
        for path in ("/nope", "/static/dashboard.js", "/../pyproject.toml", "/__init__.py", "/v1"):
            status, _, _ = await http_get(url, path)
            assert status == 404, path


async def test_websocket_path_without_upgrade_gets_426(tmp_path: Path) -> None:
    """A plain GET on /v1/ws gets 426 Upgrade Required."""
    async with running_server(tmp_path) as (url, _, _):
        status, headers, _ = await http_get(url, "/v1/ws")
        assert status == 426
        assert headers["upgrade"].lower() == "websocket"


async def test_static_files_are_served_with_their_content_types(tmp_path: Path) -> None:
    """Every static route answers 200 with its content type and the packaged file's bytes."""
    types = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}
    static = Path(__file__).resolve().parents[1] / "orderlog" / "static"
    async with running_server(tmp_path) as (url, _, _):
        for path, name in STATIC_ROUTES.items():
            status, headers, body = await http_get(url, path)
            assert status == 200, path
            assert headers["content-type"].startswith(types[Path(name).suffix]), (path, headers)
            assert "charset=utf-8" in headers["content-type"]
            assert body == (static / name).read_bytes()
        _, _, page = await http_get(url, "/dashboard")
        assert b'src="/dashboard.js"' in page and b'href="/dashboard.css"' in page
        _, _, module = await http_get(url, "/dashboard.js")
        assert b'from "/orderlog.js"' in module


async def test_head_gets_the_headers_of_get_and_no_body(tmp_path: Path) -> None:
    """HEAD on every path (health, metrics, static files, 404, 426) answers GET's status and headers, and no body
    (RFC 9110 section 9.3.2)."""
    async with running_server(tmp_path) as (url, _, _):
        for path in ("/healthz", "/metrics", "/", "/dashboard.js", "/nope", "/v1/ws"):
            get_status, get_headers, get_body = await http_get(url, path)
            status, headers, body = await http_get(url, path, method="HEAD")
            assert (status, body) == (get_status, b""), (path, status, body[:80])
            assert headers["content-type"] == get_headers["content-type"], path
            if path not in ("/healthz", "/metrics"):  # their bodies change from one request to the next
                assert headers["content-length"] == str(len(get_body)), path


async def test_head_of_a_refused_origin_gets_the_403_without_a_body(tmp_path: Path) -> None:
    async with running_server(tmp_path, allow_origins=("https://shop.example",)) as (url, _, _):
        status, _, body = await http_get(url, "/v1/ws", {"Origin": "https://evil.example"}, method="HEAD")
        assert (status, body) == (403, b"")


async def test_other_methods_get_405_naming_get_and_head(tmp_path: Path) -> None:
    async with running_server(tmp_path) as (url, _, _):
        for method in ("POST", "PUT", "DELETE", "OPTIONS"):
            status, headers, _ = await http_get(url, "/healthz", method=method)
            assert status == 405 and headers["allow"] == "GET, HEAD", method


async def test_the_dashboard_may_not_be_framed_and_runs_only_its_own_scripts(tmp_path: Path) -> None:
    """The dashboard (it has buttons that change orders) carries a Content-Security-Policy with
    frame-ancestors 'none' and X-Frame-Options DENY, so no other site can frame it (clickjacking);
    so does every other answer."""
    async with running_server(tmp_path) as (url, _, _):
        for path in ("/", "/dashboard", "/dashboard.js", "/healthz", "/nope"):
            status, headers, _ = await http_get(url, path)
            policy = {part.strip().split(" ", 1)[0]: part.strip().split(" ", 1)[1]
                      for part in headers["content-security-policy"].split(";")}
            assert policy["frame-ancestors"] == "'none'", path
            assert policy["default-src"] == "'none'" and policy["script-src"] == "'self'", path
            assert policy["connect-src"] == "'self'", path
            assert headers["x-frame-options"] == "DENY", path
