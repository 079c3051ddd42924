"""`trustnet node` as real processes over loopback: one registry on [::1] and
three nodes, each on its own ULA address added to ``lo`` for the test.

Short timings (heartbeat 0.5 s, lease 1.5 s, peer_timeout 1.5 s) keep the
whole module well under a minute; every wait is a polling loop with a
generous bound, and no assertion is about how long anything took.

Needs root (it adds and removes the addresses; skipped otherwise). Every
process and every address is removed on the way out, also when a test fails.
"""

from __future__ import annotations

import secrets
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import trio
import trio_websocket

from actors.ws import hello_frame
from http_wire import late_body_then_next
from node_process import NodeProcess, addresses_on_lo, loopback_addresses, root_reason
from registry_process import RegistryProcess, run_trustnet

pytestmark = pytest.mark.skipif(root_reason() is not None, reason=root_reason() or "")

REGISTRY_CONFIG = {"leases": {"heartbeat_interval": "500ms", "ttl_multiplier": 3,
                              "checkpoint_interval": "1s"}}
WAIT = 20.0  # a failure bound for every "eventually", not an expectation


async def eventually(check: Callable[[], Awaitable[Any]], what: str, timeout: float = WAIT) -> Any:
    """Poll `check` until it returns something truthy; that value."""
    last: Any = None
    with trio.move_on_after(timeout):
        while True:
            last = await check()
            if last:
                return last
            await trio.sleep(0.1)
    raise AssertionError(f"not within {timeout}s: {what} (last seen: {last!r})")


class Cluster:
    def __init__(self, tmp_path: Path, nursery: trio.Nursery, addresses: list[str],
                 http: httpx.AsyncClient):
        self.tmp_path, self.nursery, self.http = tmp_path, nursery, http
        self.free = list(addresses)
        self.registry: RegistryProcess | None = None
        self.nodes: dict[str, NodeProcess] = {}
        self.procs: list[NodeProcess] = []

    @property
    def url(self) -> str:
        assert self.registry is not None and self.registry.base_url
        return self.registry.base_url

    async def start_registry(self) -> RegistryProcess:
        self.registry = RegistryProcess(self.tmp_path, config=REGISTRY_CONFIG)
        await self.registry.start(self.nursery)
        assert self.registry.ws_address, self.registry.describe()
        return self.registry

    def node(self, name: str, **kw: Any) -> NodeProcess:
        assert self.registry is not None
        node = NodeProcess(self.tmp_path, name, self.free.pop(0),
                           registry_ws=self.registry.ws_address, registry_url=self.url, **kw)
        self.procs.append(node)
        return node

    async def start_node(self, name: str, **kw: Any) -> NodeProcess:
        node = self.node(name, **kw)
        await node.start(self.nursery)
        self.nodes[name] = node
        return node

    async def start(self, count: int = 3) -> list[NodeProcess]:
        await self.start_registry()
        return [await self.start_node(f"n{i + 1}") for i in range(count)]

    # ------------------------------------------------------------ reads

    async def get(self, url: str, **kw: Any) -> tuple[int, Any]:
        resp = await self.http.get(url, **kw)
        return resp.status_code, resp.json()

    async def node_peers(self, node: NodeProcess) -> dict[str, dict]:
        status, body = await self.get(node.api_url + "/peers")
        assert status == 200, body
        return {p["id"]: p for p in body["peers"]}

    async def registry_pairs(self) -> set[frozenset[str]]:
        status, body = await self.get(self.url + "/peers")
        assert status == 200, body
        return {frozenset((p["node_a"], p["node_b"])) for p in body["peers"]}

    async def inbox(self, node: NodeProcess) -> list[dict]:
        status, body = await self.get(node.api_url + "/messages", params={"limit": 1000})
        assert status == 200, body
        return body["messages"]

    async def full_mesh(self, names: list[str] | None = None) -> None:
        """Wait until every pair of `names` is linked, seen from the nodes and the registry."""
        names = sorted(names or self.nodes)
        want = {frozenset((a, b)) for a in names for b in names if a < b}

        seen: dict[str, Any] = {}

        async def linked() -> bool:
            for name in names:
                seen[name] = sorted(await self.node_peers(self.nodes[name]))
            seen["registry"] = sorted(tuple(sorted(p)) for p in await self.registry_pairs())
            return (all(set(names) - {name} <= set(seen[name]) for name in names)
                    and want <= {frozenset(p) for p in seen["registry"]})

        try:
            await eventually(linked, f"links between every pair of {names}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; peers seen: {seen}") from None

    async def received(self, node: NodeProcess, msg_id: str) -> list[dict]:
        return [m for m in await self.inbox(node) if m["id"] == msg_id]


