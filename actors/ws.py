"""The websocket transport: actor envelopes between processes, over IPv6.

Framing
    One websocket *text* frame carries one envelope, the JSON made by
    `codec.encode`, or a JSON array of envelopes: a link's writer sends what
    queued up behind a frame together (up to BATCH_BYTES), which saves a
    websocket frame and a send() per envelope under load and delays nothing.
    The first frame a dialler sends on a new connection is a hello naming
    the address it can be reached at:

        {"hello": "ws://[fd10:1234::1]:9001", "version": 1}

    The acceptor files the connection under that address, so a single
    connection carries traffic both ways: replies (and any other send) to the
    dialler go back over it, and nobody dials a peer it is already linked to.

Identity
    A dialler may put an "identity" in its hello (`hello_identity`: what
    proves who it is, e.g. a signature by its key over both addresses), and
    an acceptor given `check_identity` refuses a connection whose hello's
    identity does not check out for the address it claims, before the
    connection carries anything. TrustNet's nodes do (with TLS): together
    with the pinned certificate of the acceptor, both ends of every
    connection are then authenticated, not only the acceptor.

Trust
    A transport built with a `secret` (shared by a group of processes, e.g.
    the replicas of one registry) puts a proof of it in every hello it sends
    (actors.linkauth). An acceptor answers a hello with a proof by a welcome
    frame before anything else: {"welcome": 1, "mac": ...} when it checked
    the proof, {"welcome": 0} when it has no secret; the dialler reads it
    before the connection counts as up. A connection is trusted once the
    other side's proof checked out. Messages declared `message(...,
    trusted=True)` travel only over trusted connections: we send them (and
    the answers to them) on one, dialling for one if the link has none, and
    never in a batch with other frames; we take them only from one (else a
    ProtocolError), and we take the answer to such an ask only from one. A
    peer that answered our proof with {"welcome": 0} has no secret: for
    NO_SECRET_HOLD seconds a trusted message to it fails at once. A link's
    writes prefer its newest trusted connection; when one comes up, the
    link's unproved connections are closed, and a hello without a proof in
    the name of an address that has a trusted connection is refused, so an
    unproved connection from a member's host cannot take its traffic.
    Hellos without a proof are otherwise served as before (other processes
    share the port); a wrong proof or welcome closes the connection (1002).

Links
    A link is everything about one peer address: its live connections
    (normally one; two for a while when both sides dial at once, the newest
    carries our writes), a bounded queue of outbound frames and one writer
    task. `send` waits while the queue is full (backpressure); `send_nowait`
    raises MailboxFull instead. When the last connection of a link closes,
    `link_down(address)` fails the asks waiting on it at once.

Reconnecting
    While someone needs a link that is down (a `send` waiting, or frames
    queued), it is dialled again and again with full-jitter exponential
    backoff: the first try at once, then a random wait in [0, 50 ms],
    [0, 100 ms], ... capped at [0, 5 s]. A peer that cannot be reached for
    `unreachable_after` seconds makes `send` raise Unreachable, and the frames
    queued for it are dropped with a warning (delivery is best effort; the
    asks among them have already failed through `link_down`).

TLS
    A transport given `tls_server` (an ssl.SSLContext with its certificate)
    accepts only TLS connections, and its address is wss://[addr]:port. A
    link to a wss:// address is dialled over TLS, verified against
    `tls_client` (default: the system's trust store) with the address's host
    as the name the certificate must carry (an IP address SAN for an IP
    literal). The scheme is part of the address: ws://[::1]:9 and
    wss://[::1]:9 are two links. A TLS handshake that fails is a failed dial
    (backoff, retry), on the accepting side one closed connection.
    `tls_pin` pins instead: for a peer address it names, the certificate
    must carry exactly that public key (its SubjectPublicKeyInfo), and no
    CA, name or date is checked: peers with self-signed certificates whose
    keys a directory vouches for (TrustNet's nodes, whose registry lists
    each node's key).

Garbage
    A frame that is binary, is not a well-formed envelope, or is larger than
    `max_frame_bytes` is a ProtocolError: it is logged with the peer, that one
    connection is closed (1002 protocol error, 1009 too big) and every other
    link keeps going. A missing or malformed hello closes the same way.

Tasks
    serve() runs two nurseries. The main one (cancelled with serve) holds the
    listener, one writer per link and the dial loops. The connection nursery
    holds every connection and its reader; it is shielded from serve's
    cancellation until serve has sent every peer a close frame (1001, going
    away), so peers see an orderly close rather than a dropped socket.
"""

from __future__ import annotations

import functools
import hmac
import ipaddress
import logging
import math
import random
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import Literal
from urllib.parse import urlsplit

import orjson
import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from . import codec
from .codec import Envelope
from .errors import MailboxFull, ProtocolError, Unreachable
from .groups import collapsed
from .linkauth import ProofChecker, check_welcome, hello_proof, welcome_frame
from .transport import Deliver, LinkDown
from .wsconn import (
    CloseReason,
    ConnectionClosed,
    HandshakeError,
    NoHandshakeAnswer,
    WebSocket,
    accept_websocket,
    connect_websocket,
    peer_of,
)

__all__ = [
    "WebsocketTransport", "batch_frames", "decode_frame", "format_address", "hello_frame",
    "is_tls", "normalize_address", "parse_address", "parse_hello", "read_hello",
]

log = logging.getLogger("actors.ws")

MiB = 1024 * 1024
HELLO_VERSION = 1

