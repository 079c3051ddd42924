"""TrustNet on several IPv6 hosts: network namespaces on a bridge (issue 3, section 4).

First the harness checks itself (hosts reach each other over their ULAs, a
partition cuts a host off and healing restores it, nothing is left behind).
Then the product: one registry and five nodes, each in its own namespace
with its own address in fd10:1234::/32, as real processes.

Timeouts are failure bounds only; no test asserts how long anything took.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
import trio_websocket
import yaml

import netns
from netns import BOUND, DUMP_KEY, TRUSTNET, Host, Network, NsProcess, clean_env, eventually
from trustnet.addressing import ula_for
from trustnet.config import REGISTRY_ENV_VARS


# =========================================================================== harness

LISTENER = r"""
import json, socket, sys
name = sys.argv[1]
s = socket.socket(socket.AF_INET6)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("::", 7000))
s.listen(16)
print(json.dumps({"message": "listening", "name": name}), flush=True)
while True:
    c, peer = s.accept()
    c.sendall(json.dumps({"name": name, "peer": peer[0]}).encode())
    c.close()
"""


async def ask_listener(net: Network, src: Host, dst: Host, timeout: float = 2.0) -> dict | None:
    """What dst's listener answers a connection from src; None when unreachable."""
    try:
        stream = await net.connect_tcp(src, dst.address, 7000, timeout=timeout)
    except (OSError, trio.TooSlowError):
        return None
    async with stream:
        data = b""
        with trio.move_on_after(timeout):
            while chunk := await stream.receive_some(4096):
                data += chunk
    return json.loads(data) if data else None


async def start_listeners(net: Network, hosts: list[Host]) -> list[NsProcess]:
    procs = [await net.start(h, [sys.executable, "-c", LISTENER, h.name]) for h in hosts]
    for p in procs:
        await p.wait_for_log(lambda d: d.get("message") == "listening", timeout=BOUND)
    return procs


async def test_harness_hosts_reach_each_other_partition_and_heal(netns_available):
    async with netns.open_network() as net:
        tag = net.tag
        hosts = [await net.add_host(f"h{i}") for i in range(3)]
        assert [h.address for h in hosts] == [str(ula_for(f"h{i}")) for i in range(3)]
        assert {f"tn-{tag}-sw", *(h.ns for h in hosts)} <= set(netns.list_namespaces())
        procs = await start_listeners(net, hosts)

        # every host reaches every other one over the bridge, from its own address
        for src in hosts:
            for dst in hosts:
                if src is not dst:
                    answer = await ask_listener(net, src, dst)
                    assert answer == {"name": dst.name, "peer": src.address}, (src, dst, answer)

        # the local API path: [::1] inside a host is that host's own
        answer = await ask_listener(net, hosts[0], Host("lo", hosts[0].ns, "::1", -1))
        assert answer == {"name": "h0", "peer": "::1"}

        # h2 cut off: nobody reaches it, it reaches nobody; h0 <-> h1 unaffected
        await net.partition(hosts[2])
        assert await ask_listener(net, hosts[0], hosts[2], timeout=1.0) is None
        assert await ask_listener(net, hosts[2], hosts[1], timeout=1.0) is None
        assert (await ask_listener(net, hosts[0], hosts[1]))["name"] == "h1"
        # ...but its own loopback still works (its local API stays reachable)
        assert (await ask_listener(net, hosts[2], Host("lo", hosts[2].ns, "::1", -1)))["name"] == "h2"

        await net.heal(hosts[2])
        for src, dst in ((hosts[0], hosts[2]), (hosts[2], hosts[1])):
            answer = await eventually(lambda: _reach(net, src, dst), what=f"{src.name}->{dst.name}")
            assert answer["name"] == dst.name

        # a partition between two hosts only
        await net.partition(hosts[0], peers=[hosts[1]])
        assert await ask_listener(net, hosts[0], hosts[1], timeout=1.0) is None
        assert await ask_listener(net, hosts[1], hosts[0], timeout=1.0) is None
        assert (await ask_listener(net, hosts[0], hosts[2]))["name"] == "h2"
        await net.heal(hosts[0])
        await eventually(lambda: _reach(net, hosts[0], hosts[1]), what="h0->h1 healed")

        pids = [p.pid for p in procs]

    # the context is gone: no namespace of this network, no process it started
    assert not [ns for ns in netns.list_namespaces() if ns.startswith(f"tn-{tag}-")]
    assert all(p.returncode is not None for p in procs)
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or _zombie(pid), pid
    assert not (netns.MARKER_DIR / tag).exists()


