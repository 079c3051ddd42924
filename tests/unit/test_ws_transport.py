"""The websocket transport inside one trio process: actor systems on [::1].

Real sockets and the real clock; timeouts here are only failure bounds, no
test asserts how long anything took.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import socket

from pathlib import Path

import orjson
import pytest
import trio
import trio.testing
from trio_websocket import ConnectionClosed, WebSocketConnection, wrap_client_stream

from actors.wsconn import WebSocket

from actors import (
    Actor,
    ActorCrashed,
    ActorNotFound,
    ActorSystem,
    AskTimeout,
    ChildSpec,
    MailboxFull,
    ProtocolError,
    Refused,
    Supervisor,
    Unreachable,
    message,
    refusal,
)
from actors.ws import (
    WebsocketTransport,
    batch_frames,
    decode_frame,
    format_address,
    hello_frame,
    normalize_address,
    parse_address,
    parse_hello,
)

BOUND = 20  # seconds; generous upper bound for anything that should "just happen"


# ------------------------------------------------------------- messages

@message("test.ws.Echo")
class Echo:
    text: str


@message("test.ws.Relay")
class Relay:
    """Ask the echo actor at `address` and answer with its reply."""
    address: str
    text: str


@message("test.ws.Record")
class Record:
    item: str


@message("test.ws.Recorded")
class Recorded:
    pass


@message("test.ws.Crash")
class Crash:
    pass


@message("test.ws.Refuse")
class Refuse:
    pass


@message("test.ws.Hang")
class Hang:
    pass


@message("test.ws.Blob")
class Blob:
    data: str


@message("test.ws.Secret", trusted=True)
class Secret:
    """Only accepted on a link whose peer proved the shared secret."""
    text: str


@refusal
class WsOutOfStock(Refused):
    pass


# --------------------------------------------------------------- actors

class Echoer(Actor):
    async def receive(self, msg):
        match msg:
            case Echo(text=text):
                return f"echo:{text}"
            case Secret(text=text):
                return f"secret:{text}"
            case Relay(address=address, text=text):
                return await self.system.ref("echo", address).ask(Echo(text))
            case Refuse():
                raise WsOutOfStock("out_of_stock", "none left", {"left": 0})
            case Crash():
                raise RuntimeError("boom")
        return await super().receive(msg)


class Recorder(Actor):
    def __init__(self) -> None:
        self.items: list[str] = []

    async def receive(self, msg):
        match msg:
            case Record(item=item):
                self.items.append(item)
            case Recorded():
                return list(self.items)


class Sleeper(Actor):
    async def receive(self, msg):
        await trio.sleep_forever()


class Sink(Actor):
    """Takes every letter but holds it until its node's gate opens (mailbox of 1)."""

    def __init__(self, node: Node) -> None:
        self.node = node

    async def receive(self, msg):
        await self.node.gate.wait()
        self.node.sunk += 1


# ------------------------------------------------------------------ nodes

class Node:
    """One ActorSystem on [::1]: its transport, a few actors, a serve() we can stop."""

    def __init__(self, host: str = "::1", **transport_options) -> None:
        self.transport = WebsocketTransport(host, **transport_options)
        self.system = ActorSystem(transport=self.transport)
        self.address = self.transport.address
        self.gate = trio.Event()
        self.sunk = 0

    async def start(self, nursery: trio.Nursery) -> None:
        supervisor = Supervisor(self.system, "root", [
            ChildSpec("echo", Echoer),
            ChildSpec("recorder", Recorder),
            ChildSpec("sleeper", Sleeper),
            ChildSpec("sink", lambda: Sink(self), mailbox_size=1),
        ], intensity=100, period=1.0)
        await nursery.start(supervisor.run)
        await self.start_serving(nursery)

    async def start_serving(self, nursery: trio.Nursery) -> None:
        await nursery.start(self._serve)

    async def _serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope() as self._scope:
            self._stopped = trio.Event()
            try:
                await self.system.serve(task_status=task_status)
            finally:
                self._stopped.set()

    async def stop_serving(self) -> None:
        self._scope.cancel()
        await self._stopped.wait()

    def ref(self, name: str, other: Node | str):
        address = other if isinstance(other, str) else other.address
        return self.system.ref(name, address)


@pytest.fixture
def nodes(nursery):
    """A factory of started nodes; they stop with the test's nursery."""

    async def make(**transport_options) -> Node:
        node = Node(**transport_options)
        await node.start(nursery)
        return node

    return make


@pytest.fixture
async def pair(nodes):
    return await nodes(), await nodes()


def dead_address() -> str:
    """A [::1] address nothing listens on."""
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
        sock.bind(("::1", 0))
        return format_address("::1", sock.getsockname()[1])


@contextlib.asynccontextmanager
async def raw_client(node: Node):
    """A bare websocket connection to `node`, for sending it anything at all.

    We own the socket: trio-websocket's client leaves it open when the
    server closes first, which is what these tests are about."""
    stream = await trio.open_tcp_stream("::1", node.transport.port)
    async with stream, trio.open_nursery() as nursery:
        ws: WebSocketConnection = await wrap_client_stream(
            nursery, stream, f"[::1]:{node.transport.port}", "/")
        yield ws
        nursery.cancel_scope.cancel()


async def eventually(check, bound: float = BOUND) -> None:
    """Poll `check()` until it is true; fail after `bound` seconds."""
    with trio.fail_after(bound):
        while not check():
            await trio.sleep(0.01)


# -------------------------------------------------------------- addresses

def test_addresses_have_one_spelling():
    assert parse_address("ws://[::1]:9001") == ("::1", 9001)
    assert parse_address("ws://node.example:80/") == ("node.example", 80)
    assert normalize_address("ws://[0:0::1]:9001/") == "ws://[::1]:9001"
    assert normalize_address("ws://[FD10:1234::0001]:9") == "ws://[fd10:1234::1]:9"
    assert normalize_address("ws://127.0.0.1:5") == "ws://127.0.0.1:5"
    for bad in ("http://[::1]:9", "ws://[::1]", "ws://[::1]:9/path", "ws://:9", "[::1]:9"):
        with pytest.raises(ValueError):
            parse_address(bad)


