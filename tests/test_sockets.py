"""The hand-built send path (orderlog/service/sockets.py) against wsproto's own parser and real sockets."""


import trio
import trio.testing
import wsproto
from hypothesis import given, settings, strategies as st
from wsproto.events import Request, TextMessage

from orderlog.service.sockets import SocketWriter
from orderlog.wire import text_frame


def _client_reading(data: bytes) -> list[str]:
    """Feed server bytes to a wsproto client that has completed a handshake; return its texts."""
    client = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
    server = wsproto.WSConnection(wsproto.ConnectionType.SERVER)
    server.receive_data(client.send(Request(host="x", target="/v1/ws")))
    request = next(server.events())
    client.receive_data(server.send(wsproto.events.AcceptConnection()))
    list(client.events())
    assert isinstance(request, Request)
    client.receive_data(data)
    texts, parts = [], []
    for event in client.events():
        assert isinstance(event, TextMessage), event
        parts.append(event.data)
        if event.message_finished:
            texts.append("".join(parts))
            parts = []
    return texts


TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=300)
# Payload sizes around the 7-bit, 16-bit and 64-bit length boundaries (125/126, 65535/65536).
LONG = st.builds(lambda n, c: c * n, st.integers(120, 130) | st.integers(65_530, 65_540) | st.integers(16_380, 16_390),
                 st.sampled_from("aé€😀"))


@settings(max_examples=150, deadline=None)
@given(st.lists(TEXT | LONG, min_size=1, max_size=5))
def test_text_frames_parse_as_the_same_messages_in_wsproto(messages):
    """Every length class (7-bit, 16-bit, 64-bit) frames to bytes that wsproto reads back exactly."""
    wire = b"".join(text_frame(m.encode()) for m in messages)
    assert _client_reading(wire) == messages


async def test_writer_keeps_order_when_the_socket_is_full():
    """Writes beyond what the kernel takes are queued and flushed in order, and drain() waits for it."""
    a, b = trio.socket.socketpair()
    left, right = trio.SocketStream(a), trio.SocketStream(b)
    chunks = [bytes([i % 251]) * 50_000 for i in range(60)]  # 3 MB: far more than a socket buffer
    expected = b"".join(chunks)
    received = bytearray()
    async with trio.open_nursery() as nursery:
        writer = SocketWriter(left, nursery)
        for chunk in chunks:
            writer.write(chunk)
        assert writer.buffered > 0, "the kernel took 3 MB at once: the test proves nothing"

        async def read_all():
            while len(received) < len(expected):
                received.extend(await right.receive_some(1 << 16))

        with trio.fail_after(20):
            nursery.start_soon(read_all)
            await writer.drain(1)
            await writer.wait_flushed()
        with trio.fail_after(20):
            while len(received) < len(expected):
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert bytes(received) == expected
    assert writer.flushed == writer.written == len(expected)


async def test_writer_reports_a_lost_peer():
    """After the peer is gone, write() raises BrokenResourceError instead of queueing forever."""
    a, b = trio.socket.socketpair()
    left = trio.SocketStream(a)
    b.close()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            writer = SocketWriter(left, nursery)
            failed = False
            for _ in range(1000):
                try:
                    writer.write(b"x" * 65536)
                except trio.BrokenResourceError:
                    failed = True
                    break
                await trio.sleep(0.001)
            nursery.cancel_scope.cancel()
    assert failed
    assert writer.error is not None
