"""Storage faults: the database stops accepting writes while the service runs.

Two real faults, both on a subprocess server (`orderlog serve`):
- disk full: the database lives on a small tmpfs mounted for the test, then filled with a file
  (the writes fail with ENOSPC, as on a full disk); freeing the file clears it. Mounting needs
  root; where `mount` is refused, the file-size limit below stands in for it.
- file-size limit: RLIMIT_FSIZE of the server process is lowered (with prlimit) below the size of
  the WAL, so appending to it fails with EFBIG; root ignores file permissions, not this limit.

While the fault lasts, commands get `unavailable`, nothing partial is written, reads and feeds
keep working and /healthz answers 503 with writable false; when it clears, /healthz returns to
200 on its own and writes resume.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import trio

from conftest import cli_env
from test_crash import ServerProcess
from wsclient import TIMEOUT, assert_quiet, session

FS_SIZE = 4 * 2**20  # bytes of the test's tmpfs
RECOVERY_TIMEOUT = 10.0  # seconds for /healthz to notice that the fault cleared


async def http_get(url: str, path: str, timeout: float = TIMEOUT) -> tuple[int, bytes]:
    """A plain HTTP/1.1 GET to the server of `url` (ws://host:port/...): (status, body)."""
    parts = urlsplit(url)
    with trio.fail_after(timeout):
        stream = await trio.open_tcp_stream(parts.hostname, parts.port)
        async with stream:
            await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: {parts.hostname}\r\n\r\n".encode())
            data = b""
            while chunk := await stream.receive_some(65536):
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


async def health(url: str) -> tuple[int, dict]:
    status, body = await http_get(url, "/healthz")
    return status, json.loads(body)


def _try_mount(where: Path) -> bool:
    where.mkdir()
    if os.geteuid() != 0:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={FS_SIZE},mode=0700", "tmpfs", str(where)],
                          capture_output=True, text=True, timeout=30)
    return done.returncode == 0


def _umount(where: Path) -> None:
    subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=30)


class DiskFull:
    """Fill the tmpfs holding the database; free it to clear."""

    def __init__(self, folder: Path):
        self.filler = folder / "filler"

    def start(self, server: ServerProcess) -> None:
        chunk = b"\0" * 4096
        with open(self.filler, "wb", buffering=0) as f:
            for _ in range(FS_SIZE // len(chunk) + 1):
                try:
                    f.write(chunk)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    return
        raise AssertionError("the tmpfs did not fill up")

    def clear(self, server: ServerProcess) -> None:
        self.filler.unlink()


class FileSizeLimit:
    """RLIMIT_FSIZE of the server below the WAL's size (so no frame can be appended); lift it to clear."""

    def __init__(self, folder: Path):
        self.db = folder / "faults.db"

    def start(self, server: ServerProcess) -> None:
        self.saved = resource.prlimit(server.pid, resource.RLIMIT_FSIZE)
        wal = Path(str(self.db) + "-wal")
        limit = max(wal.stat().st_size, 4096)
        resource.prlimit(server.pid, resource.RLIMIT_FSIZE, (limit, self.saved[1]))

    def clear(self, server: ServerProcess) -> None:
        resource.prlimit(server.pid, resource.RLIMIT_FSIZE, self.saved)


ITEMS = {"items": [{"sku": "kibble", "quantity": 1}]}


@pytest.mark.parametrize("fault", ["disk-full", "file-size-limit"])
async def test_unwritable_database_answers_unavailable_and_recovers(tmp_path, fault):
    """While the database cannot be written, commands get `unavailable`, nothing partial is written, reads, feeds
    and pings keep working and /healthz says 503 writable false; once the fault clears, health and writes return."""
    folder = tmp_path / "fs"
    mounted = fault == "disk-full" and _try_mount(folder)
    if fault == "disk-full" and not mounted:
        print("mount refused here: the disk-full case uses the file-size limit instead")
    if not mounted:
        folder.mkdir(exist_ok=True)
    injector = DiskFull(folder) if mounted else FileSizeLimit(folder)
    db = folder / "faults.db"
    try:
        with ServerProcess(db) as server:
            url = await server.started()
            with trio.fail_after(60):
                async with session(url, "s1", "staff") as staff, session(url, "alice") as alice, \
                        session(url, "watcher", "staff") as watcher:
                    await staff.ok("add_stock", data={"sku": "kibble", "quantity": 1000})
                    placed = await alice.ok("place_order", "before", ITEMS)
                    await watcher.subscribe("orders", since=0)
                    before, live = await watcher.live("orders")
                    assert [e["seq"] for e in before] == [placed["seq"] - 1]  # order-created; stock-reserved is on inventory
                    assert (await health(url))[0] == 200

                    injector.start(server)
                    refused = []
                    for i in range(20):
                        reply = await alice.command("place_order", f"during-{i}", ITEMS, command_id=f"fault-{i}")
                        assert (reply["type"], reply.get("code")) == ("error", "unavailable"), reply
                        refused.append(reply)
                    reply = await staff.command("add_stock", data={"sku": "kibble", "quantity": 5},
                                                command_id="fault-stock")
                    assert (reply["type"], reply.get("code")) == ("error", "unavailable"), reply
                    status, body = await health(url)
                    assert status == 503 and body["writable"] is False and body["status"] == "unavailable", body
                    await trio.sleep(1.5)  # the writer probes the file when idle: the fault must still show
                    status, body = await health(url)
                    assert status == 503 and body["writable"] is False, body
                    # Reads, pings and feeds keep working, and show nothing of the refused commands.
                    assert (await alice.ping())["head"] == placed["seq"]
                    order = await alice.request({"type": "get", "order_id": "before"})
                    assert order["type"] == "order" and order["order"]["status"] == "placed", order
                    missing = await alice.request({"type": "get", "order_id": "during-0"})
                    assert missing["code"] == "not_found", missing
                    stock = await staff.request({"type": "get", "sku": "kibble"})
                    assert stock["stock"]["available"] == 999, stock
                    async with session(url, "late", "staff") as late:
                        await late.subscribe("orders", since=0)
                        replay, _ = await late.live("orders")
                        assert [e["seq"] for e in replay] == [e["seq"] for e in before]
                    await assert_quiet(watcher.ws, 0.2)

                    injector.clear(server)
                    with trio.fail_after(RECOVERY_TIMEOUT):
                        while (await health(url))[0] != 200:
                            await trio.sleep(0.1)
                    status, body = await health(url)
                    assert body["writable"] is True and "error" not in body, body
                    # Nothing was remembered of the refused commands: the same ids now apply for the first time.
                    for i in range(3):
                        ack = await alice.ok("place_order", f"during-{i}", ITEMS, command_id=f"fault-{i}")
                        assert ack["duplicate"] is False and ack["seq"] == placed["seq"] + 2 * (i + 1), ack
                    events = await watcher.events("orders", 3)
                    assert [e["seq"] for e in events] == [placed["seq"] + 1, placed["seq"] + 3, placed["seq"] + 5]
                    assert events[0]["prev"] == before[-1]["seq"]
            assert server.stop() == 0, server.stderr[-3000:]
            assert "event=commit.failed" in server.stderr
            assert "Traceback" not in server.stderr, server.stderr[-3000:]
        done = subprocess.run([sys.executable, "-m", "orderlog.cli", "verify", "--db", str(db)], env=cli_env(),
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
    finally:
        if mounted:
            _umount(folder)