def test_port_zero_binds_a_real_port_and_advertise_overrides():
    bound = WebsocketTransport("::1")
    try:
        assert bound.port != 0
        assert bound.address == f"ws://[::1]:{bound.port}"
    finally:
        bound.close()
    wildcard = WebsocketTransport("::", advertise="fd10:1234::7")
    try:
        assert wildcard.address == f"ws://[fd10:1234::7]:{wildcard.port}"
    finally:
        wildcard.close()
    explicit = WebsocketTransport("::1", advertise="ws://[fd10:1234::8]:9000")
    try:
        assert explicit.address == "ws://[fd10:1234::8]:9000"
    finally:
        explicit.close()


async def test_wildcard_listener_serves_ipv6_and_where_allowed_ipv4(nodes):
    node = await nodes(host="::", advertise="::1")
    client = await nodes()
    assert node.address == f"ws://[::1]:{node.transport.port}"
    assert await client.ref("echo", node).ask(Echo("v6")) == "echo:v6"
    try:
        stream = await trio.open_tcp_stream("127.0.0.1", node.transport.port)
    except OSError as exc:
        pytest.skip(f"no dual-stack on this host: {exc}")
    await stream.aclose()


async def test_a_batch_of_envelopes_in_one_frame_is_served_in_order(nodes):
    b = await nodes()
    asks = [envelope({"$t": "test.ws.Echo", "text": f"t{k}"}, cid=k) for k in range(1, 6)]
    with trio.fail_after(BOUND):
        async with raw_client(b) as ws:
            await ws.send_message(HELLO)
            await ws.send_message(batch_frames(asks))
            replies = []
            while len(replies) < len(asks):
                replies += decode_frame(await ws.get_message())
    assert [(r.kind, r.cid, r.body) for r in replies] == [
        ("reply", k, f"echo:t{k}") for k in range(1, 6)]


async def test_a_burst_travels_in_fewer_frames_than_envelopes(pair, monkeypatch):
    """What queues up behind a frame goes with it (and arrives in order)."""
    a, b = pair
    sent: list[str] = []
    real = WebSocket.send_message

    async def counting(self, message):
        sent.append(message)
        await real(self, message)

    assert await a.ref("echo", b).ask(Echo("up")) == "echo:up"  # the link is up
    monkeypatch.setattr(WebSocket, "send_message", counting)
    recorder = a.ref("recorder", b)
    for k in range(200):
        recorder.tell_nowait(Record(str(k)))
    # (same link, so the answer comes after all 200 were handled)
    assert await recorder.ask(Recorded()) == [str(k) for k in range(200)]
    assert sum(len(decode_frame(f)) for f in sent) == 202  # 200 tells, an ask, its reply
    assert len(sent) < 100, len(sent)


def test_hello_round_trip_and_rejects():
    assert parse_hello(hello_frame("ws://[::1]:5")) == "ws://[::1]:5"
    for bad in (b"{}", "nope", "[]", '{"hello": "ws://[::1]:5"}', '{"hello": 5, "version": 1}',
                '{"hello": "ws://[::1]:5", "version": true}',
                '{"hello": "ws://[::1]:5", "version": 2}',
                '{"hello": "http://x:1", "version": 1}'):
        with pytest.raises(ProtocolError):
            parse_hello(bad)


# ----------------------------------------------------------- tell and ask

async def test_tell_and_ask_both_ways(pair):
    a, b = pair
    for item in ("one", "two", "three"):
        await a.ref("recorder", b).tell(Record(item))
    a.ref("recorder", b).tell_nowait(Record("four"))
    assert await a.ref("recorder", b).ask(Recorded()) == ["one", "two", "three", "four"]

    await b.ref("recorder", a).tell(Record("back"))
    assert await b.ref("recorder", a).ask(Recorded()) == ["back"]
    assert await b.ref("echo", a).ask(Echo("from b")) == "echo:from b"
    assert await a.ref("echo", b).ask(Echo("from a")) == "echo:from a"


async def test_one_connection_carries_both_directions(pair):
    a, b = pair
    assert await a.ref("echo", b).ask(Echo("x")) == "echo:x"
    # b asks a over the connection a dialled, and a asks b back inside that
    # ask: nobody dials a second connection.
    assert await b.ref("echo", a).ask(Echo("y")) == "echo:y"
    assert await a.ref("echo", b).ask(Relay(a.address, "z")) == "echo:z"
    assert a.transport.connections(b.address) == ["out"]
    assert b.transport.connections(a.address) == ["in"]


async def test_replies_go_back_over_the_inbound_link(nodes):
    # a advertises an address where nothing listens: b can only answer (and
    # ask back) over the connection a opened.
    a = await nodes(advertise=dead_address())
    b = await nodes()
    assert await a.ref("echo", b).ask(Echo("x")) == "echo:x"
    assert await a.ref("echo", b).ask(Relay(a.address, "back")) == "echo:back"
    assert b.transport.connections(a.address) == ["in"]


async def test_simultaneous_first_contact_both_succeed(pair):
    a, b = pair
    answers = {}

    async def ask(src: Node, dst: Node, text: str) -> None:
        answers[text] = await src.ref("echo", dst).ask(Echo(text))

    async with trio.open_nursery() as nursery:
        for i in range(5):
            nursery.start_soon(ask, a, b, f"a{i}")
            nursery.start_soon(ask, b, a, f"b{i}")
    assert answers == {t: f"echo:{t}" for t in answers} and len(answers) == 10


# ------------------------------------------------------- errors come back

async def test_refused_comes_back_as_itself(pair):
    a, b = pair
    with pytest.raises(WsOutOfStock) as refused:
        await a.ref("echo", b).ask(Refuse())
    assert (refused.value.code, refused.value.message, refused.value.details) == (
        "out_of_stock", "none left", {"left": 0})


async def test_remote_crash_is_actor_crashed(pair):
    a, b = pair
    with pytest.raises(ActorCrashed):
        await a.ref("echo", b).ask(Crash())
    # Its supervisor restarted it behind the same name.
    assert await a.ref("echo", b).ask(Echo("again")) == "echo:again"


async def test_unknown_remote_actor_is_actor_not_found(pair):
    a, b = pair
    with pytest.raises(ActorNotFound):
        await a.ref("nobody", b).ask(Echo("x"))


async def test_ask_timeout(pair):
    a, b = pair
    with pytest.raises(AskTimeout):
        await a.ref("sleeper", b).ask(Hang(), timeout=0.2)


