"""The benchmark's baseline: a Quart-Trio app on hypercorn that does nothing.

It answers ``GET /ping`` and ``POST /echo`` (the body is read, then dropped)
with a tiny JSON object, served the way the registry serves: one hypercorn
process on Trio, h11, the same keep-alive setting, no access log. What the
registry reaches relative to this app is what its own work costs.

    python bench/baseline_app.py --host ::1 --port 0

prints one JSON line ``{"message": "baseline listening", "binds": [...]}`` on
stdout once it accepts connections, and stops on SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys

import hypercorn.config
import hypercorn.trio
import trio
from quart import Response, request
from quart_trio import QuartTrio

app = QuartTrio("baseline")
PONG = b'{"ok":true}'


@app.get("/ping")
async def ping() -> Response:
    return Response(PONG, content_type="application/json")


@app.post("/echo")
async def echo() -> Response:
    await request.get_data()
    return Response(PONG, content_type="application/json")


async def main(host: str, port: int) -> None:
    config = hypercorn.config.Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.keep_alive_timeout = 75.0  # as the registry (trustnet.registry.service)
    config.graceful_timeout = 1.0
    config.accesslog = None
    config.errorlog = None
    stop = trio.Event()

    async def watch_signals() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                stop.set()
                return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch_signals)
        binds = await nursery.start(lambda task_status=trio.TASK_STATUS_IGNORED:
                                    hypercorn.trio.serve(app, config, shutdown_trigger=stop.wait,
                                                         task_status=task_status))
        print(json.dumps({"message": "baseline listening", "binds": binds}), flush=True)
        await stop.wait()
        nursery.cancel_scope.deadline = trio.current_time() + 2.0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="::1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    trio.run(main, args.host, args.port)
    sys.exit(0)