async def _reach(net: Network, src: Host, dst: Host) -> dict:
    answer = await ask_listener(net, src, dst, timeout=1.0)
    assert answer is not None, f"{src.name} does not reach {dst.name}"
    return answer


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


class Boom(Exception):
    pass


async def test_harness_cleans_up_when_the_test_fails(netns_available):
    seen: dict[str, Any] = {}
    with pytest.raises(Boom):
        async with netns.open_network() as net:
            seen["tag"] = net.tag
            hosts = [await net.add_host(f"f{i}") for i in range(2)]
            seen["procs"] = await start_listeners(net, hosts)
            await net.partition(hosts[0])
            raise Boom("the test failed")
    assert not [ns for ns in netns.list_namespaces() if ns.startswith(f"tn-{seen['tag']}-")]
    assert all(p.returncode is not None for p in seen["procs"])


def test_harness_removes_what_a_dead_run_left(netns_available):
    """A run killed with SIGKILL leaves namespaces and a marker naming a dead pid;
    the next network's setup removes them (and only those)."""
    import secrets
    import subprocess
    tag = secrets.token_hex(3)
    ns = f"tn-{tag}-0"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        dead = subprocess.Popen(["true"])
        dead.wait()
        netns.MARKER_DIR.mkdir(parents=True, exist_ok=True)
        (netns.MARKER_DIR / tag).write_text(f"{dead.pid}\n")
        removed = netns.cleanup_stale()
        assert ns in removed
        assert ns not in netns.list_namespaces()
        assert not (netns.MARKER_DIR / tag).exists()
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        (netns.MARKER_DIR / tag).unlink(missing_ok=True)


# =========================================================================== product

REGISTRY_HAS_WS = "REGISTRY_WS_PORT" in REGISTRY_ENV_VARS
needs_registry_ws = pytest.mark.skipif(
    not REGISTRY_HAS_WS,
    reason="the registry has no websocket listener for nodes yet "
           "(REGISTRY_WS_PORT is not in trustnet.config.REGISTRY_ENV_VARS)")

REGISTRY_ADDR = "fd10:1234:ffff::1"
REGISTRY_HTTP, REGISTRY_WS = 8000, 8001
NODE_PORT, NODE_API = 9000, 9100
HEARTBEAT = 0.5      # registry and nodes; lease = 3 x 0.5 s
TTL_MULTIPLIER = 3
PEER_TIMEOUT = 1.5   # ping every 0.5 s, 3 missed pongs -> dropped
NODES = [f"node-{i}" for i in range(1, 6)]

