"""Shared fixtures: a database path in tmp_path, a runner for the real `orderlog` command, and
Debian's chromium for the browser tests (installed with apt-get on first use when missing)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterator

import pytest

import frameschema

REPO = Path(__file__).resolve().parents[1]


def cli_env(**extra: str) -> dict[str, str]:
    """The environment for a CLI subprocess: this checkout importable, no ORDERLOG_DB leaking in."""
    env = {k: v for k, v in os.environ.items() if k != "ORDERLOG_DB"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


@pytest.fixture(autouse=True)
def frames_conform_to_asyncapi() -> Iterator[None]:
    """Every frame a test read through tests/wsclient.py conforms to docs/asyncapi.yaml (checked
    when the test ends, so that checking never slows the test itself)."""
    frameschema.check_recorded()  # what a module or session fixture read before this test
    yield
    frameschema.check_recorded()


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


CHROMIUM = "/usr/bin/chromium"
CHROMIUM_PACKAGE = "chromium"  # Debian's; Playwright's own browser download cannot work on this machine kind
APT_TIMEOUT = 900  # seconds for `apt-get update` and the install together (about 1 to 3 min here)


@pytest.fixture(scope="session")
def chromium(pytestconfig: pytest.Config) -> str:
    """The path of Debian's chromium; when it is missing, `apt-get install chromium` (as root).

    So that the README's one test command works on a fresh machine of this kind: only the tests
    that use a browser pay for the install, once. Not root, or no apt-get: the test fails with
    what to run, never skips.
    """
    if not os.access(CHROMIUM, os.X_OK):
        _install_chromium(pytestconfig)
    return CHROMIUM


def _install_chromium(pytestconfig: pytest.Config) -> None:
    apt_get = shutil.which("apt-get")
    if apt_get is None or os.geteuid() != 0:
        pytest.fail(f"the browser tests need Debian's {CHROMIUM_PACKAGE} at {CHROMIUM}; the test suite installs it "
                    f"itself when it runs as root on a machine with apt-get. Here, run once: "
                    f"sudo apt-get update && sudo apt-get install -y {CHROMIUM_PACKAGE}", pytrace=False)
    reporter = pytestconfig.pluginmanager.get_plugin("terminalreporter")
    capture = pytestconfig.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():  # said on the terminal now, not in a captured section
            reporter.write_line(f"conftest: {CHROMIUM} is missing: apt-get install {CHROMIUM_PACKAGE} "
                                "(once, 1 to 3 min)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    lock = ["-o", "DPkg::Lock::Timeout=300"]  # another apt-get may hold the lock for a while
    try:
        for step in ([apt_get, *lock, "update"], [apt_get, *lock, "install", "-y", CHROMIUM_PACKAGE]):
            done = subprocess.run(step, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                  timeout=APT_TIMEOUT)
            if done.returncode != 0:
                pytest.fail(f"`{' '.join(step)}` failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}",
                            pytrace=False)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"`{' '.join(exc.cmd)}` took more than {APT_TIMEOUT} s", pytrace=False)
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"apt-get installed {CHROMIUM_PACKAGE} but {CHROMIUM} is still missing (a damaged install? "
                    f"apt-get install --reinstall {CHROMIUM_PACKAGE})", pytrace=False)
