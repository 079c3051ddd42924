"""What the registry's and the node's HTTP facades share: JSON answers, the
error shape, and reading a request's body to the end before answering."""

from __future__ import annotations

from typing import Any

import orjson
from quart import Response, request
from werkzeug.exceptions import HTTPException


def json_response(body: Any, status: int = 200, headers: dict | None = None) -> Response:
    """`body` as JSON; bytes are taken as JSON already encoded (a page of nodes)."""
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    return Response(data, status=status, content_type="application/json", headers=headers)


def error_response(status: int, code: str, message: str, headers: dict | None = None) -> Response:
    return json_response({"error": {"code": code, "message": message}}, status, headers)


async def finish_body(response: Response, limit: int) -> None:
    """Make sure a request's body was read, also when it was answered early
    (refused key, bad path, unknown route, bad method). Otherwise hypercorn
    leaves a body that arrives after the answer unread, and the next request
    on that keep-alive connection hangs. A body too big to read closes the
    connection instead. For an after_request hook."""
    if not request.content_length:
        return  # no body (or chunked: Quart reads that as it streams)
    if request.content_length > limit:
        response.headers["Connection"] = "close"
        return
    try:
        await request.get_data()
    except HTTPException:
        response.headers["Connection"] = "close"