# Websocket close codes (RFC 6455, section 7.4.1).
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_INVALID_DATA = 1007  # e.g. a text frame that is not UTF-8
CLOSE_TOO_BIG = 1009
# Codes the websocket layer closes with when the peer's frames are bad.
_WEBSOCKET_ERRORS = (CLOSE_PROTOCOL_ERROR, CLOSE_INVALID_DATA, CLOSE_TOO_BIG)
_CLOSE_REASON_BYTES = 120  # a close frame's reason must fit in 123 bytes

# A connection that stayed up at least this long was a working link, so the
# next reconnect starts without delay; one that dies younger counts as a
# failed dial, so a peer that accepts and at once drops us is not hammered.
STABLE_AFTER = 1.0

# A peer that answered our proof with {"welcome": 0} has no secret: for this
# long, a trusted message to it fails at once instead of dialling again.
NO_SECRET_HOLD = 10.0

LISTEN_BACKLOG = 128
# A batch of queued envelopes sent as one frame stays under this (and under
# max_frame_bytes): far below the 1 MiB default limit a peer accepts.
BATCH_BYTES = 64 * 1024
# How much a connection reads from its socket at a time.
RECEIVE_BUFFER = 64 * 1024

# What a failed dial raises: the TCP connect (OSError), the websocket handshake
# (HandshakeError, e.g. a plain HTTP server refusing the upgrade), a closed
# connection while saying hello, or connect_timeout running out.
# A failed TLS handshake (bad certificate, a plain peer) is a BrokenResourceError.
_DIAL_ERRORS = (OSError, HandshakeError, ConnectionClosed, trio.TooSlowError,
                trio.BrokenResourceError)
_SCHEMES = ("ws", "wss")


# ------------------------------------------------------------- addresses

def format_address(host: str, port: int, scheme: str = "ws") -> str:
    """ws://[host]:port for an IPv6 literal, ws://host:port otherwise
    (wss:// with scheme="wss": a TLS listener)."""
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def parse_address(address: str) -> tuple[str, int]:
    """(host, port) of a ws:// or wss://host:port address; ValueError if it is not one."""
    return _parse(address)[1:]


def is_tls(address: str) -> bool:
    """Whether a (valid) address is dialled over TLS: wss://."""
    return address[:6].lower() == "wss://"


def _parse(address: str) -> tuple[str, str, int]:
    parts = urlsplit(address)
    try:
        port = parts.port
    except ValueError:
        port = None
    if (parts.scheme not in _SCHEMES or not parts.hostname or port is None
            or parts.path not in ("", "/") or parts.query or parts.fragment
            or parts.username is not None):
        raise ValueError(f"{address!r} is not a ws://host:port (or wss://) address")
    return parts.scheme, parts.hostname, port


@functools.lru_cache(maxsize=4096)
def normalize_address(address: str) -> str:
    """One spelling per address (ws://[0::1]:9/ -> ws://[::1]:9), so a peer has one link.

    Every send asks (a reply goes to its ask's sender): cached."""
    scheme, host, port = _parse(address)
    try:
        host = ipaddress.ip_address(host).compressed
    except ValueError:
        pass  # a host name; urlsplit has lower-cased it
    return format_address(host, port, scheme)


# ---------------------------------------------------------------- frames

def hello_frame(address: str, proof: dict | None = None, identity: object = None) -> str:
    hello: dict[str, object] = {"hello": address, "version": HELLO_VERSION}
    if proof is not None:
        hello["proof"] = proof
    if identity is not None:
        hello["identity"] = identity
    return orjson.dumps(hello).decode()


def parse_hello(frame: str | bytes) -> str:
    """The dialler's (normalised) address from its hello; ProtocolError if it is not one."""
    return read_hello(frame)[0]


def read_hello(frame: str | bytes) -> tuple[str, object, object]:
    """The dialler's (normalised) address, its proof of the shared secret
    (None if it gave none; see actors.linkauth) and its identity (None if
    none; see `check_identity`); ProtocolError if the frame is not a hello."""
    if not isinstance(frame, str):
        raise ProtocolError("the hello must be a text frame")
    try:
        data = orjson.loads(frame)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(f"the hello is not JSON: {exc}") from None
    if not isinstance(data, dict) or not {"hello", "version"} <= set(data) <= {
            "hello", "version", "proof", "identity"}:
        raise ProtocolError('the hello must be {"hello": "ws://...", "version": 1}'
                            ' (and an optional "proof" and "identity")')
    version, address = data["version"], data["hello"]
    if type(version) is not int or version != HELLO_VERSION:
        raise ProtocolError(f"unsupported hello version {version!r} (want {HELLO_VERSION})")
    if not isinstance(address, str):
        raise ProtocolError("the hello address must be a string")
    try:
        return normalize_address(address), data.get("proof"), data.get("identity")
    except ValueError as exc:
        raise ProtocolError(f"bad hello address: {exc}") from None


def decode_frame(frame: str | bytes) -> list[Envelope]:
    """The envelopes in one websocket message (one, or a batch of them);
    ProtocolError for anything else."""
    if not isinstance(frame, str):
        raise ProtocolError(f"binary frame ({len(frame)} bytes); envelopes travel as JSON text")
    data = codec.loads(frame)
    if not isinstance(data, list):
        return [codec.envelope_from_json(data)]
    if not data:
        raise ProtocolError("an empty batch of envelopes")
    return [codec.envelope_from_json(item) for item in data]


def batch_frames(frames: list[str]) -> str:
    """Envelope frames as the one frame of a batch (see decode_frame)."""
    return frames[0] if len(frames) == 1 else "[" + ",".join(frames) + "]"


# ----------------------------------------------------------------- links

