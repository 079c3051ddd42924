"""The registry's HTTP facade through Quart's test client, with a real
RegistryActor over SQLite behind it."""

from __future__ import annotations

import copy
import importlib.metadata
import json
import logging
from typing import Any

import orjson
import pytest
import trio

from actors import ActorSystem
from trustnet.registry import messages as m
from trustnet.registry import validate
from trustnet.registry.actor import RegistryActor
from trustnet.registry.http import create_app
from trustnet.registry.state import RegistryState

KEY = "s3cret-key"
MAX_BODY = 4096
FORM = "application/x-www-form-urlencoded"  # what `curl -d` sends
SPEC_BODY = b'{"id": "node-test", "ipv6": "fd10:1234::1"}'


class Env:
    """The app's surroundings: the state on disk, the actor, and a client."""

    def __init__(self, state: RegistryState, actor: RegistryActor, system: ActorSystem):
        self.state, self.actor, self.system = state, actor, system
        self.ref = system.ref("registry")

    def app(self, **kw):
        kw.setdefault("max_body_bytes", MAX_BODY)
        return create_app(self.ref, **kw)

    def client(self, **kw):
        return self.app(**kw).test_client()


@pytest.fixture
async def env(tmp_path):
    state = RegistryState.open(str(tmp_path / "registry.db"))
    system = ActorSystem()
    actor = RegistryActor(state, ttl=3600.0, checkpoint_interval=3600.0)
    async with trio.open_nursery() as nursery:
        await system.spawn(nursery, actor, "registry", mailbox_size=5000)
        yield Env(state, actor, system)
        nursery.cancel_scope.cancel()
    state.close()


@pytest.fixture
def client(env):
    return env.client()


async def call(client, method: str, path: str, body: Any = None, *,
               raw: bytes | None = None, headers: dict | None = None,
               query: dict | None = None, content_length: bool = True
               ) -> tuple[int, Any, Any]:
    """(status, decoded JSON body, response). `body` is sent as JSON bytes
    without a Content-Type (as curl -d would, minus its form type) and, as
    curl and every real client do, with a Content-Length (Quart's test client
    sends none unless told; content_length=False leaves it out)."""
    data = raw if raw is not None else (orjson.dumps(body) if body is not None else None)
    kwargs: dict[str, Any] = {"headers": dict(headers or {})}
    if data is not None:
        kwargs["data"] = data
        if content_length:
            kwargs["headers"].setdefault("Content-Length", str(len(data)))
    if query is not None:
        kwargs["query_string"] = query
    response = await client.open(path, method=method, **kwargs)
    text = await response.get_data()
    assert response.content_type == "application/json", (method, path, text)
    return response.status_code, orjson.loads(text), response


def assert_error(status: int, body: Any, want_status: int, want_code: str | None = None):
    assert status == want_status, body
    assert isinstance(body, dict) and set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message"}, body
    assert isinstance(body["error"]["code"], str) and body["error"]["code"]
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if want_code is not None:
        assert body["error"]["code"] == want_code, body


async def register(client, node_id: str, ipv6: str, **fields) -> dict:
    status, body, _ = await call(client, "POST", "/nodes", {"id": node_id, "ipv6": ipv6, **fields})
    assert status in (200, 201), body
    return body


def ip(i: int) -> str:
    return f"fd10:1234::{i:x}"


# ------------------------------------------------------------------ register


def seen_content_types(app) -> list:
    seen: list = []

    @app.before_request
    async def record() -> None:
        from quart import request
        seen.append(request.headers.get("Content-Type"))

    return seen


async def test_spec_example_without_content_type(env):
    app = env.app()
    seen = seen_content_types(app)
    client = app.test_client()
    response = await client.post("/nodes", data=SPEC_BODY)
    assert seen == [None]  # really no Content-Type
    assert response.status_code == 201
    node = orjson.loads(await response.get_data())
    assert node["id"] == "node-test"
    assert node["ipv6"] == "fd10:1234::1"
    assert node["port"] == 9000
    assert node["domain"] == "default"
    assert node["lease_deadline"] > 0
    assert env.state.get_node("node-test")["port"] == 9000

    again = await client.post("/nodes", data=SPEC_BODY)
    assert again.status_code == 200
    assert orjson.loads(await again.get_data())["id"] == "node-test"
    assert env.state.node_count() == 1


async def test_spec_example_with_the_form_content_type_curl_sends(env):
    app = env.app()
    seen = seen_content_types(app)
    response = await app.test_client().post("/nodes", data=SPEC_BODY,
                                            headers={"Content-Type": FORM})
    assert seen == [FORM]
    assert response.status_code == 201
    assert orjson.loads(await response.get_data())["port"] == 9000


async def test_register_with_a_json_content_type(client):
    response = await client.post("/nodes", json={"id": "n1", "ipv6": "fd10:1234::2"})
    assert response.status_code == 201


