"""The writer's tools: the command hand-off (`Pending`), the worker thread it commits in
(`InThread`), the committed batch (`Committed`), the clock that stamps commands, and the
read-only connections (`Readers`) that catch-up, `get` and `query` use from worker threads."""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable

import attrs
import outcome
import trio

from ..canonical import format_time
from ..feed import FeedEvent
from ..records import Request
from ..store import open_store

if TYPE_CHECKING:
    from .connection import Connection

log = logging.getLogger("orderlog")

READERS = 2  # read-only connections for catch-up, get and query
# The nice value of the thread that reads snapshot pages (Linux keeps one per thread): the
# kernel gives it the CPU the writer and the event loop leave, so that a snapshot streamed at
# full speed costs other clients' commands little (README, "Snapshots and the dashboard").
BULK_NICE = 10


# -- storage access from trio -----------------------------------------------------------------


class Readers:
    """A few read-only connections, each used by one worker thread at a time."""

    def __init__(self, path: str, count: int = READERS):
        self._free = [open_store(path, readonly=True) for _ in range(count)]
        self._all = list(self._free)
        self._limiter = trio.CapacityLimiter(count)
        # Bulk reads (snapshot steps) take turns on all but one reader, so that gets, queries and
        # catch-up pages always find one free whatever the number of snapshots being sent; they
        # run in a thread of their own, at a lower CPU priority.
        self._bulk = trio.CapacityLimiter(max(1, count - 1))
        self._bulk_thread = NicedThread(BULK_NICE, "orderlog bulk")

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        async with self._limiter:
            return await self._on_free_reader(trio.to_thread.run_sync, fn, *args)

    async def run_bulk(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`run`, for a long series of reads (a snapshot's steps): at most count - 1 at a time,
        in the niced thread."""
        async with self._bulk, self._limiter:
            return await self._on_free_reader(self._bulk_thread.run, fn, *args)

    async def _on_free_reader(self, runner: Callable[..., Any], fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(store, *args)` on a free reader, through `runner` (a thread); the caller holds a slot."""
        store = self._free.pop()
        try:
            return await runner(fn, store, *args)
        finally:
            self._free.append(store)

    async def call(self, method: str, *args: Any) -> Any:
        """`store.<method>(*args)` on a free reader (SQLite or PostgreSQL, whichever the log is)."""
        return await self.run(lambda store, *a: getattr(store, method)(*a), *args)

    def close(self) -> None:
        self._bulk_thread.close()
        for store in self._all:
            store.close()


@attrs.define
class Pending:
    request: Request
    connection: "Connection"


class Handoff:
    """A result that a worker thread hands to one trio task: `_arrived(outcome)` (called through
    the trio token, in the run's thread), `await wait()` (not cancellable: the thread's work
    cannot be abandoned)."""

    def __init__(self) -> None:
        self._result: Any = None  # an outcome.Outcome once the thread is done
        self._task: Any = None  # the task waiting for it

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


class NicedThread:
    """One long-lived worker thread at a lower CPU priority (`nice` more than the thread that made
    it, at most 19; per thread on Linux; where it cannot be set, the thread runs at the process's),
    running one job at a time in order."""

    def __init__(self, nice: int, name: str):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, args=(nice,), name=name, daemon=True)
        self._thread.start()

    def _work(self, nice: int) -> None:
        tid = threading.get_native_id()
        try:
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
            with open(f"/proc/self/task/{tid}/comm", "w") as comm:  # its name in top -H, ps -L
                comm.write(self._thread.name[:15])
        except (AttributeError, OSError):
            pass
        while (job := self._jobs.get()) is not None:
            fn, token, handoff = job
            result = outcome.capture(fn)
            try:
                token.run_sync_soon(handoff._arrived, result)
            except trio.RunFinishedError:
                pass  # the service ended meanwhile: nobody waits for it

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        handoff = Handoff()
        self._jobs.put((lambda: fn(*args), trio.lowlevel.current_trio_token(), handoff))
        return await handoff.wait()

    def close(self) -> None:
        """End the thread once the jobs queued so far are done."""
        self._jobs.put(None)


class InThread(Handoff):
    """`fn(*args)`, started at once in a worker thread; `await wait()` for its result.

    Like trio.to_thread.run_sync (the result cannot be abandoned: `wait` is not cancellable),
    but the thread starts before the caller's next checkpoint, and the caller may do other work
    meanwhile. to_thread first passes a checkpoint (its capacity limiter), which lets every task
    made runnable meanwhile run before the thread is even asked to start, a few ms per group
    commit under load. Only the writer uses this, one thread at a time, so it needs no limiter.
    """

    def __init__(self, fn: Callable[..., Any], *args: Any):
        super().__init__()
        token = trio.lowlevel.current_trio_token()

        def deliver(result: Any) -> None:  # in the worker thread
            token.run_sync_soon(self._arrived, result)

        trio.lowlevel.start_thread_soon(lambda: fn(*args), deliver, name="orderlog writer")


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
