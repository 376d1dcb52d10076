"""bin/build's one-file zipapp: it runs every subcommand with no installed package to lean on.

The zipapp is built once per module (about 10 s). Each run uses a clean environment (no
PYTHONPATH, HOME and SHIV_ROOT in a temp dir, cwd a temp dir) and `python -I -S`, so that
neither this checkout nor the site-packages of the interpreter can be imported: whatever
the zipapp needs, it must carry.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import trio
from trio_websocket import open_websocket_url

from orderlog.auth import mint

REPO = Path(__file__).resolve().parents[1]
BUILD_TIMEOUT = 180  # seconds; the build itself takes about 10 s with a warm pip cache
RUN_TIMEOUT = 60
SECRET = "zipapp-secret-0123456789-0123456789-abc"


@pytest.fixture(scope="module")
def zipapp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """dist/orderlog built by bin/build into a temp dir (once for this module)."""
    out = tmp_path_factory.mktemp("dist") / "orderlog"
    done = subprocess.run([str(REPO / "bin" / "build"), "-o", str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=BUILD_TIMEOUT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert out.exists() and os.access(out, os.X_OK)
    assert not (REPO / "build").exists(), "the build must not leave build/ in the checkout"
    return out


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A HOME for the zipapp's runs (shiv unpacks itself there once)."""
    return tmp_path_factory.mktemp("home")


def clean_env(home: Path) -> dict[str, str]:
    """Only what a bare machine has: no PYTHONPATH, no ORDERLOG_*, a private HOME."""
    return {"HOME": str(home), "SHIV_ROOT": str(home / ".shiv"), "LANG": "C.UTF-8",
            "PATH": os.pathsep.join([os.path.dirname(sys.executable), "/usr/bin", "/bin"])}


def run(zipapp: Path, home: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """`python -I -S ZIPAPP ARGS...` in a clean environment."""
    return subprocess.run([sys.executable, "-I", "-S", str(zipapp), *args], cwd=cwd, env=clean_env(home),
                          capture_output=True, text=True, timeout=RUN_TIMEOUT)


def test_the_interpreter_alone_cannot_import_orderlog(home: Path, tmp_path: Path) -> None:
    """`python -I -S` in the clean environment sees neither orderlog nor trio (so the zipapp must carry them)."""
    probe = subprocess.run([sys.executable, "-I", "-S", "-c", "import trio"], cwd=tmp_path, env=clean_env(home),
                           capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert probe.returncode != 0 and "No module named 'trio'" in probe.stderr


def test_zipapp_runs_the_log_subcommands(zipapp: Path, home: Path, tmp_path: Path) -> None:
    """migrate (with the packaged SQL), seed, events, verify, rebuild, stats and token run from the zipapp."""
    db = "shop.db"

    def ok(*args: str) -> str:
        done = run(zipapp, home, tmp_path, *args)
        assert done.returncode == 0, (args, done.stderr)
        return done.stdout

    assert "0001_" in ok("migrate", "--db", db)
    assert "seeded shop.db" in ok("seed", "--db", db, "--commands", "60")
    lines = ok("events", "--db", db, "--limit", "3").splitlines()
    assert [json.loads(line)["seq"] for line in lines] == [1, 2, 3]
    assert ok("verify", "--db", db).startswith("ok ")
    assert "rebuilt" in ok("rebuild", "--db", db)
    assert json.loads(ok("stats", "--db", db, "--json"))["head"] >= 60
    token = ok("token", "--db", db, "--jwt-secret", SECRET, "--sub", "s1", "--role", "staff").strip()
    assert token.count(".") == 2
    assert "--print-config" in ok("serve", "--help")
    assert 'jwt_secret' in ok("serve", "--db", db, "--print-config")
    assert ok("--version").strip()
    # The file is executable by itself too (its #! line names python3).
    direct = subprocess.run([str(zipapp), "tail", "--help"], cwd=tmp_path, env=clean_env(home), capture_output=True,
                            text=True, timeout=RUN_TIMEOUT)
    assert direct.returncode == 0 and "--since" in direct.stdout, direct.stderr


def test_zipapp_serves_websocket_http_and_tail(zipapp: Path, home: Path, tmp_path: Path) -> None:
    """`serve` from the zipapp answers a WebSocket (welcome, command ack), HTTP (dashboard, healthz), and its `tail` reads the feed."""
    proc = subprocess.Popen([sys.executable, "-I", "-S", str(zipapp), "serve", "--db", "served.db", "--port", "0",
                             "--jwt-secret", SECRET], cwd=tmp_path, env=clean_env(home), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log: list[str] = []
    found: dict[str, str] = {}
    listening = threading.Event()

    def read() -> None:
        for line in proc.stderr:
            log.append(line)
            match = re.search(r"event=listening url=(\S+)", line)
            if match:
                found["url"] = match.group(1)
                listening.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert listening.wait(30), "".join(log)
        url = found["url"]

        async def talk() -> tuple[dict, dict]:
            with trio.fail_after(10):
                tok = mint("s1", "staff", 300, time.time(), SECRET, "HS256")
                async with open_websocket_url(f"{url}?token={tok}") as ws:
                    welcome = json.loads(await ws.get_message())
                    await ws.send_message(json.dumps({"type": "command", "id": "c-1", "name": "add_stock",
                                                      "data": {"sku": "kibble", "quantity": 3}}))
                    return welcome, json.loads(await ws.get_message())

        welcome, ack = trio.run(talk)
        assert welcome["type"] == "welcome" and welcome["user"] == "s1" and welcome["head"] == 0
        assert ack == {"type": "ack", "id": "c-1", "seq": 1, "version": 1, "events": ["stock-added"],
                       "duplicate": False}

        http = url.replace("ws://", "http://").removesuffix("/v1/ws")
        with urllib.request.urlopen(f"{http}/dashboard", timeout=10) as page:
            assert page.headers["Content-Type"].startswith("text/html")
            assert b'src="/dashboard.js"' in page.read()
        with urllib.request.urlopen(f"{http}/orderlog.js", timeout=10) as module:
            assert b"export class OrderlogClient" in module.read()
        with urllib.request.urlopen(f"{http}/healthz", timeout=10) as health:
            assert json.loads(health.read())["head"] == 1

        tok = mint("a1", "auditor", 300, time.time(), SECRET, "HS256")
        tailed = run(zipapp, home, tmp_path, "tail", "--url", url, "--token", tok, "--channel", "inventory",
                     "--since", "0", "--count", "1")
        assert tailed.returncode == 0, tailed.stderr
        assert json.loads(tailed.stdout)["type"] == "stock-added"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0, "".join(log)
