"""The fast send path: server text frames built by hand and written without waiting.

trio-websocket (with wsproto) does the handshake, receives, and sends control frames. Sending a
data frame through it costs several trips through trio's scheduler (its send lock, the socket's
checkpoints). Here instead:

- `orderlog.wire.text_frame(payload)` frames a message ourselves. Server frames are unmasked and we never
  negotiate compression, so a frame is a 2-10 byte header plus the UTF-8 payload (RFC 6455
  section 5.2), and the same payload bytes can serve every connection.
- `SocketWriter` is one per TCP connection, and every byte for that connection goes through it,
  trio-websocket's own writes included (through `WriterStream`). `write()` never waits: when
  nothing is queued it hands the bytes to the kernel at once with a non-blocking `os.write` on
  the socket's file descriptor (what asyncio transports do), and queues only what the kernel did
  not take; a flusher task sends the queue with trio's `send_all`. So bytes leave in the order
  they were written, and frames never interleave.

Relies on trio-websocket 0.12 calling `stream.send_all` for its handshake and control frames and
`stream.receive_some` for reading (its public `wrap_server_stream` takes any stream), and on trio's
`SocketStream.socket.fileno()`. tests/test_sockets.py checks the framing against wsproto's parser.
"""

from __future__ import annotations

import os
from collections import deque
from typing import Protocol

import trio

from ..wire import FrameSplitter, MessageEnd, Violation, close_frame

HIGH_WATER = 256 * 1024  # queued bytes beyond which producers wait (or a subscription falls back)
FAST_TURN = 32  # messages of one read handled in a row before letting other tasks run
FAIL_LINGER = 2.0  # seconds to wait for the peer to hang up after a protocol error's close frame


class SocketWriter:
    """Ordered, non-blocking writes to one stream; see the module docstring."""

    def __init__(self, stream: trio.abc.Stream, nursery: trio.Nursery):
        self.stream = stream
        self._nursery = nursery  # where the flusher runs, started only while something is queued
        socket = getattr(stream, "socket", None)
        # Only a plain TCP stream can take a direct write; TLS goes through the flusher.
        self._fd = socket.fileno() if isinstance(stream, trio.SocketStream) and socket is not None else None
        self._queue: deque[bytes] | None = None  # made on first need: most connections never queue
        self.buffered = 0  # bytes queued, not yet handed to the kernel
        self.written = 0  # bytes accepted by write() so far
        self.flushed = 0  # bytes handed to the kernel so far
        self.error: BaseException | None = None
        self.closed = False
        self._sending = False  # the flusher is inside send_all: no direct write may overtake it
        self._flushing = False  # the flusher task is running
        self._progress = trio.Event()

    @property
    def direct(self) -> bool:
        """True on a plain TCP stream, whose socket takes direct, non-blocking reads and writes."""
        return self._fd is not None

    def write(self, data: bytes) -> None:
        """Send `data` after everything written before it, without waiting.

        Raises trio.BrokenResourceError once the connection failed.
        """
        if self.error is not None or self.closed:
            raise trio.BrokenResourceError("connection lost") from self.error
        self.written += len(data)
        if not self._queue and not self._sending and self._fd is not None:
            try:
                sent = os.write(self._fd, data)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                self._fail(exc)
                raise trio.BrokenResourceError("connection lost") from exc
            self.flushed += sent
            if sent == len(data):
                return
            data = data[sent:]
        if self._queue is None:
            self._queue = deque()
        self._queue.append(data)
        self.buffered += len(data)
        if not self._flushing:
            self._flushing = True
            self._nursery.start_soon(self._flush)

    def _fail(self, exc: BaseException) -> None:
        self.error = exc
        self._progress.set()

    async def _flush(self) -> None:
        """Send whatever is queued, in order, then end (an idle connection keeps no task)."""
        try:
            await self._flush_queue()
        finally:
            self._flushing = False

    async def _flush_queue(self) -> None:
        while self._queue:
            chunk = self._queue.popleft() if len(self._queue) == 1 else b"".join(self._take())
            self._sending = True
            try:
                await self.stream.send_all(chunk)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self._fail(exc)
                return
            finally:
                self._sending = False
            self.buffered -= len(chunk)
            self.flushed += len(chunk)
            self._progress.set()
            self._progress = trio.Event()

    def _take(self, limit: int = 1024 * 1024) -> list[bytes]:
        parts, size = [], 0
        while self._queue and size < limit:
            part = self._queue.popleft()
            parts.append(part)
            size += len(part)
        return parts

    async def drain(self, below: int = HIGH_WATER) -> None:
        """Wait until fewer than `below` bytes are queued (or the connection failed)."""
        while self.buffered >= below and self.error is None:
            await self._progress.wait()
        if self.error is not None:
            raise trio.BrokenResourceError("connection lost") from self.error

    async def wait_flushed(self) -> None:
        """Wait until everything written so far has been handed to the kernel."""
        target = self.written
        while self.flushed < target and self.error is None:
            await self._progress.wait()
        if self.error is not None:
            raise trio.BrokenResourceError("connection lost") from self.error
        await trio.lowlevel.checkpoint()


class FastReceiver(Protocol):
    """What WriterStream hands complete text messages to (the server's Connection)."""

    def takes_fast(self) -> bool:
        """True if a message may be handled now, in the reader task; False sends it the usual
        way (wsproto, trio-websocket's channel, get_message), for example before authentication
        or while an earlier message is still on that way."""

    async def handle_fast(self, text: str) -> None:
        """Handle one message; must not raise (it runs inside trio-websocket's reader task)."""