async def test_oversized_envelope_fails_at_the_sender(nodes):
    a = await nodes(max_frame_bytes=4096)
    b = await nodes()
    with pytest.raises(ProtocolError, match="frame limit"):
        await a.ref("recorder", b).ask(Blob("x" * 8000))
    assert await a.ref("echo", b).ask(Echo("still fine")) == "echo:still fine"


# ----------------------------------------------------------- backpressure

async def test_send_nowait_raises_mailbox_full_when_the_link_queue_is_full(nodes, caplog):
    caplog.set_level(logging.INFO, logger="actors.ws")
    a = await nodes(queue_size=4, unreachable_after=0.5)
    ref = a.ref("recorder", dead_address())  # its link cannot drain
    for i in range(4):
        ref.tell_nowait(Record(str(i)))
    with pytest.raises(MailboxFull):
        ref.tell_nowait(Record("one too many"))
    # Once the peer has been unreachable for unreachable_after, the queue is
    # dropped (and said so) rather than kept, and redialled, for ever.
    await eventually(lambda: any(getattr(r, "dropped", None) == 4 for r in caplog.records))
    ref.tell_nowait(Record("room again"))


def fill_link(ref, msg) -> int:
    """tell_nowait until the link's queue is full; how many went in."""
    sent = 0
    while True:
        try:
            ref.tell_nowait(msg)
        except MailboxFull:
            return sent
        sent += 1


async def jam(ref, msg) -> int:
    """Fill a link whose receiver does not read until its queue stays full.

    A queue that is only briefly full drains while every task is idle, so
    fill again after each quiet moment until nothing more fits."""
    sent = 0
    with trio.fail_after(BOUND):
        while True:
            added = fill_link(ref, msg)
            sent += added
            if sent and not added:
                return sent
            await trio.testing.wait_all_tasks_blocked(cushion=0.05)


async def test_a_stuck_receiver_pushes_back_to_the_sender_and_loses_nothing(nodes, nursery):
    a = await nodes(queue_size=4)
    b = await nodes()
    sink = a.ref("sink", b)
    blob = Blob("x" * 256 * 1024)
    # b's sink holds its letters: b stops reading, TCP fills, a's queue fills.
    sent = await jam(sink, blob)

    # A waiting tell is held back rather than failed ...
    told = trio.Event()

    async def tell() -> None:
        await sink.tell(blob)
        told.set()

    nursery.start_soon(tell)
    await trio.testing.wait_all_tasks_blocked(cushion=0.05)
    assert not told.is_set()

    # ... and once b's sink lets go, everything arrives.
    b.gate.set()
    await eventually(lambda: told.is_set() and b.sunk == sent + 1)


async def test_a_sender_held_back_fails_when_the_transport_stops(nodes, nursery):
    a = await nodes(queue_size=2)
    b = await nodes()
    sink = a.ref("sink", b)
    blob = Blob("x" * 256 * 1024)
    await jam(sink, blob)
    outcome: list[BaseException] = []

    async def tell() -> None:
        try:
            await sink.tell(blob)
        except Exception as exc:
            outcome.append(exc)

    nursery.start_soon(tell)
    await trio.testing.wait_all_tasks_blocked(cushion=0.05)
    await a.stop_serving()
    await eventually(lambda: outcome)
    assert isinstance(outcome[0], Unreachable)


# ------------------------------------------------- link down and reconnect

async def test_link_down_fails_pending_asks_then_reconnects(pair, nursery):
    a, b = pair
    assert await a.ref("echo", b).ask(Echo("up")) == "echo:up"

    outcome: list[BaseException] = []

    async def pending_ask() -> None:
        try:
            await a.ref("sleeper", b).ask(Hang(), timeout=10 * BOUND)
        except Exception as exc:
            outcome.append(exc)

    nursery.start_soon(pending_ask)
    await trio.testing.wait_all_tasks_blocked()

    await b.stop_serving()
    # The ask fails because the link went down, long before its own timeout.
    await eventually(lambda: outcome)
    assert isinstance(outcome[0], Unreachable)
    assert a.transport.connections(b.address) == []
    with trio.fail_after(BOUND), pytest.raises(Unreachable):
        await a.ref("echo", b).ask(Echo("down"), timeout=2 * BOUND)

    await b.start_serving(nursery)
    with trio.fail_after(BOUND):
        while True:
            try:
                assert await a.ref("echo", b).ask(Echo("again")) == "echo:again"
                break
            except Unreachable:
                await trio.sleep(0.05)
    assert a.transport.connections(b.address) == ["out"]


async def test_envelopes_queued_while_down_arrive_after_reconnect(nodes, nursery):
    a = await nodes(unreachable_after=BOUND)
    b = await nodes()
    assert await a.ref("echo", b).ask(Echo("up")) == "echo:up"
    await b.stop_serving()
    await eventually(lambda: not a.transport.connections(b.address))

    for item in ("q1", "q2", "q3"):
        a.ref("recorder", b).tell_nowait(Record(item))
    await b.start_serving(nursery)
    with trio.fail_after(BOUND):
        assert await a.ref("recorder", b).ask(Recorded()) == ["q1", "q2", "q3"]


async def test_dead_address_is_unreachable_within_the_bound(nodes):
    a = await nodes()  # default unreachable_after
    ref = a.ref("echo", dead_address())
    with trio.fail_after(BOUND):
        with pytest.raises(Unreachable):
            await ref.ask(Echo("anyone?"), timeout=10 * BOUND)
        with pytest.raises(Unreachable):
            await ref.tell(Echo("anyone?"))


async def test_a_peer_that_is_not_a_websocket_server_is_unreachable(nodes, nursery):
    async def refuse_upgrade(stream: trio.SocketStream) -> None:
        await stream.receive_some()
        await stream.send_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 4\r\n\r\nnope")

    listeners = await nursery.start(functools.partial(trio.serve_tcp, refuse_upgrade, 0, host="::1"))
    http = format_address("::1", listeners[0].socket.getsockname()[1])
    a = await nodes(unreachable_after=0.5)
    with trio.fail_after(BOUND), pytest.raises(Unreachable,
                                                  match=r"refused the websocket upgrade \(HTTP 404\)"):
        await a.ref("echo", http).ask(Echo("x"))
    b = await nodes()
    assert await a.ref("echo", b).ask(Echo("still fine")) == "echo:still fine"


