"""The OpenAPI document served at /openapi.json is true to the app.

Routes and documented operations match one to one; every status the app
was seen to return for an operation is documented for it, and the body it
returned fits the documented schema; bodies the app accepted fit the
documented request schema; every $ref resolves.
"""

from __future__ import annotations

import re
from typing import Any

import orjson
import pytest
import trio
from werkzeug.exceptions import MethodNotAllowed, NotFound

from actors import ActorSystem
from trustnet.registry.actor import RegistryActor
from trustnet.registry.http import create_app
from trustnet.registry.state import RegistryState

KEY = "k3y"
MAX_BODY = 2048
METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}
IMPLICIT = {"HEAD", "OPTIONS"}  # added to every route by Quart


# ------------------------------------------------------------------ fixtures


@pytest.fixture
async def registry(tmp_path):
    state = RegistryState.open(str(tmp_path / "registry.db"))
    system = ActorSystem()
    async with trio.open_nursery() as nursery:
        await system.spawn(nursery, RegistryActor(state, ttl=3600, checkpoint_interval=3600),
                           "registry")
        yield system
        nursery.cancel_scope.cancel()
    state.close()


@pytest.fixture
def app(registry):
    return create_app(registry.ref("registry"), max_body_bytes=MAX_BODY)


@pytest.fixture
async def doc(app) -> dict:
    response = await app.test_client().get("/openapi.json")
    assert response.status_code == 200
    return orjson.loads(await response.get_data())


def openapi_path(rule: str) -> str:
    """/nodes/<node_id> or /x/<path:name> -> /nodes/{node_id}, /x/{name}."""
    return re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule)


def operations(doc: dict) -> set[tuple[str, str]]:
    return {(path, method.upper()) for path, item in doc["paths"].items()
            for method in item if method in METHODS}


def routes(app) -> set[tuple[str, str]]:
    return {(openapi_path(rule.rule), method) for rule in app.url_map.iter_rules()
            if rule.endpoint != "static" for method in rule.methods - IMPLICIT}


def resolve(doc: dict, ref: str) -> Any:
    assert ref.startswith("#/"), f"only local refs are used: {ref}"
    node: Any = doc
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        assert isinstance(node, dict) and part in node, f"unresolvable $ref {ref}"
        node = node[part]
    return node


# ------------------------------------------------------------------ a small JSON Schema checker
# Enough of JSON Schema for this document: $ref, type, properties, required,
# additionalProperties: false, items, pattern, minimum, maximum.

_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