class WriterStream(trio.abc.HalfCloseableStream):
    """The stream trio-websocket sees: reads from the socket, after replaying `prefix` (the bytes
    already read while routing the request), and writes through the connection's SocketWriter.

    Bytes that came right behind the request head (a client that sends its first frames without
    waiting for the 101) are held back until `accepted` is set: trio-websocket only looks for
    new frames after a read, so frames handed over before the accept would sit unread.

    What comes after the head is split into frames (wire.FrameSplitter). While `receiver`
    takes them, simple text messages are handed to it right here, inside trio-websocket's reader
    task, so they skip wsproto, the memory channel and a task switch; everything else (and every
    message the receiver does not take) reaches trio-websocket as the same bytes, whole frames
    only. `slow_messages` counts the data messages sent the usual way and not yet handled (the
    receiver calls `slow_message_done` for each), so that a fast message never overtakes an
    earlier slow one.
    """

    def __init__(self, stream: trio.SocketStream, writer: SocketWriter, prefix: bytes = b"",
                 max_message_size: int = 64 * 1024):
        self.stream = stream
        self.writer = writer
        end = prefix.find(b"\r\n\r\n")
        cut = end + 4 if end >= 0 else len(prefix)
        self._request_head, self._trailing = prefix[:cut], prefix[cut:]
        self.accepted = trio.Event()
        self.last_received = trio.current_time()  # when the peer last sent anything (keep-alive)
        self._splitter = FrameSplitter(max_message_size)
        self._items: deque = deque()
        self.receiver: FastReceiver | None = None
        self.slow_messages = 0
        self.violation: Violation | None = None  # the RFC 6455 violation that ended the connection

    def slow_message_done(self) -> None:
        """One message sent the usual way has been handled (see the class docstring)."""
        self.slow_messages -= 1

    @property
    def socket(self):  # trio-websocket names the endpoints from it
        return self.stream.socket

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._request_head:
            data, self._request_head = self._request_head, b""
            await trio.lowlevel.checkpoint()
            return data
        items = self._items
        handled = 0
        while True:
            while items:
                item = items.popleft()
                if type(item) is not tuple:
                    if type(item) is MessageEnd:
                        self.slow_messages += 1
                    elif type(item) is Violation:
                        return await self._fail(item)
                    return item
                text, raw = item
                receiver = self.receiver
                if receiver is None or self.slow_messages or not receiver.takes_fast():
                    self.slow_messages += 1
                    return raw
                await receiver.handle_fast(text)
                handled += 1
                if handled % FAST_TURN == 0:
                    await trio.lowlevel.checkpoint()  # a long pipeline does not hold up the others
            if self._trailing:
                await self.accepted.wait()
                data, self._trailing = self._trailing, b""
            else:
                data = await self._read(max_bytes or 65536)
                if not data:
                    return b""
                self.last_received = trio.current_time()
            items.extend(self._splitter.feed(data))

    async def _fail(self, violation: Violation) -> bytes:
        """Fail the WebSocket connection (RFC 6455 section 7.1.7): send the close frame with the
        violation's code, stop sending, let the peer hang up (at most FAIL_LINGER seconds, reading
        and dropping what it still sends, so that closing does not reset the connection before the
        close frame is read), then tell trio-websocket the stream has ended."""
        self.violation = violation
        try:
            self.writer.write(close_frame(violation.code, violation.reason))
            await self.writer.wait_flushed()
            self.writer.closed = True  # nothing more goes out, trio-websocket's frames included
            if isinstance(self.stream, trio.abc.HalfCloseableStream):  # TLS cannot half-close
                await self.stream.send_eof()
            with trio.move_on_after(FAIL_LINGER):
                while await self._read(65536):
                    pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        return b""

    async def _read(self, max_bytes: int) -> bytes:
        """The next bytes from the peer (b"" at its end). On a plain TCP socket: wait until it is
        readable, then one non-blocking read, without trying first (after a message, a client
        that waits for its reply has sent nothing more) and without trio's extra checkpoints."""
        if not self.writer.direct:
            return await self.stream.receive_some(max_bytes)
        socket = self.stream.socket
        while True:
            # The descriptor is looked up before each wait and each read: once the socket is
            # closed (-1) it must not be waited on, and its number may belong to another socket.
            # Closing it during the wait wakes the wait with ClosedResourceError (notify_closing).
            fd = socket.fileno()
            if fd < 0:
                raise trio.ClosedResourceError("the stream was closed")
            await trio.lowlevel.wait_readable(fd)
            fd = socket.fileno()
            if fd < 0:
                raise trio.ClosedResourceError("the stream was closed")
            try:
                return os.read(fd, max_bytes)
            except BlockingIOError:
                continue
            except OSError as exc:
                raise trio.BrokenResourceError("connection lost") from exc

    async def send_all(self, data) -> None:
        self.writer.write(bytes(data))
        await self.writer.wait_flushed()

    async def wait_send_all_might_not_block(self) -> None:
        await self.writer.drain(1)

    async def send_eof(self) -> None:
        await self.stream.send_eof()

    async def aclose(self) -> None:
        self.writer.closed = True
        await self.stream.aclose()
