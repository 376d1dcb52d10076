"""Shared fixtures: a database path in tmp_path and a runner for the real `orderlog` command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

REPO = Path(__file__).resolve().parents[1]


def cli_env(**extra: str) -> dict[str, str]:
    """The environment for a CLI subprocess: this checkout importable, no ORDERLOG_DB leaking in."""
    env = {k: v for k, v in os.environ.items() if k != "ORDERLOG_DB"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    """A database file path in tmp_path (not created)."""
    return tmp_path / "orderlog.db"


@pytest.fixture
def cli(tmp_path: Path) -> Callable[..., subprocess.CompletedProcess]:
    """Run `python -m orderlog.cli ARGS...` in tmp_path; returns the CompletedProcess (text)."""

    def run(*args: object, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "orderlog.cli", *map(str, args)],
            cwd=tmp_path,
            env=env or cli_env(),
            capture_output=True,
            text=True,
            encoding="utf-8",
            timeout=timeout,
        )

    return run


SEED_COMMANDS = 400  # small enough to keep every test fast, big enough for rejections


@pytest.fixture(scope="session")
def seeded_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A log seeded once per session (seed 7); never modified, copy it with `seeded_db`."""
    path = tmp_path_factory.mktemp("template") / "seeded.db"
    done = subprocess.run(
        [sys.executable, "-m", "orderlog.cli", "seed", "--db", str(path), "--commands", str(SEED_COMMANDS),
         "--seed", "7", "--batch", "64"],
        env=cli_env(), capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return path


@pytest.fixture
def seeded_db(seeded_template: Path, db_path: Path) -> Path:
    """A private copy of the seeded log at `db_path`, free to tamper with."""
    for suffix in ("", "-wal"):
        source = Path(str(seeded_template) + suffix)
        if source.exists():
            Path(str(db_path) + suffix).write_bytes(source.read_bytes())
    return db_path