@pytest.fixture
async def cluster(tmp_path):
    """A Cluster; on teardown every process it started is killed and reaped,
    then the addresses leave lo (also when the test failed)."""
    async with loopback_addresses(5) as addresses:
        limits = httpx.Limits(max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=httpx.Timeout(10.0), limits=limits) as http:
            async with trio.open_nursery() as nursery:
                c = Cluster(tmp_path, nursery, addresses, http)
                try:
                    yield c
                finally:
                    with trio.CancelScope(shield=True):
                        for node in c.procs:
                            await node.aclose()
                        if c.registry is not None:
                            await c.registry.aclose()
                    nursery.cancel_scope.cancel()
    assert not set(addresses) & addresses_on_lo(), "a test address stayed on lo"


# ------------------------------------------------------------------ tests


async def test_nodes_register_with_their_keys_and_link_up(cluster):
    nodes = await cluster.start()
    for node in nodes:
        status, body = await cluster.get(f"{cluster.url}/nodes/{node.node_id}")
        assert status == 200, body
        assert body["public_key"] == node.public_key and node.public_key
        assert body["ipv6"] == node.address and body["port"] == node.mesh_port
        key_file = node.data_dir / "node.key"
        assert key_file.stat().st_mode & 0o777 == 0o600
    await cluster.full_mesh()
    for node in nodes:
        status, body = await cluster.get(node.api_url + "/health")
        assert status == 200 and body["status"] == "ok" and body["registered"] is True
        peers = await cluster.node_peers(node)
        assert set(peers) == {n.node_id for n in nodes} - {node.node_id}
        for peer in peers.values():
            assert peer["address"] == cluster.nodes[peer["id"]].mesh_address
            assert peer["direction"] in ("in", "out")
    # Each link has one dialler and one acceptor.
    n1_peers = await cluster.node_peers(nodes[0])
    n2_peers = await cluster.node_peers(nodes[1])
    assert {n1_peers["n2"]["direction"], n2_peers["n1"]["direction"]} == {"in", "out"}
    # The registry's reputations moved off the neutral start and stay in [0, 1].
    status, body = await cluster.get(f"{cluster.url}/nodes/n1/reputation")
    assert status == 200 and 0.0 <= body["reputation"] <= 1.0
    assert body["heartbeats"]["on_time"] > 0 and body["links"]["opened"] > 0


async def test_a_broadcast_reaches_every_other_node_once(cluster):
    n1, n2, n3 = await cluster.start()
    await cluster.full_mesh()
    payload = {"hello": "mesh", "nonce": secrets.token_hex(4)}
    resp = await cluster.http.post(n1.api_url + "/broadcast", json={"payload": payload})
    assert resp.status_code == 202, resp.text
    first = resp.json()
    assert first["sent_to"] == 2

    for node in (n2, n3):
        got = await eventually(lambda node=node: cluster.received(node, first["id"]),
                               f"{node.node_id} receives the broadcast")
        assert got[0]["payload"] == payload and got[0]["from"] == "n1"
        assert got[0]["kind"] == "broadcast"
    # A second broadcast, from elsewhere, behind the first on every link:
    # once it is in, any duplicate of the first would be too.
    resp = await cluster.http.post(n2.api_url + "/broadcast", json={"payload": "second"})
    second = resp.json()["id"]
    for node in (n1, n3):
        await eventually(lambda node=node: cluster.received(node, second),
                         f"{node.node_id} receives the second broadcast")
    for node in (n2, n3):
        assert len(await cluster.received(node, first["id"])) == 1
    assert await cluster.received(n1, first["id"]) == []  # not delivered to its origin
    assert await cluster.received(n2, second) == []