class Mesh:
    """One registry and TrustNet nodes, each on its own host of ``net``."""

    def __init__(self, net: Network, tmp_path: Path):
        self.net = net
        self.tmp = tmp_path
        self.registry: NsProcess | None = None
        self.registry_host: Host | None = None
        self.nodes: dict[str, NsProcess] = {}
        self.hosts: dict[str, Host] = {}
        self.tls = False  # links between nodes over TLS (PEERS_TLS)

    # ------------------------------------------------------------ processes

    async def start_registry(self) -> NsProcess:
        self.registry_host = await self.net.add_host("registry", REGISTRY_ADDR)
        config = self.tmp / "registry.yaml"
        config.write_text(yaml.safe_dump({
            "listen": {"host": "::", "port": REGISTRY_HTTP},
            "database": {"path": str(self.tmp / "registry.db")},
            "leases": {"heartbeat_interval": HEARTBEAT, "ttl_multiplier": TTL_MULTIPLIER},
            "logging": {"level": "info", "format": "json"},
        }))
        self.registry = await self.net.start(
            self.registry_host, [TRUSTNET, "registry", "--config", str(config)],
            env=clean_env({"REGISTRY_WS_PORT": str(REGISTRY_WS)}), cwd=self.tmp, name="registry",
            log_file=self.tmp / "registry.log")
        await self.registry.wait_for_log(lambda d: d.get("message") == "registry listening",
                                         timeout=BOUND)

        async def ws_listening() -> None:  # accepted on the registry host's ULA
            stream = await self.net.connect_tcp(self.registry_host, REGISTRY_ADDR, REGISTRY_WS,
                                                timeout=2)
            await stream.aclose()
        await eventually(ws_listening, what="the registry's websocket listener for nodes")
        return self.registry

    def node_config(self, label: str, *, max_connections: int, rotate_interval: float,
                    startup_timeout: float) -> Path:
        path = self.tmp / f"{label}.yaml"
        path.write_text(yaml.safe_dump({
            "node": {"listen_host": "::", "domain": "default"},
            "registry": {"heartbeat_interval": HEARTBEAT, "startup_timeout": startup_timeout,
                         "unreachable_timeout": 120, "request_timeout": 1},
            "peers": {"max_connections": max_connections, "peer_timeout": PEER_TIMEOUT,
                      "rotate_interval": rotate_interval},
            "http": {"host": "::1"},
            "logging": {"level": "info", "format": "json"},
        }))
        return path

    async def start_node(self, name: str, *, max_connections: int = 4,
                         rotate_interval: float = 600.0, startup_timeout: float = 20.0,
                         host: Host | None = None, advertise: str = "ula",
                         data_dir: Path | None = None, wait: bool = True,
                         label: str | None = None) -> NsProcess:
        """``trustnet node`` on its own host (address ula_for(name) unless ``host``)."""
        label = label or name
        if host is None:
            host = await self.net.add_host(label)
        self.hosts[label] = host
        env = clean_env({
            "NODE_NAME": name,
            "NODE_ADVERTISE": advertise,
            "NODE_DATA_DIR": str(data_dir or self.tmp / label),
            "NODE_LISTEN_PORT": str(NODE_PORT),
            "NODE_HTTP_PORT": str(NODE_API),
            "REGISTRY_WS": f"ws://[{REGISTRY_ADDR}]:{REGISTRY_WS}",
            "REGISTRY_URL": f"http://[{REGISTRY_ADDR}]:{REGISTRY_HTTP}",
            "PEERS_TLS": "true" if self.tls else "false",
        })
        config = self.node_config(label, max_connections=max_connections,
                                  rotate_interval=rotate_interval,
                                  startup_timeout=startup_timeout)
        proc = await self.net.start(host, [TRUSTNET, "node", "--config", str(config)],
                                    env=env, cwd=self.tmp, name=label,
                                    log_file=self.tmp / f"{label}.log")
        self.nodes[label] = proc
        if wait:
            await proc.wait_for_log(lambda d: d.get("message") == "node API listening",
                                    timeout=BOUND)
        return proc

    async def start(self, names: list[str] = NODES, **node_options: Any) -> None:
        await self.start_registry()
        with netns.collapsed():
            async with trio.open_nursery() as nursery:
                for name in names:
                    nursery.start_soon(lambda n=name: self.start_node(n, **node_options))

    # ------------------------------------------------------------ APIs

    async def registry_get(self, path: str) -> Any:
        assert self.registry_host is not None
        resp = await self.net.http(self.registry_host, "GET", REGISTRY_HTTP, path)
        assert resp.status == 200, resp
        return resp.json()

    async def registered(self) -> dict[str, dict]:
        return {n["id"]: n for n in (await self.registry_get("/nodes?limit=1000"))["nodes"]}

    async def api(self, node: str, method: str, path: str, json: Any = None) -> Any:
        resp = await self.net.http(self.hosts[node], method, NODE_API, path, json=json)
        assert resp.status in (200, 202), (node, path, resp)
        return resp.json()

    async def peers(self, node: str) -> dict[str, dict]:
        return {p["id"]: p for p in (await self.api(node, "GET", "/peers"))["peers"]}

    async def all_peers(self, nodes: list[str]) -> dict[str, dict[str, dict]]:
        return {n: await self.peers(n) for n in nodes}

    async def messages(self, node: str) -> list[dict]:
        return (await self.api(node, "GET", "/messages?limit=1000"))["messages"]

    async def broadcast_reaches(self, origin: str, others: list[str], payload: Any) -> str:
        """Broadcast from ``origin``; wait until each of ``others`` got it, exactly once."""
        sent = await self.api(origin, "POST", "/broadcast", {"payload": payload})
        msg_id = sent["id"]

        async def everyone_has_it() -> None:
            missing = []
            for node in others:
                got = [m for m in await self.messages(node) if m["id"] == msg_id]
                if not got:
                    missing.append(node)
                    continue
                assert len(got) == 1, f"{node} delivered {msg_id} {len(got)} times"
                assert got[0]["from"] == origin and got[0]["payload"] == payload, got
            assert not missing, f"{missing} have not received broadcast {msg_id} (sent {sent})"
        await eventually(everyone_has_it, what=f"broadcast from {origin}")
        return msg_id

    def dump(self) -> str:
        procs = ([self.registry] if self.registry else []) + list(self.nodes.values())
        return "\n".join(p.describe(tail=40) for p in procs)