async def test_sending_without_serving_is_unreachable():
    transport = WebsocketTransport("::1")
    try:
        system = ActorSystem(transport=transport)
        with pytest.raises(Unreachable, match="not serving"):
            await system.ref("echo", dead_address()).tell(Echo("x"))
    finally:
        transport.close()


# ---------------------------------------------------------------- garbage

PEER = "ws://[::1]:1"  # the address our raw clients claim in their hello
HELLO = hello_frame(PEER)


def envelope(body, **fields) -> str:
    env = {"from": PEER + "/", "to": "echo", "kind": "ask", "cid": 1, "body": body}
    env.update(fields)
    return orjson.dumps(env).decode()


ECHO = {"$t": "test.ws.Echo", "text": "hi"}
BIG = 70_000  # over the 64 KiB frame limit of the node under attack

GARBAGE = {
    "hello not json": (["{nope"], 1002),
    "hello wrong shape": (['{"hello": 5, "version": 1}'], 1002),
    "hello without version": (['{"hello": "ws://[::1]:1"}'], 1002),
    "hello with a bad address": (['{"hello": "http://x:1", "version": 1}'], 1002),
    "hello in a binary frame": ([HELLO.encode()], 1002),
    "envelope without a hello": ([envelope(ECHO)], 1002),
    "oversized hello": (["x" * BIG], 1009),
    "not json": ([HELLO, "{not json"], 1002),
    "json array": ([HELLO, "[1, 2]"], 1002),
    "empty batch": ([HELLO, "[]"], 1002),
    "batch with one bad envelope": ([HELLO, f"[{envelope(ECHO)}, {{\"from\": 1}}]"], 1002),
    "missing envelope fields": ([HELLO, '{"from": "x", "to": "echo"}'], 1002),
    "unknown message tag": ([HELLO, envelope({"$t": "no.such.tag"})], 1002),
    "wrong field type": ([HELLO, envelope({"$t": "test.ws.Echo", "text": 5})], 1002),
    "ask without cid": ([HELLO, envelope(ECHO, cid=None)], 1002),
    "binary envelope": ([HELLO, envelope(ECHO).encode()], 1002),
    "oversized envelope": ([HELLO, envelope({"$t": "test.ws.Echo", "text": "x" * BIG})], 1009),
    # A hello may only name the host the connection comes from (here ::1).
    "hello claiming another host": ([hello_frame("ws://[fd10:1234::99]:1")], 1002),
    "hello naming a host name": ([hello_frame("ws://peer.example:1")], 1002),
    "hello naming the unspecified address": ([hello_frame("ws://[::]:1")], 1002),
    # After the hello, the peer speaks only for the address it named: replies
    # (and the links they open) would otherwise go wherever it says.
    "ask from another address": ([HELLO, envelope(ECHO, **{"from": "ws://[::1]:2/"})], 1002),
    "tell from another host": ([HELLO, envelope(ECHO, kind="tell", cid=None,
                                                **{"from": "ws://[fd10::9]:1/x"})], 1002),
    "ask from no address": ([HELLO, envelope(ECHO, **{"from": "nobody"})], 1002),
    "batch with one stranger": ([HELLO, f"[{envelope(ECHO)}, "
                                 f"{envelope(ECHO, **{'from': 'ws://[::1]:2/'})}]"], 1002),
    # Messages declared trusted need a link that proved the shared secret.
    "trusted message on a plain link": ([HELLO, envelope({"$t": "test.ws.Secret", "text": "x"})],
                                        1002),
}


@pytest.mark.parametrize("frames, code", GARBAGE.values(), ids=GARBAGE.keys())
async def test_garbage_closes_only_that_connection(nodes, caplog, frames, code):
    caplog.set_level(logging.INFO, logger="actors.ws")
    a = await nodes()
    b = await nodes(max_frame_bytes=64 * 1024)
    assert await a.ref("echo", b).ask(Echo("before")) == "echo:before"

    with trio.fail_after(BOUND):
        async with raw_client(b) as ws:
            for frame in frames:
                await ws.send_message(frame)
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    await ws.get_message()
            raw_peer = f"[::1]:{ws.local.port}"
    assert closed.value.reason.code == code

    # The process logged the peer's ProtocolError ...
    warnings = [r for r in caplog.records if r.name == "actors.ws" and r.levelno == logging.WARNING
                and getattr(r, "error", "").startswith("ProtocolError")]
    assert warnings and warnings[-1].peer in (PEER, raw_peer)
    # ... and a's link to b never noticed.
    assert await a.ref("echo", b).ask(Echo("after")) == "echo:after"
    assert a.transport.connections(b.address) == ["out"]
    assert b.transport.connections(a.address) == ["in"]


@pytest.mark.parametrize("junk", [
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # HTTP, but no websocket upgrade
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(64),  # a TLS hello
    b"\x00\xff" * 512,
], ids=["plain http", "tls", "binary"])
async def test_non_websocket_junk_does_not_disturb_the_node(pair, junk):
    a, b = pair
    assert await a.ref("echo", b).ask(Echo("before")) == "echo:before"
    with trio.fail_after(BOUND):
        async with await trio.open_tcp_stream("::1", b.transport.port) as stream:
            await stream.send_all(junk)
            with contextlib.suppress(trio.BrokenResourceError):
                while await stream.receive_some():  # until the node hangs up
                    pass
    assert await a.ref("echo", b).ask(Echo("after")) == "echo:after"


async def test_a_valid_raw_client_gets_answers(nodes):
    b = await nodes()
    async with raw_client(b) as ws:
        await ws.send_message(HELLO)
        await ws.send_message(envelope(ECHO, cid=7))
        with trio.fail_after(BOUND):
            reply = orjson.loads(await ws.get_message())
    assert (reply["kind"], reply["cid"], reply["body"]) == ("reply", 7, {"$t": "$json", "v": "echo:hi"})


