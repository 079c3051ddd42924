"""The node's local HTTP API (Quart-Trio on hypercorn, default [::1]:9100).

    GET  /health            {"status": "ok"|"degraded", "node_id", "registered", "peers"}
    GET  /version           build info
    GET  /peers             {"node_id", "max_connections", "peers": [{id, address, direction, age_seconds, rtt_ms}]}
    POST /broadcast         {"payload": <any JSON>} -> {"id", "sent_to"}
    POST /send/{node}       {"payload": <any JSON>} -> {"id", "route": "link"|"flood"}
    GET  /messages?since=N&limit=M   {"messages": [...], "last_seq"}

Errors: {"error": {"code", "message"}} as the registry's API.
"""

from __future__ import annotations

import logging

import orjson
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from actors import ActorError, AskTimeout, Ref, Refused
from trustnet.http_json import error_response, finish_body, json_response
from trustnet.version import build_info

from .config import NODE_NAME
from .messages import Broadcast, GetInbox, GetPeers, HeartbeatStatus, Send

log = logging.getLogger("trustnet.node.http")

REFUSAL_STATUS = {"not_found": 404, "invalid": 400, "unreachable": 503, "unavailable": 503}
MAX_BODY = 64 * 1024


class _BadRequest(Exception):
    def __init__(self, code: str, message: str, status: int = 400):
        super().__init__(message)
        self.code, self.message, self.status = code, message, status


def create_app(mesh: Ref, heartbeat: Ref, node_id: str, *, ask_timeout: float = 10.0) -> QuartTrio:
    app = QuartTrio("trustnet.node")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY
    app.url_map.merge_slashes = False  # a 404, not an HTML redirect elsewhere

    async def payload() -> str:
        data = await request.get_data()
        try:
            body = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise _BadRequest("invalid_json", f"request body is not JSON: {exc}") from None
        if not isinstance(body, dict) or set(body) != {"payload"}:
            raise _BadRequest("invalid_body", 'the body must be {"payload": <any JSON value>}')
        return orjson.dumps(body["payload"]).decode()

    @app.after_request
    async def read_to_the_end(response: Response) -> Response:
        await finish_body(response, MAX_BODY)
        return response

    @app.errorhandler(_BadRequest)
    async def bad_request(exc: _BadRequest) -> Response:
        return error_response(exc.status, exc.code, exc.message)

    @app.errorhandler(Refused)
    async def refused(exc: Refused) -> Response:
        return error_response(REFUSAL_STATUS.get(exc.code, 400), exc.code, exc.message)

    @app.errorhandler(ActorError)
    async def unavailable(exc: ActorError) -> Response:
        code = "timeout" if isinstance(exc, AskTimeout) else "unavailable"
        return error_response(503, code, f"node actors unavailable: {exc}")

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        code = (exc.name or "error").lower().replace(" ", "_")
        return error_response(exc.code or 500, code, exc.description or exc.name)

    @app.errorhandler(Exception)
    async def internal(exc: Exception) -> Response:
        log.error("request failed", exc_info=exc, extra={"path": request.path})
        return error_response(500, "internal", "internal error; see the node log")

    @app.get("/health")
    async def health() -> Response:
        try:
            hb = await heartbeat.ask(HeartbeatStatus(), timeout=2.0)
            peers = await mesh.ask(GetPeers(), timeout=2.0)
        except ActorError as exc:
            return json_response({"status": "unavailable", "node_id": node_id,
                                  "reason": str(exc)}, 503)
        ok = hb["registered"] and hb["misses"] < 3
        return json_response({"status": "ok" if ok else "degraded", "node_id": node_id,
                              "registered": hb["registered"], "heartbeat_misses": hb["misses"],
                              "heartbeat_session": hb["session"],
                              "sessions_opened": hb["sessions_opened"],
                              "peers": len(peers["peers"])}, 200 if ok else 503)

    @app.get("/version")
    async def version() -> Response:
        return json_response(build_info())

    @app.get("/peers")
    async def peers() -> Response:
        return json_response(await mesh.ask(GetPeers(), timeout=ask_timeout))

    @app.post("/broadcast")
    async def broadcast() -> Response:
        return json_response(await mesh.ask(Broadcast(await payload()), timeout=ask_timeout), 202)

    @app.post("/send/<target>")
    async def send(target: str) -> Response:
        if not NODE_NAME.fullmatch(target):
            raise _BadRequest("invalid_value", f"{target!r} is not a valid node id")
        return json_response(await mesh.ask(Send(target, await payload()), timeout=ask_timeout), 202)

    @app.get("/messages")
    async def messages() -> Response:
        args = request.args.to_dict()
        unknown = set(args) - {"since", "limit"}
        if unknown:
            raise _BadRequest("invalid_query", f"unknown query parameters: {sorted(unknown)}")
        since, limit = args.get("since", "0"), args.get("limit", "100")
        # ASCII digits only: int() would also take "1_0", " 5" and other
        # scripts' digits (and raise on 4,301 of them)
        if not all(v.isascii() and v.isdigit() and len(v) <= 18 for v in (since, limit)):
            raise _BadRequest("invalid_query", "since and limit must be non-negative integers")
        since, limit = int(since), int(limit)
        if not 1 <= limit <= 1000:
            raise _BadRequest("invalid_query", "limit must be within 1..1000")
        return json_response(await mesh.ask(GetInbox(since, limit), timeout=ask_timeout))

    return app