async def test_register_with_port_and_new_domain(client):
    status, node, _ = await call(client, "POST", "/nodes",
                                 {"id": "n1", "ipv6": "FD10:1234:0::00A", "port": 7001,
                                  "domain": "edge"})
    assert status == 201
    assert (node["port"], node["domain"], node["ipv6"]) == (7001, "edge", "fd10:1234::a")
    status, body, _ = await call(client, "GET", "/domains")
    assert status == 200 and [d["name"] for d in body["domains"]] == ["edge"]


async def test_reregister_updates_the_node(client):
    await register(client, "n1", ip(1))
    status, node, _ = await call(client, "POST", "/nodes",
                                 {"id": "n1", "ipv6": ip(2), "port": 9100})
    assert status == 200
    assert (node["ipv6"], node["port"]) == (ip(2), 9100)
    status, got, _ = await call(client, "GET", "/nodes/n1")
    assert (got["ipv6"], got["port"]) == (ip(2), 9100)


async def test_ipv6_held_by_another_node_is_409_and_changes_nothing(env, client):
    await register(client, "holder", ip(1))
    before = env.state.state_hash()
    status, body, _ = await call(client, "POST", "/nodes", {"id": "thief", "ipv6": ip(1)})
    assert_error(status, body, 409, "ipv6_taken")
    # the same address written differently is the same address
    status, body, _ = await call(client, "POST", "/nodes",
                                 {"id": "thief", "ipv6": "fd10:1234:0:0:0:0:0:1"})
    assert_error(status, body, 409, "ipv6_taken")
    assert env.state.state_hash() == before
    assert (await call(client, "GET", "/nodes/thief"))[0] == 404


# ------------------------------------------------------------------ nodes


async def test_list_nodes_and_domain_filter(client):
    await register(client, "a1", ip(1), domain="alpha")
    await register(client, "b1", ip(2), domain="beta")
    await register(client, "a2", ip(3), domain="alpha")
    status, page, _ = await call(client, "GET", "/nodes")
    assert status == 200
    assert [n["id"] for n in page["nodes"]] == ["a1", "a2", "b1"]
    assert page["next"] is None
    status, page, _ = await call(client, "GET", "/nodes?domain=alpha")
    assert status == 200 and [n["id"] for n in page["nodes"]] == ["a1", "a2"]
    status, page, _ = await call(client, "GET", "/nodes", query={"domain": "beta"})
    assert [n["id"] for n in page["nodes"]] == ["b1"]
    status, body, _ = await call(client, "GET", "/nodes?domain=nowhere")
    assert_error(status, body, 404, "not_found")


async def test_empty_domain_gives_an_empty_page(client):
    assert (await call(client, "POST", "/domains", {"name": "empty"}))[0] == 201
    status, page, _ = await call(client, "GET", "/nodes?domain=empty")
    assert status == 200 and page == {"nodes": [], "next": None}


async def test_pagination_over_250_nodes(env, client):
    async with trio.open_nursery() as nursery:  # concurrent asks: few transactions
        for i in range(250):
            nursery.start_soon(env.ref.ask, m.Register(f"n{i:03d}", ip(i + 1),
                                                       domain="even" if i % 2 else "odd"))
    want = [f"n{i:03d}" for i in range(250)]

    status, page, _ = await call(client, "GET", "/nodes")
    assert status == 200 and len(page["nodes"]) == 100  # the default page
    assert page["next"] == "n099"

    seen, after = [], None
    for _ in range(10):  # a cursor that never ends must fail, not hang
        query = {"limit": "100"} | ({"after": after} if after else {})
        status, page, _ = await call(client, "GET", "/nodes", query=query)
        assert status == 200
        assert len(page["nodes"]) <= 100
        seen += [n["id"] for n in page["nodes"]]
        after = page["next"]
        if after is None:
            break
    assert seen == want

    status, page, _ = await call(client, "GET", "/nodes?limit=1000")
    assert [n["id"] for n in page["nodes"]] == want and page["next"] is None
    status, page, _ = await call(client, "GET", "/nodes?limit=250")
    assert len(page["nodes"]) == 250 and page["next"] is None
    status, page, _ = await call(client, "GET", "/nodes?limit=249")
    assert page["next"] == "n248"

    seen, after = [], None
    for _ in range(30):
        query = {"domain": "odd", "limit": "7"} | ({"after": after} if after else {})
        status, page, _ = await call(client, "GET", "/nodes", query=query)
        seen += [n["id"] for n in page["nodes"]]
        after = page["next"]
        if after is None:
            break
    assert seen == want[::2]


async def test_get_and_delete_a_node(env, client):
    await register(client, "n1", ip(1))
    await register(client, "n2", ip(2))
    await call(client, "POST", "/peers", {"node_a": "n1", "node_b": "n2"})
    status, node, _ = await call(client, "GET", "/nodes/n1")
    assert status == 200 and node["id"] == "n1" and node["ipv6"] == ip(1)

    status, removed, _ = await call(client, "DELETE", "/nodes/n1")
    assert status == 200 and removed["id"] == "n1"
    for method, path in (("GET", "/nodes/n1"), ("DELETE", "/nodes/n1"),
                         ("POST", "/nodes/n1/heartbeat")):
        status, body, _ = await call(client, method, path)
        assert_error(status, body, 404, "not_found")
    status, peers, _ = await call(client, "GET", "/peers")
    assert peers == {"peers": []}
    # the address is free again
    assert (await call(client, "POST", "/nodes", {"id": "n3", "ipv6": ip(1)}))[0] == 201