async def test_a_reply_from_a_peer_that_was_not_asked_is_dropped(nodes):
    """Correlation ids are a counter, so anyone linked to a process could
    guess the id of an ask in flight and answer it (a node's lookup of a
    peer's key, say). Only the process that was asked may answer."""
    a, b = await nodes(), await nodes()
    async with trio.open_nursery() as nursery:
        answer: list = []

        async def ask_sink() -> None:  # b's sink answers once b's gate opens
            answer.append(await a.ref("sink", b).ask(Echo("held"), timeout=BOUND))
        nursery.start_soon(ask_sink)
        await eventually(lambda: a.system._pending)
        [cid] = a.system._pending
        async with raw_client(a) as ws:  # a stranger, linked to a as ws://[::1]:1
            await ws.send_message(HELLO)
            await ws.send_message(orjson.dumps(
                {"from": PEER + "/", "to": "", "kind": "reply", "cid": cid,
                 "body": {"$t": "$json", "v": "forged"}}).decode())
            await ws.send_message(envelope(ECHO, cid=99))  # still linked: it answers
            with trio.fail_after(BOUND):
                assert orjson.loads(await ws.get_message())["cid"] == 99
        assert answer == []  # the forged reply did not answer it
        b.gate.set()
    assert answer == [None]  # b's own answer did


async def test_silent_client_is_closed_after_the_hello_timeout(nodes):
    b = await nodes(hello_timeout=0.2)
    with trio.fail_after(BOUND):
        async with raw_client(b) as ws:
            with pytest.raises(ConnectionClosed) as closed:
                await ws.get_message()
    assert closed.value.reason.code == 1002


# --------------------------------------------------------------- shutdown

async def test_stopping_closes_links_with_going_away(nodes):
    b = await nodes()
    with trio.fail_after(BOUND):
        async with raw_client(b) as ws:
            await ws.send_message(HELLO)
            await eventually(lambda: b.transport.connections(PEER) == ["in"])
            await b.stop_serving()
            with pytest.raises(ConnectionClosed) as closed:
                await ws.get_message()
    assert closed.value.reason.code == 1001


# ---------------------------------------------------------------- trust

SECRET = b"a secret shared by one group"


async def test_trusted_messages_need_a_link_that_proved_the_secret(nodes):
    a, b = await nodes(secret=SECRET), await nodes(secret=SECRET)
    assert await a.ref("echo", b).ask(Secret("ab")) == "secret:ab"
    # The answer the other way goes over the same connection (a's welcome
    # proved b to a).
    assert await b.ref("echo", a).ask(Secret("ba")) == "secret:ba"
    assert b.transport.connections(a.address) == ["in"]

    stranger = await nodes()  # no secret: its open messages are served...
    assert await stranger.ref("echo", b).ask(Echo("hi")) == "echo:hi"
    with pytest.raises(Unreachable, match="needs a trusted link"):  # ...it cannot send these
        await stranger.ref("echo", b).ask(Secret("let me in"))
    # (a raw client that sends one anyway is closed: see GARBAGE)
    assert await a.ref("echo", b).ask(Secret("still")) == "secret:still"


async def test_a_different_secret_is_refused_at_the_hello(nodes, caplog):
    caplog.set_level(logging.INFO, logger="actors.ws")
    b = await nodes(secret=SECRET)
    impostor = await nodes(secret=b"not the group's secret", unreachable_after=1.0)
    with pytest.raises(Unreachable):
        await impostor.ref("echo", b).ask(Echo("hi"), timeout=BOUND)
    assert any("does not match our shared secret" in getattr(r, "error", "")
               for r in caplog.records if r.name == "actors.ws")


async def test_a_member_and_a_process_without_the_secret_still_talk(nodes):
    """A member's hello carries a proof to anyone it dials; a process
    without the secret answers {"welcome": 0} and the link works untrusted."""
    a, plain = await nodes(secret=SECRET), await nodes()
    assert await a.ref("echo", plain).ask(Echo("hi")) == "echo:hi"
    assert await plain.ref("echo", a).ask(Echo("back")) == "echo:back"
    assert a.transport.connections(plain.address) == ["out"]
    with pytest.raises(Unreachable, match="no shared secret"):  # it said so: at once
        await a.ref("echo", plain).ask(Secret("x"), timeout=BOUND)
    assert a.transport.connections(plain.address) == ["out"]  # no spare dialled


async def test_a_raw_client_with_the_secret_is_welcomed_and_trusted(nodes):
    from actors.linkauth import check_welcome, hello_proof

    b = await nodes(secret=SECRET)
    proof = hello_proof(SECRET, PEER, b.address)
    async with raw_client(b) as ws:
        await ws.send_message(hello_frame(PEER, proof))
        with trio.fail_after(BOUND):
            check_welcome(SECRET, PEER, b.address, proof["nonce"],
                          orjson.loads(await ws.get_message()))
            await ws.send_message(envelope({"$t": "test.ws.Secret", "text": "x"}, cid=3))
            reply = orjson.loads(await ws.get_message())
    assert (reply["kind"], reply["cid"], reply["body"]) == ("reply", 3, {"$t": "$json", "v": "secret:x"})

    async def refused(hello: str) -> int:
        async with raw_client(b) as ws:
            await ws.send_message(hello)
            with trio.fail_after(BOUND), pytest.raises(ConnectionClosed) as closed:
                while True:
                    await ws.get_message()
        return closed.value.reason.code

    assert await refused(hello_frame(PEER, proof)) == 1002  # the same hello again: a replay
    # A proof made out to another process (as a member's hello to anyone it
    # dials is) is no good here.
    assert await refused(hello_frame(PEER, hello_proof(SECRET, PEER, "ws://[::1]:2"))) == 1002
    # A MAC that is not ASCII used to raise TypeError out of the transport.
    bad = {**hello_proof(SECRET, PEER, b.address), "mac": "\u00e9" * 64}
    assert await refused(hello_frame(PEER, bad)) == 1002
    assert await nodes() and await (await nodes()).ref("echo", b).ask(Echo("up")) == "echo:up"