def schema_errors(doc: dict, schema: dict, value: Any, where: str = "$") -> list[str]:
    if "$ref" in schema:
        return schema_errors(doc, resolve(doc, schema["$ref"]), value, where)
    errors: list[str] = []
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_TYPES[t](value) for t in types):
            return [f"{where}: {value!r} is not of type {types}"]
    if isinstance(value, dict):
        for name in schema.get("required", []):
            if name not in value:
                errors.append(f"{where}: missing required {name!r}")
        props = schema.get("properties", {})
        for name, item in value.items():
            if name in props:
                errors += schema_errors(doc, props[name], item, f"{where}.{name}")
            elif schema.get("additionalProperties") is False:
                errors.append(f"{where}: unexpected property {name!r}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            errors += schema_errors(doc, schema["items"], item, f"{where}[{i}]")
    if isinstance(value, str) and "pattern" in schema and not re.search(schema["pattern"], value):
        errors.append(f"{where}: {value!r} does not match {schema['pattern']}")
    if _TYPES["number"](value):
        if "minimum" in schema and value < schema["minimum"]:
            errors.append(f"{where}: {value} < minimum {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            errors.append(f"{where}: {value} > maximum {schema['maximum']}")
    return errors


def test_the_schema_checker_can_say_no():
    doc = {"components": {"schemas": {"P": {"type": "object", "required": ["a"],
                                            "additionalProperties": False,
                                            "properties": {"a": {"type": "integer",
                                                                 "maximum": 3}}}}}}
    ref = {"$ref": "#/components/schemas/P"}
    assert schema_errors(doc, ref, {"a": 1}) == []
    assert schema_errors(doc, ref, {"a": 4})
    assert schema_errors(doc, ref, {"a": True})
    assert schema_errors(doc, ref, {})
    assert schema_errors(doc, ref, {"a": 1, "b": 2})
    assert schema_errors(doc, {"type": "array", "items": ref}, [{"a": "x"}])
    assert schema_errors(doc, {"type": "string", "pattern": "^a$"}, "b")


# ------------------------------------------------------------------ structure


async def test_every_route_is_documented_with_its_methods(app, doc):
    missing = routes(app) - operations(doc)
    assert not missing, f"routes missing from /openapi.json: {sorted(missing)}"


async def test_every_documented_operation_is_a_route(app, doc):
    extra = operations(doc) - routes(app)
    assert not extra, f"documented but not served: {sorted(extra)}"
    adapter = app.url_map.bind("localhost")
    for path, method in operations(doc):
        concrete = re.sub(r"\{[^}]+\}", "sample", path)
        rule, _ = adapter.match(concrete, method=method, return_rule=True)
        assert openapi_path(rule.rule) == path


async def test_path_parameters_are_declared(doc):
    for path, item in doc["paths"].items():
        wanted = set(re.findall(r"\{([^}]+)\}", path))
        for method, op in item.items():
            if method not in METHODS:
                continue
            params = [resolve(doc, p["$ref"]) if "$ref" in p else p
                      for p in item.get("parameters", []) + op.get("parameters", [])]
            declared = {p["name"] for p in params if p["in"] == "path"}
            assert declared == wanted, (path, method)
            assert all(p.get("required") for p in params if p["in"] == "path")
            assert op.get("responses"), (path, method)


async def test_every_ref_resolves(doc):
    refs: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "$ref" in node:
                refs.append(node["$ref"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(doc)
    assert refs, "the document uses $refs; finding none means the walk is broken"
    for ref in refs:
        resolve(doc, ref)


async def test_every_component_schema_is_used(doc):
    text = orjson.dumps(doc["paths"]).decode() + orjson.dumps(doc["components"]).decode()
    for name in doc["components"]["schemas"]:
        assert f'"#/components/schemas/{name}"' in text, f"schema {name} is never used"


async def test_documented_operations_say_who_may_call_them(doc):
    schemes = doc["components"]["securitySchemes"]
    for path, method in operations(doc):
        op = doc["paths"][path][method.lower()]
        documented = set(op["responses"])
        if method == "GET":
            assert "security" not in op and not {"401", "403"} & documented, (path, method)
        else:
            assert [list(s) for s in op.get("security", [])] == [["bearer"]], (path, method)
            assert {"401", "403"} <= documented, (path, method)
    assert schemes["bearer"] == {"type": "http", "scheme": "bearer"}


# ------------------------------------------------------------------ behaviour


class Recorder:
    """Sends requests and remembers (documented path, method, status, body)."""

    def __init__(self, app):
        self.client = app.test_client()
        self.adapter = app.url_map.bind("localhost")
        self.seen: list[tuple[str, str, int, Any, bytes | None]] = []

    async def __call__(self, method: str, path: str, body: Any = None, *,
                       raw: bytes | None = None, headers: dict | None = None) -> int:
        data = raw if raw is not None else (None if body is None else orjson.dumps(body))
        kwargs: dict[str, Any] = {"headers": dict(headers or {})}
        if data is not None:  # with a Content-Length, as a real client sends
            kwargs["data"] = data
            kwargs["headers"]["Content-Length"] = str(len(data))
        response = await self.client.open(path, method=method, **kwargs)
        payload = orjson.loads(await response.get_data())
        try:
            rule, _ = self.adapter.match(path.split("?")[0], method=method, return_rule=True)
        except (NotFound, MethodNotAllowed):
            return response.status_code  # not an operation: nothing to document
        self.seen.append((openapi_path(rule.rule), method, response.status_code, payload, data))
        return response.status_code


async def exercise(registry: ActorSystem) -> list[tuple[str, str, int, Any, bytes | None]]:
    """Requests covering each operation's successes and errors."""
    ref = registry.ref("registry")
    rec = Recorder(create_app(ref, max_body_bytes=MAX_BODY))
    big = b'{"id": "n9", "ipv6": "fd10:1234::9", "x": "' + b"x" * MAX_BODY + b'"}'

    # service
    assert await rec("GET", "/health") == 200
    assert await rec("GET", "/version") == 200
    assert await rec("GET", "/openapi.json") == 200
    # replication routes on a single replica
    assert await rec("GET", "/cluster") == 404
    assert await rec("POST", "/cluster/members", {"id": "r4", "address": "ws://[::1]:9"}) == 404
    assert await rec("DELETE", "/cluster/members/r4") == 404

    # nodes
    assert await rec("POST", "/nodes", {"id": "a", "ipv6": "fd10:1234::1"}) == 201
    assert await rec("POST", "/nodes", {"id": "b", "ipv6": "fd10:1234::2", "port": 7000,
                                        "domain": "edge"}) == 201
    assert await rec("POST", "/nodes", {"id": "c", "ipv6": "fd10:1234::3"}) == 201
    assert await rec("POST", "/nodes", {"id": "a", "ipv6": "fd10:1234::1"}) == 200
    assert await rec("POST", "/nodes", {"id": "x", "ipv6": "fd10:1234::1"}) == 409
    assert await rec("POST", "/nodes", {"id": "x", "ipv6": "10.0.0.1"}) == 400
    assert await rec("POST", "/nodes", {"id": "x", "ipv6": "fd10::7", "port": "1"}) == 400
    assert await rec("POST", "/nodes", {"id": "x", "ipv6": "fd10::7", "colour": 1}) == 400
    assert await rec("POST", "/nodes", {"ipv6": "fd10::7"}) == 400
    assert await rec("POST", "/nodes", raw=b"{") == 400
    assert await rec("POST", "/nodes", raw=big) == 413
    assert await rec("GET", "/nodes") == 200
    assert await rec("GET", "/nodes?domain=edge&limit=1") == 200
    assert await rec("GET", "/nodes?limit=1&after=a") == 200
    assert await rec("GET", "/nodes?limit=0") == 400
    assert await rec("GET", "/nodes?bogus=1") == 400
    assert await rec("GET", "/nodes?domain=nowhere") == 404
    assert await rec("GET", "/nodes/a") == 200
    assert await rec("GET", "/nodes/bad%20id") == 400
    assert await rec("GET", "/nodes/ghost") == 404
    assert await rec("POST", "/nodes/a/heartbeat") == 200
    assert await rec("POST", "/nodes/a/heartbeat", {}) == 200
    assert await rec("POST", "/nodes/a/heartbeat", {"x": 1}) == 400
    assert await rec("POST", "/nodes/ghost/heartbeat") == 404
    assert await rec("POST", "/nodes/a/heartbeat", raw=big) == 413
    assert await rec("GET", "/nodes/a/reputation") == 200
    assert await rec("GET", "/nodes/a/reputation?x=1") == 400
    assert await rec("GET", "/nodes/bad%20id/reputation") == 400
    assert await rec("GET", "/nodes/ghost/reputation") == 404
    assert await rec("DELETE", "/nodes/a/identity") == 404  # a holds no key
    assert await rec("DELETE", "/nodes/bad%20id/identity") == 400

    # domains
    assert await rec("GET", "/domains") == 200
    assert await rec("GET", "/domains?x=1") == 400
    assert await rec("POST", "/domains", {"name": "zone"}) == 201
    assert await rec("POST", "/domains", {"name": "zone"}) == 409
    assert await rec("POST", "/domains", {"name": 1}) == 400
    assert await rec("POST", "/domains", {"name": "ok", "x": 1}) == 400
    assert await rec("POST", "/domains", raw=big) == 413

    # peers
    assert await rec("POST", "/peers", {"node_a": "a", "node_b": "b"}) == 201
    assert await rec("POST", "/peers", {"node_a": "c", "node_b": "a"}) == 201
    assert await rec("POST", "/peers", {"node_a": "a", "node_b": "ghost"}) == 404
    assert await rec("POST", "/peers", {"node_a": "a"}) == 400
    assert await rec("POST", "/peers", raw=big) == 413
    assert await rec("GET", "/peers") == 200
    assert await rec("GET", "/peers?node=a") == 200
    assert await rec("GET", "/peers?node=ghost") == 404
    assert await rec("GET", "/peers?other=a") == 400
    assert await rec("DELETE", "/peers", {"node_a": "a", "node_b": "b"}) == 200
    assert await rec("DELETE", "/peers?node_a=a&node_b=c") == 200
    assert await rec("DELETE", "/peers", {"node_a": "a", "node_b": "b"}) == 404
    assert await rec("DELETE", "/peers", {"node_a": "a", "node_b": "b", "n": 1}) == 400
    assert await rec("DELETE", "/peers", raw=big) == 413

    # deleting last: the node is gone for everything after
    assert await rec("DELETE", "/nodes/c") == 200
    assert await rec("DELETE", "/nodes/c") == 404
    assert await rec("DELETE", "/nodes/bad%20id") == 400

    # with an API key: every write operation refused both ways
    keyed = Recorder(create_app(ref, api_key=KEY, max_body_bytes=MAX_BODY))
    writes = [("POST", "/nodes", {"id": "k", "ipv6": "fd10:1234::99"}),
              ("DELETE", "/nodes/a", None), ("POST", "/nodes/a/heartbeat", None),
              ("DELETE", "/nodes/a/identity", None),
              ("POST", "/domains", {"name": "kz"}),
              ("POST", "/peers", {"node_a": "a", "node_b": "b"}),
              ("DELETE", "/peers", {"node_a": "a", "node_b": "b"})]
    for method, path, body in writes:
        assert await keyed(method, path, body) == 401
        assert await keyed(method, path, body, headers={"Authorization": "Bearer no"}) == 403
    assert await keyed("POST", "/nodes/a/heartbeat",
                       headers={"Authorization": f"Bearer {KEY}"}) == 200

    # nobody behind the routes: every operation answers 503
    dead = Recorder(create_app(registry.ref("nobody"), max_body_bytes=MAX_BODY,
                               ask_timeout=1.0))
    for method, path, body in [
        ("GET", "/health", None), ("GET", "/nodes", None), ("GET", "/nodes/a", None),
        ("GET", "/domains", None), ("GET", "/peers", None),
        ("GET", "/nodes/a/reputation", None), *writes,
    ]:
        assert await dead(method, path, body) == 503

    return rec.seen + keyed.seen + dead.seen


async def test_every_observed_status_is_documented(registry, app, doc):
    seen = await exercise(registry)
    undocumented = sorted({(path, method, status) for path, method, status, _, _ in seen
                           if str(status) not in doc["paths"][path][method.lower()]["responses"]})
    assert not undocumented, f"statuses returned but not documented: {undocumented}"
    # the requests above reached every operation
    assert {(path, method) for path, method, *_ in seen} == operations(doc)


async def test_every_response_fits_its_documented_schema(registry, doc):
    for path, method, status, payload, _ in await exercise(registry):
        response = doc["paths"][path][method.lower()]["responses"][str(status)]
        schema = response["content"]["application/json"]["schema"]
        errors = schema_errors(doc, schema, payload)
        assert not errors, (method, path, status, errors)


async def test_accepted_bodies_fit_the_documented_request_schema(registry, doc):
    checked = 0
    for path, method, status, _, data in await exercise(registry):
        op = doc["paths"][path][method.lower()]
        if status >= 300 or data is None or "requestBody" not in op:
            continue
        schema = op["requestBody"]["content"]["application/json"]["schema"]
        assert not schema_errors(doc, schema, orjson.loads(data)), (method, path, data)
        checked += 1
    assert checked >= 5


async def test_bodies_refused_for_their_shape_break_the_documented_schema(registry, doc):
    """400s for unknown/missing fields or wrong types are what the schema forbids too."""
    checked = 0
    for path, method, status, payload, data in await exercise(registry):
        op = doc["paths"][path][method.lower()]
        if (status != 400 or data is None or "requestBody" not in op
                or payload["error"]["code"] not in {"unknown_field", "missing_field",
                                                    "invalid_type"}):
            continue
        schema = op["requestBody"]["content"]["application/json"]["schema"]
        assert schema_errors(doc, schema, orjson.loads(data)), (method, path, data)
        checked += 1
    assert checked >= 5
