"""`bin/build --standalone`: one file that runs orderlog on a machine with no Python at all.

The file is built once per session (about 20 to 40 s). Every run goes through `sandboxed()`:
`env -i` with a PATH of one empty folder, a private HOME and cwd. As root (every machine of
this project's kind, and CI) the run also happens in a private mount namespace (`unshare
--mount`) where every Python on the machine is hidden: its installation folders are covered by
empty tmpfs mounts and its `python*` executables by /dev/null. So whatever the file needs, it
must carry, the interpreter included.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shlex
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
BUILD_TIMEOUT = 300  # seconds; the build takes 20 to 40 s on this machine kind
RUN_TIMEOUT = 60
SECRET = "standalone-secret-0123456789-0123456789"
HIDE_PYTHON = os.geteuid() == 0  # mount namespaces need root; the machines of this kind run as root


def python_installations() -> tuple[list[str], list[str]]:
    """(folders, executables) of every Python this machine has, to hide from the file's runs."""
    folders = {sys.base_prefix, sys.prefix, os.path.expanduser("~/.pyenv"),
               *glob.glob("/usr/lib/python3*"), *glob.glob("/usr/local/lib/python3*")}
    executables = {*glob.glob("/usr/bin/python*"), *glob.glob("/usr/local/bin/python*")}
    folders = {os.path.realpath(f) for f in folders if os.path.isdir(f)}
    # Covering a folder covers what is inside it (and its mount point would be gone for a second mount).
    outermost = [f for f in folders if not any(f.startswith(other + os.sep) for other in folders)]
    return sorted(outermost), sorted(e for e in executables if os.path.isfile(e))


def sandboxed(argv: list[str], home: Path) -> list[str]:
    """`argv` run with an environment that holds no Python (and, as root, a machine that shows none)."""
    empty_bin = home / "bin"
    empty_bin.mkdir(exist_ok=True)
    env = ["/usr/bin/env", "-i", f"PATH={empty_bin}", f"HOME={home}", "LANG=C.UTF-8"]
    if not HIDE_PYTHON:
        return [*env, *argv]
    folders, executables = python_installations()
    script = "set -e\n" + "".join(f"mount -t tmpfs -o size=1m,mode=0755 none {shlex.quote(f)}\n" for f in folders)
    script += "".join(f"mount --bind /dev/null {shlex.quote(e)}\n" for e in executables)
    script += 'exec "$@"\n'
    return ["/usr/bin/unshare", "--mount", "--propagation", "private", "/bin/sh", "-c", script, "sh", *env, *argv]