async def test_heartbeat(env, client):
    await register(client, "n1", ip(1))
    status, lease, _ = await call(client, "POST", "/nodes/n1/heartbeat")
    assert status == 200
    assert lease["node_id"] == "n1" and lease["ttl"] == 3600.0
    assert lease["lease_deadline"] == env.actor.leases.deadline("n1")
    # the node and its page show the renewed lease, not the checkpointed one
    for path in ("/nodes/n1", "/nodes?domain=default"):
        status, body, _ = await call(client, "GET", path)
        node = body if path == "/nodes/n1" else body["nodes"][0]
        assert node["lease_deadline"] == lease["lease_deadline"], path
    status, lease, _ = await call(client, "POST", "/nodes/n1/heartbeat", {})
    assert status == 200
    status, body, _ = await call(client, "POST", "/nodes/ghost/heartbeat")
    assert_error(status, body, 404, "not_found")
    status, body, _ = await call(client, "POST", "/nodes/n1/heartbeat", {"x": 1})
    assert_error(status, body, 400, "unknown_field")
    status, body, _ = await call(client, "POST", "/nodes/n1/heartbeat", raw=b"nope")
    assert_error(status, body, 400, "malformed_json")


# ------------------------------------------------------------------ domains


async def test_domains(client):
    status, body, _ = await call(client, "GET", "/domains")
    assert status == 200 and body == {"domains": []}
    status, dom, _ = await call(client, "POST", "/domains", {"name": "zeta"})
    assert status == 201 and dom["name"] == "zeta" and dom["id"].startswith("dom-")
    assert dom["created_at"].endswith("Z")
    await call(client, "POST", "/domains", {"name": "alpha"})
    status, body, _ = await call(client, "POST", "/domains", {"name": "zeta"})
    assert_error(status, body, 409, "domain_exists")
    status, body, _ = await call(client, "GET", "/domains")
    assert [d["name"] for d in body["domains"]] == ["alpha", "zeta"]
    # a node can join an existing domain
    node = await register(client, "n1", ip(1), domain="zeta")
    assert node["domain"] == "zeta"


# ------------------------------------------------------------------ peers


async def test_peers(client):
    for i, name in enumerate(("a", "b", "c"), 1):
        await register(client, name, ip(i))
    status, peer, _ = await call(client, "POST", "/peers", {"node_a": "b", "node_b": "a"})
    assert status == 201 and (peer["node_a"], peer["node_b"]) == ("a", "b")
    await call(client, "POST", "/peers", {"node_a": "a", "node_b": "c"})

    status, body, _ = await call(client, "GET", "/peers?node=a")
    assert status == 200
    assert [(p["node_a"], p["node_b"]) for p in body["peers"]] == [("a", "b"), ("a", "c")]
    status, body, _ = await call(client, "GET", "/peers?node=c")
    assert [(p["node_a"], p["node_b"]) for p in body["peers"]] == [("a", "c")]
    status, body, _ = await call(client, "GET", "/peers")
    assert len(body["peers"]) == 2

    status, body, _ = await call(client, "DELETE", "/peers", {"node_a": "b", "node_b": "a"})
    assert status == 200 and body == {"node_a": "a", "node_b": "b"}
    status, body, _ = await call(client, "DELETE", "/peers?node_a=c&node_b=a")
    assert status == 200 and body == {"node_a": "a", "node_b": "c"}
    status, body, _ = await call(client, "GET", "/peers")
    assert body == {"peers": []}
    status, body, _ = await call(client, "DELETE", "/peers", {"node_a": "a", "node_b": "b"})
    assert_error(status, body, 404, "not_found")


async def test_peer_errors(client):
    await register(client, "a", ip(1))
    status, body, _ = await call(client, "POST", "/peers", {"node_a": "a", "node_b": "ghost"})
    assert_error(status, body, 404, "not_found")
    status, body, _ = await call(client, "POST", "/peers", {"node_a": "a", "node_b": "a"})
    assert_error(status, body, 400, "invalid_value")
    status, body, _ = await call(client, "GET", "/peers?node=ghost")
    assert_error(status, body, 404, "not_found")
    status, body, _ = await call(client, "DELETE", "/peers?node_a=a")
    assert_error(status, body, 400, "missing_field")
    status, body, _ = await call(client, "DELETE", "/peers?node_a=a&node_b=b&x=1")
    assert_error(status, body, 400, "unknown_field")
    status, body, _ = await call(client, "DELETE", "/peers")
    assert_error(status, body, 400, "malformed_json")


# ------------------------------------------------------------------ bad input


def reg_body(**fields) -> dict:
    return {"id": "n1", "ipv6": "fd10:1234::1"} | fields


