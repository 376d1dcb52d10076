"""`--client node`: the fan-out subscribers in one Node.js process using the `ws` package, so the
feed is also measured by a client that is not Python (`node/subscribers.js`).

The package is installed once with `npm ci` into `<cache dir>/orderlog-bench-node-<hash of the
lock file>/` on first use; the script runs from this folder with NODE_PATH pointing there. The
process speaks JSON lines: `ready` on stdout, `go` and `stop` on stdin, then `result` (the
shape of the Python subscriber workers' result, latencies = receipt minus the event's `at`).
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import shutil
import subprocess
import threading
import time
from array import array
from pathlib import Path
from typing import Any, Callable

from .processes import BenchError

HERE = Path(__file__).resolve().parent / "node"
SCRIPT = HERE / "subscribers.js"
INSTALL_TIMEOUT = 300.0


def missing_tools() -> str | None:
    """Why `--client node` cannot run here, or None."""
    lacking = [tool for tool in ("node", "npm") if shutil.which(tool) is None]
    if lacking:
        return (f"--client node needs {' and '.join(lacking)} on the PATH (Node.js >= 18 with npm; "
                "e.g. apt-get install nodejs npm)")
    return None


def ensure_installed(cache_dir: Path, say: Callable[[str], None]) -> Path:
    """The node_modules folder holding `ws`, installed with `npm ci` on first use."""
    lock = (HERE / "package-lock.json").read_bytes()
    folder = cache_dir / f"orderlog-bench-node-{hashlib.sha256(lock).hexdigest()[:12]}"
    modules = folder / "node_modules"
    if (modules / "ws" / "package.json").exists():
        return modules
    building = cache_dir / f"{folder.name}.{os.getpid()}.building"
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir(parents=True)
    for name in ("package.json", "package-lock.json"):
        shutil.copyfile(HERE / name, building / name)
    say(f"installing the Node.js client's `ws` package with npm ci into {folder} (once) ...")
    try:
        done = subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--omit=dev"], cwd=building,
                              capture_output=True, text=True, timeout=INSTALL_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise BenchError(f"npm ci did not finish within {INSTALL_TIMEOUT:.0f} s") from None
    if done.returncode != 0:
        shutil.rmtree(building, ignore_errors=True)
        raise BenchError(f"npm ci failed ({done.returncode}): {(done.stderr or done.stdout)[-800:]}")
    try:
        os.replace(building, folder)
    except OSError:  # another bench installed it meanwhile
        shutil.rmtree(building, ignore_errors=True)
    return modules


class NodeSubscribers:
    """One Node.js process holding the subscriptions `subs` [(token, user, role, channel, prefix)]."""

    def __init__(self, modules: Path, urls: list[str], subs: list, workdir: Path, setup_timeout: float):
        """Subscriber i connects to urls[i % len(urls)] (several nodes of one log)."""
        self.config = workdir / f"node-subscribers-{time.time_ns()}.json"
        self.config.write_text(json.dumps({"url": urls[0], "urls": urls, "subs": subs, "setup_timeout": setup_timeout}))
        self.stderr = open(workdir / f"node-subscribers-{time.time_ns()}.log", "wb")
        env = {**os.environ, "NODE_PATH": str(modules)}
        self.proc = subprocess.Popen(["node", str(SCRIPT), str(self.config)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.stderr, env=env, text=True, bufsize=1)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def receive(self, kind: str, timeout: float) -> dict:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise BenchError(f"the Node.js client sent no {kind!r} within {timeout:.0f} s") from None
        if line is None:
            self.proc.wait(5)
            tail = Path(self.stderr.name).read_bytes()[-800:].decode("utf-8", "replace")
            raise BenchError(f"the Node.js client exited ({self.proc.returncode}) before {kind!r}: {tail}")
        try:
            message = json.loads(line)
        except ValueError:
            raise BenchError(f"the Node.js client sent a line that is not JSON: {line[:200]!r}") from None
        if message.get("kind") != kind:
            raise BenchError(f"the Node.js client sent {message.get('kind')!r}, expected {kind!r}")
        if kind == "result":  # the Python workers' shape: latencies as packed doubles
            message["latencies"] = array("d", message["latencies"]).tobytes()
        return message

    def send(self, message: dict) -> None:
        try:
            self.proc.stdin.write(json.dumps(message) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.stderr.close()

    def __enter__(self) -> "NodeSubscribers":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
