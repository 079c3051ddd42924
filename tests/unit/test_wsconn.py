"""actors.wsconn: one websocket driven by wsproto in the reading task.

The transport's tests (test_ws_transport.py) run it against trio-websocket
peers over real sockets; these drive it frame by frame from a raw wsproto
peer over in-memory streams, for what those peers never send.
"""

import pytest
import trio
import trio.testing
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    RejectConnection,
    Request,
    TextMessage,
)

from actors.wsconn import (
    ConnectionClosed,
    HandshakeError,
    NoHandshakeAnswer,
    accept_websocket,
    connect_websocket,
)

LIMIT = 1000


class RawPeer:
    """The other end, as bare wsproto over a stream."""

    def __init__(self, stream: trio.abc.Stream, kind: ConnectionType):
        self.stream, self.ws = stream, WSConnection(kind)

    async def send(self, event) -> None:
        await self.stream.send_all(self.ws.send(event))

    async def expect_close(self, code: int) -> CloseConnection:
        """The next read brings our side's close frame, with `code`."""
        [event] = await self.events()
        assert isinstance(event, CloseConnection) and event.code == code, event
        return event

    async def events(self) -> list:
        """What the next read brings (at least one event)."""
        while True:
            data = await self.stream.receive_some(65536)
            self.ws.receive_data(data or None)
            events = list(self.ws.events())
            if events or not data:
                return events


async def server_and_client():
    """Our side accepting, a raw wsproto client on the other end."""
    ours, theirs = trio.testing.memory_stream_pair()
    client = RawPeer(theirs, ConnectionType.CLIENT)
    await client.send(Request(host="[::1]:9", target="/"))
    ws = await accept_websocket(ours, max_message_size=LIMIT, receive_buffer=65536)
    assert [type(e) for e in await client.events()] == [AcceptConnection]
    return ws, client


async def test_messages_both_ways_text_and_binary():
    ws, client = await server_and_client()
    await client.send(TextMessage(data="hello"))
    await client.send(BytesMessage(data=b"\x00\x01"))
    assert await ws.get_message() == "hello"
    assert await ws.get_message() == b"\x00\x01"
    await ws.send_message("back")
    [event] = await client.events()
    assert isinstance(event, TextMessage) and event.data == "back"


async def test_a_fragmented_message_is_put_together():
    ws, client = await server_and_client()
    await client.send(TextMessage(data="frag", message_finished=False))
    await client.send(TextMessage(data="mented", message_finished=True))
    assert await ws.get_message() == "fragmented"


async def test_a_message_over_the_limit_closes_with_1009_before_it_is_whole():
    ws, client = await server_and_client()
    for _ in range(3):  # 1,200 characters in fragments, never finished
        await client.send(TextMessage(data="x" * 400, message_finished=False))
    with pytest.raises(ConnectionClosed) as closed:
        await ws.get_message()
    assert (closed.value.reason.code, closed.value.reason.by_peer) == (1009, False)
    await client.expect_close(1009)


async def test_pings_are_answered():
    ws, client = await server_and_client()
    await client.send(Ping(payload=b"are you there"))
    await client.send(TextMessage(data="after"))
    assert await ws.get_message() == "after"  # the pong went out while reading
    [event] = await client.events()
    assert isinstance(event, Pong) and event.payload == b"are you there"


async def test_a_close_from_the_peer_is_answered_and_reported():
    ws, client = await server_and_client()
    await client.send(CloseConnection(code=1001, reason="going away"))
    with pytest.raises(ConnectionClosed) as closed:
        await ws.get_message()
    reason = closed.value.reason
    assert (reason.code, reason.reason, reason.by_peer) == (1001, "going away", True)
    await client.expect_close(1001)
    with pytest.raises(ConnectionClosed):
        await ws.send_message("too late")


async def test_a_peer_that_vanishes_is_an_abnormal_close():
    ws, client = await server_and_client()
    await client.stream.aclose()
    with pytest.raises(ConnectionClosed) as closed:
        await ws.get_message()
    assert closed.value.reason.code == 1006