@pytest.fixture(scope="session")
def standalone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """dist/orderlog built by `bin/build --standalone` into a temp dir (once per session)."""
    out = tmp_path_factory.mktemp("standalone") / "orderlog"
    done = subprocess.run([str(REPO / "bin" / "build"), "--standalone", "-o", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=BUILD_TIMEOUT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert out.exists() and os.access(out, os.X_OK)
    assert not (REPO / "build").exists(), "the build must not leave build/ in the checkout"
    assert not list(REPO.glob("*.spec")), "the build must not leave a .spec file in the checkout"
    return out


@pytest.fixture
def home(tmp_path: Path) -> Path:
    path = tmp_path / "home"
    path.mkdir()
    return path


def run(home: Path, cwd: Path, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(sandboxed(list(argv), home), cwd=cwd, capture_output=True, text=True, timeout=RUN_TIMEOUT,
                          stdin=subprocess.DEVNULL)


def test_the_sandbox_has_no_python(home: Path, tmp_path: Path) -> None:
    """In the sandbox no `python`/`python3` is on PATH and, as root, none of the machine's Pythons runs even by its full path."""
    probe = run(home, tmp_path, "/bin/sh", "-c", "command -v python3 || command -v python || echo none")
    assert probe.stdout.strip() == "none", probe
    assert run(home, tmp_path, "/bin/sh", "-c", "echo $PYTHONPATH$PYTHONHOME").stdout.strip() == ""
    if HIDE_PYTHON:
        for interpreter in {sys.executable, *python_installations()[1]}:
            assert run(home, tmp_path, interpreter, "-c", "print('hello')").returncode != 0, interpreter
        assert run(home, tmp_path, "/bin/ls", "-A", sys.base_prefix).stdout == ""


def test_standalone_runs_the_log_subcommands(standalone: Path, home: Path, tmp_path: Path) -> None:
    """migrate, seed, verify, events, stats, state of the projections (rebuild) and token run with no Python on the machine."""

    def ok(*args: str) -> str:
        done = run(home, tmp_path, str(standalone), *args)
        assert done.returncode == 0, (args, done.stdout, done.stderr)
        return done.stdout

    assert ok("--version").startswith("orderlog ")
    assert "0001_" in ok("migrate", "--db", "shop.db")
    assert "seeded shop.db" in ok("seed", "--db", "shop.db", "--commands", "80")
    assert ok("verify", "--db", "shop.db").startswith("ok ")
    lines = ok("events", "--db", "shop.db", "--limit", "3").splitlines()
    assert [json.loads(line)["seq"] for line in lines] == [1, 2, 3]
    assert "rebuilt" in ok("rebuild", "--db", "shop.db")
    assert json.loads(ok("stats", "--db", "shop.db", "--json"))["head"] >= 80
    token = ok("token", "--db", "shop.db", "--jwt-secret", SECRET, "--sub", "s1", "--role", "staff").strip()
    assert token.count(".") == 2
    assert "jwt_secret" in ok("serve", "--db", "shop.db", "--print-config")
    # A user mistake is still one line and exit 2, not a traceback from the frozen program.
    missing = run(home, tmp_path, str(standalone), "verify", "--db", "nowhere.db")
    assert missing.returncode == 2 and missing.stderr.startswith("orderlog: error:"), missing
    # The load generator needs a Python for its subprocesses: a clear refusal.
    bench = run(home, tmp_path, str(standalone), "bench", "commands")
    assert bench.returncode == 2 and "orderlog_bench" in bench.stderr, bench


def test_standalone_serves_the_dashboard_and_the_feed(standalone: Path, home: Path, tmp_path: Path) -> None:
    """`serve` from the standalone file reaches `listening`, serves the dashboard, acks a command, feeds `tail`, and stops cleanly on SIGTERM; the log then verifies."""
    assert run(home, tmp_path, str(standalone), "seed", "--db", "served.db", "--commands", "40").returncode == 0
    proc = subprocess.Popen(sandboxed([str(standalone), "serve", "--db", "served.db", "--port", "0",
                                       "--jwt-secret", SECRET], home),
                            cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    log: list[str] = []
    found: dict[str, str] = {}
    listening = threading.Event()

    def read() -> None:
        for line in proc.stderr:
            log.append(line)
            match = re.search(r"event=listening url=(\S+).* head=(\d+)", line)
            if match:
                found["url"], found["head"] = match.groups()
                listening.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert listening.wait(30), "".join(log)
        url, head = found["url"], int(found["head"])
        assert head >= 40

        async def talk() -> tuple[dict, dict]:
            with trio.fail_after(10):
                tok = mint("s1", "staff", 300, time.time(), SECRET, "HS256")
                async with open_websocket_url(f"{url}?token={tok}") as ws:
                    welcome = json.loads(await ws.get_message())
                    await ws.send_message(json.dumps({"type": "command", "id": "c-standalone", "name": "add_stock",
                                                      "data": {"sku": "kibble", "quantity": 3}}))
                    return welcome, json.loads(await ws.get_message())

        welcome, ack = trio.run(talk)
        assert welcome["type"] == "welcome" and welcome["head"] == head
        assert ack["type"] == "ack" and ack["seq"] == head + 1 and ack["events"] == ["stock-added"]

        http = url.replace("ws://", "http://").removesuffix("/v1/ws")
        with urllib.request.urlopen(f"{http}/", timeout=10) as page:
            assert page.headers["Content-Type"].startswith("text/html")
            assert b'src="/dashboard.js"' in page.read()
        for path, marker in [("/dashboard.js", b"OrderlogClient"), ("/orderlog.js", b"export class OrderlogClient"),
                             ("/dashboard.css", b"{")]:
            with urllib.request.urlopen(f"{http}{path}", timeout=10) as asset:
                assert marker in asset.read(), path
        with urllib.request.urlopen(f"{http}/healthz", timeout=10) as health:
            assert json.loads(health.read())["head"] == head + 1

        tok = mint("a1", "auditor", 300, time.time(), SECRET, "HS256")
        tailed = run(home, tmp_path, str(standalone), "tail", "--url", url, "--token", tok, "--channel", "inventory",
                     "--since", str(head), "--count", "1")
        assert tailed.returncode == 0, tailed.stderr
        assert json.loads(tailed.stdout)["seq"] == head + 1
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(timeout=15) == 0, "".join(log)
        finally:
            if proc.poll() is None:
                proc.kill()
    verified = run(home, tmp_path, str(standalone), "verify", "--db", "served.db")
    assert verified.returncode == 0 and verified.stdout.startswith("ok "), verified