class _Connection:
    """One websocket of a link, with what the logs say about it."""

    __slots__ = ("ws", "remote", "direction", "since", "trusted")

    def __init__(self, ws: WebSocket):
        self.ws = ws
        self.remote = _endpoint(ws)  # read now: the socket may be gone when we log its end
        self.direction: Literal["in", "out"] = "out" if ws.is_client else "in"
        self.since = trio.current_time()
        # Set once the peer proved the shared secret: it may carry `trusted` messages.
        self.trusted = False


class _NoSecret(Exception):
    """A dial for a trusted connection reached a peer without the secret."""


class _NoWebsocketAnswer(trio.TooSlowError):
    """TCP connected but the websocket handshake got no answer (in time, or
    before the peer hung up); a TLS listener dialled as ws:// does that."""


class _TrustedFrame(str):
    """An encoded envelope whose message needs a trusted connection."""

    __slots__ = ()


class _Link:
    """One peer address: its live connections, its outbound queue, its dial state."""

    def __init__(self, peer: str, queue_size: int):
        self.peer = peer
        self.host, self.port = parse_address(peer)
        self.tls = is_tls(peer)
        self.http_host = peer.split("://", 1)[1]  # the Host header: [addr]:port
        self.queue_in, self.queue_out = trio.open_memory_channel[str](queue_size)
        # Oldest first; the newest carries our writes.
        self.connections: list[_Connection] = []
        self.waiters = 0  # tasks waiting for this link to come up; dial while > 0
        self.trust_waiters = 0  # those of them that need a trusted connection
        self.no_secret_until = -math.inf  # see NO_SECRET_HOLD
        self.dialing = False
        self.failures = 0  # failed dials (and short-lived links) since the last good link
        self.last_error = "not dialled yet"
        self.warned = False  # a dial failure that is likely a misconfiguration was logged
        self._changed = trio.Event()

    @property
    def current(self) -> _Connection | None:
        """The connection our writes go over: the newest trusted one, else the newest."""
        return self.usable(False)

    def usable(self, trusted: bool) -> _Connection | None:
        """The connection for a write (one that needs a trusted connection
        if `trusted`), None if there is none."""
        for conn in reversed(self.connections):
            if conn.trusted:
                return conn
        return None if trusted or not self.connections else self.connections[-1]

    @property
    def wanted(self) -> _Connection | None:
        """What the waiting senders need: a trusted connection if any of them
        needs one, else any; None means dial."""
        return self.usable(self.trust_waiters > 0)

    def changed(self) -> None:
        """Wake every task waiting for a connection to come or go."""
        self._changed.set()
        self._changed = trio.Event()

    async def wait_changed(self) -> None:
        await self._changed.wait()

    def drop_queued(self) -> int:
        """Empty the outbound queue; returns how many frames were dropped."""
        dropped = 0
        while True:
            try:
                self.queue_out.receive_nowait()
            except trio.WouldBlock:
                return dropped
            dropped += 1


# ------------------------------------------------------------- transport

