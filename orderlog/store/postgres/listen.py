"""The cross-node wake-up: one LISTEN connection per node, in its own thread.

Each append transaction ends with `pg_notify(HEAD_CHANNEL, '<new head>')`, delivered to every
listener when (and only if) it commits. A notification is only a wake-up: the node then reads
the events after its own head from the log, so a lost or merged notification costs latency,
never an event. The service also polls on its own every second, the fallback for a listener
that is reconnecting.

Why a thread and not async: psycopg's async API runs on asyncio only, and the service runs on
trio. A blocking connection in a thread of its own waits in `notifies()` without holding up the
event loop, and hands each head to the service with a callback (the service passes it on to
its trio thread with `TrioToken.run_sync_soon`).
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

import psycopg

from .schema import CONNECT_TIMEOUT, display_url, reason

log = logging.getLogger("orderlog")

HEAD_CHANNEL = "orderlog_head"  # NOTIFY channel; notifications are per database
WAKE_EVERY = 1.0  # seconds between looks at the stop flag while no notification comes
RECONNECT_DELAYS = (0.1, 0.5, 1.0, 2.0, 5.0)  # seconds before each reconnect attempt (the last repeats)


class HeadListener:
    """Calls `on_head(seq)` (in its own thread) for every head another appender announces; and
    `on_head(0)` after each (re)connection, since notifications sent meanwhile are lost."""

    def __init__(self, url: str, on_head: Callable[[int], None]):
        self._url = url
        self._on_head = on_head
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="orderlog listen", daemon=True)

    def start(self) -> "HeadListener":
        self._thread.start()
        return self

    def stop(self, timeout: float = WAKE_EVERY + CONNECT_TIMEOUT) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                with psycopg.connect(self._url, autocommit=True, connect_timeout=CONNECT_TIMEOUT) as conn:
                    conn.execute(f"LISTEN {HEAD_CHANNEL}")
                    if failures:
                        log.info("event=listen.reconnected db=%s", display_url(self._url))
                    failures = 0
                    self._on_head(0)  # read whatever was committed while nobody listened
                    while not self._stop.is_set():
                        for notify in conn.notifies(timeout=WAKE_EVERY):
                            self._on_head(_seq(notify.payload))
            except psycopg.Error as exc:
                if failures == 0:
                    log.warning("event=listen.lost db=%s reason=%r", display_url(self._url), reason(exc))
                delay = RECONNECT_DELAYS[min(failures, len(RECONNECT_DELAYS) - 1)]
                failures += 1
                self._stop.wait(delay)


def _seq(payload: str) -> int:
    try:
        return int(payload)
    except ValueError:
        return 0  # not ours to judge: read the log anyway