async def test_an_unproved_connection_gets_no_trusted_traffic_and_no_say(nodes):
    """A process on a member's host (here all are on ::1) says hello in the
    member's name without a proof. Before the member has a trusted
    connection, that is an untrusted connection: trusted messages never go
    over it, its answers to trusted asks are not taken (it used to get the
    Raft traffic and answer for the member), and it is closed once a
    trusted connection comes up. After that, such a hello is refused."""
    a, b = await nodes(secret=SECRET), await nodes(secret=SECRET)
    async with raw_client(a) as ws:
        await ws.send_message(hello_frame(b.address))  # no proof, first
        await eventually(lambda: a.transport.connections(b.address) == ["in"])
        got: list = []

        async def ask() -> None:  # b's sleeper never answers
            with pytest.raises(AskTimeout):
                got.append(await a.ref("sleeper", b).ask(Secret("raft data"), timeout=2.0))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask)
            await eventually(lambda: a.system._pending)  # the ask waits for its answer
            with trio.fail_after(BOUND), pytest.raises(ConnectionClosed) as closed:
                for cid in range(1, 40):  # guess its correlation id
                    await ws.send_message(orjson.dumps(
                        {"from": b.address + "/", "to": "", "kind": "reply", "cid": cid,
                         "body": {"$t": "$json", "v": "forged"}}).decode())
                while True:  # nothing comes this way; a closes it
                    frame = await ws.get_message()
                    pytest.fail(f"the unproved connection got {frame!r}")
            assert closed.value.reason.reason.startswith("superseded")
        assert got == []
    await eventually(lambda: a.transport.connections(b.address) == ["out"])
    async with raw_client(a) as ws:  # now that a trusted connection exists
        await ws.send_message(hello_frame(b.address))
        with trio.fail_after(BOUND), pytest.raises(ConnectionClosed) as closed:
            while True:
                await ws.get_message()
    assert closed.value.reason.code == 1002
    assert await a.ref("echo", b).ask(Secret("still")) == "secret:still"


def test_hello_proofs_are_bound_fresh_and_used_once():
    from actors.linkauth import ProofChecker, check_welcome, hello_proof, welcome_frame

    now = 1_800_000_000.0
    ME = "ws://[::1]:9"
    checker = ProofChecker(SECRET, ME, clock=lambda: now)
    proof = hello_proof(SECRET, PEER, ME, now=now)
    nonce = checker.check(PEER, proof)
    with pytest.raises(ProtocolError, match="replay"):
        checker.check(PEER, proof)
    fresh = hello_proof(SECRET, PEER, ME, now=now)
    with pytest.raises(ProtocolError, match="does not match"):  # bound to the dialler...
        checker.check("ws://[::1]:2", fresh)
    with pytest.raises(ProtocolError, match="does not match"):  # ...and to us
        checker.check(PEER, hello_proof(SECRET, PEER, "ws://[::1]:8", now=now))
    with pytest.raises(ProtocolError, match="does not match"):
        checker.check(PEER, hello_proof(b"another secret", PEER, ME, now=now))
    with pytest.raises(ProtocolError, match="does not match"):
        checker.check(PEER, {**fresh, "mac": "\u00e9" * 64})
    with pytest.raises(ProtocolError, match="off our clock"):
        checker.check(PEER, hello_proof(SECRET, PEER, ME, now=now - 600))
    for bad in (None, "x", {"time": now, "nonce": "00" * 16, "mac": "x"},
                {**fresh, "extra": 1}, {**fresh, "nonce": "short"}):
        with pytest.raises(ProtocolError, match="must be"):
            checker.check(PEER, bad)
    check_welcome(SECRET, PEER, ME, nonce, welcome_frame(SECRET, PEER, ME, nonce))
    for wrong in (welcome_frame(SECRET, PEER, ME, fresh["nonce"]),
                  welcome_frame(b"another secret", PEER, ME, nonce),
                  welcome_frame(SECRET, PEER, "ws://[::1]:8", nonce),
                  {"welcome": 1, "mac": proof["mac"]},  # a hello's MAC is no welcome
                  {"welcome": 1, "mac": "\u00e9" * 64}):
        with pytest.raises(ProtocolError, match="does not match"):
            check_welcome(SECRET, PEER, ME, nonce, wrong)


async def test_a_wrong_welcome_fails_the_dial(nodes, nursery, caplog):
    """A member dials an address whose process answers its proof with a
    welcome that does not prove the secret: the connection is closed and
    the member's trusted ask finds no link."""
    from trio_websocket import serve_websocket

    caplog.set_level(logging.INFO, logger="actors.ws")
    a = await nodes(secret=SECRET, unreachable_after=1.0)

    async def impostor(request) -> None:
        ws = await request.accept()
        await ws.get_message()  # the hello, with a's proof
        await ws.send_message(orjson.dumps({"welcome": 1, "mac": "00" * 32}).decode())
        with contextlib.suppress(ConnectionClosed):
            await ws.get_message()

    server = await nursery.start(serve_websocket, impostor, "::1", 0, None)
    with pytest.raises(Unreachable, match="does not match our shared secret"):
        await a.ref("echo", format_address("::1", server.port)).ask(Secret("x"), timeout=BOUND)
    assert any("does not match our shared secret" in getattr(r, "error", "")
               for r in caplog.records if r.name == "actors.ws")


# ------------------------------------------------------------------- TLS

@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    """A CA and a certificate for [::1] (trustnet.tls), and a second CA that did not sign it."""
    from trustnet.tls import make_certificates, write_certificates

    paths = write_certificates(make_certificates(["::1", "localhost"]),
                               str(tmp_path_factory.mktemp("tls")))
    other = write_certificates(make_certificates(["::1"]), str(tmp_path_factory.mktemp("other")))
    return {**paths, "other_ca.pem": other["ca.pem"]}


def tls_options(files, *, serve: bool = True, ca: str = "ca.pem") -> dict:
    from trustnet.tls import client_context, server_context

    options = {"tls_client": client_context(files[ca])}
    if serve:
        options["tls_server"] = server_context(files["cert.pem"], files["key.pem"])
    return options


def test_wss_addresses_are_addresses_of_their_own():
    from actors.ws import is_tls

    assert normalize_address("WSS://[0::1]:9/") == "wss://[::1]:9"
    assert parse_address("wss://[::1]:9") == ("::1", 9)
    assert is_tls("wss://[::1]:9") and not is_tls("ws://[::1]:9")
    assert normalize_address("wss://[::1]:9") != normalize_address("ws://[::1]:9")


