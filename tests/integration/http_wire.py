"""Raw HTTP/1.1 on a socket, for what an HTTP client library hides: a body
sent after its headers, and the next request on the same connection."""

from __future__ import annotations

import trio

Response = tuple[int, dict[str, str], bytes]


async def read_response(stream: trio.SocketStream, buf: bytearray) -> Response:
    """One HTTP/1.1 response with a Content-Length body from ``stream``."""
    while b"\r\n\r\n" not in buf:
        data = await stream.receive_some(65536)
        if not data:
            raise EOFError(f"connection closed; received {bytes(buf)!r}")
        buf += data
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip()
               for k, _, v in (line.partition(":") for line in header_lines)}
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        data = await stream.receive_some(65536)
        if not data:
            raise EOFError("connection closed inside a response body")
        rest += data
    del buf[:len(head) + 4 + length]
    return int(status_line.split()[1]), headers, rest[:length]


async def late_body_then_next(port: int, method: str, path: str, body: bytes,
                              next_path: str) -> tuple[Response, Response | None]:
    """Send a request's headers, then (after the server answered early, or
    waited) its body together with a GET of `next_path` on the same
    keep-alive connection, as a client that writes headers and body apart
    does (httpx, curl). Returns both answers; the second is None when the
    first closed the connection (a client would not reuse it). A server that
    leaves the late body unread never answers the GET: fails after 5 s."""
    host = f"[::1]:{port}"
    head = (f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    get = f"GET {next_path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    stream = await trio.open_tcp_stream("::1", port)
    async with stream:
        buf = bytearray()
        await stream.send_all(head)
        first = None
        with trio.move_on_after(1.0):
            first = await read_response(stream, buf)
        if first is not None:
            # Let the server finish with the request it answered early, as a
            # slow client would, before the rest of its body arrives.
            await trio.sleep(0.5)
        await stream.send_all(body + get)
        with trio.fail_after(5):
            if first is None:
                first = await read_response(stream, buf)
            if first[1].get("connection", "").lower() == "close":
                return first, None
            return first, await read_response(stream, buf)
