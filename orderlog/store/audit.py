"""The auditor's checks: the hash chain, seq and version continuity, projections == fold.

Theory of operation. `check_chain` is pure: it walks events in seq order and recomputes
what docs/protocol.md section 5 promises (seq 1, 2, 3 ... without gaps; per-stream versions 1,
2, 3 ...; `hash = sha256(prev_hash + canonical(event))` with 32 zero bytes before seq 1)
and stops at the FIRST event that breaks a promise, naming its seq and what is wrong.
`compare_projections` is pure too: it names the first order or sku whose stored projection
differs from a fresh fold of the log. `verify_store` runs both over one read snapshot of a
store (SQLite or PostgreSQL: only the store's public methods are used here), so a writer
appending meanwhile cannot make a sound log look broken.
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable, Iterable, Iterator, Sequence

import attrs

from ..canonical import ZERO_HASH, event_from_json, event_hash
from ..checkpoint import Checkpoint
from ..domain import Event, State
from .log import Store

Progress = Callable[[int, int], None]
PROGRESS_EVERY = 10_000  # events between progress calls
HASH_RE = re.compile(r"^[0-9a-f]{64}\Z")


class CorruptRow(Exception):
    """A stored event row that is not even an event (its data is not JSON, say)."""

    def __init__(self, seq: Any, reason: str, where: str | None = None):
        super().__init__(f"{where or f'seq {seq}'}: {reason}")
        self.seq = seq


@attrs.frozen
class ChainReport:
    """What `check_chain` found: how far the chain holds, and the first problem if any."""

    count: int  # events checked and found sound
    last_seq: int  # seq of the last sound event (0 if none)
    last_hash: str  # its hash ("" if none)
    problem: str | None = None


def check_chain(events: Iterable[Event], progress: Progress | None = None, total: int = 0,
                checkpoints: Sequence[Checkpoint] = ()) -> ChainReport:
    """Recompute the hash chain and check seq and version continuity; stop at the first problem.

    `events` must come in stored order (by seq). Problems read like
    "seq 17: hash mismatch (data or fields changed)" or "seq 40: gap, expected seq 39".
    The iterable may raise `CorruptRow`, which is reported as the problem.

    Each of `checkpoints` (signed elsewhere, already verified) must find its event with exactly
    its hash: a history rewritten before it, hashes recomputed, fails at the checkpoint's seq,
    the first seq known to differ (with the range the change lies in when an earlier
    checkpoint still matches).
    """
    try:
        attested = _attested(checkpoints)
    except ValueError as exc:
        return ChainReport(0, 0, "", str(exc))
    matched = 0  # the newest checkpoint seq found intact
    prev_hash = ZERO_HASH
    last_hash = ""
    expected = 1
    versions: dict[str, int] = {}
    count = 0

    def report(problem: str | None) -> ChainReport:
        return ChainReport(count, expected - 1, last_hash, problem)

    try:
        for event in events:
            seq = event.seq
            if seq != expected:
                if isinstance(seq, int) and seq > expected:
                    return report(f"seq {seq}: gap, expected seq {expected}")
                return report(f"seq {seq}: out of order, expected seq {expected}")
            want = versions.get(event.stream, 0) + 1
            if event.version != want:
                return report(f"seq {seq}: {event.stream} has version {event.version}, expected version {want}")
            if not isinstance(event.hash, str) or not HASH_RE.match(event.hash):
                return report(f"seq {seq}: malformed hash {event.hash!r}")
            try:
                recomputed = event_hash(prev_hash, event)
            except (TypeError, ValueError) as exc:
                return report(f"seq {seq}: cannot hash the event ({exc})")
            if recomputed != event.hash:
                return report(f"seq {seq}: hash mismatch (data or fields changed)")
            signed = attested.get(seq)
            if signed is not None:
                if signed != event.hash:
                    return report(_rewritten(seq, event.hash, signed, matched))
                matched = seq
            versions[event.stream] = want
            prev_hash = bytes.fromhex(event.hash)
            last_hash = event.hash
            expected += 1
            count += 1
            if progress is not None and count % PROGRESS_EVERY == 0:
                progress(count, total)
    except CorruptRow as bad:
        return report(str(bad))
    if progress is not None:
        progress(count, total)
    beyond = [seq for seq in sorted(attested) if seq >= expected]
    if beyond:
        return report(f"seq {beyond[0]}: signed in a checkpoint but not in the log, which ends at seq "
                      f"{expected - 1} (truncated, or another log)")
    return report(None)


def _attested(checkpoints: Sequence[Checkpoint]) -> dict[int, str]:
    """seq -> hash over the checkpoints; two that disagree on one seq cannot both hold."""
    attested: dict[int, str] = {}
    for point in checkpoints:
        if attested.setdefault(point.seq, point.hash) != point.hash:
            raise ValueError(f"two checkpoints sign different hashes for seq {point.seq}: the signing key "
                             "signed two histories")
    return attested


def _rewritten(seq: int, have: str, signed: str, matched: int) -> str:
    where = (f"the change is in seq {matched + 1}..{seq} (seq {matched} still matches its checkpoint)" if matched
             else f"the change is in seq 1..{seq}")
    return (f"seq {seq}: hash {have[:16]}... differs from the signed checkpoint's {signed[:16]}...: the history "
            f"up to seq {seq} was rewritten and rehashed; {where}")


def compare_projections(stored: State, folded: State) -> str | None:
    """Name the first order (then sku), by key, whose stored projection differs from the fold."""
    for kind, have, want in (("order", stored.orders, folded.orders), ("sku", stored.stock, folded.stock)):
        if have == want:
            continue
        for key in sorted(set(have) | set(want)):
            a, b = have.get(key), want.get(key)
            if a == b:
                continue
            if a is None:
                return f"{kind} {key}: in the log but missing from the projections"
            if b is None:
                return f"{kind} {key}: in the projections but not in the log"
            for field in attrs.fields(type(a)):
                x, y = getattr(a, field.name), getattr(b, field.name)
                if x != y:
                    return f"{kind} {key}: projection has {field.name}={x!r}, the log says {y!r}"
    return None


@attrs.frozen
class VerifyResult:
    """The outcome of `verify_store`: ok, or the first problem found."""

    ok: bool
    events: int
    head: int
    last_hash: str
    orders: int = 0
    skus: int = 0
    problem: str | None = None


def stored_events(store: Store) -> Iterator[Event]:
    """Every stored event row as an Event, in seq order; `CorruptRow` for a row that is not one."""
    for row in store.iter_event_rows():
        seq, stream, version, type_, at, actor, command_id, data, hash_ = row
        try:
            decoded = json.loads(data)
        except (TypeError, ValueError):
            raise CorruptRow(seq, "data is not valid JSON") from None
        yield Event(seq, stream, version, type_, at, actor, command_id, decoded, hash_)


def exported_events(lines: Iterable[str]) -> Iterator[Event]:
    """The events of a JSONL export (`orderlog events --format jsonl`), in file order;
    `CorruptRow` naming the line for one that is not an EVENT object."""
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield event_from_json(json.loads(line))
        except ValueError as exc:
            raise CorruptRow(None, f"not an EVENT object ({exc})", where=f"line {number}") from None


def verify_store(
    store: Store,
    chain_progress: Progress | None = None,
    fold_progress: Progress | None = None,
    checkpoints: Sequence[Checkpoint] = (),
) -> VerifyResult:
    """Check the whole log and the projections of `store` within one read snapshot, and that
    the log holds every one of `checkpoints` (verified signatures) and extends it."""
    for point in checkpoints:
        if point.log_id != store.log_id:
            return VerifyResult(False, 0, store.head(), "", problem=(
                f"the checkpoint of seq {point.seq} is of log {point.log_id}, this is log {store.log_id} "
                "(another log, or its log_id was changed)"))
    with store.read_snapshot():  # one snapshot for every read below (readers never block the writer)
        head = store.head()
        chain = check_chain(stored_events(store), chain_progress, head, checkpoints)
        if chain.problem is not None:
            return VerifyResult(False, chain.count, head, chain.last_hash, problem=chain.problem)
        try:
            folded, _ = store.fold_log(fold_progress)
        except Exception as exc:  # a chained but nonsensical log (a hand-made file, say)
            return VerifyResult(False, chain.count, head, chain.last_hash, problem=f"the log does not fold: {exc}")
        stored = store.stored_projections()
        problem = compare_projections(stored, folded)
        if problem is not None:
            projected = store.projection_seq()
            if projected != head:
                problem += f" (projections are folded up to seq {projected}, the log ends at {head})"
            problem += "; `orderlog rebuild` recomputes them"
        return VerifyResult(problem is None, chain.count, head, chain.last_hash,
                            len(folded.orders), len(folded.stock), problem)


def stats(store: Store) -> dict[str, Any]:
    """Counts an operator wants at a glance: head, events by type, orders by status, sizes."""
    with store.read_snapshot():
        head = store.head()
        schema = store.schema_version()
        projection_seq = store.projection_seq()
        counts = store.counts()
    return {
        "path": store.path,
        "log_id": store.log_id,
        "head": head,
        "schema_version": schema,
        "projection_seq": projection_seq,
        "events_by_type": counts["events_by_type"],
        "orders": sum(counts["orders_by_status"].values()),
        "orders_by_status": counts["orders_by_status"],
        "stock": counts["stock"],
        "file": counts["file"],
    }