async def test_tls_links_carry_asks_both_ways_and_secrets_over_them(nodes, tls_files):
    """Two TLS listeners that trust the CA: wss:// addresses, asks both
    ways over one connection, and the shared secret proved inside TLS."""
    a = await nodes(secret=SECRET, **tls_options(tls_files))
    b = await nodes(secret=SECRET, **tls_options(tls_files))
    assert a.address.startswith("wss://[::1]:")
    assert await a.ref("echo", b).ask(Echo("hi"), timeout=BOUND) == "echo:hi"
    assert await b.ref("echo", a).ask(Secret("x"), timeout=BOUND) == "secret:x"
    assert a.transport.connections(b.address) == ["out"]
    assert b.transport.connections(a.address) == ["in"]


async def test_a_plain_process_reaches_a_tls_listener_through_wss(nodes, tls_files):
    """A node without a certificate of its own (nodes of a TLS registry)
    dials wss:// with the CA; the replies go back over that connection."""
    server = await nodes(**tls_options(tls_files))
    client = await nodes(**tls_options(tls_files, serve=False))
    assert client.address.startswith("ws://")
    assert await client.ref("echo", server).ask(Echo("hi"), timeout=BOUND) == "echo:hi"
    assert server.transport.connections(client.address) == ["in"]


@pytest.mark.parametrize("case", ["untrusted CA", "plain dial", "TLS to a plain listener"])
async def test_a_failed_tls_handshake_fails_the_dial_and_spares_the_listener(
        nodes, tls_files, case, caplog):
    """A certificate from another CA, a plain websocket to a TLS port, TLS
    to a plain port: each dial fails (Unreachable, after retries), nothing
    crashes, and the listener goes on serving the clients that get it right."""
    caplog.set_level(logging.DEBUG, logger="actors.ws")
    server = await nodes(**tls_options(tls_files))
    plain_server = await nodes()
    good = await nodes(**tls_options(tls_files, serve=False))
    if case == "untrusted CA":
        bad = await nodes(unreachable_after=1.0, **tls_options(tls_files, serve=False,
                                                                ca="other_ca.pem"))
        target = server.address
    elif case == "plain dial":
        bad = await nodes(unreachable_after=1.0, connect_timeout=0.4)
        target = server.address.replace("wss://", "ws://")
    else:
        bad = await nodes(unreachable_after=1.0, **tls_options(tls_files, serve=False))
        target = plain_server.address.replace("ws://", "wss://")
    with pytest.raises(Unreachable):
        await bad.ref("echo", target).ask(Echo("x"), timeout=BOUND)
    # a misconfiguration more than a peer that is down: a warning, said once
    warned = [r for r in caplog.records if r.name == "actors.ws" and r.levelno == logging.WARNING]
    if case == "untrusted CA":
        assert [r.getMessage() for r in warned] == ["TLS handshake failed"]
        assert "CERTIFICATE_VERIFY_FAILED" in warned[0].error
    elif case == "plain dial":  # the TLS listener hangs up without an answer
        assert [r.getMessage() for r in warned] == ["no websocket handshake answer"]
        assert "dial wss://" in warned[0].error
    else:
        assert [r.getMessage() for r in warned] == ["TLS handshake failed"]
    assert await good.ref("echo", server).ask(Echo("still"), timeout=BOUND) == "echo:still"
    assert await bad.ref("echo", plain_server).ask(Echo("plain"), timeout=BOUND) == "echo:plain"


async def test_the_tls_warning_comes_even_after_failures_of_another_kind(
        nodes, tls_files, caplog):
    """The first dials find nothing listening (routine, debug); once the
    peer is up, its certificate does not verify: that is still warned about."""
    caplog.set_level(logging.DEBUG, logger="actors.ws")
    server = await nodes(**tls_options(tls_files))
    await server.stop_serving()
    doubting = await nodes(unreachable_after=BOUND, **tls_options(
        tls_files, serve=False, ca="other_ca.pem"))

    async def ask() -> None:
        with pytest.raises((Unreachable, AskTimeout)):
            await doubting.ref("echo", server).ask(Echo("x"), timeout=BOUND)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ask)
        await eventually(lambda: any(r.getMessage() == "dial failed" for r in caplog.records))
        await server.start_serving(nursery)
        await eventually(lambda: any(r.getMessage() == "TLS handshake failed"
                                     and r.levelno == logging.WARNING for r in caplog.records))
        nursery.cancel_scope.cancel()


async def test_the_certificate_must_name_the_host_dialled(nodes, tls_files, tmp_path):
    """A certificate for another address, signed by the trusted CA, is refused."""
    from trustnet.tls import client_context, make_certificates, server_context

    certs = make_certificates(["fd10:1234::1"])
    (tmp_path / "cert.pem").write_bytes(certs.cert)
    (tmp_path / "key.pem").write_bytes(certs.key)
    (tmp_path / "ca.pem").write_bytes(certs.ca_cert)
    server = await nodes(tls_server=server_context(str(tmp_path / "cert.pem"),
                                                   str(tmp_path / "key.pem")))
    client = await nodes(unreachable_after=1.0,
                         tls_client=client_context(str(tmp_path / "ca.pem")))
    with pytest.raises(Unreachable, match="match|mismatch|not valid"):
        await client.ref("echo", server).ask(Echo("x"), timeout=BOUND)


async def test_an_ask_that_never_left_says_why_the_link_is_down(nodes, tls_files):
    """An ask whose timeout runs out before any link came up names the last
    failed dial (here the certificate), not just the timeout."""
    from actors import AskTimeout

    server = await nodes(**tls_options(tls_files))
    doubting = await nodes(unreachable_after=30.0, **tls_options(tls_files, serve=False,
                                                                  ca="other_ca.pem"))
    with pytest.raises(AskTimeout, match="no link to .* came up .*CERTIFICATE_VERIFY_FAILED"):
        await doubting.ref("echo", server).ask(Echo("x"), timeout=2.0)
    assert doubting.transport.link_error(server.address) is not None
    good = await nodes(**tls_options(tls_files, serve=False))
    assert await good.ref("echo", server).ask(Echo("x"), timeout=BOUND) == "echo:x"
    assert good.transport.link_error(server.address) is None


