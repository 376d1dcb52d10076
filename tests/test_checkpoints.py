"""Signed checkpoints through the command line: keygen, checkpoint, verify --checkpoint.

The point of a checkpoint: whoever can write the SQLite file can rewrite history and recompute
every hash after the change, and plain `verify` passes; `verify --checkpoint` must not.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import stat
from pathlib import Path

import attrs
import pytest
from hypothesis import given, settings, strategies as st

from orderlog import checkpoint
from orderlog.canonical import ZERO_HASH, event_hash
from orderlog.domain import Event
from orderlog.store.audit import check_chain
from test_audit import SOUND
from test_cli import assert_one_line_error


@pytest.fixture
def keys(cli, tmp_path) -> tuple[Path, Path]:
    done = cli("keygen", "--key", "signer.key")
    assert done.returncode == 0, done.stderr
    return tmp_path / "signer.key", tmp_path / "signer.key.pub"


def sign(cli, db, key) -> str:
    done = cli("checkpoint", "--db", db, "--key", key)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def verify(cli, *args):
    return cli("verify", *map(str, args))


def rewrite(db: Path, seq: int, command_id: str) -> None:
    """What an attacker with the file does: change event `seq` (its command_id, which no
    projection shows), then recompute every hash from there on, so that the chain holds."""
    conn = sqlite3.connect(db)
    try:
        conn.execute("DROP TRIGGER events_append_only_update")
        rows = conn.execute("SELECT seq, stream, version, type, at, actor, command_id, data FROM events "
                            "ORDER BY seq").fetchall()
        prev = ZERO_HASH
        for row in rows:
            event = Event(*row[:7], json.loads(row[7]))
            if event.seq == seq:
                event = attrs.evolve(event, command_id=command_id)
            hash_ = event_hash(prev, event)
            if event.seq >= seq:
                conn.execute("UPDATE events SET command_id = ?, hash = ? WHERE seq = ?", (event.command_id, hash_, event.seq))
            prev = bytes.fromhex(hash_)
        conn.commit()
    finally:
        conn.close()


def test_keygen_writes_a_0600_pair_and_never_overwrites(cli, tmp_path, keys):
    """keygen writes FILE and FILE.pub, mode 0600, PEM Ed25519; a second run refuses to overwrite."""
    private, public = keys
    for path in keys:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    checkpoint.private_key(private.read_text())
    checkpoint.public_key(public.read_text())
    before = private.read_bytes()
    assert_one_line_error(cli("keygen", "--key", "signer.key"), "signer.key exists", "never overwrites")
    assert private.read_bytes() == before


def test_a_rewritten_history_passes_verify_but_fails_against_the_checkpoint(cli, seeded_db, keys, tmp_path):
    """A history rewritten and rehashed before a checkpoint passes plain verify, and fails
    verify --checkpoint (on the file and on its export) naming the checkpoint's seq; an earlier
    checkpoint that still holds narrows where the change lies."""
    private, public = keys
    shutil.copy(seeded_db, tmp_path / "early.db")
    early = sign(cli, tmp_path / "early.db", private)  # the head of the template: every event
    head = checkpoint.parse_payload(_payload(early)).seq
    assert verify(cli, "--db", seeded_db, "--checkpoint", early, "--public-key", public).returncode == 0

    rewrite(seeded_db, head - 5, "rewritten-command")
    plain = verify(cli, "--db", seeded_db)
    assert plain.returncode == 0, plain.stdout  # the chain alone proves nothing
    failed = verify(cli, "--db", seeded_db, "--checkpoint", early, "--public-key", public)
    assert failed.returncode == 1
    assert f"FAILED {seeded_db}: seq {head}: hash" in failed.stdout
    assert f"differs from the signed checkpoint" in failed.stdout and f"seq 1..{head}" in failed.stdout
    assert f"seq 1..{head - 1} are sound" in failed.stdout

    # With a checkpoint signed before the change too: the change is between the two.
    shutil.copy(tmp_path / "early.db", tmp_path / "earlier.db")  # the same log, cut at seq head-10
    conn = sqlite3.connect(tmp_path / "earlier.db")
    conn.execute("DROP TRIGGER events_append_only_delete")
    conn.execute("DELETE FROM events WHERE seq > ?", (head - 10,))
    conn.commit()
    conn.close()
    older = sign(cli, tmp_path / "earlier.db", private)
    failed = verify(cli, "--db", seeded_db, "--checkpoint", early, "--checkpoint", older, "--public-key", public)
    assert failed.returncode == 1
    assert f"the change is in seq {head - 9}..{head} (seq {head - 10} still matches its checkpoint)" in failed.stdout

    export = tmp_path / "export.jsonl"
    done = cli("events", "--db", seeded_db)
    export.write_text(done.stdout, encoding="utf-8")
    assert verify(cli, "--export", export).returncode == 0
    failed = verify(cli, "--export", export, "--checkpoint", early, "--public-key", public)
    assert failed.returncode == 1 and f"seq {head}: hash" in failed.stdout


def _payload(jws: str) -> bytes:
    import base64

    part = jws.split(".")[1]
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def test_verify_passes_on_the_log_and_its_export_and_reports_the_checkpoint(cli, seeded_db, keys, tmp_path):
    """A sound log holding the checkpoint passes, on the file and on its JSONL export, and says so."""
    private, public = keys
    jws = sign(cli, seeded_db, private)
    done = verify(cli, "--db", seeded_db, "--checkpoint", jws, "--public-key", public)
    assert done.returncode == 0, done.stdout
    assert "held, and the chain extends it to the head" in done.stdout
    export = tmp_path / "export.jsonl"
    export.write_text(cli("events", "--db", seeded_db).stdout, encoding="utf-8")
    done = verify(cli, "--export", export, "--checkpoint", jws, "--public-key", public)
    assert done.returncode == 0, done.stdout
    assert "held" in done.stdout and "the checkpoints are of log" in done.stdout


def test_verify_fails_on_a_truncated_log_another_log_another_key(cli, seeded_db, keys, tmp_path):
    """A checkpoint beyond the head, of another log_id, or signed by another key fails the audit (exit 1)."""
    private, public = keys
    jws = sign(cli, seeded_db, private)
    head = checkpoint.parse_payload(_payload(jws)).seq
    truncated = tmp_path / "truncated.db"
    shutil.copy(seeded_db, truncated)
    conn = sqlite3.connect(truncated)
    conn.execute("DROP TRIGGER events_append_only_delete")
    conn.execute("DELETE FROM events WHERE seq > 10")
    conn.commit()
    conn.close()
    done = verify(cli, "--db", truncated, "--checkpoint", jws, "--public-key", public)
    assert done.returncode == 1
    assert f"seq {head}: signed in a checkpoint but not in the log, which ends at seq 10" in done.stdout

    assert cli("migrate", "--db", "other.db").returncode == 0
    done = verify(cli, "--db", "other.db", "--checkpoint", jws, "--public-key", public)
    assert done.returncode == 1 and "is of log" in done.stdout

    assert cli("keygen", "--key", "other.key").returncode == 0
    done = verify(cli, "--db", seeded_db, "--checkpoint", jws, "--public-key", "other.key.pub")
    assert done.returncode == 1 and "signature does not verify with this public key" in done.stdout
    forged = jws.rsplit(".", 1)[0] + "." + "A" * 86
    done = verify(cli, "--db", seeded_db, "--checkpoint", forged, "--public-key", public)
    assert done.returncode == 1 and "signature does not verify" in done.stdout


def test_checkpoint_and_verify_flag_errors_are_one_line(cli, db_path, keys, tmp_path):
    """Misused flags, an empty log, a bad key file or export: one line, exit 2, no traceback."""
    private, public = keys
    assert cli("migrate", "--db", db_path).returncode == 0
    assert_one_line_error(cli("checkpoint", "--db", db_path, "--key", private), "the log is empty")
    assert_one_line_error(cli("checkpoint", "--db", db_path, "--key", "missing.key"), "no such file", "keygen")
    assert_one_line_error(cli("checkpoint", "--db", db_path, "--key", public), "not an unencrypted PEM private key")
    private.chmod(0o640)
    assert_one_line_error(cli("checkpoint", "--db", db_path, "--key", private), "refusing the checkpoint key",
                          "mode 0640")
    assert_one_line_error(cli("verify", "--db", db_path, "--checkpoint", "a.b.c"), "needs --public-key")
    assert_one_line_error(cli("verify", "--db", db_path, "--public-key", public), "goes with --checkpoint")
    assert_one_line_error(cli("verify", "--db", db_path, "--checkpoint", "a.b.c", "--public-key", private),
                          "--public-key", "not a PEM public key")
    assert_one_line_error(cli("verify", "--export", "missing.jsonl"), "--export missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"type":"x"}\n')
    done = verify(cli, "--export", bad)
    assert done.returncode == 1 and "line 1: not an EVENT object" in done.stdout


# -- the pure parts ------------------------------------------------------------------------------

PAIR = checkpoint.new_key_pair()
PRIVATE, PUBLIC = checkpoint.private_key(PAIR[0]), checkpoint.public_key(PAIR[1])


@settings(max_examples=50, deadline=None)
@given(log_id=st.text(min_size=1, max_size=40), seq=st.integers(1, 2**62), iat=st.integers(0, 2**40),
       hash_=st.binary(min_size=32, max_size=32))
def test_sign_then_verify_gives_the_checkpoint_back(log_id, seq, iat, hash_):
    """Any checkpoint signed with the private key verifies with the public key to the same values."""
    point = checkpoint.Checkpoint(log_id, seq, hash_.hex(), iat)
    assert checkpoint.verify(checkpoint.sign(point, PRIVATE), PUBLIC) == point


@settings(max_examples=50, deadline=None)
@given(position=st.integers(0, 200), char=st.sampled_from("AQgw_-"))
def test_any_changed_character_fails_verification(position, char):
    """Changing any one character of a checkpoint makes it fail (never a crash, never another checkpoint)."""
    jws = checkpoint.sign(checkpoint.Checkpoint("log", 7, "ab" * 32, 1), PRIVATE)
    position %= len(jws)
    if jws[position] in ".":
        return
    changed = jws[:position] + (char if jws[position] != char else "B") + jws[position + 1:]
    try:
        got = checkpoint.verify(changed, PUBLIC)
    except checkpoint.BadCheckpoint:
        return
    # base64url's last character carries spare bits: a change there may decode to the same bytes.
    assert got == checkpoint.Checkpoint("log", 7, "ab" * 32, 1)


def test_verify_refuses_other_algorithms_and_payloads():
    """An HS256 token, a JWS with none, or a payload with other keys is not a checkpoint."""
    import jwt

    hs = jwt.encode({"log_id": "l", "seq": 1, "hash": "ab" * 32, "iat": 1}, "k" * 32, algorithm="HS256")
    with pytest.raises(checkpoint.BadCheckpoint, match="EdDSA"):
        checkpoint.verify(hs, PUBLIC)
    none = jwt.encode({"log_id": "l", "seq": 1, "hash": "ab" * 32, "iat": 1}, None, algorithm="none")
    with pytest.raises(checkpoint.BadCheckpoint):
        checkpoint.verify(none, PUBLIC)
    extra = jwt.api_jws.encode(json.dumps({"log_id": "l", "seq": 1, "hash": "ab" * 32, "iat": 1, "x": 1}).encode(),
                               PRIVATE, algorithm="EdDSA")
    with pytest.raises(checkpoint.BadCheckpoint, match="exactly"):
        checkpoint.verify(extra, PUBLIC)
    for bad in (None, "", "abc", "a.b.c", "x" * 5000):
        with pytest.raises(checkpoint.BadCheckpoint):
            checkpoint.verify(bad, PUBLIC)


def test_check_chain_against_checkpoints():
    """check_chain fails at a checkpoint whose hash the log does not have, or beyond its end."""
    point = lambda seq, hash_: checkpoint.Checkpoint("l", seq, hash_, 0)  # noqa: E731
    assert check_chain(SOUND, checkpoints=[point(2, SOUND[1].hash), point(4, SOUND[3].hash)]).problem is None
    report = check_chain(SOUND, checkpoints=[point(2, SOUND[1].hash), point(4, "0" * 64)])
    assert report.problem.startswith("seq 4: hash") and "seq 3..4 (seq 2 still matches" in report.problem
    assert (report.count, report.last_seq) == (3, 3)
    assert check_chain(SOUND, checkpoints=[point(5, "0" * 64)]).problem.startswith("seq 5: signed in a checkpoint")
    assert "two histories" in check_chain(SOUND, checkpoints=[point(2, "0" * 64), point(2, "1" * 64)]).problem
