"""The service's thread hand-offs (orderlog/service/writer.py): the niced thread that reads
snapshot pages runs its jobs one at a time, in order, at BULK_NICE, and hands each result (or
exception) to the task that asked, whichever other tasks wait meanwhile."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import trio

from orderlog.service.writer import BULK_NICE, NicedThread


async def test_niced_thread_runs_jobs_in_order_at_its_nice_value_and_hands_back_results_and_errors():
    worker = NicedThread(BULK_NICE, "orderlog test")
    try:
        seen: list[tuple[int, int, int]] = []

        def job(i: int) -> int:
            tid = threading.get_native_id()
            seen.append((i, tid, os.getpriority(os.PRIO_PROCESS, tid)))
            return i * i

        results: dict[int, int] = {}

        async def ask(i: int) -> None:
            results[i] = await worker.run(job, i)

        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(ask, i)
                await trio.sleep(0)  # queued in this order
        assert results == {i: i * i for i in range(20)}
        assert [i for i, _, _ in seen] == list(range(20))  # one at a time, in order
        tids = {tid for _, tid, _ in seen}
        assert len(tids) == 1 and tids != {threading.get_native_id()}
        base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        assert {nice for _, _, nice in seen} == {min(19, base + BULK_NICE)}
        assert Path(f"/proc/self/task/{tids.pop()}/comm").read_text().strip() == "orderlog test"
        assert BULK_NICE > 0
        with pytest.raises(ZeroDivisionError):
            await worker.run(lambda: 1 // 0)
        assert await worker.run(job, 7) == 49  # still serving after a job raised
    finally:
        worker.close()