async def test_links_over_tls_pin_each_peers_registered_key(cluster):
    """peers.tls: every node serves wss:// with a certificate it signs itself
    for its identity key, and dials its peers pinning the key the registry
    lists for them (no CA to run). The mesh forms and carries broadcasts and
    direct messages as over ws://; a node without TLS cannot link to them."""
    await cluster.start_registry()
    tls = {"peers": {"tls": True}}
    nodes = [await cluster.start_node(f"n{i}", config=tls) for i in (1, 2, 3)]
    assert all(n.mesh_address.startswith("wss://[") for n in nodes), [n.mesh_address for n in nodes]
    await cluster.full_mesh()
    for node in nodes:
        for peer in (await cluster.node_peers(node)).values():
            assert peer["address"] == cluster.nodes[peer["id"]].mesh_address
    n1, n2, n3 = nodes
    resp = await cluster.http.post(n1.api_url + "/broadcast", json={"payload": "over tls"})
    assert resp.status_code == 202, resp.text
    for node in (n2, n3):
        await eventually(lambda node=node: cluster.received(node, resp.json()["id"]),
                         f"{node.node_id} receives the broadcast over TLS")
    resp = await cluster.http.post(n3.api_url + "/send/n1", json={"payload": "direct"})
    assert resp.status_code in (200, 202), resp.text
    await eventually(lambda: cluster.received(n1, resp.json()["id"]), "n1 gets the direct message")
    # A connection must carry the dialler's signed identity in its hello (TLS
    # alone does not say who dials): without one, or signed for a name the
    # registry lists elsewhere, it is closed before it carries anything.
    import ssl as ssl_module

    from trustnet.identity import NodeIdentity
    from trustnet.node.handshake import hello_identity

    anyone = ssl_module.SSLContext(ssl_module.PROTOCOL_TLS_CLIENT)
    anyone.check_hostname, anyone.verify_mode = False, ssl_module.CERT_NONE
    mark = len(n1.lines)
    me = f"wss://[{n1.address}]:9"  # the connection comes from n1's address on this host
    for identity in (None, hello_identity(NodeIdentity.generate(), "n2", me, n1.mesh_address,
                                          n1.public_key, time.time())):
        async with trio_websocket.open_websocket_url(n1.mesh_address, ssl_context=anyone) as ws:
            await ws.send_message(hello_frame(me, identity=identity))
            with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                with trio.fail_after(WAIT):
                    await ws.get_message()
        assert closed.value.reason.code == 1002
    refusals = [d["error"] for d in n1.lines[mark:] if d.get("message") == "protocol error, closing link"]
    assert any("signed identity" in e for e in refusals), refusals
    assert any("the registry lists 'n2' at" in e for e in refusals), refusals
    assert set(await cluster.node_peers(n1)) == {"n2", "n3"}
    # A plain node is listed with the others but cannot link to them (nor they to it).
    plain = await cluster.start_node("n4", config={"peers": {"max_connections": 3}})
    await trio.sleep(3.0)
    assert await cluster.node_peers(plain) == {}
    assert "n4" not in await cluster.node_peers(n1)


