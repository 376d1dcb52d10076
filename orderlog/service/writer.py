"""The writer's tools: the command hand-off (`Pending`), the worker thread it commits in
(`InThread`), the committed batch (`Committed`), the clock that stamps commands, and the
read-only connections (`Readers`) that catch-up, `get` and `query` use from worker threads."""

from __future__ import annotations

import logging
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable

import attrs
import trio

from ..canonical import format_time
from ..feed import FeedEvent
from ..records import Request
from ..store import open_store

if TYPE_CHECKING:
    from .connection import Connection

log = logging.getLogger("orderlog")

READERS = 2  # read-only connections for catch-up, get and query


# -- storage access from trio -----------------------------------------------------------------


class Readers:
    """A few read-only connections, each used by one worker thread at a time."""

    def __init__(self, path: str, count: int = READERS):
        self._free = [open_store(path, readonly=True) for _ in range(count)]
        self._all = list(self._free)
        self._limiter = trio.CapacityLimiter(count)
        # Bulk reads (snapshot steps) take turns on all but one reader, so that gets, queries and
        # catch-up pages always find one free whatever the number of snapshots being sent.
        self._bulk = trio.CapacityLimiter(max(1, count - 1))

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        async with self._limiter:
            store = self._free.pop()
            try:
                return await trio.to_thread.run_sync(fn, store, *args)
            finally:
                self._free.append(store)

    async def run_bulk(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`run`, for a long series of reads (a snapshot's steps): at most count - 1 at a time."""
        async with self._bulk:
            return await self.run(fn, *args)

    async def call(self, method: str, *args: Any) -> Any:
        """`store.<method>(*args)` on a free reader (SQLite or PostgreSQL, whichever the log is)."""
        return await self.run(lambda store, *a: getattr(store, method)(*a), *args)

    def close(self) -> None:
        for store in self._all:
            store.close()


@attrs.define
class Pending:
    request: Request
    connection: "Connection"


class InThread:
    """`fn(*args)`, started at once in a worker thread; `await wait()` for its result.

    Like trio.to_thread.run_sync (the result cannot be abandoned: `wait` is not cancellable),
    but the thread starts before the caller's next checkpoint, and the caller may do other work
    meanwhile. to_thread first passes a checkpoint (its capacity limiter), which lets every task
    made runnable meanwhile run before the thread is even asked to start, a few ms per group
    commit under load. Only the writer uses this, one thread at a time, so it needs no limiter.
    """

    def __init__(self, fn: Callable[..., Any], *args: Any):
        self._result: Any = None  # an outcome.Outcome once the thread is done
        self._task: Any = None  # the task waiting for it
        token = trio.lowlevel.current_trio_token()

        def deliver(result: Any) -> None:  # in the worker thread
            token.run_sync_soon(self._arrived, result)

        trio.lowlevel.start_thread_soon(lambda: fn(*args), deliver, name="orderlog writer")

    def _arrived(self, result: Any) -> None:
        if self._task is not None:
            trio.lowlevel.reschedule(self._task, result)
        else:
            self._result = result

    async def wait(self) -> Any:
        if self._result is not None:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return self._result.unwrap()
        self._task = trio.lowlevel.current_task()
        return await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)


@attrs.frozen
class Committed:
    """A batch whose commit has ended: one outcome per command, and the events to publish."""

    batch: list[Pending]
    outcomes: list
    events: list[FeedEvent]


class Clock:
    """Now as store.format_time writes it (RFC 3339 UTC, milliseconds), for each command's `at`:
    the date and time of day are formatted once per second, not once per command."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def now(self) -> str:
        moment = time.time()
        second = int(moment)
        if second != self._second:
            self._prefix = format_time(datetime.fromtimestamp(second, timezone.utc))[:-4]  # "...:SS."
            self._second = second
        return f"{self._prefix}{int((moment - second) * 1000):03d}Z"
