"""The service's subcommands (serve, token, tail): registered into the main CLI parser."""

from __future__ import annotations

import argparse


def register(subparsers: "argparse._SubParsersAction") -> None:
    """Add the service subcommands to `orderlog`'s parser (filled in by the live-service work)."""