@pytest.fixture
async def mesh(network, tmp_path, request):
    """A :class:`Mesh` on a fresh network; a failing test's report gets the
    tail of every process's log (the whole logs are in tmp_path/*.log)."""
    m = Mesh(network, tmp_path)
    request.node.stash[DUMP_KEY] = m.dump
    yield m


def node_address(name: str, tls: bool = False) -> str:
    return f"{'wss' if tls else 'ws'}://[{ula_for(name)}]:{NODE_PORT}"


async def wait_links(mesh: Mesh, nodes: list[str], *, at_least: int, at_most: int,
                     timeout: float = BOUND) -> dict[str, dict[str, dict]]:
    """Wait until every node has at_least..at_most links, each to a node of
    ``nodes``, over the peer's own ULA, and seen from both ends."""
    async def check() -> dict[str, dict[str, dict]]:
        links = await mesh.all_peers(nodes)
        for node, peers in links.items():
            assert at_least <= len(peers) <= at_most, \
                f"{node} has {len(peers)} links {sorted(peers)}, want {at_least}..{at_most}"
            for peer, info in peers.items():
                assert peer in nodes, f"{node} is linked to {peer}"
                assert info["address"] == node_address(peer, mesh.tls), (node, info)
                assert node in links[peer], f"{node} lists {peer} but {peer} does not list {node}"
        return links
    return await eventually(check, what="links", timeout=timeout)


@needs_registry_ws
@pytest.mark.parametrize("tls", [False, True], ids=["ws", "wss"])
async def test_mesh_forms_registers_and_broadcasts(mesh, tls):
    """Five nodes on five hosts register with their ULAs and keys, each reaches
    its target link count (max_connections 4 in a mesh of five: every other
    node), the registry's peers table follows the links, and a broadcast
    reaches every node exactly once. With TLS between the nodes (each pins
    its peers' registered keys) the same, over wss://."""
    mesh.tls = tls
    await mesh.start()

    async def all_registered() -> dict[str, dict]:
        nodes = await mesh.registered()
        assert sorted(nodes) == NODES, sorted(nodes)
        return nodes
    registered = await eventually(all_registered, what="registration")
    for name in NODES:
        started = mesh.nodes[name].logs("node starting")[0]
        assert registered[name]["ipv6"] == str(ula_for(name)) == mesh.hosts[name].address
        assert registered[name]["port"] == NODE_PORT
        assert registered[name]["public_key"] == started["public_key"]

    await wait_links(mesh, NODES, at_least=4, at_most=4)

    async def peers_table_matches() -> None:
        links = await mesh.all_peers(NODES)
        mine = {frozenset((a, b)) for a, peers in links.items() for b in peers}
        rows = (await mesh.registry_get("/peers"))["peers"]
        theirs = {frozenset((r["node_a"], r["node_b"])) for r in rows}
        assert theirs == mine, (f"registry peers {sorted(map(sorted, theirs))} "
                                f"!= links {sorted(map(sorted, mine))}")
    await eventually(peers_table_matches, what="the registry's peers table")

    for origin in (NODES[0], NODES[3]):
        await mesh.broadcast_reaches(origin, [n for n in NODES if n != origin],
                                     {"hello": "from " + origin, "n": [1, 2, 3]})
    # the origin does not deliver its own broadcast
    assert not [m for m in await mesh.messages(NODES[0]) if m["from"] == NODES[0]]