async def test_bad_frames_close_with_1002():
    ws, client = await server_and_client()
    await client.stream.send_all(b"\x8f\x80\x00\x00\x00\x00")  # opcode 0xF does not exist
    with pytest.raises(ConnectionClosed) as closed:
        await ws.get_message()
    assert (closed.value.reason.code, closed.value.reason.by_peer) == (1002, False)
    await client.expect_close(1002)


async def test_aclose_while_another_task_reads():
    """The reader takes the peer's answer to our close; aclose waits for it."""
    ws, client = await server_and_client()
    async with trio.open_nursery() as nursery:
        got: list = []

        async def read() -> None:
            with pytest.raises(ConnectionClosed) as closed:
                await ws.get_message()
            got.append(closed.value.reason)

        nursery.start_soon(read)
        await trio.testing.wait_all_tasks_blocked()

        async def answer() -> None:
            [event] = await client.events()
            await client.send(event.response())

        nursery.start_soon(answer)
        with trio.fail_after(5):
            await ws.aclose(1000, "bye")
    assert [(r.code, r.reason, r.by_peer) for r in got] == [(1000, "bye", False)]


async def test_aclose_without_an_answer_is_bounded_by_the_caller():
    ws, client = await server_and_client()
    with trio.move_on_after(0.2):
        await ws.aclose()
    with pytest.raises(ConnectionClosed):
        await ws.get_message()
    assert await client.stream.receive_some(65536)  # our close frame, then nothing
    assert await client.stream.receive_some(65536) == b""


async def test_a_plain_http_request_gets_400():
    ours, theirs = trio.testing.memory_stream_pair()
    await theirs.send_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    with pytest.raises(HandshakeError, match="not a websocket request"):
        await accept_websocket(ours, max_message_size=LIMIT, receive_buffer=65536)
    assert (await theirs.receive_some(65536)).startswith(b"HTTP/1.1 400")


async def test_the_client_side_and_a_refused_upgrade():
    ours, theirs = trio.testing.memory_stream_pair()
    server = RawPeer(theirs, ConnectionType.SERVER)

    async def serve() -> None:
        [request] = await server.events()
        assert isinstance(request, Request) and request.host == "[::1]:9"
        await server.send(AcceptConnection())
        await server.send(TextMessage(data="welcome"))  # may come with the answer

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        ws = await connect_websocket(ours, "[::1]:9", "/", max_message_size=LIMIT,
                                     receive_buffer=65536)
    assert ws.is_client and await ws.get_message() == "welcome"

    ours, theirs = trio.testing.memory_stream_pair()
    server = RawPeer(theirs, ConnectionType.SERVER)

    async def refuse() -> None:
        await server.events()
        await server.send(RejectConnection(status_code=404))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(refuse)
        with pytest.raises(HandshakeError, match=r"refused the websocket upgrade \(HTTP 404\)"):
            await connect_websocket(ours, "[::1]:9", "/", max_message_size=LIMIT,
                                    receive_buffer=65536)


async def test_a_server_that_hangs_up_gave_no_answer():
    """What a TLS listener does to a plain dial: reads, then hangs up."""
    ours, theirs = trio.testing.memory_stream_pair()

    async def hang_up() -> None:
        await theirs.receive_some(65536)
        await theirs.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(hang_up)
        with pytest.raises(NoHandshakeAnswer):
            await connect_websocket(ours, "[::1]:9", "/", max_message_size=LIMIT,
                                    receive_buffer=65536)


async def test_two_closes_and_a_late_reader_share_the_stream():
    """A connection closed from two tasks at once (a shutdown and a
    ProtocolError), and its reader coming back to read meanwhile: one task
    reads the stream at a time, every one of them ends."""
    ws, client = await server_and_client()
    ended: list[str] = []

    async def close(name: str) -> None:
        await ws.aclose(1001, "going away")
        ended.append(name)

    async def read() -> None:
        with pytest.raises(ConnectionClosed) as closed:
            await ws.get_message()
        assert closed.value.reason.code == 1001
        ended.append("reader")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(close, "first")
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(close, "second")
        nursery.start_soon(read)
        await trio.testing.wait_all_tasks_blocked()
        event = await client.expect_close(1001)
        await client.send(event.response())
    assert sorted(ended) == ["first", "reader", "second"]