class WebsocketTransport:
    """Actor envelopes between processes over websockets (see the module doc).

    The listening socket is bound here, not in serve(), so `address` carries
    the real port even for port=0: ActorSystem reads it when it is built,
    before serve() runs. serve() can run again after it ended (same port).
    """

    def __init__(
        self,
        host: str = "::",
        port: int = 0,
        advertise: str | None = None,
        *,
        max_frame_bytes: int = MiB,
        queue_size: int = 1000,
        unreachable_after: float = 2.0,
        connect_timeout: float = 2.0,
        hello_timeout: float = 5.0,
        close_timeout: float = 1.0,
        backoff_initial: float = 0.05,
        backoff_max: float = 5.0,
        rng: random.Random | None = None,
        secret: bytes | None = None,
        tls_server: ssl.SSLContext | None = None,
        tls_client: ssl.SSLContext | None = None,
        tls_pin: Callable[[str], bytes | None] | None = None,
        hello_identity: Callable[[str], object] | None = None,
        check_identity: Callable[[str, object], Awaitable[None]] | None = None,
    ):
        """
        host:      the interface to listen on; "::" listens on every IPv6
                   address (and IPv4 too where the host allows dual-stack).
        port:      0 picks a free port; `port` and `address` then carry it.
        advertise: what peers dial to reach us: a host ("fd10:1234::1", the
                   bound port is added) or a full "ws://[addr]:port". Needed
                   when binding "::", which peers cannot dial.
        max_frame_bytes: the largest frame sent or accepted (1009 beyond).
        queue_size: outbound envelopes queued per link before `send` waits.
        unreachable_after: how long `send` waits for a link to a peer that
                   is down before it raises Unreachable.
        connect_timeout: bound on one dial (TCP plus websocket handshake).
        hello_timeout: how long an accepted connection may stay silent.
        close_timeout: bound on a close handshake.
        backoff_initial, backoff_max: the reconnect backoff (module doc).
        rng:       the jitter's source, seeded in tests that need replay.
        secret:    shared by a group of processes (actors.linkauth): links
                   between two of them are trusted and may carry messages
                   declared `trusted`; links to anyone else may not.
        tls_server: accept TLS connections only, with this context (its
                   certificate loaded); the address is then wss://.
        tls_client: what wss:// peers' certificates are checked against;
                   None: the system's trust store.
        tls_pin:   address -> the DER SubjectPublicKeyInfo a wss:// peer's
                   certificate must carry (checked instead of tls_client;
                   b"": none will do), or None for that address (checked
                   against tls_client).
        hello_identity: address dialled -> what our hellos carry as
                   "identity" (JSON), for acceptors that check it.
        check_identity: awaited with the address an inbound hello claims and
                   its "identity" (None if it has none) before the
                   connection is filed; raises ProtocolError to refuse it.
                   Within hello_timeout.
        """
        self.host = host
        self.port = port
        self.max_frame_bytes = max_frame_bytes
        self.queue_size = queue_size
        self.unreachable_after = unreachable_after
        self.connect_timeout = connect_timeout
        self.hello_timeout = hello_timeout
        self.close_timeout = close_timeout
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self._rng = rng or random.Random()
        if secret is not None and not secret:
            raise ValueError("an empty secret; pass None for no secret")
        self._secret = secret
        self._tls_server = tls_server
        self._tls_client = tls_client
        self._tls_pin = tls_pin
        self._hello_identity = hello_identity
        self._check_identity = check_identity
        self._tls_pinning: ssl.SSLContext | None = None

        self._sock: socket.socket | None = self._bind()
        self.port = self._sock.getsockname()[1]
        try:
            self.address = self._advertised(advertise)
        except ValueError:
            self.close()
            raise
        self._proofs = ProofChecker(secret, self.address) if secret is not None else None
        self._hello = hello_frame(self.address)
        # Dial from the address we advertise, so the peer can check that our
        # hello comes from the host it names (see _check_origin).
        self._source = _source_address(self.address)

        self._links: dict[str, _Link] = {}
        self._nursery: trio.Nursery | None = None  # set while serving
        self._io: trio.Nursery | None = None
        self._deliver: Deliver | None = None
        self._link_down: LinkDown | None = None

    def __repr__(self) -> str:
        return f"WebsocketTransport({self.address})"

    # ---------------------------------------------------------- public API

    async def serve(
        self,
        deliver: Deliver,
        link_down: LinkDown,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept and dial links until cancelled; started() once listening."""
        self._deliver, self._link_down = deliver, link_down
        sock, self._sock = self._sock or self._bind(), None
        listener: trio.abc.Listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        if self._tls_server is not None:
            listener = trio.SSLListener(listener, self._tls_server, https_compatible=True)
        try:
            with collapsed():
                async with trio.open_nursery() as nursery:
                    await self._serve_in(nursery, listener, task_status)
        finally:
            # Writers and connections are gone: fail senders still waiting
            # for room in a queue, and start afresh if served again.
            for link in self._links.values():
                link.queue_out.close()
            self._links.clear()
            self._io = None

    async def send(self, address: str, envelope: Envelope) -> None:
        """Queue `envelope` for `address`, waiting while the link's queue is full.

        Raises Unreachable when no link to `address` comes up within
        `unreachable_after` seconds, ProtocolError when the envelope is
        larger than `max_frame_bytes`."""
        frame = self._frame(envelope)
        link = self._link(address)
        trusted = isinstance(frame, _TrustedFrame)
        if link.usable(trusted) is None:
            await self._connected(link, trusted)
        try:
            await link.queue_in.send(frame)
        except trio.BrokenResourceError:
            raise Unreachable(f"cannot reach {address}: the transport stopped") from None

    def send_nowait(self, address: str, envelope: Envelope) -> None:
        """Queue `envelope` for `address`; MailboxFull instead of waiting.

        The link is dialled in the background if it is down; if that fails
        for `unreachable_after` seconds the envelope is dropped (logged)."""
        frame = self._frame(envelope)
        link = self._link(address)
        try:
            link.queue_in.send_nowait(frame)
        except trio.WouldBlock:
            raise MailboxFull(
                f"link to {link.peer} is full ({self.queue_size} envelopes queued)") from None
        except trio.BrokenResourceError:
            raise Unreachable(f"cannot reach {address}: the transport stopped") from None

    def link_address(self, address: str) -> str:
        return normalize_address(address)

    def link_error(self, address: str) -> str | None:
        """Why the link to `address` is down (its last failed dial, e.g. a
        certificate that did not verify); None if it is up or never used."""
        try:
            link = self._links.get(normalize_address(address))
        except ValueError:
            return None
        return None if link is None or link.connections else link.last_error

    def connections(self, address: str) -> list[Literal["in", "out"]]:
        """The live connections to `address`, oldest first: "in" was accepted,
        "out" was dialled by us. Empty when the link is down."""
        link = self._links.get(normalize_address(address))
        if link is None:
            return []
        return [conn.direction for conn in link.connections]

    def close(self) -> None:
        """Release the listening socket of a transport that is not serving."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    # ------------------------------------------------------------ serving

    async def _serve_in(self, nursery: trio.Nursery, listener: trio.abc.Listener,
                        task_status: trio.TaskStatus[None]) -> None:
        io_scope = trio.CancelScope(shield=True)
        io = await nursery.start(self._host_connections, io_scope)
        try:
            await nursery.start(functools.partial(
                trio.serve_listeners, self._handshake, [listener], handler_nursery=io))
            self._nursery, self._io = nursery, io
            log.info("listening", extra={"address": self.address})
            task_status.started()
            await trio.sleep_forever()
        finally:
            self._nursery = None  # new sends fail with Unreachable from here on
            with trio.CancelScope(shield=True):
                await listener.aclose()
                await self._close_links()
            io_scope.cancel()

    async def _host_connections(self, io_scope: trio.CancelScope,
                                *, task_status: trio.TaskStatus[trio.Nursery]) -> None:
        """The nursery every connection lives in (see "Tasks" in the module doc)."""
        with io_scope:
            async with trio.open_nursery() as io:
                task_status.started(io)
                await trio.sleep_forever()

    async def _close_links(self) -> None:
        """Send every peer a close frame (going away), bounded by close_timeout."""
        with trio.move_on_after(self.close_timeout):
            async with trio.open_nursery() as nursery:
                for link in self._links.values():
                    for conn in link.connections:
                        nursery.start_soon(conn.ws.aclose, CLOSE_GOING_AWAY, "shutting down")

    # ---------------------------------------------------- inbound connections

    async def _handshake(self, stream: trio.abc.Stream) -> None:
        """One accepted stream: the websocket handshake within
        connect_timeout, then `_accept`; the stream is closed however it ends."""
        async with stream:
            ws = None
            with trio.move_on_after(self.connect_timeout):
                try:
                    ws = await accept_websocket(stream, max_message_size=self.max_frame_bytes,
                                                receive_buffer=RECEIVE_BUFFER)
                except HandshakeError as exc:
                    log.debug("websocket handshake failed",
                              extra={"remote": _endpoint(stream), "error": _describe(exc)})
            if ws is not None:
                await self._accept(_Connection(ws))

    async def _accept(self, conn: _Connection) -> None:
        """One inbound connection: a hello first, then it is a link like any other."""
        hello = await self._receive_hello(conn)
        if hello is None:
            return
        peer, welcome = hello
        try:
            link = self._link(peer)
        except Unreachable:  # we are shutting down
            await self._close(conn, CLOSE_GOING_AWAY, "shutting down")
            return
        if self._secret is not None and not conn.trusted and link.usable(True) is not None:
            await self._reject(conn, peer, ProtocolError(
                f"{peer} has a connection that proved the shared secret; a hello in its "
                "name must prove it too"))
            return
        if welcome is not None:
            try:
                await conn.ws.send_message(orjson.dumps(welcome).decode())
            except ConnectionClosed as closed:
                self._note_closed(conn, peer, closed.reason)
                return
        await self._run_connection(link, conn)

    async def _receive_hello(self, conn: _Connection) -> tuple[str, dict | None] | None:
        """The peer address from the first frame and the welcome to answer
        it with (None: its hello had no proof), or None after closing a bad
        connection. Until the hello names it, logs call the peer by its
        socket address."""
        with trio.move_on_after(self.hello_timeout):
            try:
                frame = await conn.ws.get_message()
            except ConnectionClosed as closed:
                self._note_closed(conn, conn.remote, closed.reason)
                return None
            try:
                peer, proof, identity = read_hello(frame)
                _check_origin(peer, conn.ws)
                if self._check_identity is not None:
                    try:
                        await self._check_identity(peer, identity)
                    except (ProtocolError, trio.Cancelled):
                        raise
                    except Exception as exc:  # a check that broke refuses, never crashes
                        raise ProtocolError(f"the hello's identity could not be checked: "
                                            f"{_describe(exc)}") from None
                if proof is None:
                    return peer, None
                if self._proofs is None:
                    return peer, {"welcome": 0}
                nonce = self._proofs.check(peer, proof)
                conn.trusted = True
                return peer, welcome_frame(self._secret, peer, self.address, nonce)  # type: ignore[arg-type]
            except ProtocolError as exc:
                await self._reject(conn, conn.remote, exc)
                return None
        await self._reject(conn, conn.remote,
                           ProtocolError(f"no hello within {self.hello_timeout}s"))
        return None

    # --------------------------------------------------- outbound connections

    def _link(self, address: str) -> _Link:
        """The link to `address`, created (with its writer) on first use."""
        if self._nursery is None:
            raise Unreachable(f"cannot reach {address}: the transport is not serving")
        try:
            peer = normalize_address(address)
        except ValueError as exc:
            raise Unreachable(f"cannot reach {address}: {exc}") from None
        link = self._links.get(peer)
        if link is None:
            link = self._links[peer] = _Link(peer, self.queue_size)
            self._nursery.start_soon(self._write_frames, link)
        return link

    async def _write_frames(self, link: _Link) -> None:
        """The link's writer: send queued frames in order, reconnecting as
        needed; what queued up behind a frame goes with it, as one batch."""
        budget = min(BATCH_BYTES, self.max_frame_bytes)
        carry: str | None = None  # taken from the queue, did not fit the last batch
        while True:
            if carry is None:
                try:
                    carry = await link.queue_out.receive()
                except (trio.EndOfChannel, trio.ClosedResourceError):
                    return
            batch, size, carry = [carry], len(carry), None
            # A batch is all trusted frames or none: they may need different
            # connections (or none may be found for the trusted ones).
            trusted = isinstance(batch[0], _TrustedFrame)
            while size < budget:
                try:
                    frame = link.queue_out.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                    break
                if (size + 1 + len(frame) > budget - 2
                        or isinstance(frame, _TrustedFrame) != trusted):
                    carry = frame
                    break
                batch.append(frame)
                size += 1 + len(frame)
            await self._write(link, batch_frames(batch), len(batch), trusted)

    async def _write(self, link: _Link, frame: str, envelopes: int, trusted: bool) -> None:
        while True:
            conn = link.usable(trusted)
            if conn is None:
                try:
                    conn = await self._connected(link, trusted)
                except Unreachable as exc:
                    if trusted and link.current is not None:
                        # Only this batch needs what is missing; the frames
                        # behind it can go over the link as it is.
                        log.warning("no trusted link to the peer, dropping envelopes",
                                    extra={"peer": link.peer, "dropped": envelopes,
                                           "error": str(exc)})
                        return
                    dropped = envelopes + link.drop_queued()
                    log.warning("peer unreachable, dropping queued envelopes",
                                extra={"peer": link.peer, "dropped": dropped, "error": str(exc)})
                    return
            try:
                await conn.ws.send_message(frame)
                return
            except ConnectionClosed:
                # Try again on the next connection. The reader of this one
                # may not have noticed yet, so take it off the link now.
                self._detach(link, conn)

    async def _connected(self, link: _Link, trusted: bool = False) -> _Connection:
        """The link's live connection (a trusted one if `trusted`), dialling
        if there is none; Unreachable after `unreachable_after` seconds
        without one, or at once for a trusted one without a secret."""
        if trusted and self._secret is None:
            raise Unreachable(f"{link.peer}: the message needs a trusted link and this "
                              "transport has no secret")
        if trusted and trio.current_time() < link.no_secret_until:
            raise Unreachable(f"{link.peer}: the message needs a trusted link and the peer "
                              "has no shared secret (it answered our proof so)")
        link.waiters += 1
        link.trust_waiters += trusted
        try:
            with trio.move_on_after(self.unreachable_after):
                while (conn := link.usable(trusted)) is None:
                    if not link.dialing:
                        self._start_dialling(link)
                    await link.wait_changed()
                return conn
        finally:
            link.waiters -= 1
            link.trust_waiters -= trusted
        kind = "trusted link" if trusted else "link"
        raise Unreachable(f"{link.peer} unreachable: no {kind} within {self.unreachable_after}s "
                          f"(last error: {link.last_error})")

    def _start_dialling(self, link: _Link) -> None:
        if self._nursery is None:
            raise Unreachable(f"cannot reach {link.peer}: the transport is not serving")
        link.dialing = True
        self._nursery.start_soon(self._dial, link)

    async def _dial(self, link: _Link) -> None:
        """Dial until the link is up or nobody waits for it any more."""
        try:
            while link.wanted is None:
                if not link.waiters:
                    link.failures = 0  # the next time it is needed, try at once
                    return
                await trio.sleep(self._backoff(link.failures))
                # An inbound hello may have brought the link up meanwhile.
                if link.waiters and link.wanted is None:
                    up = await self._dial_once(link)
                    if up and link.trust_waiters and link.usable(True) is None:
                        link.failures += 1  # up, but the peer proved nothing
                        link.last_error = "the peer did not prove the shared secret"
        finally:
            link.dialing = False
            link.changed()

    async def _dial_once(self, link: _Link) -> bool:
        """One dial; True if it brought a connection up."""
        try:
            await self._io.start(self._dialled_connection, link)  # type: ignore[union-attr]
            return True
        except _DIAL_ERRORS as exc:
            link.failures += 1
            link.last_error = _describe(exc)
            # A peer that is down is routine (debug); a TLS handshake that
            # fails, or a websocket handshake nobody answers, is more likely
            # a certificate or a scheme that does not match: a warning, once
            # until the link is up again.
            if link.tls and isinstance(exc.__cause__, ssl.SSLError):
                message = "TLS handshake failed"
            elif isinstance(exc, _NoWebsocketAnswer):
                message = "no websocket handshake answer"
            else:
                message = "dial failed"
            level = logging.DEBUG
            if message != "dial failed" and not link.warned:
                level, link.warned = logging.WARNING, True
            log.log(level, message, extra={"peer": link.peer, "attempt": link.failures,
                                           "error": link.last_error})
        except (ProtocolError, _NoSecret) as exc:  # its welcome was wrong or 0
            link.failures += 1
            link.last_error = f"{type(exc).__name__}: {exc}"
        return False

    def _backoff(self, failures: int) -> float:
        """Full jitter: a first try at once, then uniform in [0, initial * 2**(n-1)], capped."""
        if failures == 0:
            return 0.0
        cap = min(self.backoff_max, self.backoff_initial * 2 ** min(failures - 1, 32))
        return self._rng.uniform(0, cap)

    async def _dialled_connection(self, link: _Link,
                                  *, task_status: trio.TaskStatus[None]) -> None:
        """Dial, say hello, then read the connection until it closes.

        Errors before started() go to the dial loop, which backs off and
        retries; after it, a failing connection ends just this link."""
        up = False
        try:
            with trio.fail_after(self.connect_timeout):
                stream = await trio.open_tcp_stream(link.host, link.port,
                                                    local_address=self._source)
                if link.tls:
                    stream = await self._tls_handshake(stream, link)
            proof = identity = nonce = None
            if self._secret is not None:  # a fresh proof per connection
                proof = hello_proof(self._secret, self.address, link.peer)
                nonce = proof["nonce"]
            if self._hello_identity is not None:
                identity = self._hello_identity(link.peer)
            hello = (self._hello if proof is None and identity is None
                     else hello_frame(self.address, proof, identity))
            async with stream:  # closed however the link ends
                hint = "" if link.tls else " (if the peer serves TLS, dial wss://)"
                with trio.move_on_after(self.connect_timeout) as handshake:
                    try:
                        ws = await connect_websocket(stream, link.http_host, "/",
                                                     max_message_size=self.max_frame_bytes,
                                                     receive_buffer=RECEIVE_BUFFER)
                    except NoHandshakeAnswer:
                        raise _NoWebsocketAnswer(f"the peer hung up on the websocket "
                                                 f"handshake{hint}") from None
                if handshake.cancelled_caught:
                    raise _NoWebsocketAnswer(f"no answer to the websocket handshake within "
                                             f"{self.connect_timeout:g}s{hint}")
                with trio.fail_after(self.connect_timeout):
                    await ws.send_message(hello)
                    conn = _Connection(ws)
                    if nonce is not None:
                        await self._read_welcome(link, conn, nonce)
                up = True
                await self._run_connection(link, conn, task_status=task_status)
        except Exception as exc:
            if not up:
                raise
            log.warning("link failed", extra={"peer": link.peer, "error": _describe(exc)},
                        exc_info=not isinstance(exc, _DIAL_ERRORS))

    async def _tls_handshake(self, tcp: trio.SocketStream, link: _Link) -> trio.SSLStream:
        """TLS over a dialled TCP stream, the peer's certificate checked for
        the link's host, or for the key pinned for its address; closes the
        TCP stream if the handshake or the check fails."""
        pin = self._tls_pin(link.peer) if self._tls_pin is not None else None
        if pin is not None:
            if self._tls_pinning is None:
                self._tls_pinning = pinning_context()
            context = self._tls_pinning
        else:
            if self._tls_client is None:
                self._tls_client = ssl.create_default_context()
            context = self._tls_client
        stream = trio.SSLStream(tcp, context, server_hostname=link.host, https_compatible=True)
        try:
            await stream.do_handshake()
            if pin is not None:
                check_pin(stream.getpeercert(binary_form=True), pin, link.peer)
        except BaseException:
            await trio.aclose_forcefully(tcp)
            raise
        return stream

    async def _read_welcome(self, link: _Link, conn: _Connection, nonce: str) -> None:
        """The acceptor's answer to our proof: trusted if it proved the
        secret back; ProtocolError (logged, connection closed) if its answer
        is wrong."""
        frame = await conn.ws.get_message()
        try:
            data = orjson.loads(frame) if isinstance(frame, str) else None
        except orjson.JSONDecodeError:
            data = None
        try:
            if data == {"welcome": 0}:  # the acceptor has no secret
                link.no_secret_until = trio.current_time() + NO_SECRET_HOLD
                if link.connections:  # dialled for trust in vain: do not keep a spare
                    await self._close(conn, CLOSE_NORMAL, "no shared secret")
                    raise _NoSecret(f"{link.peer} has no shared secret")
                return  # an untrusted connection, the link's only one
            check_welcome(self._secret, self.address, link.peer, nonce, data)  # type: ignore[arg-type]
        except ProtocolError as exc:
            await self._reject(conn, link.peer, exc)
            raise
        conn.trusted = True

    # ------------------------------------------------------- both directions

    async def _run_connection(self, link: _Link, conn: _Connection,
                              *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                              ) -> None:
        """File `conn` under its link and deliver what it carries until it closes."""
        self._attach(link, conn)
        task_status.started()
        try:
            await self._read_frames(link, conn)
        finally:
            self._detach(link, conn)

    async def _read_frames(self, link: _Link, conn: _Connection) -> None:
        while True:
            try:
                frame = await conn.ws.get_message()
            except ConnectionClosed as closed:
                self._note_closed(conn, link.peer, closed.reason)
                return
            try:
                envelopes = decode_frame(frame)
                codec.check_trust(envelopes, conn.trusted)
            except ProtocolError as exc:
                await self._reject(conn, link.peer, exc)
                return
            if conn.direction == "in":
                # The hello named this peer (and its host is the socket's):
                # it may not speak for another address, which replies and
                # new links would then go to.
                stranger = next((e.sender for e in envelopes if e.kind in ("ask", "tell")
                                 and not _speaks_for(e.sender, link.peer)), None)
                if stranger is not None:
                    await self._reject(conn, link.peer, ProtocolError(
                        f"envelope from {stranger!r} on the link of {link.peer}"))
                    return
            for envelope in envelopes:
                try:
                    # Awaited: a full mailbox holds up this link, and through TCP
                    # the peer's writer (backpressure end to end).
                    await self._deliver(envelope, link.peer, conn.trusted)  # type: ignore[misc]
                except Exception:  # a bug in routing must not take the link down
                    log.exception("delivery failed", extra={"peer": link.peer, "to": envelope.to})

    def _attach(self, link: _Link, conn: _Connection) -> None:
        link.connections.append(conn)
        link.warned = False
        log.info("link up", extra={"peer": link.peer, "remote": conn.remote,
                                   "direction": conn.direction, "trusted": conn.trusted,
                                   "connections": len(link.connections)})
        if conn.trusted:
            link.no_secret_until = -math.inf
            # An unproved connection in the name of a peer that proves the
            # secret is not its own: it must not carry the peer's traffic.
            for other in [c for c in link.connections if not c.trusted]:
                self._io.start_soon(self._close, other, CLOSE_NORMAL,  # type: ignore[union-attr]
                                    "superseded by a connection that proved the shared secret")
        link.changed()

    def _detach(self, link: _Link, conn: _Connection) -> None:
        """Take `conn` off its link (once); the last one off means the link is down."""
        if conn not in link.connections:
            return
        link.connections.remove(conn)
        lived = trio.current_time() - conn.since
        link.failures = 0 if lived >= STABLE_AFTER else link.failures + 1
        link.changed()
        if not link.connections:
            log.info("link down", extra={"peer": link.peer, "remote": conn.remote})
            self._link_down(link.peer)  # type: ignore[misc]

    # ------------------------------------------------------------- closing

    async def _reject(self, conn: _Connection, peer: str, error: ProtocolError) -> None:
        """Log a peer's protocol error and close that connection (1002)."""
        log.warning("protocol error, closing link",
                    extra={"peer": peer, "remote": conn.remote, "error": f"ProtocolError: {error}",
                           "close_code": CLOSE_PROTOCOL_ERROR})
        await self._close(conn, CLOSE_PROTOCOL_ERROR, str(error))

    async def _close(self, conn: _Connection, code: int, reason: str) -> None:
        reason = reason.encode()[:_CLOSE_REASON_BYTES].decode(errors="ignore")
        with trio.move_on_after(self.close_timeout):
            await conn.ws.aclose(code, reason)

    def _note_closed(self, conn: _Connection, peer: str, reason: CloseReason) -> None:
        """Log why a connection closed. The websocket layer closes by itself
        (1009) on a frame over max_frame_bytes and (1002, 1007) on frames
        that break the protocol: those are the peer's protocol errors."""
        extra = {"peer": peer, "remote": conn.remote, "close_code": reason.code,
                 "close_reason": reason.reason}
        if reason.by_peer or reason.code not in _WEBSOCKET_ERRORS:
            log.debug("connection closed", extra=extra)
            return
        if reason.code == CLOSE_TOO_BIG:
            extra["error"] = (f"ProtocolError: frame over the {self.max_frame_bytes}-byte limit "
                              f"({reason.reason})")
        else:
            extra["error"] = f"ProtocolError: {reason.reason}"
        log.warning("protocol error, closing link", extra=extra)

    # -------------------------------------------------------------- helpers

    def _frame(self, envelope: Envelope) -> str:
        data = codec.encode(envelope)
        if len(data) > self.max_frame_bytes:
            raise ProtocolError(f"envelope to {envelope.to!r} is {len(data)} bytes, over the "
                                f"{self.max_frame_bytes}-byte frame limit")
        if codec.envelope_needs_trust(envelope):
            return _TrustedFrame(data.decode())
        return data.decode()

    def _bind(self) -> socket.socket:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(
            self.host, self.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        try:
            # A restarted process gets its port back despite old connections in TIME_WAIT.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and _is_wildcard(self.host):
                _allow_ipv4(sock)
            sock.bind(sockaddr)
            sock.listen(LISTEN_BACKLOG)
        except BaseException:
            sock.close()
            raise
        return sock

    def _advertised(self, advertise: str | None) -> str:
        scheme = "ws" if self._tls_server is None else "wss"
        if advertise is None:
            return normalize_address(format_address(self.host, self.port, scheme))
        if "://" in advertise:
            address = normalize_address(advertise)
            if is_tls(address) != (self._tls_server is not None):
                raise ValueError(f"advertise {advertise!r}: this transport listens with "
                                 f"{'TLS (wss://)' if self._tls_server else 'no TLS (ws://)'}")
            return address
        return normalize_address(format_address(advertise, self.port, scheme))


def _is_wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def _allow_ipv4(sock: socket.socket) -> None:
    """Dual-stack: IPv4 clients reach an IPv6 wildcard listener (where the host allows)."""
    try:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    except (OSError, AttributeError):
        log.debug("dual-stack not available; listening on IPv6 only")


def _source_address(address: str) -> str | None:
    host, _ = parse_address(address)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None  # a host name: let the kernel choose
    return None if ip.is_unspecified else ip.compressed


def _speaks_for(sender: str, peer: str) -> bool:
    """Whether an envelope's `from` ("ws://[::1]:9001/name") names the
    process address `peer` (canonical), in any spelling."""
    address = sender.rsplit("/", 1)[0]
    if address == peer:  # the usual case, without parsing
        return True
    try:
        return normalize_address(address) == peer
    except ValueError:
        return False


class PinMismatch(ssl.SSLError):
    """A pinned peer's certificate carries another key."""


def pinning_context() -> ssl.SSLContext:
    """A client context for pinned peers: TLS 1.3, no CA, name or date
    check (check_pin does the checking, after the handshake)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def certificate_key(der: bytes) -> bytes:
    """The DER SubjectPublicKeyInfo of a DER certificate."""
    return x509.load_der_x509_certificate(der).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def check_pin(der: bytes | None, pin: bytes, peer: str) -> None:
    """trio.BrokenResourceError (caused by PinMismatch: a failed TLS dial)
    unless certificate `der` carries the public key `pin`."""
    try:
        ok = bool(pin) and der is not None and hmac.compare_digest(certificate_key(der), pin)
    except ValueError:
        ok = False
    if not ok:
        cause = PinMismatch(f"{peer}'s certificate does not carry the key pinned for it"
                            if pin else f"no key is known for {peer}: no certificate will do")
        raise trio.BrokenResourceError(str(cause)) from cause


def _check_origin(peer: str, ws: WebSocket) -> None:
    """A hello may only name the host the connection comes from.

    Without this, anyone who can reach us could claim a peer's address and
    have that peer's traffic (and its replies) routed to them, or slip
    messages in as that peer. A host name cannot be checked here and an
    unspecified address cannot be dialled back: both are refused.
    """
    host, _ = parse_address(peer)
    try:
        claimed = ipaddress.ip_address(host)
    except ValueError:
        raise ProtocolError(f"hello names host {host!r}; a peer must give its IP address") from None
    if claimed.is_unspecified:
        raise ProtocolError(f"hello names the unspecified address {peer}")
    actual = ws.remote[0] if ws.remote is not None else None
    try:
        actual_ip = ipaddress.ip_address(str(actual)) if actual is not None else None
    except ValueError:
        actual_ip = None
    if isinstance(actual_ip, ipaddress.IPv6Address) and actual_ip.ipv4_mapped:
        actual_ip = actual_ip.ipv4_mapped
    if actual_ip is None or actual_ip != claimed:
        raise ProtocolError(f"hello claims {peer} but the connection comes from {actual}")


def _endpoint(connection: WebSocket | trio.abc.Stream) -> str:
    """The socket peer of a connection (or a stream not yet one), for logs."""
    remote = connection.remote if isinstance(connection, WebSocket) else peer_of(connection)
    if remote is None:
        return "?"
    return format_address(*remote).split("://", 1)[1]


def _describe(exc: BaseException) -> str:
    """`Type: message`, looking through wrappers (a broken TLS stream) for the cause."""
    text = str(exc) or str(exc.__cause__ or "")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
