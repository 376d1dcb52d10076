"""WebSocket framing, sans I/O: server text frames built by hand, and the fast receive path
(client bytes -> complete text messages, or frames for wsproto).

trio-websocket reads through our stream (service/sockets.py, WriterStream) and feeds what it reads to
wsproto; each message then goes through a memory channel to the task that called
`get_message`: a task switch and a few trips through trio's scheduler per message. Here the
stream splits what it reads into frames first:

- a *simple* frame (masked, final, opcode text, no reserved bit, not inside a fragmented
  message, at most `max_message_size` bytes, valid UTF-8) becomes a `(text, raw)` pair, which
  the connection handles at once, in the reader task;
- a frame that breaks RFC 6455 becomes a `Violation` (close code 1002, or 1007 for text that is
  not UTF-8), and everything after it is dropped: the server sends that close frame and then
  closes the connection (section 7.1.7, "Fail the WebSocket Connection"). These are: a reserved
  bit set (no extension is ever negotiated), an unmasked frame, a reserved opcode, a control
  frame that is fragmented or longer than 125 bytes, a continuation frame with no message to
  continue, a new data frame inside a fragmented message, a close frame with a 1-byte payload,
  a close code no endpoint may send or a close reason that is not UTF-8, and invalid UTF-8 in
  a text message (in a fragmented one, found as soon as the bytes so far cannot be completed
  into UTF-8). trio-websocket and wsproto detect these too, but then drop the TCP connection
  without sending the close frame;
- everything else (control frames, fragments, binary frames, a valid close frame) is handed to
  wsproto as the same bytes, whole frames only, so wsproto and trio-websocket keep doing what
  they did: pongs, the close handshake, 1009 for a message over the limit. A frame over the
  limit is passed on as it arrives (never buffered here), and after a close frame everything
  is passed on.

So the memory held here is at most one frame of `max_message_size` (plus its header), and
wsproto sees exactly the bytes the client sent, in order, up to the first violation. RFC 6455
section 5.2 (framing), 5.3 (client masking), 5.4 (fragmentation), 5.5 (control frames), 7.4
(close codes), 8.1 (UTF-8); Autobahn|Testsuite sections 5, 6 and 7 test these.
"""

from __future__ import annotations

import codecs

OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0, 1, 2, 8, 9, 10
_OPCODES = frozenset({OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG})


def frame_header(length: int) -> bytes:
    """The header of an unmasked, final text frame carrying `length` payload bytes."""
    if length < 126:
        return bytes((0x81, length))
    if length < 65536:
        return b"\x81\x7e" + length.to_bytes(2, "big")
    return b"\x81\x7f" + length.to_bytes(8, "big")


def text_frame(payload: bytes) -> bytes:
    """A complete server text frame."""
    return frame_header(len(payload)) + payload



PROTOCOL_ERROR = 1002
INVALID_PAYLOAD = 1007


def valid_close_code(code: int) -> bool:
    """Whether a peer may send `code` in a close frame (RFC 6455 section 7.4: the defined codes
    except 1004, 1005, 1006 and 1015, which no endpoint sends; 3000-4999 for libraries and
    applications). 1014 (registered later) is refused, as wsproto refuses it."""
    return 1000 <= code <= 1003 or 1007 <= code <= 1013 or 3000 <= code <= 4999


def close_frame(code: int, reason: str = "") -> bytes:
    """A complete server close frame (the reason is cut to fit the 125-byte control payload)."""
    payload = code.to_bytes(2, "big") + reason.encode()[:123]
    return bytes((0x88, len(payload))) + payload


class Violation:
    """The client broke RFC 6455: close with `code` (1002 or 1007) and `reason`, then hang up."""

    __slots__ = ("code", "reason")

    def __init__(self, code: int, reason: str):
        self.code = code
        self.reason = reason

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Violation) and (self.code, self.reason) == (other.code, other.reason)

    def __repr__(self) -> str:
        return f"Violation({self.code}, {self.reason!r})"


class MessageEnd(bytes):
    """A whole frame for wsproto that ends a data message: wsproto will deliver one message
    (or close the connection)."""


# One item of FrameSplitter.feed's output: bytes for wsproto (a MessageEnd when they end a data
# message), a (text, raw) complete message, or a Violation (always the last item).
Item = bytes | tuple[str, bytes] | Violation
_utf8 = codecs.getincrementaldecoder("utf-8")