BAD_REQUESTS = [
    # (method, path, body: dict | bytes, status, code)
    ("POST", "/nodes", b'{"id": "n1", "ipv6": ', 400, "malformed_json"),
    ("POST", "/nodes", b"", 400, "malformed_json"),
    ("POST", "/nodes", b"\xff\xfe{}", 400, "malformed_json"),
    ("POST", "/nodes", b"id=n1&ipv6=fd10::1", 400, "malformed_json"),
    ("POST", "/nodes", b"[]", 400, "malformed_json"),
    ("POST", "/nodes", b'"node"', 400, "malformed_json"),
    ("POST", "/nodes", b"null", 400, "malformed_json"),
    ("POST", "/nodes", b"42", 400, "malformed_json"),
    ("POST", "/nodes", b"[" * 2000, 400, "malformed_json"),  # nesting too deep
    ("POST", "/nodes", reg_body(port="9000"), 400, "invalid_type"),
    ("POST", "/nodes", reg_body(id=5), 400, "invalid_type"),
    ("POST", "/nodes", reg_body(ipv6=1), 400, "invalid_type"),
    ("POST", "/nodes", reg_body(ipv6=None), 400, "invalid_type"),
    ("POST", "/nodes", reg_body(domain=7), 400, "invalid_type"),
    ("POST", "/nodes", reg_body(port=True), 400, "invalid_type"),
    ("POST", "/nodes", reg_body(port=9000.0), 400, "invalid_type"),
    ("POST", "/nodes", reg_body(port=None), 400, "invalid_type"),
    ("POST", "/nodes", reg_body(port=0), 400, "invalid_port"),
    ("POST", "/nodes", reg_body(port=-1), 400, "invalid_port"),
    ("POST", "/nodes", reg_body(port=65536), 400, "invalid_port"),
    ("POST", "/nodes", reg_body(port=70000), 400, "invalid_port"),
    ("POST", "/nodes", b'{"id": "n1", "ipv6": "fd10::1", "port": 1e400}', 400, "malformed_json"),
    ("POST", "/nodes", reg_body(color="red"), 400, "unknown_field"),
    ("POST", "/nodes", reg_body(ip="fd10::1"), 400, "unknown_field"),
    ("POST", "/nodes", {"id": "n1"}, 400, "missing_field"),
    ("POST", "/nodes", {"ipv6": "fd10::1"}, 400, "missing_field"),
    ("POST", "/nodes", {}, 400, "missing_field"),
    ("POST", "/nodes", reg_body(ipv6="10.0.0.1"), 400, "invalid_ipv6"),
    ("POST", "/nodes", reg_body(ipv6="::ffff:10.0.0.1"), 400, "invalid_ipv6"),
    ("POST", "/nodes", reg_body(ipv6="garbage"), 400, "invalid_ipv6"),
    ("POST", "/nodes", reg_body(ipv6=""), 400, "invalid_ipv6"),
    ("POST", "/nodes", reg_body(ipv6="fd10::1::2"), 400, "invalid_ipv6"),
    ("POST", "/nodes", reg_body(ipv6="fe80::1%eth0"), 400, "invalid_ipv6"),
    ("POST", "/nodes", reg_body(ipv6="[fd10::1]"), 400, "invalid_ipv6"),
    ("POST", "/nodes", reg_body(ipv6="::"), 400, "invalid_ipv6"),
    ("POST", "/nodes", reg_body(ipv6="ff02::1"), 400, "invalid_ipv6"),
    ("POST", "/nodes", reg_body(id=""), 400, "invalid_value"),
    ("POST", "/nodes", reg_body(id="has space"), 400, "invalid_value"),
    ("POST", "/nodes", reg_body(id="node\n"), 400, "invalid_value"),
    ("POST", "/nodes", reg_body(id="-leading-dash"), 400, "invalid_value"),
    ("POST", "/nodes", reg_body(id="x" * 65), 400, "invalid_value"),
    ("POST", "/nodes", reg_body(id="nöde"), 400, "invalid_value"),
    ("POST", "/nodes", reg_body(domain="a/b"), 400, "invalid_value"),
    ("GET", "/nodes?limit=0", None, 400, "invalid_value"),
    ("GET", "/nodes?limit=1001", None, 400, "invalid_value"),
    ("GET", "/nodes?limit=-1", None, 400, "invalid_value"),
    ("GET", "/nodes?limit=abc", None, 400, "invalid_value"),
    ("GET", "/nodes?limit=", None, 400, "invalid_value"),
    ("GET", "/nodes?limit=1.5", None, 400, "invalid_value"),
    ("GET", "/nodes?limit=%C2%B2", None, 400, "invalid_value"),  # superscript two
    ("GET", "/nodes?limit=%D9%A1%D9%A2", None, 400, "invalid_value"),  # Arabic-Indic 12
    ("GET", "/nodes?limit=" + "1" * 5000, None, 400, "invalid_value"),
    ("GET", "/nodes?after=bad%20id", None, 400, "invalid_value"),
    ("GET", "/nodes?domain=", None, 400, "invalid_value"),
    ("GET", "/nodes?foo=1", None, 400, "unknown_parameter"),
    ("GET", "/nodes?Domain=alpha", None, 400, "unknown_parameter"),
    ("GET", "/nodes/n1?verbose=1", None, 400, "unknown_parameter"),
    ("GET", "/domains?x=1", None, 400, "unknown_parameter"),
    ("GET", "/peers?nodes=n1", None, 400, "unknown_parameter"),
    ("GET", "/peers?node=", None, 400, "invalid_value"),
    ("GET", "/nodes/bad%20id", None, 400, "invalid_value"),
    ("GET", "/nodes/ghost", None, 404, "not_found"),
    ("DELETE", "/nodes/ghost", None, 404, "not_found"),
    ("POST", "/nodes/ghost/heartbeat", None, 404, "not_found"),
    ("POST", "/nodes/n1/heartbeat", b"[]", 400, "malformed_json"),
    ("POST", "/domains", {}, 400, "missing_field"),
    ("POST", "/domains", {"name": 5}, 400, "invalid_type"),
    ("POST", "/domains", {"name": "ok", "extra": 1}, 400, "unknown_field"),
    ("POST", "/domains", {"name": "a b"}, 400, "invalid_value"),
    ("POST", "/domains", b"{", 400, "malformed_json"),
    ("POST", "/peers", {"node_a": "n1"}, 400, "missing_field"),
    ("POST", "/peers", {"node_a": "n1", "node_b": 2}, 400, "invalid_type"),
    ("POST", "/peers", {"node_a": "n1", "node_b": "n2", "x": 0}, 400, "unknown_field"),
    ("DELETE", "/peers", b"nope", 400, "malformed_json"),
    ("GET", "/no/such/route", None, 404, "not_found"),
    ("POST", "/nodes/n1/heartbeat/extra", None, 404, "not_found"),
    ("GET", "/nodes//reputation", None, 404, "not_found"),  # not /nodes/reputation
    ("POST", "/nodes//heartbeat", None, 404, "not_found"),
    ("PUT", "/nodes", reg_body(), 405, "method_not_allowed"),
    ("PATCH", "/nodes/n1", {}, 405, "method_not_allowed"),
    ("GET", "/nodes/n1/heartbeat", None, 405, "method_not_allowed"),
    ("DELETE", "/domains", None, 405, "method_not_allowed"),
    ("POST", "/health", None, 405, "method_not_allowed"),
]


