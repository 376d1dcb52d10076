"""The settings file of `orderlog serve` (--config FILE): precedence, --print-config and errors."""

from __future__ import annotations

import re

import signal
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import jwt
import pytest

from conftest import cli_env
from orderlog.cli import main

FILE_SECRET = "file-secret-0123456789-0123456789-abcdef"
ENV_SECRET = "env-secret-0123456789-0123456789-abcdefg"


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def printed(result: subprocess.CompletedProcess) -> dict:
    """The --print-config output, which is TOML itself."""
    assert result.returncode == 0, result.stderr
    return tomllib.loads(result.stdout)


def source_of(result: subprocess.CompletedProcess, key: str) -> str:
    """The `# where` comment of one key in the --print-config output."""
    for line in result.stdout.splitlines():
        if line.split("=", 1)[0].strip("# ").split(" ")[0] == key:
            return line.rsplit("# ", 1)[1]
    raise AssertionError(f"{key} not in:\n{result.stdout}")


def test_flags_beat_environment_beat_file_beat_defaults(cli, tmp_path: Path) -> None:
    """Each key takes the flag, else the ORDERLOG_* variable, else the file, else the default."""
    conf = write(tmp_path / "orderlog.toml", f"""
port = 9000
max_connections = 7
rate_limit = 42.5
auth_timeout = "2m"
synchronous = "normal"
log_level = "warning"
jwt_secret = "{FILE_SECRET}"
allow_origin = ["https://shop.example", "https://admin.example"]
""")
    env = cli_env(ORDERLOG_PORT="9100", ORDERLOG_MAX_CONNECTIONS="8", ORDERLOG_JWT_SECRET=ENV_SECRET)
    result = cli("serve", "--config", conf, "--port", "9200", "--print-config", env=env)
    values = printed(result)
    assert values["port"] == 9200 and source_of(result, "port") == "flag"
    assert values["max_connections"] == 8 and source_of(result, "max_connections") == "env ORDERLOG_MAX_CONNECTIONS"
    assert values["rate_limit"] == 42.5 and source_of(result, "rate_limit").startswith("file ")
    assert values["auth_timeout"] == 120.0
    assert values["synchronous"] == "NORMAL"
    assert values["log_level"] == "WARNING"
    assert values["allow_origin"] == ["https://shop.example", "https://admin.example"]
    assert values["ping_interval"] == 20.0 and source_of(result, "ping_interval") == "default"
    assert values["host"] == "127.0.0.1"
    # The secret comes from the environment, and is never shown.
    assert values["jwt_secret"] == "***" and source_of(result, "jwt_secret") == "env ORDERLOG_JWT_SECRET"
    assert ENV_SECRET not in result.stdout and FILE_SECRET not in result.stdout


def test_print_config_touches_no_file_and_masks_the_secret(cli, tmp_path: Path) -> None:
    """--print-config exits 0 without creating the database or its secret, and shows `jwt_secret = "***"`."""
    conf = write(tmp_path / "orderlog.toml", f'db = "data.db"\njwt_secret = "{FILE_SECRET}"\n')
    result = cli("serve", "--config", conf, "--print-config")
    values = printed(result)
    assert re.search(r'^jwt_secret +\= "\*\*\*"', result.stdout, re.M)  # whatever the column width
    assert values["db"] == str(tmp_path / "data.db")  # relative to the file's directory
    assert not (tmp_path / "data.db").exists()
    assert list(tmp_path.iterdir()) == [conf]
    bare = cli("serve", "--print-config")
    assert "jwt_secret" in bare.stdout and "orderlog.db.secret" in bare.stdout
    assert printed(bare)["port"] == 8765
    assert not (tmp_path / "orderlog.db").exists() and not (tmp_path / "orderlog.db.secret").exists()


def test_config_comes_from_the_environment_variable(cli, tmp_path: Path) -> None:
    """ORDERLOG_CONFIG names the file when --config is not given."""
    conf = write(tmp_path / "o.toml", "max_message_size = 1024\n")
    values = printed(cli("serve", "--print-config", env=cli_env(ORDERLOG_CONFIG=str(conf))))
    assert values["max_message_size"] == 1024


@pytest.mark.parametrize("text, message", [
    ("prot = 9000\n", "unknown key 'prot'"),
    ("max-message-size = 10\n", "did you mean 'max_message_size'"),
    ('port = "9000"\n', "port must be an integer, not a string"),
    ("port = true\n", "port must be an integer, not a boolean"),
    ("port = 70000\n", "must be a port number"),
    ("rate_limit = -1\n", "must be a number > 0"),
    ('allow_origin = "https://a.example"\n', "allow_origin must be a list of strings"),
    ("allow_origin = [1, 2]\n", "allow_origin must be a list of strings"),
    ('auth_timeout = "soon"\n', "not a duration"),
    ("[serve]\nport = 1\n", "unknown key 'serve'"),
    ("port = \n", "not valid TOML"),
])
def test_bad_file_is_one_line_and_exit_2(capsys, monkeypatch, tmp_path: Path, text: str, message: str) -> None:
    """An unknown key, a value of the wrong type or a malformed file is one error line and exit code 2."""
    monkeypatch.chdir(tmp_path)
    conf = write(tmp_path / "bad.toml", text)
    for extra in ([], ["--print-config"]):
        assert main(["serve", "--config", str(conf), *extra]) == 2
        out, err = capsys.readouterr()
        assert out == ""
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("orderlog: error: ") and str(conf) in lines[0], err
        assert message in lines[0]
    assert not (tmp_path / "orderlog.db").exists()


def test_missing_file_is_exit_2(cli, tmp_path: Path) -> None:
    """A --config file that does not exist is one error line and exit code 2."""
    result = cli("serve", "--config", tmp_path / "nope.toml")
    assert result.returncode == 2
    assert result.stderr.strip() == f"orderlog: error: {tmp_path / 'nope.toml'}: No such file or directory"


def test_serve_runs_with_the_file_and_token_signs_with_its_secret(cli, tmp_path: Path) -> None:
    """`serve --config` listens where the file says, on its database; `token --config` signs with its secret."""
    conf = write(tmp_path / "etc.toml", f'db = "served.db"\nport = 0\njwt_secret = "{FILE_SECRET}"\n')
    minted = cli("token", "--config", conf, "--sub", "alice", "--role", "staff")
    assert minted.returncode == 0, minted.stderr
    claims = jwt.decode(minted.stdout.strip(), FILE_SECRET, algorithms=["HS256"])
    assert claims["sub"] == "alice" and claims["role"] == "staff"

    proc = subprocess.Popen([sys.executable, "-m", "orderlog.cli", "serve", "--config", str(conf)], cwd=tmp_path,
                            env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    listening = threading.Event()

    def read() -> None:
        for line in proc.stderr:
            lines.append(line)
            if "event=listening" in line:
                listening.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert listening.wait(20), "".join(lines)
        assert (tmp_path / "served.db").exists()
        assert not (tmp_path / "served.db.secret").exists()  # the file's secret is used
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0, "".join(lines)
