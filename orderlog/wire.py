"""WebSocket framing, sans I/O: server text frames built by hand, and the fast receive path
(client bytes -> complete text messages, or frames for wsproto).

trio-websocket reads through our stream (service/sockets.py, WriterStream) and feeds what it reads to
wsproto; each message then goes through a memory channel to the task that called
`get_message`: a task switch and a few trips through trio's scheduler per message. Here the
stream splits what it reads into frames first:

- a *simple* frame (masked, final, opcode text, no reserved bit, not inside a fragmented
  message, at most `max_message_size` bytes, valid UTF-8) becomes a `(text, raw)` pair, which
  the connection handles at once, in the reader task;
- everything else (control frames, fragments, binary frames, invalid UTF-8, a bad header) is
  handed to wsproto as the same bytes, whole frames only, so wsproto and trio-websocket keep
  doing what they did: pongs, the close handshake, 1002 for a protocol error, 1007 for invalid
  UTF-8, 1009 for a message over the limit. A frame over the limit is passed on as it arrives
  (never buffered here), and after a close frame or a bad header everything is passed on.

So the memory held here is at most one frame of `max_message_size` (plus its header), and
wsproto sees exactly the bytes the client sent, in order. RFC 6455 section 5.2 (framing),
5.3 (client masking), 5.4 (fragmentation), 5.5 (control frames).
"""

from __future__ import annotations

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



class MessageEnd(bytes):
    """A whole frame for wsproto that ends a data message: wsproto will deliver one message
    (or close the connection)."""


# One item of FrameSplitter.feed's output: bytes for wsproto (a MessageEnd when they end a data
# message), or a (text, raw) complete message.
Item = bytes | tuple[str, bytes]


def unmask(payload: bytes, mask: bytes) -> bytes:
    """XOR `payload` with the 4-byte `mask`, repeated (RFC 6455 section 5.3)."""
    length = len(payload)
    if not length:
        return payload
    key = (mask * (length // 4 + 1))[:length]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(length, "little")


class FrameSplitter:
    """Splits the bytes of one client connection into items; see the module docstring."""

    __slots__ = ("max_message_size", "_buffer", "_through", "_fragmented", "_passing")

    def __init__(self, max_message_size: int):
        self.max_message_size = max_message_size
        self._buffer = b""  # the start of an incomplete frame
        self._through = 0  # bytes of a large frame still to pass on as they arrive
        self._fragmented = False  # inside a fragmented data message (its frames go to wsproto)
        self._passing = False  # after a close frame or a bad header: pass everything on

    def feed(self, data: bytes) -> list[Item]:
        """The items that `data` completes, in the order of the bytes."""
        data = bytes(data)
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
            if (b0 & 0x70 or not masked or opcode not in _OPCODES
                    or (opcode >= OP_CLOSE and (not final or length > 125))):
                # wsproto refuses this frame and closes (1002): from here on it sees everything.
                self._passing = True
                out.append(buf[pos:])
                pos = size
                break
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
                self._through = total  # trio-websocket closes with 1009 as it arrives
                continue
            if size - pos < total:
                break  # the state changes only once the frame is complete
            self._fragmented = fragmented
            frame = buf[pos:pos + total]
            pos += total
            if opcode == OP_CLOSE:
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
                    out.append(MessageEnd(frame))  # wsproto closes with 1007
                else:
                    out.append((text, frame))
            elif final and opcode < OP_CLOSE:
                out.append(MessageEnd(frame))
            else:
                out.append(frame)
        self._buffer = buf[pos:] if pos < size else b""
        return out