async def test_cli_peers_broadcast_send_and_messages(cluster):
    n1, n2, n3 = await cluster.start()
    await cluster.full_mesh()

    done = await run_trustnet("peers", "--api", n1.api_url)
    assert done.returncode == 0, done
    peers = orjson.loads(done.stdout)
    assert peers["node_id"] == "n1" and {p["id"] for p in peers["peers"]} == {"n2", "n3"}

    done = await run_trustnet("broadcast", '{"from": "cli"}', env={"TRUSTNET_NODE_API": n2.api_url})
    assert done.returncode == 0, done
    msg_id = orjson.loads(done.stdout)["id"]

    async def in_n3() -> list[dict]:
        done = await run_trustnet("messages", "--api", n3.api_url)
        assert done.returncode == 0, done
        return [m for m in orjson.loads(done.stdout)["messages"] if m["id"] == msg_id]

    got = await eventually(in_n3, "trustnet messages on n3 shows the CLI broadcast")
    assert got[0]["payload"] == {"from": "cli"} and got[0]["from"] == "n2"

    done = await run_trustnet("send", "--api", n1.api_url, "n3", "just for n3")
    assert done.returncode == 0, done
    sent = orjson.loads(done.stdout)
    assert sent["route"] == "link"
    got = await eventually(lambda: cluster.received(n3, sent["id"]), "n3 gets the direct message")
    assert got[0]["kind"] == "direct" and got[0]["payload"] == "just for n3"
    assert await cluster.received(n2, sent["id"]) == []

    done = await run_trustnet("messages", "--api", n3.api_url, "--since", "1")
    assert done.returncode == 0, done
    assert all(m["seq"] > 1 for m in orjson.loads(done.stdout)["messages"])

    done = await run_trustnet("send", "--api", n1.api_url, "nobody", "x")
    assert done.returncode == 1 and "not_found" in done.stderr, done
    done = await run_trustnet("peers", "--api", "http://[::1]:1")
    assert done.returncode == 1 and "cannot reach the node API" in done.stderr, done


async def test_a_killed_node_is_dropped_by_its_peers_and_evicted(cluster):
    n1, n2, n3 = await cluster.start()
    await cluster.full_mesh()
    marks = {n.node_id: len(n.lines) for n in (n1, n2)}
    reg_mark = len(cluster.registry.lines)

    n3.kill()  # SIGKILL
    assert await n3.wait() == -signal.SIGKILL

    for node in (n1, n2):
        await eventually(lambda node=node: _without(cluster, node, "n3"),
                         f"{node.node_id} drops its link to n3")
        await node.wait_for_log(lambda d: d.get("message") == "link closed"
                                and d.get("peer") == "n3", start=marks[node.node_id])
    expired = await cluster.registry.wait_for_log(
        lambda d: d.get("message") == "node expired" and d.get("node_id") == "n3",
        start=reg_mark, timeout=WAIT)
    assert expired["level"] == "error"
    status, body = await cluster.get(f"{cluster.url}/nodes/n3")
    assert status == 404 and body["error"]["code"] == "not_found"
    await eventually(lambda: _pairs_are(cluster, {frozenset(("n1", "n2"))}),
                     "the registry's peers table holds only n1-n2")
    # The survivors stay registered and linked.
    for node in (n1, n2):
        status, body = await cluster.get(f"{cluster.url}/nodes/{node.node_id}")
        assert status == 200
    assert set(await cluster.node_peers(n1)) == {"n2"}
    assert not cluster.registry.logs("node expired", node_id="n1")
    assert not cluster.registry.logs("node expired", node_id="n2")


async def test_a_node_whose_lease_ran_out_registers_again(cluster):
    n1, n2, n3 = await cluster.start()
    await cluster.full_mesh()
    mark, reg_mark = len(n3.lines), len(cluster.registry.lines)
    n3.process.send_signal(signal.SIGSTOP)  # frozen: no heartbeats, no pongs
    try:
        await cluster.registry.wait_for_log(
            lambda d: d.get("message") == "node expired" and d.get("node_id") == "n3",
            start=reg_mark, timeout=WAIT)
        status, _ = await cluster.get(f"{cluster.url}/nodes/n3")
        assert status == 404
    finally:
        n3.process.send_signal(signal.SIGCONT)
    # Told "not_found" at its next heartbeat, it registers again (same key).
    await n3.wait_for_log(lambda d: d.get("message", "").startswith(
        "registry does not know this node"), start=mark, timeout=WAIT)
    await n3.wait_for_log(lambda d: d.get("message") == "node registered", start=mark,
                          timeout=WAIT)
    status, body = await cluster.get(f"{cluster.url}/nodes/n3")
    assert status == 200 and body["public_key"] == n3.public_key
    await cluster.full_mesh()
    assert n3.returncode is None and not [d for d in n3.lines if d.get("level") == "fatal"]


