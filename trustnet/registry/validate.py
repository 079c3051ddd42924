"""Turning untrusted request bodies into registry messages, or a clear 400.

Pure functions: no Quart, no actor. Each names the field that is wrong.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from trustnet.addressing import canonical_ipv6
from trustnet.config import FieldError, replica_id, ws_address

from . import messages as m
from .node_protocol import SignedHeartbeat

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
NAME_RULE = "1-64 characters: letters, digits, '.', '_' or '-', starting with a letter or digit"
MAX_PAGE = 1000
LIMIT = re.compile(r"[0-9]{1,4}")


class BadRequest(Exception):
    def __init__(self, code: str, message: str, status: int = 400):
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


def parse_json(body: bytes, *, optional: bool = False) -> dict[str, Any]:
    """The JSON object in a body (whatever its Content-Type: curl -d sends form)."""
    if not body.strip():
        if optional:
            return {}
        raise BadRequest("malformed_json", "request body is empty; expected a JSON object")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest("malformed_json", f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadRequest("malformed_json",
                         f"request body must be a JSON object, got {type(data).__name__}")
    return data


def _fields(data: dict[str, Any], required: tuple[str, ...], optional: tuple[str, ...]) -> None:
    unknown = sorted(set(data) - set(required) - set(optional))
    if unknown:
        allowed = ", ".join(required + optional)
        raise BadRequest("unknown_field", f"unknown field(s) {', '.join(unknown)}; allowed: {allowed}")
    missing = [f for f in required if f not in data]
    if missing:
        raise BadRequest("missing_field", f"missing required field(s): {', '.join(missing)}")


def name(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise BadRequest("invalid_type", f"{field} must be a string, got {_kind(value)}")
    if not NAME.fullmatch(value):  # match() would let "$" accept a trailing newline
        raise BadRequest("invalid_value", f"{field} {value!r} is not valid: {NAME_RULE}")
    return value


def ipv6(value: Any, field: str = "ipv6") -> str:
    if not isinstance(value, str):
        raise BadRequest("invalid_type", f"{field} must be a string, got {_kind(value)}")
    try:
        return canonical_ipv6(value)
    except ValueError as exc:
        raise BadRequest("invalid_ipv6", f"{field}: {exc}") from None


def port(value: Any, field: str = "port") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest("invalid_type", f"{field} must be an integer, got {_kind(value)}")
    if not 1 <= value <= 65535:
        raise BadRequest("invalid_port", f"{field} must be 1..65535, got {value}")
    return value


def register(data: dict[str, Any], node_id: str | None = None) -> m.Register:
    _fields(data, ("id", "ipv6"), ("port", "domain"))
    return m.Register(
        node_id=name(data["id"], "id"),
        ipv6=ipv6(data["ipv6"]),
        port=port(data.get("port", m.DEFAULT_PORT)),
        domain=name(data.get("domain", m.DEFAULT_DOMAIN), "domain"),
    )


def heartbeat(data: dict[str, Any], node_id: str) -> m.Heartbeat | SignedHeartbeat:
    """An empty body for open nodes; {"statement": ...} for nodes bound to a key."""
    _fields(data, (), ("statement",))
    node_id = name(node_id, "node id")
    if "statement" not in data:
        return m.Heartbeat(node_id=node_id)
    statement = data["statement"]
    if not isinstance(statement, str):
        raise BadRequest("invalid_type", "statement must be the JSON text of a signed statement")
    try:
        claimed = orjson.loads(statement)
    except orjson.JSONDecodeError:
        claimed = None  # the registry refuses it (bad_statement)
    if isinstance(claimed, dict) and "node_id" in claimed and claimed["node_id"] != node_id:
        # Otherwise a heartbeat posted for one node would renew another's lease.
        raise BadRequest("invalid_value", f"the statement is for node {claimed['node_id']!r}, "
                                          f"not {node_id!r}")
    return SignedHeartbeat(statement=statement)


def create_domain(data: dict[str, Any]) -> m.CreateDomainReq:
    _fields(data, ("name",), ())
    return m.CreateDomainReq(name=name(data["name"], "name"))


def peer_pair(data: dict[str, Any]) -> tuple[str, str]:
    _fields(data, ("node_a", "node_b"), ())
    a, b = name(data["node_a"], "node_a"), name(data["node_b"], "node_b")
    if a == b:
        raise BadRequest("invalid_value", "node_a and node_b must be different nodes")
    return a, b


def query(args: dict[str, str], allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(args) - set(allowed))
    if unknown:
        raise BadRequest("unknown_parameter",
                         f"unknown query parameter(s) {', '.join(unknown)}; "
                         f"allowed: {', '.join(allowed) or 'none'}")


def list_nodes(args: dict[str, str]) -> m.ListNodes:
    """GET /nodes's query; the page is asked for as the JSON to send."""
    query(args, ("domain", "limit", "after"))
    limit_text = args.get("limit", "100")
    # ASCII digits only: str.isdigit() also takes "²" (int() then raises) and
    # int() of thousands of digits raises too; both were 500s.
    if not LIMIT.fullmatch(limit_text) or not 1 <= int(limit_text) <= MAX_PAGE:
        raise BadRequest("invalid_value", f"limit must be an integer 1..{MAX_PAGE}, got {limit_text!r}")
    domain = args.get("domain")
    after = args.get("after")
    return m.ListNodes(domain=name(domain, "domain") if domain is not None else None,
                       limit=int(limit_text),
                       after=name(after, "after") if after is not None else None,
                       encoded=True)


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def new_member(data: dict[str, Any]) -> tuple[str, str]:
    """POST /cluster/members: {"id", "address"}, checked as registry.yaml's
    replication.peers are: a member that can never be reached would still
    count toward every quorum."""
    _fields(data, ("id", "address"), ())
    for field, value, check in (("id", data["id"], replica_id),
                                ("address", data["address"], ws_address)):
        if not isinstance(value, str):
            raise BadRequest("invalid_type", f"{field} must be a string, got {_kind(value)}")
        try:
            check(value)
        except FieldError as exc:
            raise BadRequest("invalid_value", f"{field} {exc}") from None
    return data["id"], data["address"]
