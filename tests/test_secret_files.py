"""Files that hold secrets or customers' data: a planted JWT secret is refused, new files are 0600.

Run through the real command line (subprocesses), as an operator would meet them.
"""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest

from test_cli import assert_one_line_error

SECRET_TEXT = "a-planted-secret-0123456789-0123456789-abcdef\n"


def _secret(tmp_path: Path) -> Path:
    return tmp_path / "orderlog.db.secret"


def _refused(cli, *fragments):
    """`serve` and `token` both refuse the secret with one line naming it, exit 2."""
    for args in (("serve", "--port", "0"), ("token", "--sub", "mallory", "--role", "staff")):
        done = cli(*args, "--db", "orderlog.db", timeout=30)
        assert_one_line_error(done, "orderlog.db.secret", *fragments)
        assert "refusing the JWT secret" in done.stderr


def test_a_secret_that_is_a_symbolic_link_is_refused(cli, tmp_path):
    """A DB.secret that is a symlink (to a file someone else chose) is refused, exit 2."""
    planted = tmp_path / "elsewhere"
    planted.write_text(SECRET_TEXT)
    planted.chmod(0o600)
    _secret(tmp_path).symlink_to(planted)
    _refused(cli, "is a symbolic link")


def test_a_dangling_secret_link_is_refused_not_followed(cli, tmp_path):
    """A DB.secret link to a missing file is refused; nothing is created where it points."""
    target = tmp_path / "target-chosen-by-someone-else"
    _secret(tmp_path).symlink_to(target)
    _refused(cli, "is a symbolic link")
    assert not target.exists()


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o602])
def test_a_secret_open_to_group_or_others_is_refused(cli, tmp_path, mode):
    """A DB.secret readable or writable by group or others is refused, naming its mode."""
    path = _secret(tmp_path)
    path.write_text(SECRET_TEXT)
    path.chmod(mode)
    _refused(cli, "open to group or others", f"mode {mode:04o}", "chmod 600")


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_a_secret_owned_by_another_user_is_refused(cli, tmp_path):
    """A DB.secret owned by another user is refused, even with mode 0600."""
    path = _secret(tmp_path)
    path.write_text(SECRET_TEXT)
    path.chmod(0o600)
    os.chown(path, 65534, 65534)
    _refused(cli, "owned by uid 65534")


def test_a_secret_that_is_a_fifo_is_refused_without_blocking(cli, tmp_path):
    """A FIFO planted as DB.secret is refused at once (opening it must not wait for a writer)."""
    os.mkfifo(_secret(tmp_path), 0o600)
    _refused(cli, "is not a regular file")


def test_a_created_secret_is_0600_whatever_the_umask_and_then_trusted(cli, tmp_path):
    """`serve` creates DB.secret 0600 even under umask 000, and `token` then signs with it."""
    old = os.umask(0)
    try:
        done = cli("serve", "--db", "orderlog.db", "--port", "0", "--print-config")
        assert done.returncode == 0 and not _secret(tmp_path).exists()  # --print-config creates nothing
        assert_one_line_error(cli("token", "--db", "orderlog.db", "--sub", "alice"), "does not exist")
        with socket.socket() as holder:  # a busy port: serve creates the secret, then stops
            holder.bind(("127.0.0.1", 0))
            holder.listen()
            done = cli("serve", "--db", "orderlog.db", "--port", holder.getsockname()[1], timeout=30)
    finally:
        os.umask(old)
    assert done.returncode == 2 and "orderlog: error: cannot listen" in done.stderr, done.stderr
    assert stat.S_IMODE(_secret(tmp_path).stat().st_mode) == 0o600
    assert cli("token", "--db", "orderlog.db", "--sub", "alice").returncode == 0


# -- the database file ---------------------------------------------------------------------------


async def test_the_database_wal_and_shm_are_created_0600_whatever_the_umask(tmp_path):
    """`serve` on a new file, under umask 000: the database, its -wal and its -shm are all 0600."""
    from test_crash import SECRET, ServerProcess
    from wsclient import session

    old = os.umask(0)
    try:
        server = ServerProcess(tmp_path / "fresh.db")
    finally:
        os.umask(old)
    try:
        url = await server.started()
        async with session(url, "staff-1", "staff", secret=SECRET) as staff:
            await staff.ok("add_stock", data={"sku": "kibble", "quantity": 1})
            modes = {suffix: stat.S_IMODE(Path(f"{tmp_path / 'fresh.db'}{suffix}").stat().st_mode)
                     for suffix in ("", "-wal", "-shm")}
    finally:
        assert server.stop() == 0
    assert modes == {"": 0o600, "-wal": 0o600, "-shm": 0o600}


@pytest.mark.parametrize("command", [("migrate",), ("seed", "--commands", "5"),
                                     ("serve", "--port", "0", "--jwt-secret", "serve-cli-test-secret-0123456789abcdef")])
def test_a_dangling_symlink_as_the_database_is_refused(cli, tmp_path, command):
    """A --db that is a symlink to a missing file is refused with one line (exit 2); nothing is
    created where it points."""
    target = tmp_path / "elsewhere"
    target.mkdir()
    (tmp_path / "link.db").symlink_to(target / "planted.db")
    done = cli(*command, "--db", "link.db", timeout=30)
    assert_one_line_error(done, "link.db: a symbolic link to a missing file")
    assert list(target.iterdir()) == []


# -- siblings: files that are not secret but decide who gets in -----------------------------------


def test_a_jwt_public_key_or_settings_file_others_may_write_is_refused(cli, tmp_path):
    """Whoever may rewrite the token-checking public key mints any token, and the settings file may
    name the secret or the key: each is refused (one line, exit 2) when group or others may write
    it, or another user owns it."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    public = tmp_path / "jwt.pub"
    public.write_bytes(ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    settings = tmp_path / "orderlog.toml"
    settings.write_text('port = 0\njwt_secret = "a-secret-from-the-file-0123456789abcdef"\n')
    settings.chmod(0o600)
    for mode in (0o664, 0o646):
        public.chmod(mode)
        done = cli("serve", "--jwt-algorithm", "ES256", "--jwt-public-key", "jwt.pub", "--print-config")
        assert_one_line_error(done, "refusing --jwt-public-key", "writable by group or others", f"mode {mode:04o}")
        settings.chmod(mode)
        for command in (("serve", "--print-config"), ("token", "--sub", "mallory", "--role", "staff")):
            done = cli(*command, "--config", "orderlog.toml")
            assert_one_line_error(done, "refusing --config", "writable by group or others")
        settings.chmod(0o600)
    public.chmod(0o644)
    assert cli("serve", "--jwt-algorithm", "ES256", "--jwt-public-key", "jwt.pub", "--print-config").returncode == 0
    assert cli("token", "--sub", "alice", "--config", "orderlog.toml").returncode == 0
    if os.geteuid() == 0:
        os.chown(settings, 65534, 65534)
        assert_one_line_error(cli("token", "--sub", "alice", "--config", "orderlog.toml"), "owned by uid 65534")