@needs_registry_ws
async def test_late_joiner_gets_links_in_a_saturated_mesh(mesh):
    """max_connections 3: four nodes fill up among themselves (each linked to the
    other three) and refuse a fifth as "full"; rotation (every 3 s here, a full
    node drops one random link) makes room, and the fifth reaches at least 2
    links while no node goes over 3."""
    await mesh.start(NODES[:4], max_connections=3, rotate_interval=3.0)
    await wait_links(mesh, NODES[:4], at_least=3, at_most=3)
    await mesh.start_node(NODES[4], max_connections=3, rotate_interval=3.0)

    async def joined() -> None:
        peers = await mesh.peers(NODES[4])
        assert len(peers) >= 2, f"{NODES[4]} has links {sorted(peers)}"
    await eventually(joined, what=f"{NODES[4]} linking into a full mesh")
    await wait_links(mesh, NODES, at_least=1, at_most=3)


@needs_registry_ws
async def test_killed_node_dropped_by_peers_and_evicted(mesh):
    await mesh.start()
    await wait_links(mesh, NODES, at_least=4, at_most=4)
    victim = NODES[2]
    rest = [n for n in NODES if n != victim]
    reg_mark = len(mesh.registry.lines)
    marks = {n: len(mesh.nodes[n].lines) for n in rest}

    mesh.nodes[victim].send_signal(signal.SIGKILL)
    killed_at = trio.current_time()
    assert await mesh.nodes[victim].wait() == -signal.SIGKILL

    async def peers_dropped_it() -> None:
        for node in rest:
            assert victim not in await mesh.peers(node), f"{node} still lists {victim}"
    await eventually(peers_dropped_it, what=f"peers dropping {victim}")
    dropped_after = trio.current_time() - killed_at
    for node in rest:
        closed = mesh.nodes[node].logs("link closed", start=marks[node], peer=victim)
        assert closed, f"{node} logged no 'link closed' for {victim}"

    async def evicted() -> None:
        assert victim not in await mesh.registered()
        assert mesh.registry.logs("node expired", start=reg_mark, node_id=victim)
    await eventually(evicted, what=f"registry evicting {victim}")
    evicted_after = trio.current_time() - killed_at
    assert not [r for r in (await mesh.registry_get("/peers"))["peers"]
                if victim in (r["node_a"], r["node_b"])]

    # the others keep a mesh among themselves and still carry broadcasts
    await wait_links(mesh, rest, at_least=3, at_most=3)
    await mesh.broadcast_reaches(rest[0], rest[1:], "after the kill")
    print(f"dropped by peers after {dropped_after:.2f}s (peer_timeout {PEER_TIMEOUT}s), "
          f"evicted after {evicted_after:.2f}s (lease {HEARTBEAT * TTL_MULTIPLIER}s)")


