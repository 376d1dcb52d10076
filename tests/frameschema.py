"""docs/asyncapi.yaml as validators: every frame the server sends in the protocol tests must conform.

`check_server_frame(message)` picks the message by the frame's `type` (the document's
`x-orderlog-dispatch`) and validates it against that message's payload schema with jsonschema
(AsyncAPI 3's default schema format is a superset of JSON Schema draft 7). A frame of a `type`
the document does not describe, or one that breaks its schema, fails the test with the path
and the rule it broke. `tests/wsclient.decode` hands every frame it reads to `record`, and
conftest's autouse fixture checks what was recorded when each test ends (`check_recorded`), so the checking never slows a
test down while it measures latencies or races a deadline. A test may read hundreds of
thousands of events (the load tests): every frame is checked up to `CHECK_ALL` per test; past
that, the first frame of each new shape (type, fields, data fields, which values are null) and
every `STRIDE`-th frame.

The document is PROTOCOL.md v1.2 exactly, with no allowance for older forms.
"""

from __future__ import annotations

import functools
import json
import threading
from pathlib import Path
from typing import Any

import jsonschema
import yaml

DOCUMENT = Path(__file__).resolve().parents[1] / "docs" / "asyncapi.yaml"


class NonConformingFrame(AssertionError):
    """A frame the server sent does not match docs/asyncapi.yaml."""


@functools.cache
def document() -> dict[str, Any]:
    with DOCUMENT.open(encoding="utf-8") as file:
        return yaml.safe_load(file)


def _inlined(node: Any, doc: dict[str, Any]) -> Any:
    """`node` with every `$ref` (all are local) replaced by what it points at (there are no cycles).

    jsonschema resolves a `$ref` anew at every use: inlined, an event frame takes about 260 µs of
    CPU instead of 470.
    """
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/"):
            target: Any = doc
            for part in ref[2:].split("/"):
                target = target[part]
            # draft 7 ignores the siblings of a $ref (ours are descriptions only)
            return _inlined(target, doc)
        return {k: _inlined(v, doc) for k, v in node.items()}
    if isinstance(node, list):
        return [_inlined(v, doc) for v in node]
    return node


@functools.cache
def validator(message: str) -> jsonschema.Draft7Validator:
    """The validator of the payload of `components.messages[message]`."""
    doc = document()
    schema = _inlined(doc["components"]["messages"][message]["payload"], doc)
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def message_of(frame_type: Any, direction: str = "server") -> str | None:
    """The message name for a frame's `type` in `direction` (server or client), or None."""
    return document()["x-orderlog-dispatch"][direction].get(frame_type) if isinstance(frame_type, str) else None


def errors(message: dict[str, Any], direction: str = "server") -> list[str]:
    """Why `message` does not conform (empty if it does)."""
    name = message_of(message.get("type"), direction)
    if name is None:
        return [f"type {message.get('type')!r} is not a {direction} message of docs/asyncapi.yaml"]
    found = list(validator(name).iter_errors(message))
    return [f"{name}: {'/'.join(map(str, e.absolute_path)) or '(frame)'}: {e.message}"
            for e in (jsonschema.exceptions.best_match(found),)] if found else []


def check_server_frame(message: dict[str, Any]) -> None:
    """Fail unless `message`, a frame the server sent, conforms to docs/asyncapi.yaml."""
    problems = errors(message)
    if problems:
        raise NonConformingFrame(f"the server sent a frame that does not conform to docs/asyncapi.yaml: "
                                 f"{problems[0]}\n  frame: {str(message)[:2000]}")


CHECK_ALL = 5_000  # frames per test checked one by one
STRIDE = 50  # past CHECK_ALL: every STRIDE-th frame, and the first of each shape


class _Recorder:
    """The frames read during the current test (their text), bounded as the module doc says."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self.kept: list[str] = []
        self.count = 0
        self.shapes: set[tuple] = set()

    def record(self, text: str, message: dict[str, Any]) -> None:
        with self.lock:
            self.count += 1
            if self.count <= CHECK_ALL or self.count % STRIDE == 0:
                self.kept.append(text)
                return
            shape = _shape(message)
            if shape not in self.shapes:
                self.shapes.add(shape)
                self.kept.append(text)

    def take(self) -> tuple[list[str], int]:
        with self.lock:
            kept, count = self.kept, self.count
            self.reset()
            return kept, count


def _shape(message: dict[str, Any]) -> tuple:
    data = message.get("data")
    return (message.get("type"), str(message.get("channel", ""))[:6], tuple(sorted(message)),
            tuple(sorted(data)) if isinstance(data, dict) else None,
            tuple(sorted(k for k, v in message.items() if v is None)))


_recorder = _Recorder()


def record(text: str, message: dict[str, Any]) -> None:
    """Keep a frame the server sent, to be checked when the test ends."""
    _recorder.record(text, message)


def check_recorded() -> int:
    """Check the frames recorded since the last call; return how many were read. Raises
    NonConformingFrame for the first one that does not conform (and how many more do not)."""
    kept, count = _recorder.take()
    bad = [(text, problems) for text in kept if (problems := errors(json.loads(text)))]
    if bad:
        text, problems = bad[0]
        raise NonConformingFrame(f"the server sent {len(bad)} frame(s) that do not conform to docs/asyncapi.yaml "
                                 f"(of {len(kept)} checked, {count} read); the first: {problems[0]}\n"
                                 f"  frame: {text[:2000]}")
    return count
