"""`orderlog bench`: load scenarios over real sockets (filled in by the speed work)."""

from __future__ import annotations

import argparse


def register(subparsers: "argparse._SubParsersAction") -> None:
    """Add `orderlog bench` to the CLI (nothing yet)."""