def _data(body: Any) -> bytes | None:
    if body is None or isinstance(body, bytes):
        return body
    return orjson.dumps(body)


@pytest.mark.parametrize(("method", "path", "body", "status", "code"), BAD_REQUESTS,
                         ids=[f"{i:02d}-{r[0]}-{r[4]}" for i, r in enumerate(BAD_REQUESTS)])
async def test_bad_request_is_a_json_error(env, client, method, path, body, status, code):
    await register(client, "n1", ip(0x100))
    await register(client, "n2", ip(0x200))
    before = env.state.state_hash()
    got, payload, response = await call(client, method, path, raw=_data(body))
    assert_error(got, payload, status, code)
    if status == 405:
        assert response.headers.get("Allow"), "a 405 must list the allowed methods"
    assert env.state.state_hash() == before


async def test_a_barrage_of_bad_requests_changes_nothing(env, client):
    for i in range(5):
        await register(client, f"keep{i}", ip(0x1000 + i), domain="alpha")
    await call(client, "POST", "/peers", {"node_a": "keep0", "node_b": "keep1"})
    await call(client, "POST", "/domains", {"name": "beta"})
    before = env.state.state_hash()
    nodes_before = (await call(client, "GET", "/nodes"))[1]

    statuses = set()
    for method, path, body, _, _ in BAD_REQUESTS:
        for target in (path, path.replace("n1", "keep0")):
            statuses.add((await call(client, method, target, raw=_data(body)))[0])
    # attempts on live data that must be refused as a whole
    for body in (
        {"id": "keep0", "ipv6": "10.0.0.1"},
        {"id": "keep0", "ipv6": ip(0x1000), "port": 0},
        {"id": "keep0", "ipv6": ip(0x1000), "domain": "beta", "x": 1},
        {"id": "keep1", "ipv6": ip(0x1000)},  # keep0's address
        {"id": "intruder", "ipv6": ip(0x1004)},  # keep4's address
    ):
        statuses.add((await call(client, "POST", "/nodes", body))[0])
    statuses.add((await call(client, "POST", "/domains", {"name": "alpha"}))[0])
    statuses.add((await call(client, "POST", "/peers", {"node_a": "keep0", "node_b": "zz"}))[0])
    statuses.add((await call(client, "DELETE", "/peers",
                             {"node_a": "keep2", "node_b": "keep3"}))[0])
    assert statuses <= {400, 404, 405, 409}
    assert 500 not in statuses

    assert env.state.state_hash() == before
    assert (await call(client, "GET", "/nodes"))[1]["nodes"] == nodes_before["nodes"]


# ------------------------------------------------------------------ body size