async def test_a_ca_bundle_trusts_the_old_and_the_new_certificate_during_a_rotation(
        nodes, tls_files, tmp_path):
    """docs/operations.md, rotating the certificate: clients get both CAs in
    one ca_file, then the replicas move to the new certificate one by one."""
    from trustnet.tls import client_context, make_certificates, server_context, \
        write_certificates

    new = write_certificates(make_certificates(["::1"]), str(tmp_path / "new"))
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(Path(tls_files["ca.pem"]).read_bytes() + Path(new["ca.pem"]).read_bytes())
    old_server = await nodes(**tls_options(tls_files))
    new_server = await nodes(tls_server=server_context(new["cert.pem"], new["key.pem"]))
    client = await nodes(tls_client=client_context(str(bundle)))
    assert await client.ref("echo", old_server).ask(Echo("old"), timeout=BOUND) == "echo:old"
    assert await client.ref("echo", new_server).ask(Echo("new"), timeout=BOUND) == "echo:new"


def test_advertising_the_wrong_scheme_is_refused(tls_files):
    with pytest.raises(ValueError, match="TLS"):
        WebsocketTransport("::1", 0, advertise="ws://[::1]:9", **tls_options(tls_files))
    with pytest.raises(ValueError, match="no TLS"):
        WebsocketTransport("::1", 0, advertise="wss://[::1]:9")


@pytest.fixture
def node_keys(tmp_path):
    """Two Ed25519 node identities with their key files (as a node keeps them)."""
    from trustnet.identity import NodeIdentity

    out = {}
    for name in ("a", "b"):
        out[name] = NodeIdentity.load_or_create(tmp_path / name)
    return out


def peer_tls(identity, data_dir) -> "ssl.SSLContext":
    from trustnet.tls import peer_server_context

    return peer_server_context(identity.private_key, str(data_dir / "node.key"), "n", "::1",
                               str(data_dir))


@pytest.mark.parametrize("case", ["registered key", "another key"])
async def test_a_pinned_peer_must_present_the_key_it_is_listed_with(
        nodes, node_keys, tmp_path, case, caplog):
    """Nodes' links (peers.tls): the acceptor presents a certificate it signed
    itself for its identity key; the dialler checks no CA or name, only that
    the certificate carries the key pinned for that address (the registry's).
    A listener with any other key, e.g. an impostor at that address, fails
    the dial with a warning, and nothing is sent to it."""
    from trustnet.tls import peer_pin

    caplog.set_level(logging.DEBUG, logger="actors.ws")
    served = "a" if case == "registered key" else "b"
    server = await nodes(tls_server=peer_tls(node_keys[served], tmp_path / served))
    assert server.address.startswith("wss://")
    pinned = {server.address: peer_pin(node_keys["a"].public_key)}
    client = await nodes(unreachable_after=1.0, tls_pin=pinned.get)
    if case == "registered key":
        assert await client.ref("echo", server.address).ask(Echo("x"), timeout=BOUND) == "echo:x"
        return
    with pytest.raises(Unreachable):
        await client.ref("recorder", server.address).tell(Record("secret"))
    warned = [r for r in caplog.records if r.name == "actors.ws" and r.levelno == logging.WARNING]
    assert [r.getMessage() for r in warned] == ["TLS handshake failed"]
    assert "does not carry the key pinned for it" in warned[0].error
    assert await server.ref("recorder", server.address).ask(Recorded(), timeout=BOUND) == []


async def test_an_address_without_a_pin_is_checked_against_the_ca(nodes, node_keys, tmp_path):
    """A self-signed node certificate is only accepted through its pin: to a
    dialler that has no pin for the address (not a peer the registry listed)
    it is an untrusted certificate."""
    server = await nodes(tls_server=peer_tls(node_keys["a"], tmp_path / "a"))
    client = await nodes(unreachable_after=1.0, tls_pin=lambda address: None)
    with pytest.raises(Unreachable, match="CERTIFICATE_VERIFY_FAILED"):
        await client.ref("echo", server.address).ask(Echo("x"), timeout=BOUND)


@pytest.mark.parametrize("case", ["accepted", "refused", "check broke", "none given"])
async def test_an_acceptor_checks_the_identity_in_each_hello(nodes, case, caplog):
    """check_identity sees the address a hello claims and its identity, and
    refuses the connection (logged as a protocol error) before it carries
    anything; a check that breaks refuses too, and the listener serves on."""
    caplog.set_level(logging.INFO, logger="actors.ws")
    seen: list[tuple[str, object]] = []

    async def check(address: str, identity: object) -> None:
        seen.append((address, identity))
        if case == "check broke":
            raise RuntimeError("the directory is down")
        if identity != {"me": address}:
            raise ProtocolError(f"not who it says: {identity!r}")

    def says(claim: str):  # a hello_identity: "I am <claim>"
        return lambda to: {"me": claim}

    server = await nodes(check_identity=check)
    client = await nodes(unreachable_after=1.0)
    claim = {"accepted": client.address, "refused": "ws://[::1]:1",
             "check broke": client.address, "none given": None}[case]
    client.transport._hello_identity = says(claim) if claim else None
    if case == "accepted":
        assert await client.ref("echo", server.address).ask(Echo("x"), timeout=BOUND) == "echo:x"
        assert seen == [(client.address, {"me": client.address})]
        return
    with pytest.raises(Unreachable):
        await client.ref("echo", server.address).ask(Echo("x"), timeout=BOUND)
    assert seen and seen[0] == (client.address, {"me": claim} if claim else None)
    reasons = " ".join(str(getattr(r, "error", "")) for r in caplog.records)
    assert ("could not be checked" if case == "check broke" else "not who it says") in reasons
    if case != "check broke":  # the listener goes on: a hello that checks out is served
        good = await nodes()
        good.transport._hello_identity = says(good.address)
        assert await good.ref("echo", server.address).ask(Echo("y"), timeout=BOUND) == "echo:y"


async def test_an_empty_pin_accepts_no_certificate(nodes, node_keys, tmp_path, caplog):
    """b"" for an address: no key is known there, so no certificate will do
    (what a node gives an address it is not dialling a known peer at)."""
    caplog.set_level(logging.DEBUG, logger="actors.ws")
    server = await nodes(tls_server=peer_tls(node_keys["a"], tmp_path / "a"))
    client = await nodes(unreachable_after=1.0, tls_pin=lambda address: b"")
    with pytest.raises(Unreachable):
        await client.ref("echo", server.address).ask(Echo("x"), timeout=BOUND)
    warned = [r for r in caplog.records if r.name == "actors.ws" and r.levelno == logging.WARNING]
    assert "no key is known" in warned[0].error
