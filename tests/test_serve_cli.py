"""`orderlog serve` on bad input: one line on stderr and exit 2, never a traceback."""

import socket
import subprocess
import sys

SECRET = "serve-cli-test-secret-0123456789abcdef"


def _serve(tmp_path, *args):
    return subprocess.run([sys.executable, "-m", "orderlog.cli", "serve", "--jwt-secret", SECRET, *args],
                          cwd=tmp_path, capture_output=True, text=True, timeout=30)


def test_a_file_that_is_not_sqlite_is_one_line(tmp_path):
    """A --db that is not a SQLite file exits 2 with `orderlog: error: ... not a SQLite database`."""
    (tmp_path / "notes.db").write_text("shopping list\n")
    done = _serve(tmp_path, "--db", "notes.db", "--port", "0")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert "orderlog: error: notes.db: not a SQLite database" in done.stderr


def test_a_busy_port_is_one_line(tmp_path):
    """A port another program holds exits 2 naming the address, instead of a traceback."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        done = _serve(tmp_path, "--db", "a.db", "--port", str(port))
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert f"orderlog: error: cannot listen on 127.0.0.1:{port}" in done.stderr


def test_bad_flag_values_are_usage_errors(tmp_path):
    """Malformed flag values are argparse usage errors (exit 2) that name the flag."""
    for args, word in ((["--port", "http"], "--port"), (["--auth-timeout", "soon"], "--auth-timeout"),
                       (["--jwt-algorithm", "none"], "jwt-algorithm")):
        done = _serve(tmp_path, "--db", "a.db", *args)
        assert done.returncode == 2, (args, done.stderr)
        assert word in done.stderr and "Traceback" not in done.stderr, done.stderr
