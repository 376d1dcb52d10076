"""Short pauses of Python's cyclic garbage collector in a server with many long-lived objects.

CPython's full collection (generation 2) stops the whole process and visits every tracked
object; it runs each time the objects that survived the young collections have grown by a
quarter. With 10,000 connections (about 150 tracked objects each: trio tasks and coroutines,
trio-websocket, wsproto and h11 state) one pass took about 0.9 s on the development machine,
and every client's events waited that long.

The policy, for the `orderlog serve` process only (`install`): after each full pass, and after
each pass of the middle generation, what survived it is moved to the permanent generation
(`gc.freeze`), so the next full pass visits only what was created since (at 10,000 connections
opened in a burst, every pass then took at most 60 ms). Freezing after the middle passes too
keeps even the first full pass after a burst of connections short: 1,000 subscribers that had
just connected cost one 57 ms full pass, during which every feed waited (the p99 of a fan-out
at 10 events/s); with it, the longest pass seen was 15 ms. Frozen objects are still freed by reference counting; only cyclic garbage among them
waits, until it is handed back to the collector (`gc.unfreeze`). A server's frozen garbage is
mostly closed connections, so that happens after every `RELEASE_AFTER` closed connections, and
in any case after every `RELEASE_PASSES` full passes: the next full pass then visits everything
once (one long pause, as without the policy), and the frozen garbage waits at most that long.

Not installed in tests that run the server inside the test process: gc state is process-wide.
"""

from __future__ import annotations

import gc
from typing import Any

RELEASE_AFTER = 1000  # closed connections between two hand-backs of the frozen objects
RELEASE_PASSES = 64  # full passes between two hand-backs, whatever the connections do


class FreezeAfterFullPass:
    def __init__(self, release_after: int = RELEASE_AFTER, release_passes: int = RELEASE_PASSES):
        self.release_after = release_after
        self.release_passes = release_passes
        self.closed = 0  # connections closed since the frozen objects were last handed back
        self.passes = 0  # full passes since then
        self.releases = 0

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "stop" and info["generation"] == 1:
            gc.freeze()  # survivors of the middle generation: no full pass has to visit them
        elif phase == "stop" and info["generation"] == 2:
            self.passes += 1
            if self.passes > self.release_passes:
                # What was alive at earlier freezes (a request in flight, say) may be garbage
                # by now, connections or not: this pass visited only the newer objects, so
                # hand everything back; the next pass visits it all once.
                self._release()
            else:
                gc.freeze()

    def connection_closed(self) -> None:
        self.closed += 1
        if self.closed >= self.release_after:
            self._release()

    def _release(self) -> None:
        self.closed = self.passes = 0
        self.releases += 1
        gc.unfreeze()


_installed: FreezeAfterFullPass | None = None


def install(release_after: int = RELEASE_AFTER, release_passes: int = RELEASE_PASSES) -> FreezeAfterFullPass:
    """Install the policy in this process and freeze what is alive now (after a full pass)."""
    global _installed
    if _installed is None:
        _installed = FreezeAfterFullPass(release_after, release_passes)
        gc.callbacks.append(_installed._on_gc)
    gc.collect()  # a full pass: the callback freezes what is loaded by now (modules, classes)
    return _installed


def uninstall() -> None:
    global _installed
    if _installed is not None:
        gc.callbacks.remove(_installed._on_gc)
        _installed = None
    gc.unfreeze()


def connection_closed() -> None:
    """Count a closed connection (a no-op unless the policy is installed)."""
    if _installed is not None:
        _installed.connection_closed()