def unmask(payload: bytes, mask: bytes) -> bytes:
    """XOR `payload` with the 4-byte `mask`, repeated (RFC 6455 section 5.3)."""
    length = len(payload)
    if not length:
        return payload
    key = (mask * (length // 4 + 1))[:length]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(length, "little")


class FrameSplitter:
    """Splits the bytes of one client connection into items; see the module docstring."""

    __slots__ = ("max_message_size", "_buffer", "_through", "_fragmented", "_passing", "_failed", "_text")

    def __init__(self, max_message_size: int):
        self.max_message_size = max_message_size
        self._buffer = b""  # the start of an incomplete frame
        self._through = 0  # bytes of a large frame still to pass on as they arrive
        self._fragmented = False  # inside a fragmented data message (its frames go to wsproto)
        self._passing = False  # after a close frame: pass everything on
        self._failed = False  # after a Violation: drop everything
        self._text = None  # the UTF-8 check of the fragmented text message under way, if any

    def feed(self, data: bytes) -> list[Item]:
        """The items that `data` completes, in the order of the bytes."""
        data = bytes(data)
        if self._failed:
            return []
        if self._passing:
            return [data] if data else []
        buf = self._buffer + data if self._buffer else data
        size = len(buf)
        pos = 0
        out: list[Item] = []
        while pos < size:
            if self._through:
                take = min(self._through, size - pos)
                out.append(buf[pos:pos + take])
                pos += take
                self._through -= take
                continue
            if size - pos < 2:
                break
            b0, b1 = buf[pos], buf[pos + 1]
            length = b1 & 0x7F
            header = 2
            if length == 126:
                header = 4
                if size - pos < header:
                    break
                length = int.from_bytes(buf[pos + 2:pos + 4], "big")
            elif length == 127:
                header = 10
                if size - pos < header:
                    break
                length = int.from_bytes(buf[pos + 2:pos + 10], "big")
            masked = b1 & 0x80
            if masked:
                header += 4
            if size - pos < header:
                break
            opcode, final = b0 & 0x0F, b0 & 0x80
            if (b0 & 0x70 or not masked or opcode not in _OPCODES or length >> 63
                    or (opcode >= OP_CLOSE and (not final or length > 125))
                    or (opcode < OP_CLOSE and (opcode == OP_CONTINUATION) != self._fragmented)):
                return self._fail(out, PROTOCOL_ERROR, _header_problem(b0, masked, opcode, final, length))
            fragmented = self._fragmented
            if opcode == OP_TEXT or opcode == OP_BINARY:
                simple = opcode == OP_TEXT and final and not fragmented
                fragmented = not final
            else:
                simple = False
                if opcode == OP_CONTINUATION and final:
                    fragmented = False
            total = header + length
            if length > self.max_message_size:
                self._fragmented = fragmented
                self._text = None  # trio-websocket closes with 1009 as it arrives: nothing to check
                self._through = total
                continue
            if size - pos < total:
                break  # the state changes only once the frame is complete
            self._fragmented = fragmented
            frame = buf[pos:pos + total]
            pos += total
            if opcode == OP_CLOSE:
                problem = _close_problem(unmask(frame[header:], frame[header - 4:header]))
                if problem is not None:
                    return self._fail(out, *problem)
                self._passing = True
                out.append(frame)
                if pos < size:
                    out.append(buf[pos:])
                pos = size
                break
            if simple:
                try:
                    text = unmask(frame[header:], frame[header - 4:header]).decode("utf-8")
                except UnicodeDecodeError:
                    return self._fail(out, INVALID_PAYLOAD, "text message is not valid UTF-8")
                out.append((text, frame))
                continue
            if opcode == OP_TEXT:
                self._text = _utf8()  # the first frame of a fragmented text message
            if self._text is not None and opcode in (OP_TEXT, OP_CONTINUATION):
                try:
                    self._text.decode(unmask(frame[header:], frame[header - 4:header]), final=bool(final))
                except UnicodeDecodeError:
                    return self._fail(out, INVALID_PAYLOAD, "text message is not valid UTF-8")
                if final:
                    self._text = None
            if final and opcode < OP_CLOSE:
                out.append(MessageEnd(frame))
            else:
                out.append(frame)
        self._buffer = buf[pos:] if pos < size else b""
        return out

    def _fail(self, out: list[Item], code: int, reason: str) -> list[Item]:
        """End with a Violation; nothing more is read from this connection."""
        self._failed = True
        self._buffer = b""
        out.append(Violation(code, reason))
        return out


def _header_problem(b0: int, masked: int, opcode: int, final: int, length: int) -> str:
    """Why a frame header breaks RFC 6455 (close 1002); FrameSplitter.feed found that it does."""
    if length >> 63:
        return "payload length with the most significant bit set"
    if b0 & 0x70:
        return "reserved bits set (no extension was negotiated)"
    if not masked:
        return "client frames must be masked"
    if opcode not in _OPCODES:
        return f"reserved opcode {opcode}"
    if opcode >= OP_CLOSE:
        if not final:
            return "fragmented control frame"
        if length > 125:
            return "control frame longer than 125 bytes"
    elif opcode == OP_CONTINUATION:
        return "continuation frame without a message to continue"
    return "new data message inside a fragmented message"


def _close_problem(payload: bytes) -> tuple[int, str] | None:
    """Why a close frame's payload breaks RFC 6455 (code and reason), or None."""
    if not payload:
        return None
    if len(payload) == 1:
        return PROTOCOL_ERROR, "close frame with a 1-byte payload"
    if not valid_close_code(int.from_bytes(payload[:2], "big")):
        return PROTOCOL_ERROR, f"invalid close code {int.from_bytes(payload[:2], 'big')}"
    try:
        payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        return INVALID_PAYLOAD, "close reason is not valid UTF-8"
    return None
