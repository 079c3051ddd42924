"""Remote tell/ask between two real processes over the websocket transport on [::1].

The other process is tests/integration/actor_peer.py, started with this
interpreter. Every test kills what it started, whatever happens. Timeouts
are only failure bounds; nothing asserts how long anything took.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path
from typing import AsyncIterator

import orjson
import pytest
import trio
import trio.testing

from actors import ActorSystem, Supervisor, Unreachable
from actors.ws import WebsocketTransport

HERE = Path(__file__).resolve().parent
PEER_SCRIPT = HERE / "actor_peer.py"
if str(HERE) not in sys.path:  # pytest's importlib mode does not add it
    sys.path.insert(0, str(HERE))

from actor_peer import Echo, Hang, Recorded, Record, Relay, children  # noqa: E402

BOUND = 30  # seconds; generous upper bound for anything that should "just happen"


class Peer:
    """The other process: its address and its OS process."""

    def __init__(self, process: trio.Process, address: str):
        self.process = process
        self.address = address

    def kill(self) -> None:
        """SIGKILL: no close frames, no goodbyes."""
        self.process.kill()


async def read_line(stream: trio.abc.ReceiveStream) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        chunk = await stream.receive_some(1)
        if not chunk:
            raise RuntimeError(f"peer exited before it was ready (got {line!r})")
        line += chunk
    return line


@contextlib.asynccontextmanager
async def peer_process(port: int = 0, greet: str | None = None) -> AsyncIterator[Peer]:
    """Run actor_peer.py until it listens; SIGKILL and reap it on the way out."""
    command = [sys.executable, str(PEER_SCRIPT), "--port", str(port)]
    if greet:
        command += ["--greet", greet]
    process = await trio.lowlevel.open_process(command, stdout=subprocess.PIPE)
    try:
        with trio.fail_after(BOUND):
            ready = orjson.loads(await read_line(process.stdout))
        yield Peer(process, ready["address"])
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
            await process.wait()
            await process.stdout.aclose()


@pytest.fixture
async def local(nursery) -> ActorSystem:
    """This process's side: an ActorSystem on [::1] with the same actors."""
    system = ActorSystem(transport=WebsocketTransport("::1"))
    await nursery.start(Supervisor(system, "root", children()).run)
    await nursery.start(system.serve)
    return system


async def ask_until_answered(ref, msg):
    """Ask, retrying while the peer is still unreachable (bounded)."""
    with trio.fail_after(BOUND):
        while True:
            try:
                return await ref.ask(msg)
            except Unreachable:
                await trio.sleep(0.05)


async def test_tell_and_ask_across_processes(local):
    async with peer_process() as peer:
        recorder = local.ref("recorder", peer.address)
        for item in ("a", "b", "c"):
            await recorder.tell(Record(item))
        assert await recorder.ask(Recorded()) == ["a", "b", "c"]
        assert await local.ref("echo", peer.address).ask(Echo("hi")) == "echo:hi"
        # The peer asks us back (over the connection we dialled) inside our ask.
        assert await local.ref("echo", peer.address).ask(Relay(local.address, "back")) == \
            "echo:back"
        assert local.transport.connections(peer.address) == ["out"]


async def test_kill_9_fails_pending_asks_then_reconnects_after_restart(local, nursery):
    async with peer_process() as peer:
        port = int(peer.address.rsplit(":", 1)[1])
        echo = local.ref("echo", peer.address)
        assert await echo.ask(Echo("up")) == "echo:up"

        failures: list[BaseException] = []

        async def pending_ask() -> None:
            try:
                await local.ref("sleeper", peer.address).ask(Hang(), timeout=10 * BOUND)
            except Exception as exc:
                failures.append(exc)

        nursery.start_soon(pending_ask)
        await trio.testing.wait_all_tasks_blocked()

        peer.kill()
        with trio.fail_after(BOUND):
            await peer.process.wait()
            # link_down failed the pending ask, long before its own timeout.
            while not failures:
                await trio.sleep(0.01)
        assert isinstance(failures[0], Unreachable)
        assert local.transport.connections(peer.address) == []
        with trio.fail_after(BOUND), pytest.raises(Unreachable):
            await echo.ask(Echo("anyone?"), timeout=10 * BOUND)

    async with peer_process(port) as restarted:
        assert restarted.address == peer.address
        assert await ask_until_answered(echo, Echo("again")) == "echo:again"
        assert await echo.ask(Relay(local.address, "back again")) == "echo:back again"
        # The restarted peer started empty: our tells reach the new process.
        await local.ref("recorder", restarted.address).tell(Record("fresh"))
        assert await local.ref("recorder", restarted.address).ask(Recorded()) == ["fresh"]


async def test_the_peer_dials_us_and_we_answer_over_its_link(local):
    async with peer_process(greet=local.address) as peer:
        recorder = local.ref("recorder")
        with trio.fail_after(BOUND):
            while not await recorder.ask(Recorded()):
                await trio.sleep(0.01)
        assert await recorder.ask(Recorded()) == [f"hello from {peer.address}"]
        # Our ask to the peer rides the connection it opened.
        assert await local.ref("echo", peer.address).ask(Echo("hi")) == "echo:hi"
        assert local.transport.connections(peer.address) == ["in"]
