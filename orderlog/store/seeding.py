"""`orderlog seed`: a generated, realistic history appended through the store's own command
path (`Store.execute_batch`), in big batches. Blocking: runs in the caller's thread."""

from __future__ import annotations

import gc
import time
from datetime import datetime, timedelta, timezone
from typing import Callable

import attrs

from ..canonical import format_time, parse_time
from ..records import Filter
from ..domain import Rejected
from ..seed import CATALOG, SeedGenerator, history_times
from .log import Store

DEFAULT_SEED_BATCH = 10_000  # commands per transaction while seeding (a bulk load: fewer, bigger commits)


@attrs.define
class SeedReport:
    """What a seed run did."""

    commands: int = 0
    accepted: int = 0
    rejected: dict[str, int] = attrs.Factory(dict)
    surprises: int = 0
    events: int = 0
    head: int = 0
    seconds: float = 0.0

    @property
    def rate(self) -> float:
        return self.commands / self.seconds if self.seconds > 0 else 0.0


class SeedError(Exception):
    """The seed cannot write the history it was asked for (one line, nothing written)."""


def run_seed(store: Store, commands: int, seed: int, batch: int,
             progress: Callable[[int, int], None] | None = None,
             days: float = 0.0, until: datetime | None = None) -> SeedReport:
    """Send `commands` generated commands through `Store.execute_batch`, `batch` at a time. Their
    `at` spread evenly over the `days` before `until` (default now), starting no earlier than the
    log's newest event, so `at` never goes back; `days=0` stamps each batch with the time it is sent.
    SeedError if `until` is before the log's newest event."""
    start_head = store.head()
    stamps = _stamps(store, start_head, commands, days, until)
    generator = SeedGenerator(seed, run=f"r{start_head}", stock=_available(store))
    report = SeedReport()
    # The cyclic garbage collector would only re-scan each batch's objects while they live
    # (about a tenth of the run): they form no cycles and are freed by reference counting.
    collecting = gc.isenabled()
    gc.disable()
    try:
        _seed_batches(store, generator, report, commands, batch, progress, stamps)
    finally:
        if collecting:
            gc.enable()
    report.head = store.head()
    report.events = report.head - start_head
    return report


def _seed_batches(store: Store, generator: SeedGenerator, report: SeedReport, commands: int, batch: int,
                  progress: Callable[[int, int], None] | None,
                  stamps: Callable[[int, int], list[str]]) -> None:
    started = time.perf_counter()
    while report.commands < commands:
        planned = generator.batch(stamps(report.commands, min(batch, commands - report.commands)))
        outcomes = store.execute_batch([p.request for p in planned]).outcomes
        for plan, outcome in zip(planned, outcomes):
            if isinstance(outcome, Rejected):
                report.rejected[outcome.code] = report.rejected.get(outcome.code, 0) + 1
            else:
                report.accepted += 1
            if not generator.observe(plan, outcome):
                report.surprises += 1
        report.commands += len(planned)
        if report.surprises:  # someone else writes too: believe the store, not the model
            generator.sync_stock(_available(store))
        if progress:
            progress(report.commands, commands)
    report.seconds = time.perf_counter() - started


def _stamps(store: Store, head: int, commands: int, days: float,
            until: datetime | None) -> Callable[[int, int], list[str]]:
    """The seed's clock: the `at` of commands `first .. first+count-1`, as `stamps(first, count)`.
    The simulated history runs from `days` before its end (`until`, or now) to its end, but starts
    no earlier than the log's newest event; an end before that event is a SeedError (a default end,
    now, before it moves up to it: a log written by a clock ahead of this one)."""
    if not days:
        return lambda first, count: [format_time(datetime.now(timezone.utc))] * count
    newest_events = store.read_events(Filter(after=head - 1), limit=1) if head else []
    newest = parse_time(newest_events[0].at) if newest_events else None
    end = until or datetime.now(timezone.utc)
    if newest and end < newest:
        if until:
            raise SeedError(f"the history cannot end at {format_time(until)}, before the log's newest "
                            f"event (seq {head}, at {newest_events[0].at}): `at` never goes back")
        end = newest
    start = max(end - timedelta(days=days), newest) if newest else end - timedelta(days=days)
    return lambda first, count: history_times(start, end, first, count, commands)


def _available(store: Store) -> dict[str, int]:
    """The available stock of the seed catalog's skus, as stored."""
    found = {}
    for sku, _, _ in CATALOG:
        stock = store.get_stock(sku)
        if stock is not None:
            found[sku] = stock.available
    return found
