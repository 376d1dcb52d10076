"""The anchored chain over real sockets: `head_hash` in welcome, pong and /healthz, and the
checkpoints `serve --checkpoint-key` signs every N events and serves at GET /v1/checkpoint."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

from conftest import cli_env
from orderlog import checkpoint
from test_crash import SECRET as CRASH_SECRET, ServerProcess
from test_feed import query_all
from test_http import http_get
from wsclient import running_server, session, stock_up


async def _health(url: str) -> dict:
    status, _, body = await http_get(url, "/healthz")
    assert status == 200
    return json.loads(body)


async def test_head_hash_is_the_hash_of_the_head_in_welcome_pong_and_healthz(tmp_path: Path) -> None:
    """head_hash is null on an empty log, then the hash of event `head` in every welcome, pong and
    /healthz, for every role, and again after a restart."""
    async with running_server(tmp_path) as (url, _, _):
        async with session(url, "staff-1", "staff") as staff:
            assert (staff.welcome["head"], staff.welcome["head_hash"]) == (0, None)
            assert (await staff.ping())["head_hash"] is None
            assert (await _health(url))["head_hash"] is None
            await stock_up(staff, {"kibble": 10})
            await staff.ok("place_order", "o-1", {"items": [{"sku": "kibble", "quantity": 1}], "customer": "alice"})
            log = await query_all(staff)
            last = log[-1]
            pong = await staff.ping()
            assert (pong["head"], pong["head_hash"]) == (last["seq"], last["hash"])
            health = await _health(url)
            assert (health["head"], health["head_hash"]) == (last["seq"], last["hash"])
            async with session(url, "alice") as alice:
                assert (alice.welcome["head"], alice.welcome["head_hash"]) == (last["seq"], last["hash"])
                assert (await alice.ping())["head_hash"] == last["hash"]
    async with running_server(tmp_path) as (url, _, _):  # the same file: the head hash is read back
        async with session(url, "auditor-1", "auditor") as auditor:
            assert (auditor.welcome["head"], auditor.welcome["head_hash"]) == (last["seq"], last["hash"])


async def _served(url: str) -> tuple[int, str | None]:
    status, headers, body = await http_get(url, "/v1/checkpoint")
    if status != 200:
        return status, None
    assert headers["content-type"].startswith("application/json")
    return status, json.loads(body)["checkpoint"]


async def test_the_server_signs_a_checkpoint_every_n_events_and_serves_the_newest(tmp_path: Path) -> None:
    """With --checkpoint-every 5, /v1/checkpoint is 404 until 5 events are in, then the newest
    checkpoint, signed over (log_id, seq, hash of seq): kept (0600) across a restart, unless the kept
    one does not verify with the key; a server without a key serves none."""
    private_pem, public_pem = checkpoint.new_key_pair()
    key, public = checkpoint.private_key(private_pem), checkpoint.public_key(public_pem)
    async with running_server(tmp_path, checkpoint_key=key, checkpoint_every=5) as (url, _, _):
        async with session(url, "staff-1", "staff") as staff:
            assert await _served(url) == (404, None)
            for i in range(4):
                await staff.ok("add_stock", data={"sku": f"s{i}", "quantity": 1})
            assert await _served(url) == (404, None)
            await staff.ok("add_stock", data={"sku": "s4", "quantity": 1})
            log = await query_all(staff)
            first = checkpoint.verify((await _served(url))[1], public)
            assert first == checkpoint.Checkpoint(staff.welcome["log_id"], 5, log[4]["hash"], first.iat)
            for i in range(4):
                await staff.ok("add_stock", data={"sku": "s", "quantity": 1})
            assert checkpoint.verify((await _served(url))[1], public).seq == 5
            await staff.ok("place_order", "o-1", {"items": [{"sku": "s", "quantity": 1}], "customer": "c"})
            log = await query_all(staff)
            newest = checkpoint.verify((await _served(url))[1], public)
            assert (newest.seq, newest.hash) == (11, log[10]["hash"])  # the commit that passed 10: seq 11
    kept = tmp_path / "orderlog.db.checkpoints"
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    async with running_server(tmp_path, checkpoint_key=key, checkpoint_every=5) as (url, _, _):
        assert checkpoint.verify((await _served(url))[1], public) == newest
    async with running_server(tmp_path) as (url, _, _):
        assert await _served(url) == (404, None)
    # A line planted in the file (signed with another key) is not served after a restart.
    other = checkpoint.private_key(checkpoint.new_key_pair()[0])
    forged = checkpoint.sign(checkpoint.Checkpoint(newest.log_id, 11, "0" * 64, newest.iat), other)
    with kept.open("a") as f:
        f.write(json.dumps({"seq": 11, "checkpoint": forged}) + "\n")
    async with running_server(tmp_path, checkpoint_key=key, checkpoint_every=5) as (url, _, _):
        assert await _served(url) == (404, None)


async def test_serve_checkpoint_key_then_verify_with_the_cli(tmp_path: Path) -> None:
    """keygen, `serve --checkpoint-key --checkpoint-every 3` (a real process), commands, GET
    /v1/checkpoint, then `verify --checkpoint --public-key` passes on the file the server wrote."""
    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "orderlog.cli", *args], cwd=tmp_path, env=cli_env(),
                              capture_output=True, text=True, timeout=60)

    assert cli("keygen", "--key", "signer.key").returncode == 0
    server = ServerProcess(tmp_path / "served.db", "--checkpoint-key", str(tmp_path / "signer.key"),
                           "--checkpoint-every", "3")
    try:
        url = await server.started()
        async with session(url, "staff-1", "staff", secret=CRASH_SECRET) as staff:
            for i in range(3):
                await staff.ok("add_stock", data={"sku": f"s{i}", "quantity": 1})
        status, jws = await _served(url)
        assert status == 200, server.stderr
    finally:
        assert server.stop() == 0
    done = cli("verify", "--db", "served.db", "--checkpoint", jws, "--public-key", "signer.key.pub")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "checkpoint seq 3" in done.stdout


def test_serve_checkpoint_flag_errors_are_one_line(cli, tmp_path: Path) -> None:
    """--checkpoint-every without a key, a missing key, or a key open to others: exit 2, one line."""
    from test_cli import assert_one_line_error

    secret = ["--jwt-secret", "serve-cli-test-secret-0123456789abcdef"]
    done = cli("serve", "--port", "0", *secret, "--checkpoint-every", "3")
    assert_one_line_error(done, "--checkpoint-every goes with --checkpoint-key")
    done = cli("serve", "--port", "0", *secret, "--checkpoint-key", "missing.key")
    assert_one_line_error(done, "--checkpoint-key missing.key: no such file")
    assert cli("keygen", "--key", "k").returncode == 0
    (tmp_path / "k").chmod(0o644)
    done = cli("serve", "--port", "0", *secret, "--checkpoint-key", "k")
    assert_one_line_error(done, "refusing the checkpoint key", "mode 0644")