async def _without(cluster: Cluster, node: NodeProcess, peer: str) -> bool:
    return peer not in await cluster.node_peers(node)


async def _pairs_are(cluster: Cluster, want: set[frozenset[str]]) -> bool:
    return await cluster.registry_pairs() == want


async def test_a_stolen_name_is_refused(cluster):
    await cluster.start_registry()
    owner = await cluster.start_node("n1")
    # Same name, its own data dir: another key.
    thief = cluster.node("thief", node_id="n1", data_dir=cluster.tmp_path / "thief-data")
    await thief.launch(cluster.nursery)
    assert await thief.wait() == 1, thief.describe()
    fatal = [d for d in thief.lines if d.get("level") == "fatal"]
    assert fatal, thief.describe()
    assert "name_taken" in fatal[0]["message"] and fatal[0].get("error_code") == "name_taken"
    assert not thief.logs("node API listening")
    started = thief.logs("node starting")
    assert started and started[0]["public_key"] != owner.public_key
    # The owner keeps its name and its lease.
    status, body = await cluster.get(f"{cluster.url}/nodes/n1")
    assert status == 200 and body["public_key"] == owner.public_key
    assert body["ipv6"] == owner.address
    status, body = await cluster.get(owner.api_url + "/health")
    assert status == 200 and body["status"] == "ok"
    assert owner.returncode is None


async def test_a_garbage_frame_closes_only_that_connection(cluster):
    n1, n2, n3 = await cluster.start()
    await cluster.full_mesh()
    before = await cluster.node_peers(n1)
    mark = len(n1.lines)

    # After a proper hello, a frame that is not JSON. Dialling n1's address on
    # this host, the connection comes from that same address, so that is the
    # host the hello must name to be accepted (see ws._check_origin).
    async with trio_websocket.open_websocket_url(n1.mesh_address) as ws:
        await ws.send_message(hello_frame(f"ws://[{n1.address}]:9"))
        await ws.send_message("this is {not json")
        with pytest.raises(trio_websocket.ConnectionClosed) as closed:
            with trio.fail_after(WAIT):
                await ws.get_message()
    assert closed.value.reason.code == 1002
    assert "hello" not in closed.value.reason.reason, closed.value.reason
    # Garbage instead of the hello.
    async with trio_websocket.open_websocket_url(n1.mesh_address) as ws:
        await ws.send_message(b"\x00\xff binary junk")
        with pytest.raises(trio_websocket.ConnectionClosed) as closed:
            with trio.fail_after(WAIT):
                await ws.get_message()
    assert closed.value.reason.code == 1002

    errors = await eventually(lambda: _protocol_errors(n1, mark), "two logged ProtocolErrors")
    assert all("ProtocolError" in e["error"] for e in errors)

    # The node kept its links (the same ones: they are older now, not reopened).
    after = await cluster.node_peers(n1)
    assert set(after) == set(before) == {"n2", "n3"}
    for peer in after:
        assert after[peer]["age_seconds"] >= before[peer]["age_seconds"]
    assert not [d for d in n1.lines[mark:] if d.get("message") in ("link closed", "link opened")]
    # ...and they still carry traffic.
    resp = await cluster.http.post(n1.api_url + "/broadcast", json={"payload": "still here"})
    msg_id = resp.json()["id"]
    for node in (n2, n3):
        await eventually(lambda node=node: cluster.received(node, msg_id),
                         f"{node.node_id} receives a broadcast after the garbage")
    status, body = await cluster.get(n1.api_url + "/health")
    assert status == 200 and body["status"] == "ok"
    assert n1.returncode is None