@needs_registry_ws
async def test_partitioned_node_evicted_and_returns_by_itself(mesh):
    await mesh.start()
    await wait_links(mesh, NODES, at_least=4, at_most=4)
    victim = NODES[1]
    rest = [n for n in NODES if n != victim]
    proc = mesh.nodes[victim]
    reg_mark = len(mesh.registry.lines)

    await mesh.net.partition(mesh.hosts[victim])
    cut_at = trio.current_time()

    async def cut_off() -> None:
        assert victim not in await mesh.registered(), "still registered"
        assert mesh.registry.logs("node expired", start=reg_mark, node_id=victim)
        for node in rest:
            assert victim not in await mesh.peers(node), f"{node} still lists {victim}"
        # its own API still answers (loopback) and it has lost every link
        assert not await mesh.peers(victim), "the cut-off node still lists links"
    await eventually(cut_off, what=f"{victim} evicted and unlinked")
    assert proc.returncode is None, proc.describe()
    evicted_after = trio.current_time() - cut_at
    mark = len(proc.lines)

    await mesh.net.heal(mesh.hosts[victim])
    healed_at = trio.current_time()

    async def back() -> None:
        assert victim in await mesh.registered(), "not registered again"
    await eventually(back, what=f"{victim} registering again", timeout=60)
    assert proc.logs("node registered", start=mark), "no 'node registered' after the heal"
    await wait_links(mesh, NODES, at_least=4, at_most=4, timeout=60)
    back_after = trio.current_time() - healed_at
    await mesh.broadcast_reaches(victim, rest, "back again")
    await mesh.broadcast_reaches(rest[0], [n for n in NODES if n != rest[0]], "welcome back")
    assert proc.returncode is None
    print(f"evicted {evicted_after:.2f}s after the cut, fully linked {back_after:.2f}s "
          f"after the heal")


@needs_registry_ws
async def test_stolen_name_is_refused(mesh):
    """A second node under a registered name, on its own host with its own key,
    is refused: it exits 1 saying name_taken; the owner keeps name, key, address."""
    await mesh.start(NODES[:2])
    owner = NODES[0]
    before = (await mesh.registered())[owner]
    reg_mark = len(mesh.registry.lines)
    thief_host = await mesh.net.add_host("thief")  # its own host, address and key
    # startup_timeout 5 s: a refusal taken for unreachability ends the run soon
    thief = await mesh.start_node(owner, host=thief_host, advertise=thief_host.address,
                                  data_dir=mesh.tmp / "thief", wait=False, label="thief",
                                  startup_timeout=5)
    code = await thief.wait(timeout=BOUND)
    assert not thief.logs("node API listening")
    assert code == 1, thief.describe()
    fatal = [d for d in thief.lines if d.get("level") == "fatal"]
    assert fatal, thief.describe()
    assert fatal[0].get("error_code") == "name_taken", (
        "the node did not take the registry's refusal as name_taken: "
        f"{fatal[0].get('message')!r} (error {fatal[0].get('error')!r})")
    # the owner keeps its name, key and address
    after = (await mesh.registered())[owner]
    assert (after["public_key"], after["ipv6"]) == (before["public_key"], before["ipv6"])
    assert mesh.nodes[owner].returncode is None
    assert not mesh.registry.logs("node updated", start=reg_mark, node_id=owner)
    await mesh.broadcast_reaches(NODES[1], [owner], "still the owner")


