"""Files that decide who may do what: the JWT secret next to the database, the checkpoint signing
key, the JWT public key and the settings file.

Whoever can write a secret file decides what it holds, and whoever can read it can use it. So a
secret is read only from a regular file that this user owns and that nobody else may read or
write, opened without following a symbolic link (a link planted in the database's folder would
hand the choice of the secret to whoever planted it). New secret files are created 0600 and
never over an existing file or link.

A file that is not secret but is trusted (the public key that checks tokens: whoever replaces
it mints any token; the settings file, which may name the secret or the key) must not be
writable by anyone but this user or root (`check_trusted`); it may be a link, and readable.
"""

from __future__ import annotations

import errno
import os
import stat


class UntrustedFile(Exception):
    """A secret file that must not be used (one line, naming the file and what to do)."""


def read_private(path: str) -> str:
    """The text of the secret file `path`, after checking that only this user controls it.

    Raises FileNotFoundError when there is no such file (nor link), UntrustedFile when the file
    is a symbolic link, not a regular file, owned by another user, or open to group or others,
    and OSError for any other failure to read it.
    """
    try:
        # O_NONBLOCK: a FIFO planted under the name must not block the open.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        if exc.errno == errno.ELOOP or (exc.errno != errno.ENOENT and os.path.islink(path)):
            raise UntrustedFile(f"{path} is a symbolic link; a secret must be a file of its own "
                                f"(replace the link with the file, mode 0600)") from None
        raise
    with os.fdopen(fd, "r", encoding="utf-8") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise UntrustedFile(f"{path} is not a regular file")
        if info.st_uid != os.geteuid():
            raise UntrustedFile(f"{path} is owned by uid {info.st_uid}, not by this user (uid {os.geteuid()}); "
                                f"only the user that runs orderlog may own its secrets")
        if info.st_mode & 0o077:
            mode = stat.S_IMODE(info.st_mode)
            raise UntrustedFile(f"{path} is open to group or others (mode {mode:04o}); "
                                f"run `chmod 600 {path}` if its content is yours, else replace it")
        try:
            return f.read()
        except UnicodeDecodeError:
            raise UntrustedFile(f"{path} is not UTF-8 text") from None


def write_private(path: str, text: str) -> None:
    """Create `path` with mode 0600 holding `text`; FileExistsError if anything (a link too) is there."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            fd = -1
            f.write(text)
    finally:
        if fd >= 0:
            os.close(fd)


def check_trusted(path: str) -> None:
    """UntrustedFile unless `path` (links followed) is a regular file owned by this user or root
    and not writable by group or others; OSError if it cannot be examined."""
    info = os.stat(path)
    if not stat.S_ISREG(info.st_mode):
        raise UntrustedFile(f"{path} is not a regular file")
    if info.st_uid not in (os.geteuid(), 0):
        raise UntrustedFile(f"{path} is owned by uid {info.st_uid}, neither this user (uid {os.geteuid()}) nor root; "
                            "whoever owns it decides what it says")
    if info.st_mode & 0o022:
        mode = stat.S_IMODE(info.st_mode)
        raise UntrustedFile(f"{path} is writable by group or others (mode {mode:04o}); run `chmod go-w {path}`")
