"""Rough edges a new user hits (issue 18): what the docs promise, tried against the real thing.

Each test starts the real `orderlog serve` (in-process or as a subprocess) or the real CLI and
talks to it over real sockets or through its exit code and stderr.
"""

from __future__ import annotations

import json

import trio
from trio_websocket import ConnectionClosed

from orderlog.store import Store
from test_crash import ServerProcess
from wsclient import connect, decode, recv_json, token

BURST = 3000  # commands one client pipelines while the server is told to stop


# -- shutdown: the last batch's acks go out before 1001 ---------------------------------------


async def test_sigterm_sends_the_acks_of_every_committed_command_before_1001(tmp_path):
    """On SIGTERM amid a burst, every command the log holds was acked on the socket before the 1001 close."""
    db = tmp_path / "burst.db"
    with ServerProcess(db, "--rate-limit", "1000000") as server:
        url = await server.started()
        acked: set[str] = set()
        refused: dict[str, str] = {}
        close_code: list[int] = []
        async with connect(url, token("s1", "staff")) as ws:
            welcome = await recv_json(ws)
            assert welcome["type"] == "welcome", welcome
            signalled = trio.Event()

            async def send() -> None:
                try:
                    for i in range(BURST):
                        await ws.send_message(json.dumps({
                            "type": "command", "id": f"c-{i}", "name": "add_stock",
                            "data": {"sku": "kibble", "quantity": 1}}))
                except ConnectionClosed:
                    pass

            async def receive() -> None:
                while True:
                    try:
                        frame = decode(await ws.get_message())
                    except ConnectionClosed as exc:
                        close_code.append(exc.reason.code)
                        return
                    if frame["type"] == "ack":
                        acked.add(frame["id"])
                    else:
                        assert frame["type"] == "error", frame
                        refused[frame["id"]] = frame["code"]
                    if len(acked) >= 200 and not signalled.is_set():
                        signalled.set()
                        server.proc.send_signal(15)

            with trio.fail_after(30):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(send)
                    nursery.start_soon(receive)
        rc = await trio.to_thread.run_sync(server.proc.wait, 15)
        assert close_code == [1001], server.stderr
        assert rc == 0, server.stderr
    store = Store.open(str(db), readonly=True)
    try:
        committed = {e.command_id for e in store.read_events(limit=None)}
    finally:
        store.close()
    assert acked <= committed
    missing = committed - acked
    assert not missing, f"{len(missing)} committed commands got no ack before the close, e.g. {sorted(missing)[:5]}"
    assert set(refused.values()) <= {"unavailable"}, refused
    assert not set(refused) & committed
