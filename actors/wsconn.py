"""One websocket over a Trio stream, driven by wsproto in the caller's task.

The transport (actors.ws) needs little of a websocket library: a handshake
each way, whole messages in and out, pings answered, a close handshake, and
a bound on a message's size. trio-websocket, which it used before, runs a
reader task per connection that hands every message to the consumer through
a memory channel: two task switches and a channel per message. Here the
task that calls `get_message` reads the socket and runs wsproto itself, so
a message costs one wake-up: an echo server does ~15,400 messages/s this
way against ~10,400 over trio-websocket with 1,000 connections on this
machine (bench/ws_floor.py), and with one connection per node a heartbeat
is mostly that cost.

Concurrency: one task reads (`get_message`); any task may send (a lock
keeps frames whole); `aclose` may be called from any task and more than
once, also while another one reads: one task at a time reads the stream,
the others wait for it to close.
"""

from __future__ import annotations

from collections import deque

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.utilities import RemoteProtocolError

__all__ = ["CloseReason", "ConnectionClosed", "HandshakeError", "NoHandshakeAnswer", "WebSocket",
           "accept_websocket", "connect_websocket", "peer_of"]

CLOSE_ABNORMAL = 1006  # no close frame: the connection was lost (RFC 6455, 7.1.5)
CLOSE_TOO_BIG = 1009


class CloseReason:
    """Why a websocket closed: the close frame's code and reason, and
    whether the peer sent it (False: we closed, or found its frames bad)."""

    __slots__ = ("code", "reason", "by_peer")

    def __init__(self, code: int, reason: str | None, by_peer: bool):
        self.code, self.reason, self.by_peer = code, reason, by_peer

    def __repr__(self) -> str:
        side = "peer" if self.by_peer else "local"
        return f"CloseReason({self.code}, {self.reason!r}, {side})"


class ConnectionClosed(Exception):
    """The websocket is closed; `reason` says how."""

    def __init__(self, reason: CloseReason):
        super().__init__(reason)
        self.reason = reason


class HandshakeError(Exception):
    """The opening handshake failed: not a websocket request, a refused
    upgrade (e.g. a plain HTTP server), or the stream ended during it."""


class NoHandshakeAnswer(HandshakeError):
    """The peer hung up without a word of answer to our handshake (a TLS
    listener dialled without TLS does that)."""


class WebSocket:
    """An open websocket (made by accept_websocket or connect_websocket)."""

    def __init__(self, stream: trio.abc.Stream, protocol: WSConnection, *, is_client: bool,
                 max_message_size: int, receive_buffer: int):
        self._stream = stream
        self._protocol = protocol
        self.is_client = is_client
        self.max_message_size = max_message_size
        self._receive_buffer = receive_buffer
        self.remote = peer_of(stream)  # (host, port), None if unknown
        self.closed: CloseReason | None = None
        self._messages: deque[str | bytes] = deque()
        self._parts: list[str | bytes] = []  # a fragmented message so far
        self._size = 0
        self._send_lock = trio.Lock()
        self._reading = False  # a task is reading the stream (get_message or aclose)
        self._stream_closed = trio.Event()

    async def get_message(self) -> str | bytes:
        """The next whole message (str for text, bytes for binary);
        ConnectionClosed once the websocket is closed."""
        if self._messages:
            return self._messages.popleft()
        if self._reading:  # an aclose is reading the peer's last frames
            await self._stream_closed.wait()
            raise ConnectionClosed(self._lost())
        self._reading = True
        try:
            while not self._messages:
                if self._stream_closed.is_set():
                    raise ConnectionClosed(self._lost())
                await self._receive()
            return self._messages.popleft()
        finally:
            self._reading = False

    async def send_message(self, message: str | bytes) -> None:
        """Send one message (text for str, binary for bytes)."""
        if self.closed is not None:
            raise ConnectionClosed(self.closed)
        event = TextMessage(data=message) if isinstance(message, str) else BytesMessage(data=message)
        await self._send(self._protocol.send(event))

    async def aclose(self, code: int = 1000, reason: str | None = None) -> None:
        """Close: send a close frame, wait for the peer's (the caller bounds
        the wait), then close the stream, also when cancelled."""
        try:
            if self.closed is None:
                self.closed = CloseReason(code, reason, by_peer=False)
                await self._send_close(code, reason)
            if self._reading:  # another task reads the peer's close frame for us
                await self._stream_closed.wait()
            else:
                self._reading = True
                try:
                    while not self._stream_closed.is_set():
                        await self._receive()
                finally:
                    self._reading = False
        finally:
            await self._close_stream()

    # -------------------------------------------------------------- inside

    def _lost(self) -> CloseReason:
        """Why it closed; a websocket that ended without a close frame was
        lost (1006)."""
        if self.closed is None:
            self.closed = CloseReason(CLOSE_ABNORMAL, "connection lost", by_peer=False)
        return self.closed

    async def _receive(self) -> None:
        """Read once from the stream and act on what it carried."""
        try:
            data = await self._stream.receive_some(self._receive_buffer)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        if not data:
            self._lost()
            await self._close_stream()
            return
        self._protocol.receive_data(data)
        for event in self._protocol.events():
            kind = type(event)
            if kind is TextMessage or kind is BytesMessage:
                if self.closed is None:
                    await self._take(event)  # type: ignore[arg-type]
            elif kind is Ping:
                if self._protocol.state is ConnectionState.OPEN:
                    await self._send_quietly(self._protocol.send(event.response()))  # type: ignore[union-attr]
            elif kind is CloseConnection:
                await self._closing(event)  # type: ignore[arg-type]
                return

    async def _take(self, event: TextMessage | BytesMessage) -> None:
        if event.message_finished and not self._parts:
            if len(event.data) > self.max_message_size:
                await self._refuse_too_big()
            else:
                self._messages.append(event.data)
            return
        self._parts.append(event.data)
        self._size += len(event.data)
        if self._size > self.max_message_size:
            await self._refuse_too_big()
        elif event.message_finished:
            empty = "" if isinstance(event, TextMessage) else b""
            self._messages.append(empty.join(self._parts))  # type: ignore[arg-type]
            self._parts, self._size = [], 0

    async def _refuse_too_big(self) -> None:
        self._parts, self._size = [], 0
        reason = f"message over the {self.max_message_size}-byte limit"
        self.closed = CloseReason(CLOSE_TOO_BIG, reason, by_peer=False)
        await self._send_close(CLOSE_TOO_BIG, reason)
        await self._close_stream()

    async def _closing(self, event: CloseConnection) -> None:
        """A close frame came (or wsproto found the peer's frames bad)."""
        state = self._protocol.state
        if state is ConnectionState.REMOTE_CLOSING:  # the peer closes: answer it
            if self.closed is None:
                self.closed = CloseReason(event.code, event.reason, by_peer=True)
            await self._send_quietly(self._protocol.send(event.response()))
        elif state is ConnectionState.OPEN:  # a frame that broke the protocol
            if self.closed is None:
                self.closed = CloseReason(event.code, event.reason, by_peer=False)
            await self._send_close(event.code, event.reason)
        # else: the peer's answer to our close
        await self._close_stream()

    async def _send_close(self, code: int, reason: str | None) -> None:
        if self._protocol.state is ConnectionState.OPEN:
            await self._send_quietly(self._protocol.send(CloseConnection(code=code, reason=reason)))

    async def _send(self, data: bytes) -> None:
        try:
            self._send_lock.acquire_nowait()  # no checkpoint when nobody else sends
        except trio.WouldBlock:
            await self._send_lock.acquire()
        try:
            await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise ConnectionClosed(self._lost()) from None
        finally:
            self._send_lock.release()

    async def _send_quietly(self, data: bytes) -> None:
        """Send a control frame; a peer that is gone does not need it."""
        try:
            await self._send(data)
        except ConnectionClosed:
            pass

    async def _close_stream(self) -> None:
        if not self._stream_closed.is_set():
            self._stream_closed.set()
            await trio.aclose_forcefully(self._stream)


