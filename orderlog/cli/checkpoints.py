"""`orderlog keygen` and `orderlog checkpoint`, and the checkpoint flags of `orderlog verify`.

A checkpoint (orderlog/checkpoint.py) anchors the hash chain outside the shop: signed with a
private key the shop holds, kept by someone the shop does not control, checked later with the
public key. The private key is read like the JWT secret (`files.read_private`): only from a file
this user alone controls.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Sequence

from .. import checkpoint
from ..checkpoint import BadCheckpoint, BadKey, Checkpoint
from ..store import open_store
from ..store import checkpoints as stored
from . import UsageError, db_path
from .files import UntrustedFile, read_private, write_private

PUBLIC_SUFFIX = ".pub"


def load_private_key(path: str, flag: str = "--key"):
    """The Ed25519 signing key in `path`; UsageError (one line) if missing, untrusted or not one."""
    try:
        return checkpoint.private_key(read_private(path))
    except UntrustedFile as exc:
        raise UsageError(f"refusing the checkpoint key: {exc}") from None
    except FileNotFoundError:
        raise UsageError(f"{flag} {path}: no such file (create a key pair with `orderlog keygen --key {path}`)") from None
    except OSError as exc:
        raise UsageError(f"{flag} {path}: {exc.strerror}") from None
    except BadKey as exc:
        raise UsageError(f"{flag} {path}: {exc}") from None


def load_public_key(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return checkpoint.public_key(f.read())
    except OSError as exc:
        raise UsageError(f"--public-key {path}: {exc.strerror}") from None
    except (BadKey, UnicodeDecodeError) as exc:
        raise UsageError(f"--public-key {path}: {exc}") from None


def verified_checkpoints(args: argparse.Namespace) -> list[Checkpoint]:
    """The checkpoints given to `verify`, signatures checked; UsageError for a flag misuse,
    BadCheckpoint (the audit fails) for one that does not verify."""
    tokens: Sequence[str] = args.checkpoint or ()
    if tokens and not args.public_key:
        raise UsageError("--checkpoint needs --public-key FILE (the PEM public key of the signer)")
    if args.public_key and not tokens:
        raise UsageError("--public-key goes with --checkpoint JWS")
    if not tokens:
        return []
    key = load_public_key(args.public_key)
    found = []
    for number, token in enumerate(tokens, 1):
        try:
            found.append(checkpoint.verify(token, key))
        except BadCheckpoint as exc:
            which = f"checkpoint {number}" if len(tokens) > 1 else "the checkpoint"
            raise BadCheckpoint(f"{which}: {exc}") from None
    return sorted(found, key=lambda c: c.seq)


def describe(points: Sequence[Checkpoint]) -> str:
    """What the checkpoints that held attest, for verify's summary line."""
    newest = points[-1]
    signed = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(newest.iat))
    more = f" and {len(points) - 1} earlier" if len(points) > 1 else ""
    return f"checkpoint seq {newest.seq:,} (signed {signed}){more} held, and the chain extends it to the head"


# -- keygen and checkpoint -----------------------------------------------------------------------


def cmd_keygen(args: argparse.Namespace) -> int:
    """`orderlog keygen --key FILE`: write FILE (private) and FILE.pub (public), both 0600."""
    private_path, public_path = args.key, args.key + PUBLIC_SUFFIX
    for path in (private_path, public_path):
        if os.path.lexists(path):
            raise UsageError(f"{path} exists; keygen never overwrites a key (move it away first)")
    private_pem, public_pem = checkpoint.new_key_pair()
    try:
        write_private(private_path, private_pem)
        write_private(public_path, public_pem)
    except FileExistsError as exc:
        raise UsageError(f"{exc.filename} appeared meanwhile; keygen never overwrites a key") from None
    except OSError as exc:
        raise UsageError(f"cannot write {exc.filename}: {exc.strerror}") from None
    print(f"wrote {private_path} (Ed25519 private key: `orderlog serve --checkpoint-key {private_path}`, "
          f"`orderlog checkpoint --key {private_path}`)")
    print(f"wrote {public_path} (public key: give it to the auditors, for `orderlog verify --public-key`)")
    return 0


def cmd_checkpoint(args: argparse.Namespace) -> int:
    """`orderlog checkpoint --key FILE`: print a signed checkpoint of the log's head."""
    key = load_private_key(args.key)
    path = db_path(args)
    store = open_store(path, readonly=True)
    try:
        seq, hash_ = stored.head(store)
        log_id = store.log_id
    finally:
        store.close()
    if hash_ is None:
        raise UsageError(f"{path}: the log is empty; there is nothing to checkpoint yet")
    print(checkpoint.sign(Checkpoint(log_id, seq, hash_, int(time.time())), key))
    return 0


def register(subparsers: "argparse._SubParsersAction", db: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser(
        "keygen", help="write an Ed25519 key pair for signed checkpoints",
        description="Write a new Ed25519 key pair: the private key to FILE and the public key to FILE.pub, "
        "both mode 0600. The server signs checkpoints with the private key (serve --checkpoint-key); "
        "auditors check them with the public key (verify --public-key). Never overwrites a file.",
    )
    p.add_argument("--key", required=True, metavar="FILE", help="where to write the private key (FILE.pub: the public one)")
    p.set_defaults(func=cmd_keygen)

    p = subparsers.add_parser(
        "checkpoint", parents=[db], help="print a signed checkpoint of the log's head (a compact JWS)",
        description="Sign {log_id, seq, hash, iat} of the log's newest event with the Ed25519 private key and "
        "print the compact JWS. Keep it somewhere the shop cannot write; `orderlog verify --checkpoint JWS "
        "--public-key FILE.pub` later proves the log still holds that event and extends it. Opens the "
        "database read-only, so it may run next to a server.",
    )
    p.add_argument("--key", required=True, metavar="FILE", help="the private key (from `orderlog keygen`; mode 0600)")
    p.set_defaults(func=cmd_checkpoint)
