"""The package's folders are its layers, and the import contracts in pyproject.toml say so:
these tests run import-linter on the tree, show that a planted violation is caught, and check
that the auditor's commands load no server code."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def lint(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    code = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(no_cache=True))"
    return subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=120)


def test_the_import_contracts_hold():
    done = lint(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


def test_a_core_module_that_imports_the_store_breaks_the_contract(tmp_path):
    for name in ("orderlog", "orderlog_bench"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    domain = tmp_path / "orderlog" / "domain.py"
    domain.write_text(domain.read_text() + "\nfrom orderlog.store import Store  # planted\n")
    done = lint(tmp_path)
    assert done.returncode != 0, done.stdout
    assert "orderlog.domain -> orderlog.store" in done.stdout
    assert "BROKEN" in done.stdout


def test_the_auditors_commands_load_no_server_code(tmp_path):
    db = tmp_path / "a.db"
    code = (
        "import sys; from orderlog.cli import main\n"
        f"assert main(['migrate', '--db', {str(db)!r}]) == 0\n"
        f"assert main(['verify', '--db', {str(db)!r}]) == 0\n"
        f"assert main(['events', '--db', {str(db)!r}]) == 0\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('trio', 'trio_websocket', 'wsproto', 'prometheus_client', 'orderlog_bench') or m.startswith('orderlog.service.server'))\n"
        "print('LOADED', loaded)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "LOADED []" in done.stdout, done.stdout
