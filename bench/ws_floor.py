"""What one websocket message costs a Trio server before any registry work.

The heartbeat benchmark's one-connection-per-node case (`raw:500:500`) is
bound by what each message costs on its own: nothing can be batched when
every connection has one heartbeat in flight. This measures that floor: a
server that only echoes each message back, with N connections per client
process and one message in flight on each, in six builds:

  tcp             a Trio SocketStream, receive_some -> send_all, no websocket
  wsproto         one Trio task per connection driving wsproto directly
  wsconn          actors.wsconn (wsproto in the reading task), get_message
                  -> send_message in one task
  wsconn+writer   the same, the reply handed to a writer task through a
                  memory channel: what actors.ws does (a link's writer batches)
  trio-websocket  get_message -> send_message in one task
  tws+writer      the same with a writer task: what actors.ws did until
                  2026-11-27

The registry does strictly more per heartbeat (envelope decode, session MAC,
lease renewal, reply encode), so what an echo reaches here bounds what the
registry can reach with one connection per node.

    .venv/bin/python bench/ws_floor.py                    # all six, 2 x 500 connections, 8 s each
    .venv/bin/python bench/ws_floor.py --connections 50 --seconds 4 --modes tcp,trio-websocket

Two client processes (raw sockets, selectors, frames pre-encoded with
wsproto) load one server process on [::1]; the server's CPU comes from
/proc. Prints messages/s, the server's CPU share of a core and its CPU per
message. Stops by itself; every process it starts is ended.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import selectors
import socket
import sys
import time

MODES = ("tcp", "wsproto", "wsconn", "wsconn+writer", "trio-websocket", "tws+writer")
# About the size of a session heartbeat's envelope on the wire.
MESSAGE = ('{"from":"ws://[fd10:1234::1]:7000/n0001234","to":"registry","cid":123456,'
           '"body":{"t":"SessionHeartbeat","session":"3f9c2a","counter":4711,'
           '"mac":"9d2f4c0b7a1e6d35"}}')
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------- servers


def serve(mode: str, port_queue: mp.Queue) -> None:
    import trio
    import trio_websocket
    import wsproto
    from wsproto.events import AcceptConnection, CloseConnection, Request, TextMessage

    async def tcp(stream: trio.SocketStream) -> None:
        try:
            while data := await stream.receive_some(65536):
                await stream.send_all(data)
        except trio.BrokenResourceError:
            pass

    async def direct(stream: trio.SocketStream) -> None:
        ws = wsproto.WSConnection(wsproto.ConnectionType.SERVER)
        try:
            while data := await stream.receive_some(65536):
                ws.receive_data(data)
                out = []
                for event in ws.events():
                    if isinstance(event, Request):
                        out.append(ws.send(AcceptConnection()))
                    elif isinstance(event, TextMessage):
                        out.append(ws.send(TextMessage(data=event.data)))
                    elif isinstance(event, CloseConnection):
                        return
                if out:
                    await stream.send_all(b"".join(out))
        except trio.BrokenResourceError:
            pass

    async def one_task(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        try:
            while True:
                await ws.send_message(await ws.get_message())
        except trio_websocket.ConnectionClosed:
            pass

    async def echo_through_writer(ws, closed: type[Exception]) -> None:
        """Echo, each reply handed to a writer task through a memory channel."""
        send, receive = trio.open_memory_channel(64)

        async def writer() -> None:
            async for message in receive:
                await ws.send_message(message)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(writer)
                while True:
                    send.send_nowait(await ws.get_message())
        except (closed, trio.ClosedResourceError):
            pass

    async def with_writer(request: trio_websocket.WebSocketRequest) -> None:
        await echo_through_writer(await request.accept(), trio_websocket.ConnectionClosed)

    async def wsconn_writer(stream: trio.SocketStream) -> None:
        from actors.wsconn import ConnectionClosed, HandshakeError, accept_websocket

        try:
            ws = await accept_websocket(stream, max_message_size=1 << 20, receive_buffer=65536)
        except HandshakeError:
            return
        await echo_through_writer(ws, ConnectionClosed)

    async def wsconn_one_task(stream: trio.SocketStream) -> None:
        from actors.wsconn import ConnectionClosed, HandshakeError, accept_websocket

        try:
            ws = await accept_websocket(stream, max_message_size=1 << 20, receive_buffer=65536)
        except HandshakeError:
            return
        try:
            while True:
                await ws.send_message(await ws.get_message())
        except ConnectionClosed:
            pass

    async def main() -> None:
        listeners = await trio.open_tcp_listeners(0, host="::1")
        port_queue.put(listeners[0].socket.getsockname()[1])
        async with trio.open_nursery() as nursery:
            if mode in ("tcp", "wsproto", "wsconn", "wsconn+writer"):
                handler = {"tcp": tcp, "wsproto": direct, "wsconn": wsconn_one_task,
                           "wsconn+writer": wsconn_writer}[mode]
                await trio.serve_listeners(handler, listeners)
            else:
                handler = one_task if mode == "trio-websocket" else with_writer
                server = trio_websocket.WebSocketServer(handler, listeners, handler_nursery=nursery)
                await server.run()

    trio.run(main)


# ---------------------------------------------------------------- clients


def client(mode: str, port: int, connections: int, start: float, warmup: float,
           seconds: float, results: mp.Queue) -> None:
    import wsproto
    from wsproto.events import AcceptConnection, Request, TextMessage

    sel = selectors.DefaultSelector()
    size = len(MESSAGE.encode())
    # A server's frame is unmasked: a 2-byte header, 4 from 126 bytes of payload.
    reply_size = size if mode == "tcp" else size + (2 if size < 126 else 4)
    socks = []
    for _ in range(connections):
        sock = socket.create_connection(("::1", port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if mode == "tcp":
            frame = MESSAGE.encode()
        else:
            ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
            sock.sendall(ws.send(Request(host="localhost", target="/")))
            accepted = False
            while not accepted:
                ws.receive_data(sock.recv(65536))
                accepted = any(isinstance(e, AcceptConnection) for e in ws.events())
            frame = ws.send(TextMessage(data=MESSAGE))  # masked once, sent again and again
        socks.append((sock, frame))
    time.sleep(max(0.0, start - time.time()))  # all clients start together
    for sock, frame in socks:
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ, [frame, 0])
        sock.send(frame)
    counted = 0
    begin, end = start + warmup, start + warmup + seconds
    while (now := time.time()) < end:
        for key, _ in sel.select(0.2):
            frame, pending = key.data
            data = key.fileobj.recv(65536)
            if not data:
                raise SystemExit("the server closed a connection")
            pending += len(data)
            while pending >= reply_size:
                pending -= reply_size
                key.fileobj.send(frame)
                if begin <= now:
                    counted += 1
            key.data[1] = pending
    results.put(counted)


# ---------------------------------------------------------------- driver


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def measure(mode: str, connections: int, warmup: float, seconds: float) -> tuple[float, float]:
    ctx = mp.get_context("fork")
    ports, results = ctx.Queue(), ctx.Queue()
    server = ctx.Process(target=serve, args=(mode, ports), daemon=True)
    server.start()
    clients = []
    try:
        port = ports.get(timeout=30)
        start = time.time() + 1.0 + connections / 500  # room to connect
        clients = [ctx.Process(target=client, daemon=True,
                               args=(mode, port, connections, start, warmup, seconds, results))
                   for _ in range(2)]
        for p in clients:
            p.start()
        time.sleep(max(0.0, start + warmup - time.time()))
        cpu0 = cpu_seconds(server.pid)
        time.sleep(seconds)
        cpu1 = cpu_seconds(server.pid)
        total = sum(results.get(timeout=30) for _ in clients)
    finally:
        for p in clients + [server]:
            p.kill()
            p.join()
    return total / seconds, (cpu1 - cpu0) / seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=500, help="per client process")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--modes", default=",".join(MODES))
    args = parser.parse_args(argv)
    modes = args.modes.split(",")
    if unknown := set(modes) - set(MODES):
        parser.error(f"unknown modes {sorted(unknown)}; choose from {', '.join(MODES)}")
    print(f"echo of {len(MESSAGE)}-byte text messages, 2 client processes x "
          f"{args.connections} connections, one message in flight on each; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(f"  {'server':<16} {'msg/s':>8} {'srv CPU':>8} {'us/msg':>8}")
    for mode in modes:
        rate, cpu = measure(mode, args.connections, args.warmup, args.seconds)
        per = cpu / rate * 1e6 if rate else float("nan")
        print(f"  {mode:<16} {rate:>8.0f} {cpu:>8.0%} {per:>8.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