@pytest.mark.parametrize("content_length", [True, False], ids=["declared", "undeclared"])
@pytest.mark.parametrize(("method", "path"), [
    ("POST", "/nodes"), ("POST", "/domains"), ("POST", "/peers"), ("DELETE", "/peers"),
    ("POST", "/nodes/n1/heartbeat"),
])
async def test_oversized_body_is_413(env, client, method, path, content_length):
    """Refused whether the size is declared up front or only found while reading."""
    await register(client, "n1", ip(1))
    deadline = env.actor.leases.deadline("n1")
    before = env.state.state_hash()
    padding = "x" * (MAX_BODY + 10)
    big = orjson.dumps({"id": "n2", "ipv6": ip(2), "pad": padding})
    status, body, _ = await call(client, method, path, raw=big,
                                 content_length=content_length)
    assert_error(status, body, 413, "body_too_large")
    assert env.state.state_hash() == before
    assert env.actor.leases.deadline("n1") == deadline


@pytest.mark.parametrize("content_length", [True, False], ids=["declared", "undeclared"])
async def test_body_of_exactly_the_limit_is_read(client, content_length):
    body = orjson.dumps({"id": "n1", "ipv6": ip(1)})
    body += b" " * (MAX_BODY - len(body))
    assert len(body) == MAX_BODY
    status, _, _ = await call(client, "POST", "/nodes", raw=body, content_length=content_length)
    assert status == 201
    status, body, _ = await call(client, "POST", "/nodes", raw=body + b" ",
                                 content_length=content_length)
    assert_error(status, body, 413, "body_too_large")


# ------------------------------------------------------------------ API key


WRITES = [
    ("POST", "/nodes", {"id": "new", "ipv6": ip(9)}),
    ("POST", "/nodes", {"id": "a", "ipv6": ip(1), "port": 1234}),
    ("DELETE", "/nodes/a", None),
    ("POST", "/nodes/a/heartbeat", None),
    ("POST", "/domains", {"name": "gamma"}),
    ("POST", "/peers", {"node_a": "a", "node_c": "c"}),
    ("POST", "/peers", {"node_a": "a", "node_b": "c"}),
    ("DELETE", "/peers", {"node_a": "a", "node_b": "b"}),
    ("DELETE", "/peers?node_a=a&node_b=b", None),
]


@pytest.fixture
async def keyed(env):
    """An app that needs a key for writes, over a registry with some data."""
    open_client = env.client()
    for i, name in enumerate(("a", "b", "c"), 1):
        await register(open_client, name, ip(i))
    await call(open_client, "POST", "/peers", {"node_a": "a", "node_b": "b"})
    return env.client(api_key=KEY)


@pytest.mark.parametrize(("method", "path", "body"), WRITES)
@pytest.mark.parametrize(("headers", "status", "code"), [
    ({}, 401, "unauthorized"),
    ({"Authorization": ""}, 401, "unauthorized"),
    ({"Authorization": "Bearer wrong"}, 403, "forbidden"),
    ({"Authorization": f"Bearer {KEY}x"}, 403, "forbidden"),
    ({"Authorization": "Bearer"}, 403, "forbidden"),
    ({"Authorization": f"Basic {KEY}"}, 403, "forbidden"),
    ({"Authorization": KEY}, 403, "forbidden"),
])
async def test_writes_without_the_right_key_are_refused(env, keyed, method, path, body,
                                                        headers, status, code):
    before = env.state.state_hash()
    deadline = env.actor.leases.deadline("a")
    got, payload, response = await call(keyed, method, path, body, headers=headers)
    assert_error(got, payload, status, code)
    if status == 401:
        assert response.headers.get("WWW-Authenticate") == "Bearer"
    assert env.state.state_hash() == before
    assert env.actor.leases.deadline("a") == deadline  # not even a heartbeat went through


async def test_writes_with_the_key_succeed(env, keyed):
    auth = {"Authorization": f"Bearer {KEY}"}
    results = [(await call(keyed, method, path, body, headers=auth))[0]
               for method, path, body in WRITES]
    # register, re-register, delete a, heartbeat of deleted a, domain,
    # bad peer body, peer with deleted a, delete peer (gone with a) twice
    assert results == [201, 200, 200, 404, 201, 400, 404, 404, 404]
    assert (await call(keyed, "POST", "/nodes", {"id": "a", "ipv6": ip(1)},
                       headers={"authorization": f"bearer {KEY}"}))[0] == 201


async def test_reads_stay_open_with_a_key(keyed):
    for path in ("/health", "/version", "/openapi.json", "/nodes", "/nodes/a",
                 "/domains", "/peers", "/peers?node=a", "/nodes?domain=default"):
        status, body, _ = await call(keyed, "GET", path)
        assert status == 200, (path, body)


# ------------------------------------------------------------------ service


async def test_health(env, client):
    status, body, _ = await call(client, "GET", "/health")
    assert status == 200
    assert body["status"] == "ok" and body["ready"] is True
    assert body["applied_index"] == env.state.applied_index


async def test_health_is_503_without_a_running_actor(env):
    client = create_app(env.system.ref("nobody"), ask_timeout=1.0).test_client()
    status, body, _ = await call(client, "GET", "/health")
    assert status == 503 and body["status"] == "unavailable"
    status, body, response = await call(client, "POST", "/nodes", {"id": "a", "ipv6": ip(1)})
    assert_error(status, body, 503, "unavailable")
    assert response.headers.get("Retry-After") == "1"
    status, body, _ = await call(client, "GET", "/nodes")
    assert_error(status, body, 503, "unavailable")