@needs_registry_ws
async def test_garbage_frames_close_only_that_connection(mesh):
    await mesh.start()
    links = await wait_links(mesh, NODES, at_least=4, at_most=4)
    target = NODES[0]
    proc = mesh.nodes[target]
    mark = len(proc.lines)
    intruder = await mesh.net.add_host("intruder")
    hello = json.dumps({"hello": f"ws://[{intruder.address}]:{NODE_PORT}", "version": 1})

    async def send_and_get_closed(frames: list[str | bytes]) -> int | None:
        stream = await mesh.net.connect_tcp(intruder, mesh.hosts[target].address, NODE_PORT)
        async with trio.open_nursery() as nursery:
            ws = await trio_websocket.wrap_client_stream(
                nursery, stream, f"[{mesh.hosts[target].address}]:{NODE_PORT}", "/")
            for frame in frames:
                await ws.send_message(frame)
            code = None
            with trio.fail_after(BOUND):
                try:
                    while True:
                        await ws.get_message()
                except trio_websocket.ConnectionClosed as closed:
                    code = closed.reason.code if closed.reason else None
            await ws.aclose()
        return code

    cases = {
        "garbage instead of a hello": [b"\x00\xffnot even text"],
        "non-JSON text instead of a hello": ["this is not JSON {"],
        "non-JSON after a hello": [hello, "{{{ garbage"],
        "a JSON frame that is no envelope": [hello, json.dumps({"to": 1, "what": "?"})],
        "an oversized frame": [hello, "x" * (1024 * 1024 + 1)],
    }
    for case, frames in cases.items():
        before = len(proc.lines)
        code = await send_and_get_closed(frames)
        assert code in (1002, 1009), f"{case}: closed with {code}"
        # the node logs it right after its close frame went out: wait for the line
        await proc.wait_for_log(lambda d: d.get("message") == "protocol error, closing link",
                                start=before)
    errors = proc.logs("protocol error, closing link", start=mark)
    assert len(errors) == len(cases), [e.get("error") for e in errors]

    # the node is fine and none of its links moved
    assert proc.returncode is None
    assert not proc.logs("link closed", start=mark), proc.logs("link closed", start=mark)
    now = await mesh.all_peers(NODES)
    assert set(now[target]) == set(links[target])
    for peer, info in now[target].items():
        assert info["age_seconds"] > links[target][peer]["age_seconds"], "link was reopened"
    for node in NODES[1:]:
        assert target in now[node]
    await mesh.broadcast_reaches(target, NODES[1:], "links still up")


@needs_registry_ws
async def test_a_hello_claiming_a_peers_address_takes_nothing_over(mesh):
    """A host that opens a websocket to node-1 and names node-2's address in its
    hello (no challenge-response) must neither receive node-1's traffic for
    node-2, nor have what it sends taken as node-2's, nor break the real link."""
    names = NODES[:3]
    await mesh.start(names)
    links = await wait_links(mesh, names, at_least=2, at_most=2)
    target, claimed = names[0], names[1]
    intruder = await mesh.net.add_host("intruder")
    stream = await mesh.net.connect_tcp(intruder, mesh.hosts[target].address, NODE_PORT)
    problems: list[str] = []
    async with trio.open_nursery() as nursery:
        ws = await trio_websocket.wrap_client_stream(
            nursery, stream, f"[{mesh.hosts[target].address}]:{NODE_PORT}", "/")
        await ws.send_message(json.dumps({"hello": node_address(claimed), "version": 1}))
        forged = {"from": node_address(claimed) + "/", "to": "mesh", "kind": "tell", "cid": None,
                  "body": {"$t": "node.mesh.flood", "msg_id": "f0f0f0f0f0f0f0f0",
                           "origin": names[2], "via": claimed, "hops_left": 3,
                           "payload": json.dumps("forged"), "target": None}}
        received: list[str] = []
        with trio.move_on_after(2 * PEER_TIMEOUT):  # several ping rounds
            with contextlib.suppress(trio_websocket.ConnectionClosed):
                await ws.send_message(json.dumps(forged))
                while True:
                    received.append(await ws.get_message())
        if received:
            problems.append(f"the intruder received {len(received)} frames meant for "
                            f"{claimed}, e.g. {received[0][:150]}")
        await ws.aclose()
    # a real broadcast from the claimed node, so the forged one had its chance first
    await mesh.broadcast_reaches(claimed, [target], "the real one")
    if [m for m in await mesh.messages(target) if m["id"] == forged["body"]["msg_id"]]:
        problems.append(f"{target} delivered a flood the intruder forged as relayed by {claimed}")
    now = await mesh.peers(target)
    if claimed not in now or now[claimed]["age_seconds"] <= links[target][claimed]["age_seconds"]:
        problems.append(f"the real link {target}-{claimed} was dropped or reopened: "
                        f"{mesh.nodes[target].logs('link closed')}")
    assert not problems, "\n".join(problems)
