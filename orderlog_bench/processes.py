"""The processes of a bench run: the servers under load (`Target`, `start_server`), the worker
processes that make the load (`Pool`), and the tokens they use."""

from __future__ import annotations

import multiprocessing
import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

START_TIMEOUT = 60.0  # seconds for a server to log that it listens
STOP_TIMEOUT = 15.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
LISTENING_RE = re.compile(rb"event=listening url=(\S+)")
TOKEN_TTL = 6 * 3600.0


class BenchError(Exception):
    """The bench could not run a scenario (a server did not start, a worker crashed...)."""


# -- servers ------------------------------------------------------------------------------------


class Target:
    """A server under load: orderlog or a baseline, started by us (or given with --url)."""

    def __init__(self, name: str, url: str, pid: int | None, proc: subprocess.Popen | None, log: Path | None,
                 db: str | None = None, urls: list[str] | None = None, pids: list[int] | None = None):
        self.name = name
        self.url = url
        self.urls = urls or [url]  # several nodes serving one log (--url A,B,C); `url` is the first
        self.pid = pid
        self.pids = pids or ([pid] if pid is not None else [])  # CPU figures sum over these
        self.proc = proc
        self.log = log
        self.db = db

    def cpu(self) -> float | None:
        """Seconds of CPU (user + system, all threads) the server used so far (summed over
        its nodes' processes)."""
        if not self.pids:
            return None
        total = 0.0
        for pid in self.pids:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / CLK_TCK
            except (OSError, IndexError, ValueError):
                return None
        return total

    def status(self, key: str) -> int | None:
        """A /proc/<pid>/status size (VmRSS, VmHWM) in bytes."""
        if self.pid is None:
            return None
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith(key + ":"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def rss(self) -> int | None:
        return self.status("VmRSS")

    def alive(self) -> bool:
        return self.proc is None or self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORDERLOG_")}
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    return env


def start_server(name: str, workdir: Path, secret: str, *, db: str | None = None, args: list[str] = (),
                 fault: str | None = None) -> Target:
    """Start orderlog (`name` == "orderlog") or a baseline on port 0 and wait for its URL."""
    log = workdir / f"{name}-{time.time_ns()}.log"
    if name == "orderlog":
        command = [sys.executable, "-m", "orderlog.cli", "serve", "--db", db, "--host", "127.0.0.1", "--port", "0",
                   f"--jwt-secret={secret}", *args]  # one argument: a secret may start with "-"
    else:
        command = [sys.executable, "-m", "orderlog_bench.baselines", name, "--port", "0"]
        if fault:
            command += ["--fault", fault]
    with open(log, "wb") as err:
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                env=clean_env(), start_new_session=True)
    deadline = time.time() + START_TIMEOUT
    while time.time() < deadline:
        found = LISTENING_RE.search(log.read_bytes())
        if found:
            return Target(name, found.group(1).decode(), proc.pid, proc, log, db)
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    if proc.poll() is None:
        proc.kill()
        proc.wait(5)
    tail = log.read_bytes()[-2000:].decode("utf-8", "replace")
    raise BenchError(f"{name} did not start listening:\n{tail}")

# -- worker processes ---------------------------------------------------------------------------------


class Pool:
    """Worker processes (forked) and their pipes; every wait bounded."""

    def __init__(self) -> None:
        self.context = multiprocessing.get_context("fork")
        self.workers: list[tuple[Any, Any]] = []

    def start(self, role: Callable, config: dict) -> int:
        from .workers import run_worker

        parent, child = self.context.Pipe()
        process = self.context.Process(target=run_worker, args=(role, config, child), daemon=True)
        process.start()
        child.close()
        self.workers.append((process, parent))
        return len(self.workers) - 1

    def receive(self, index: int, kind: str, timeout: float) -> dict:
        process, pipe = self.workers[index]
        if not pipe.poll(timeout):
            raise BenchError(f"worker {index} sent no {kind!r} within {timeout:.0f} s")
        try:
            got, payload = pipe.recv()
        except EOFError:
            raise BenchError(f"worker {index} exited before sending {kind!r}") from None
        if got == "error":
            raise BenchError(f"worker {index} crashed: {payload}")
        if got != kind:
            raise BenchError(f"worker {index} sent {got!r}, expected {kind!r}")
        return payload

    def gather(self, kind: str, timeout: float, indices: list[int] | None = None) -> list[dict]:
        deadline = time.time() + timeout
        return [self.receive(i, kind, max(0.1, deadline - time.time()))
                for i in (range(len(self.workers)) if indices is None else indices)]

    def send(self, message: tuple, indices: list[int] | None = None) -> None:
        for i in range(len(self.workers)) if indices is None else indices:
            try:
                self.workers[i][1].send(message)
            except (BrokenPipeError, OSError):
                pass

    def close(self) -> None:
        for process, pipe in self.workers:
            process.join(5)
            if process.is_alive():
                process.terminate()
                process.join(5)
            pipe.close()
        self.workers = []

    def __enter__(self) -> "Pool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Tokens:
    def __init__(self, secret: str):
        self.secret = secret
        self._cache: dict[tuple[str, str], str] = {}

    def __call__(self, sub: str, role: str = "customer") -> str:
        from orderlog.auth import mint

        key = (sub, role)
        if key not in self._cache:
            self._cache[key] = mint(sub, role, TOKEN_TTL, time.time(), self.secret, "HS256")
        return self._cache[key]


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else 1 << 20
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]

def git_commit() -> dict:
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "orderlog"], cwd=root, capture_output=True,
                               text=True, timeout=10).stdout
        return {"commit": commit, "dirty_files": [line[3:] for line in dirty.splitlines()]}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty_files": []}