async def test_health_is_503_after_the_actor_stopped(tmp_path):
    state = RegistryState.open(str(tmp_path / "r.db"))
    system = ActorSystem()
    async with trio.open_nursery() as nursery:
        await system.spawn(nursery, RegistryActor(state, ttl=60, checkpoint_interval=60),
                           "registry")
        client = create_app(system.ref("registry")).test_client()
        assert (await call(client, "GET", "/health"))[0] == 200
        nursery.cancel_scope.cancel()
    assert (await call(client, "GET", "/health"))[0] == 503
    state.close()


async def test_version(client):
    status, body, _ = await call(client, "GET", "/version")
    assert status == 200
    assert set(body) == {"version", "build_time", "commit"}
    assert body["version"] == importlib.metadata.version("trustnet")
    assert all(isinstance(v, str) and v for v in body.values())


async def test_openapi_is_served(client):
    status, body, _ = await call(client, "GET", "/openapi.json")
    assert status == 200 and body["openapi"].startswith("3.")


async def test_request_id_and_request_log(client, caplog):
    caplog.set_level(logging.INFO, logger="trustnet.http")
    response = await client.get("/nodes/ghost", headers={"X-Request-Id": "req-42"})
    assert response.status_code == 404
    assert response.headers["X-Request-Id"] == "req-42"
    [record] = [r for r in caplog.records if r.name == "trustnet.http"
                and r.getMessage() == "request"]
    assert (record.method, record.path, record.status, record.request_id) == \
        ("GET", "/nodes/ghost", 404, "req-42")
    assert record.duration_ms >= 0
    other = await client.get("/health")
    assert len(other.headers["X-Request-Id"]) == 16


@pytest.mark.parametrize(("data", "code"), [
    ({"id": "r4"}, "missing_field"),
    ({"address": "ws://[::1]:8031"}, "missing_field"),
    ({"id": "r4", "address": "ws://[::1]:8031", "voter": True}, "unknown_field"),
    ({"id": 4, "address": "ws://[::1]:8031"}, "invalid_type"),
    ({"id": "r4", "address": ["ws://[::1]:8031"]}, "invalid_type"),
    ({"id": "", "address": "ws://[::1]:8031"}, "invalid_value"),
    ({"id": "r 4", "address": "ws://[::1]:8031"}, "invalid_value"),
    ({"id": "r" * 65, "address": "ws://[::1]:8031"}, "invalid_value"),
    ({"id": "r4", "address": "ws://"}, "invalid_value"),
    ({"id": "r4", "address": "ws://[::1]"}, "invalid_value"),
    ({"id": "r4", "address": "ws://[::1]:0"}, "invalid_value"),
    ({"id": "r4", "address": "ws://[::1]:70000"}, "invalid_value"),
    ({"id": "r4", "address": "ws://[fd10::zz]:8031"}, "invalid_value"),
    ({"id": "r4", "address": "http://[::1]:8031"}, "invalid_value"),
    ({"id": "r4", "address": "ws://[::1]:8031/path"}, "invalid_value"),
])
def test_a_new_member_is_checked_like_a_configured_peer(data, code):
    """POST /cluster/members (replicated mode): a member added with an
    address nobody can dial would still count toward every quorum."""
    with pytest.raises(validate.BadRequest) as info:
        validate.new_member(data)
    assert info.value.code == code and info.value.status == 400
    assert validate.new_member({"id": "r4", "address": "ws://[::1]:8031"}) == (
        "r4", "ws://[::1]:8031")


# ------------------------------------------------------------------ fuzz

_ODD_VALUES: list[Any] = [
    None, True, False, 0, -1, 1.5, 2**70, -(2**63), float("1e308"), "", " ", "x" * 300,
    "nöde", "\u0000", "\ud7ff", "fd10:1234::1", "::1", "10.0.0.1", "fd10:1234::1%eth0",
    "fd10:1234::/64", "9000", [], {}, [1, 2], {"a": 1}, "ws://[::1]:1", "a" * 64, "-x", "x-",
]
_ODD_SEGMENTS = ["n1", "%00", "%2F", "..", "%E2%82%AC", "a" * 65, "%FF", "n1%20", "N1",
                 "x" * 2000, "%25", "n1;x", "%0d%0a", ""]
_ODD_QUERIES = [
    "domain=alpha", "limit=1", "limit=1&limit=2", "after=n1", "after=", "domain=%00",
    "consistency=stale", "consistency=linear", "limit=0x10", "limit=%201", "limit=1e3",
    "node=n1", "node=n1&node=n2", "x", "=", "&&", "domain=alpha&after=zz&limit=1000",
    "limit=99999999999999999999999", "%ZZ=1", "domain=" + "d" * 200,
]
_CONTENT_TYPES = [None, "application/json", "text/plain", FORM, "application/json; charset=latin-1",
                  "multipart/form-data; boundary=x", "application/json; charset=utf-16",
                  "application/octet-stream", "*/*"]


