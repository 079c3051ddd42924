"""The registry's HTTP facade: each route turns a request into a message to
the RegistryActor and its answer into JSON. No registry logic lives here."""

from __future__ import annotations

import hmac
import logging
import os
import time
from typing import Any

import attrs
from quart import Response, g, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from actors import ActorError, AskTimeout, Ref, Refused
from trustnet.version import build_info

from trustnet.consensus.actor import AddMember, ClusterStatus, ReadBarrier, RemoveMember
from trustnet.http_json import error_response, finish_body, json_response

from . import messages as m
from . import validate
from .openapi import OPENAPI
from .validate import BadRequest

log = logging.getLogger("trustnet.http")

REFUSAL_STATUS = {"not_found": 404, "ipv6_taken": 409, "domain_exists": 409, "invalid": 400,
                  "name_taken": 409, "bad_statement": 403, "signature_required": 403,
                  # replicated mode (consensus refusals): all retryable, same request id
                  "no_leader": 503, "commit_unknown": 503, "not_committed": 503,
                  "not_leader": 503, "conf_change_in_progress": 409, "invalid_member": 400}
RETRY_AFTER = frozenset({"no_leader", "commit_unknown", "not_committed", "not_leader"})
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def create_app(registry: Ref, *, api_key: str | None = None, max_body_bytes: int = 65536,
               ask_timeout: float = 10.0, consensus: Ref | None = None) -> QuartTrio:
    """`consensus` set: replicated mode. Writes carry a request id (the
    Idempotency-Key or X-Request-Id header, else a fresh one) so a retried
    write applies once; reads are linearizable (ReadBarrier first) unless
    `?consistency=stale`, and carry X-Raft-Index / X-Raft-Term."""
    app = QuartTrio("trustnet.registry")
    app.config["MAX_CONTENT_LENGTH"] = max_body_bytes
    # No redirect of /nodes//heartbeat to /nodes/heartbeat: an empty id
    # would become the node named "heartbeat". An empty segment is a 404.
    app.url_map.merge_slashes = False
    key = api_key.encode() if api_key else None

    async def ask(msg: Any) -> Any:
        if consensus is None:
            return await registry.ask(msg, timeout=ask_timeout)
        if hasattr(msg, "request_id"):
            msg = attrs.evolve(msg, request_id=g.write_id)
        answer = await registry.ask(msg, timeout=ask_timeout)
        if isinstance(answer, dict) and m.RAFT_POSITION in answer:
            answer = dict(answer)
            g.raft = tuple(answer.pop(m.RAFT_POSITION))
        return answer

    async def read(msg: Any) -> Response | Any:
        """Ask a read; in replicated mode after a read barrier (unless stale)."""
        if consensus is None:
            return await ask(msg)
        if g.consistency == "stale":
            st = await consensus.ask(ClusterStatus(hops=1), timeout=ask_timeout)
            g.raft = (st["applied"], st["term"])
        else:
            barrier = await consensus.ask(ReadBarrier(), timeout=ask_timeout)
            g.raft = (barrier["index"], barrier["term"])
        return await registry.ask(msg, timeout=ask_timeout)

    def args() -> dict[str, str]:
        """The query parameters without `consistency` (replicated mode)."""
        out = request.args.to_dict()
        if consensus is not None:
            out.pop("consistency", None)
        return out

    async def body(*, optional: bool = False) -> dict[str, Any]:
        if request.content_length is not None and request.content_length > max_body_bytes:
            raise BadRequest("body_too_large",
                             f"request body is {request.content_length} bytes; "
                             f"the limit is {max_body_bytes}", 413)
        return validate.parse_json(await request.get_data(), optional=optional)

    # ------------------------------------------------------------ plumbing

    @app.before_request
    async def start_request() -> Response | None:
        g.started = time.perf_counter()
        # 16 random hex digits; os.urandom is ~5x cheaper than uuid4().hex[:16]
        g.request_id = request.headers.get("X-Request-Id") or os.urandom(8).hex()
        if consensus is not None:
            g.write_id = (request.headers.get("Idempotency-Key") or g.request_id)[:128]
            g.consistency = request.args.get("consistency", "linearizable")
            if g.consistency not in ("linearizable", "stale"):
                return error_response(400, "invalid_value",
                                      "consistency must be linearizable or stale")
        if key is not None and request.method in WRITE_METHODS:
            return _check_key(key)
        return None

    @app.after_request
    async def log_request(response: Response) -> Response:
        await finish_body(response, max_body_bytes)
        response.headers["X-Request-Id"] = g.get("request_id", "")
        raft = g.get("raft")
        if raft is not None:
            response.headers["X-Raft-Index"] = str(raft[0])
            response.headers["X-Raft-Term"] = str(raft[1])
        if not log.isEnabledFor(logging.INFO):  # skip building the record's fields
            return response
        duration = (time.perf_counter() - g.get("started", time.perf_counter())) * 1000
        log.info("request", extra={"method": request.method, "path": request.path,
                                   "status": response.status_code,
                                   "duration_ms": round(duration, 3),
                                   "request_id": g.get("request_id")})
        return response

    @app.errorhandler(BadRequest)
    async def bad_request(exc: BadRequest) -> Response:
        return error_response(exc.status, exc.code, exc.message)

    @app.errorhandler(Refused)
    async def refused(exc: Refused) -> Response:
        headers = {"Retry-After": "1"} if exc.code in RETRY_AFTER else None
        if exc.code in RETRY_AFTER:
            log.info("write refused by consensus", extra={"code": exc.code, "error": exc.message})
        return error_response(REFUSAL_STATUS.get(exc.code, 400), exc.code, exc.message, headers)

    @app.errorhandler(ActorError)
    async def unavailable(exc: ActorError) -> Response:
        log.warning("registry actor unavailable", extra={"error": str(exc)})
        code = "timeout" if isinstance(exc, AskTimeout) else "unavailable"
        return error_response(503, code, f"registry unavailable: {exc}", {"Retry-After": "1"})

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        code = (exc.name or "error").lower().replace(" ", "_")
        if exc.code == 413:
            return error_response(413, "body_too_large",
                                  f"request body exceeds the limit of {max_body_bytes} bytes")
        # A 405 must say which methods the resource allows (RFC 9110 15.5.6).
        allow = {k: v for k, v in exc.get_headers() if k.lower() == "allow"}
        return error_response(exc.code or 500, code, exc.description or exc.name, allow or None)

    @app.errorhandler(Exception)
    async def internal(exc: Exception) -> Response:
        log.error("request failed", exc_info=exc,
                  extra={"path": request.path, "request_id": g.get("request_id")})
        return error_response(500, "internal", "internal error; see the registry log")

    # ------------------------------------------------------------ service

    @app.get("/health")
    async def health() -> Response:
        try:
            status = await registry.ask(m.Status(), timeout=min(ask_timeout, 2.0))
        except ActorError as exc:
            return json_response({"status": "unavailable", "reason": str(exc)}, 503)
        if consensus is not None and status.get("leader") is None:
            return json_response({"status": "no_leader", **status}, 503)
        return json_response({"status": "ok", **status})

    version_info: dict[str, str] = {}

    @app.get("/version")
    async def version() -> Response:
        # Built once: importlib.metadata costs ~0.4 ms a call, and what this
        # process runs cannot change while it runs.
        if not version_info:
            version_info.update(build_info())
        return json_response(version_info)

    @app.get("/openapi.json")
    async def openapi() -> Response:
        return json_response(OPENAPI)

    # ------------------------------------------------------------ nodes

    @app.post("/nodes")
    async def register() -> Response:
        answer = await ask(validate.register(await body()))
        return json_response(answer["node"], 201 if answer["created"] else 200)

    @app.get("/nodes")
    async def list_nodes() -> Response:
        return json_response(await read(validate.list_nodes(args())))

    @app.get("/nodes/<node_id>")
    async def get_node(node_id: str) -> Response:
        validate.query(args(), ())
        return json_response(await read(m.GetNode(validate.name(node_id, "node id"))))

    @app.delete("/nodes/<node_id>")
    async def delete_node(node_id: str) -> Response:
        return json_response(await ask(m.Deregister(validate.name(node_id, "node id"))))

    @app.post("/nodes/<node_id>/heartbeat")
    async def heartbeat(node_id: str) -> Response:
        return json_response(await ask(validate.heartbeat(await body(optional=True), node_id)))

    @app.get("/nodes/<node_id>/reputation")
    async def reputation(node_id: str) -> Response:
        validate.query(args(), ())
        return json_response(await read(m.ReputationOf(validate.name(node_id, "node id"))))

    @app.delete("/nodes/<node_id>/identity")
    async def release_name(node_id: str) -> Response:
        return json_response(await ask(m.ReleaseName(validate.name(node_id, "node id"))))

    # ------------------------------------------------------------ domains

    @app.get("/domains")
    async def list_domains() -> Response:
        validate.query(args(), ())
        return json_response({"domains": await read(m.ListDomains())})

    @app.post("/domains")
    async def create_domain() -> Response:
        return json_response(await ask(validate.create_domain(await body())), 201)

    # ------------------------------------------------------------ peers

    @app.get("/peers")
    async def list_peers() -> Response:
        query = args()
        validate.query(query, ("node",))
        node = query.get("node")
        node_id = validate.name(node, "node") if node is not None else None
        return json_response({"peers": await read(m.ListPeers(node_id))})

    @app.post("/peers")
    async def add_peer() -> Response:
        a, b = validate.peer_pair(await body())
        return json_response(await ask(m.AddPeerReq(a, b)), 201)

    @app.delete("/peers")
    async def remove_peer() -> Response:
        # DELETE bodies are unusual; the pair may come as query parameters too.
        query = request.args.to_dict()
        data = query if query else await body()
        a, b = validate.peer_pair(data)
        return json_response(await ask(m.RemovePeerReq(a, b)))

    # ------------------------------------------------------------ cluster (replicated mode)

    def not_replicated() -> Response:
        return error_response(404, "not_replicated",
                              "this registry runs a single replica (replication.enabled: false)")

    @app.get("/cluster")
    async def cluster() -> Response:
        if consensus is None:
            return not_replicated()
        return json_response(await consensus.ask(ClusterStatus(), timeout=ask_timeout))

    @app.post("/cluster/members")
    async def add_member() -> Response:
        data = await body()
        if consensus is None:
            return not_replicated()
        ident, address = validate.new_member(data)
        return json_response(await consensus.ask(AddMember(ident, address),
                                                 timeout=ask_timeout), 201)

    @app.delete("/cluster/members/<member_id>")
    async def remove_member(member_id: str) -> Response:
        if consensus is None:
            return not_replicated()
        return json_response(await consensus.ask(RemoveMember(member_id), timeout=ask_timeout))

    return app


def _check_key(key: bytes) -> Response | None:
    header = request.headers.get("Authorization")
    if not header:
        return error_response(401, "unauthorized",
                              "this registry needs an API key: send 'Authorization: Bearer <key>'",
                              {"WWW-Authenticate": "Bearer"})
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key):
        return error_response(403, "forbidden", "the API key is wrong")
    return None
