"""The log's head hash, and the signed checkpoints kept next to the database (`DB.checkpoints`).

The checkpoints file holds one JSON object per line, `{"seq": N, "checkpoint": JWS}`, appended
by `serve --checkpoint-key` (mode 0600, never through a symbolic link). It is a convenience (the
newest survives a restart, and an operator can hand the whole file to an auditor): a checkpoint
proves something only in a copy kept out of the shop's reach (docs/operations.md).

Blocking I/O: the service calls these from the writer's worker thread.
"""

from __future__ import annotations

import json
import os

from .log import Store, Unavailable

CHECKPOINTS_SUFFIX = ".checkpoints"
TAIL_BYTES = 64 * 1024  # how much of the file's end `latest` reads (a line is about 350 bytes)


def head(store: Store) -> tuple[int, str | None]:
    """(seq, hash) of the newest committed event; (0, None) for an empty log."""
    return store.last_event()


def checkpoints_path(db: str) -> str:
    return db + CHECKPOINTS_SUFFIX


def save(db: str, seq: int, jws: str) -> None:
    """Append the checkpoint of `seq` to DB.checkpoints, durably; Unavailable if it cannot be written."""
    line = json.dumps({"seq": seq, "checkpoint": jws}, separators=(",", ":")) + "\n"
    try:
        fd = os.open(checkpoints_path(db), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise Unavailable(f"{checkpoints_path(db)}: {exc.strerror}") from None


def latest(db: str) -> tuple[int, str] | None:
    """(seq, jws) of the last well-formed line of DB.checkpoints, if any (its signature unchecked)."""
    try:
        fd = os.open(checkpoints_path(db), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        size = os.fstat(fd).st_size
        os.lseek(fd, max(0, size - TAIL_BYTES), os.SEEK_SET)
        tail = os.read(fd, TAIL_BYTES)
    except OSError:
        return None
    finally:
        os.close(fd)
    for line in reversed(tail.splitlines()):
        try:
            entry = json.loads(line)
            seq, jws = entry["seq"], entry["checkpoint"]
        except (ValueError, TypeError, KeyError):
            continue
        if type(seq) is int and isinstance(jws, str):
            return seq, jws
    return None
