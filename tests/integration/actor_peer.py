"""The other process of the remote-actor tests: an ActorSystem on [::1].

    python tests/integration/actor_peer.py [--port N] [--greet ADDRESS]

Once it listens it prints one JSON line, {"address": "ws://[::1]:N"}, on
stdout (logs go to stderr), then serves until it is killed. With --greet it
first tells the recorder at ADDRESS Record("hello from <its address>"), so
the test sees this process dial it. The test module imports the message
classes from here, so both processes speak the same tags.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import orjson
import trio

# Run as a script, sys.path starts with this file's directory: put the project
# first so this process runs the same `actors` as the tests that started it.
ROOT = str(Path(__file__).resolve().parents[2])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from actors import Actor, ActorSystem, ChildSpec, Supervisor, message  # noqa: E402
from actors.ws import WebsocketTransport  # noqa: E402


@message("test.peer.Echo")
class Echo:
    text: str


@message("test.peer.Relay")
class Relay:
    """Ask the echo actor at `address` and answer with its reply."""
    address: str
    text: str


@message("test.peer.Record")
class Record:
    item: str


@message("test.peer.Recorded")
class Recorded:
    pass


@message("test.peer.Hang")
class Hang:
    pass


class Echoer(Actor):
    async def receive(self, msg):
        match msg:
            case Echo(text=text):
                return f"echo:{text}"
            case Relay(address=address, text=text):
                return await self.system.ref("echo", address).ask(Echo(text))
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


def children() -> list[ChildSpec]:
    return [ChildSpec("echo", Echoer), ChildSpec("recorder", Recorder),
            ChildSpec("sleeper", Sleeper)]


async def main(port: int, greet: str | None) -> None:
    transport = WebsocketTransport("::1", port)
    system = ActorSystem(transport=transport)
    async with trio.open_nursery() as nursery:
        await nursery.start(Supervisor(system, "root", children()).run)
        await nursery.start(system.serve)
        if greet:
            await system.ref("recorder", greet).tell(Record(f"hello from {system.address}"))
        sys.stdout.write(orjson.dumps({"address": system.address}).decode() + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--greet", metavar="ADDRESS")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="peer %(levelname)s %(name)s: %(message)s")
    args = parser.parse_args()
    trio.run(main, args.port, args.greet)
