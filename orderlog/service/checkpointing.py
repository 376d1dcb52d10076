"""`serve --checkpoint-key`: a signed checkpoint of the log every N events (orderlog/checkpoint.py).

The writer calls `Checkpointer.after_commit` in its worker thread, right after each commit: the
checkpoint of the new head is signed and appended to DB.checkpoints when N events or more were
appended since the last one. `GET /v1/checkpoint` serves the newest (`latest`, a str assigned
whole, so the trio thread reads it without a lock). At start the newest kept one is served again
only if it verifies with this key and names this log (the file is not trusted otherwise).
"""

from __future__ import annotations

import logging
import time

from ..checkpoint import BadCheckpoint, Checkpoint, sign, verify
from ..feed import FeedEvent
from ..store import Store, Unavailable
from ..store import checkpoints as stored

log = logging.getLogger("orderlog")


class Checkpointer:
    def __init__(self, store: Store, key, every: int):
        self.key = key
        self.every = every
        self.log_id = store.log_id
        self.db = store.path
        self.signed_seq, self.latest = 0, None
        kept = stored.latest(self.db)
        if kept is not None:
            try:
                point = verify(kept[1], key.public_key())
            except BadCheckpoint as exc:
                log.warning("event=checkpoint.ignored path=%s reason=%r", stored.checkpoints_path(self.db), str(exc))
                return
            if point.log_id == self.log_id and point.seq == kept[0]:
                self.signed_seq, self.latest = point.seq, kept[1]

    def after_commit(self, events: list[FeedEvent]) -> None:
        """Sign and keep a checkpoint of the last of `events` if it is `every` past the last one.
        Never raises for a write that fails: the commit it follows stands (the next one retries)."""
        if not events or events[-1].seq - self.signed_seq < self.every:
            return
        last = events[-1]
        jws = sign(Checkpoint(self.log_id, last.seq, last.hash, int(time.time())), self.key)
        try:
            stored.save(self.db, last.seq, jws)
        except Unavailable as exc:
            log.error("event=checkpoint.failed seq=%d reason=%r", last.seq, str(exc))
            return
        self.signed_seq, self.latest = last.seq, jws
        log.info("event=checkpoint.signed seq=%d", last.seq)