def _odd(rng) -> Any:
    """One of _ODD_VALUES, a copy: the mutations must not change the list."""
    return copy.deepcopy(rng.choice(_ODD_VALUES))


def _fuzz_request(rng) -> tuple[str, str, bytes | None, dict]:
    """A request made from a valid one by a few random mutations."""
    node = rng.choice(["n1", "n2", "n3", "ghost"])
    kind = rng.randrange(9)
    body: Any = None
    if kind == 0:
        method, path = "POST", "/nodes"
        body = {"id": node, "ipv6": ip(rng.randrange(1, 6))}
        for key in ("port", "domain", "public_key"):
            if rng.random() < 0.3:
                body[key] = rng.choice([7000, "alpha", "beta", None])
    elif kind == 1:
        method, path = "POST", f"/nodes/{node}/heartbeat"
    elif kind == 2:
        method, path = rng.choice(["GET", "DELETE"]), f"/nodes/{node}"
    elif kind == 3:
        method, path = "GET", "/nodes?" + rng.choice(_ODD_QUERIES)
    elif kind == 4:
        method, path = rng.choice(["GET", "POST"]), "/domains"
        body = {"name": rng.choice(["alpha", "beta", "gamma"])} if method == "POST" else None
    elif kind == 5:
        method = rng.choice(["GET", "POST", "DELETE"])
        path = "/peers" + ("?" + rng.choice(_ODD_QUERIES) if method == "GET" else "")
        body = None if method == "GET" else {"node_a": node, "node_b": rng.choice(["n1", "n2"])}
    elif kind == 6:
        method, path = "GET", f"/nodes/{node}/reputation"
    elif kind == 7:
        method = rng.choice(["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
        path = rng.choice(["/health", "/version", "/nodes", "/peers", "/domains", "/cluster"])
    else:
        method = rng.choice(["GET", "POST", "DELETE"])
        path = "/nodes/" + rng.choice(_ODD_SEGMENTS) + rng.choice(["", "/heartbeat", "/reputation"])
    if isinstance(body, dict):
        for _ in range(rng.randrange(3)):
            if not isinstance(body, dict):
                break
            op = rng.randrange(4)
            if op == 0 and body:
                body.pop(rng.choice(sorted(body)))
            elif op == 1 and body:
                body[rng.choice(sorted(body))] = _odd(rng)
            elif op == 2:
                body[rng.choice(["extra", "ID", "ipv6 ", "node_a", "name"])] = _odd(rng)
            else:
                body = rng.choice([body, [body], _odd(rng)])
    data = None if body is None and rng.random() < 0.8 else json.dumps(
        body, ensure_ascii=rng.random() < 0.5).encode()  # json: ints past 64 bits too
    if data is not None and rng.random() < 0.3:  # damage the bytes themselves
        at = rng.randrange(len(data) + 1)
        data = rng.choice([data[:at], data[:at] + bytes([rng.randrange(256)]) + data[at:],
                           data[:at] + b"\xc3\x28" + data[at:], b"\xef\xbb\xbf" + data])
    headers = {}
    if (ctype := rng.choice(_CONTENT_TYPES)) is not None:
        headers["Content-Type"] = ctype
    if rng.random() < 0.5:
        headers["Authorization"] = rng.choice([f"Bearer {KEY}", "Bearer nope", "Basic xyz",
                                              "Bearer", f"bearer {KEY}", f"Bearer {KEY} ", ""])
    if rng.random() < 0.1:
        headers["X-Request-Id"] = rng.choice(["r" * 300, "\u00e9", "ok-1", ""])
    return method, path, data, headers


@pytest.mark.parametrize("seed", range(6))
async def test_random_requests_get_json_answers_and_refusals_change_nothing(env, seed):
    """Seeded random mutations of valid requests (fields, types, bytes,
    paths, queries, headers, API key): every answer is JSON, none is a
    5xx, every error has the error shape, and a refused request leaves the
    stored state exactly as it was."""
    import random

    rng = random.Random(seed)
    client = env.client(api_key=KEY if seed % 2 else None)
    statuses: dict[int, int] = {}
    for _ in range(250):
        method, path, data, headers = _fuzz_request(rng)
        before = env.state.state_hash()
        if method == "OPTIONS":  # Quart's own answer: the allowed methods, no body
            response = await client.open(path, method=method, headers=headers)
            assert response.status_code == 200 and response.headers.get("Allow")
            assert await response.get_data() == b""
            continue
        got, payload, response = await call(client, method, path, raw=data, headers=headers)
        statuses[got] = statuses.get(got, 0) + 1
        assert got < 500, (method, path, data, headers, payload)
        if got >= 400:
            assert_error(got, payload, got)
            assert env.state.state_hash() == before, (method, path, data, headers, payload)
    # Both outcomes happen, so the fuzz reaches the code behind validation.
    assert any(200 <= s < 300 for s in statuses) and any(400 <= s < 500 for s in statuses)
    status, page, _ = await call(client, "GET", "/nodes?limit=1000")
    assert status == 200 and page["next"] is None
    for node in page["nodes"]:
        assert (await call(client, "GET", f"/nodes/{node['id']}"))[1] == node