async def test_the_node_api_answers_bad_requests_and_keeps_the_connection(cluster):
    """A request answered before its body arrived (a bad node id in the
    path) leaves its keep-alive connection usable: the late body is read and
    the next request answered (it hung before). Query numbers are plain
    ASCII digits."""
    (n1,) = await cluster.start(1)
    port = int(n1.api_url.rsplit(":", 1)[1])
    body = orjson.dumps({"payload": "x" * 100})
    (status, _, payload), after = await late_body_then_next(port, "POST", "/send/..", body,
                                                            "/version")
    assert status == 400 and orjson.loads(payload)["error"]["code"] == "invalid_value"
    if after is not None:  # else the node closed the connection
        assert after[0] == 200, after
    for query in ("since=1_0", "since=%D9%A1", "limit=%201", "since=-1", "limit=0", "x=1",
                  "since=" + "9" * 5000):
        status, answer = await cluster.get(n1.api_url + "/messages?" + query)
        assert status == 400 and answer["error"]["code"] == "invalid_query", (query, answer)
    assert (await cluster.get(n1.api_url + "/messages?since=0&limit=5"))[0] == 200


async def test_local_api_messages_from_the_network_close_the_link(cluster):
    """What a process's own HTTP API asks its actors (the registry's
    API-key writes, the node's local inbox and broadcast) is refused when it
    comes over an actor link instead: the link closes with a ProtocolError,
    and nothing is done. Before, anyone reaching the actor port could release
    a bound name without the API key, or read a node's inbox."""
    (n1,) = await cluster.start(1)
    await eventually(lambda: _has_key(cluster, "n1"), "n1 registered with its key")
    reg_ws = cluster.registry.ws_address

    async def refused(url: str, hello: str, to: str, body: dict) -> None:
        envelope = {"from": hello + "/", "to": to, "kind": "ask", "cid": 1, "body": body}
        async with trio_websocket.open_websocket_url(url) as ws:
            await ws.send_message(hello_frame(hello))
            await ws.send_message(orjson.dumps(envelope).decode())
            with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                with trio.fail_after(WAIT):
                    await ws.get_message()
        assert closed.value.reason.code == 1002, closed.value.reason
        assert "local to its process" in closed.value.reason.reason, closed.value.reason

    await refused(reg_ws, "ws://[::1]:9", "registry",
                  {"$t": "registry.req.release_name", "node_id": "n1", "request_id": ""})
    await refused(reg_ws, "ws://[::1]:9", "registry",
                  {"$t": "registry.req.deregister", "node_id": "n1", "request_id": ""})
    await refused(n1.mesh_address, f"ws://[{n1.address}]:9", "mesh",
                  {"$t": "node.local.inbox", "since": 0, "limit": 10})
    assert await _has_key(cluster, "n1")  # still registered, still bound to its key
    status, body = await cluster.get(n1.api_url + "/health")
    assert status == 200 and body["status"] == "ok"


async def _has_key(cluster: Cluster, node_id: str) -> bool:
    status, body = await cluster.get(cluster.url + f"/nodes/{node_id}")
    return status == 200 and bool(body.get("public_key"))


async def _protocol_errors(node: NodeProcess, start: int) -> list[dict] | None:
    found = [d for d in node.lines[start:] if d.get("message") == "protocol error, closing link"]
    return found if len(found) >= 2 else None


async def test_loopback_addresses_are_removed_when_the_block_raises():
    seen: list[str] = []
    with pytest.raises(RuntimeError):
        async with loopback_addresses(2) as addresses:
            seen.extend(addresses)
            assert set(addresses) <= addresses_on_lo()
            raise RuntimeError("boom")
    assert len(seen) == 2 and not set(seen) & addresses_on_lo()