async def accept_websocket(stream: trio.abc.Stream, *, max_message_size: int,
                           receive_buffer: int) -> WebSocket:
    """The server's side of the opening handshake on an accepted stream
    (the caller bounds its time); HandshakeError if it is not one, after
    answering a request that is not an upgrade with HTTP 400."""
    protocol = WSConnection(ConnectionType.SERVER)
    while True:
        data = await _receive_handshake(stream, receive_buffer)
        try:
            protocol.receive_data(data)
        except RemoteProtocolError as exc:
            if exc.event_hint is not None:
                try:
                    await stream.send_all(protocol.send(exc.event_hint))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
            raise HandshakeError(f"not a websocket request: {exc}") from None
        for event in protocol.events():
            if isinstance(event, Request):
                await _send_handshake(stream, protocol.send(AcceptConnection()))
                return WebSocket(stream, protocol, is_client=False,
                                 max_message_size=max_message_size, receive_buffer=receive_buffer)


async def connect_websocket(stream: trio.abc.Stream, host: str, path: str, *,
                            max_message_size: int, receive_buffer: int) -> WebSocket:
    """The client's side of the opening handshake on a connected stream
    (the caller bounds its time); HandshakeError if the server refuses it."""
    protocol = WSConnection(ConnectionType.CLIENT)
    await _send_handshake(stream, protocol.send(Request(host=host, target=path)))
    first = True
    while True:
        data = await _receive_handshake(stream, receive_buffer, first)
        first = False
        try:
            protocol.receive_data(data)
        except RemoteProtocolError as exc:
            raise HandshakeError(f"bad handshake answer: {exc}") from None
        for event in protocol.events():
            if isinstance(event, AcceptConnection):
                return WebSocket(stream, protocol, is_client=True,
                                 max_message_size=max_message_size, receive_buffer=receive_buffer)
            if isinstance(event, (RejectConnection, RejectData)):
                status = getattr(event, "status_code", None)
                raise HandshakeError("the server refused the websocket upgrade"
                                     + (f" (HTTP {status})" if status else ""))


async def _receive_handshake(stream: trio.abc.Stream, size: int, first: bool = False) -> bytes:
    try:
        data = await stream.receive_some(size)
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        if first and isinstance(stream, trio.SocketStream):
            raise NoHandshakeAnswer(f"the peer hung up on the handshake: {exc}") from exc
        raise HandshakeError(f"the connection broke during the handshake: {exc}") from exc
    if not data:
        if first:
            raise NoHandshakeAnswer("the peer hung up on the handshake")
        raise HandshakeError("the peer closed the connection during the handshake")
    return data


async def _send_handshake(stream: trio.abc.Stream, data: bytes) -> None:
    try:
        await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        raise HandshakeError(f"the connection broke during the handshake: {exc}") from exc


def peer_of(stream: trio.abc.Stream) -> tuple[str, int] | None:
    """The socket peer (host, port) under a SocketStream or an SSLStream."""
    while isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    sock = getattr(stream, "socket", None)
    try:
        name = sock.getpeername() if sock is not None else None
    except OSError:
        return None
    return (str(name[0]), int(name[1])) if name else None
