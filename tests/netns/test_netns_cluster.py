"""The replicated registry on three IPv6 hosts (network namespaces), cut
apart by nftables: real processes, real sockets, real partitions (issue 4).

Timeouts are failure bounds only; no test asserts how long anything took.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import pytest
import yaml

from netns import DUMP_KEY, TRUSTNET, Host, Network, NsProcess, clean_env, eventually
from trustnet.tls import make_certificates, write_certificates

REPLICAS = {"r1": "fd10:1234:ffff::11", "r2": "fd10:1234:ffff::12", "r3": "fd10:1234:ffff::13"}
HTTP, WS = 8000, 8001


class Group:
    """Three `trustnet registry` replicas, one per host, sharing a secret."""

    def __init__(self, net: Network, tmp: Path, tls: bool = False):
        self.net = net
        self.tmp = tmp
        self.secret = secrets.token_hex(24)
        self.hosts: dict[str, Host] = {}
        self.procs: dict[str, NsProcess] = {}
        # tls: one certificate for the group, naming every replica's address
        # (and [::1], where the test's requests go), as `trustnet tls-cert` makes it.
        self.tls = write_certificates(make_certificates(["::1", *REPLICAS.values()]),
                                      str(tmp / "certs")) if tls else None

    async def start(self) -> None:
        scheme = "wss" if self.tls else "ws"
        peers = [{"id": rid, "address": f"{scheme}://[{addr}]:{WS}"}
                 for rid, addr in REPLICAS.items()]
        for rid, addr in REPLICAS.items():
            host = self.hosts[rid] = await self.net.add_host(rid, addr)
            config = self.tmp / f"{rid}.yaml"
            config.write_text(yaml.safe_dump({
                "listen": {"host": "::", "port": HTTP, "ws_port": WS},
                "database": {"path": str(self.tmp / rid / "registry.db")},
                "replication": {"enabled": True, "id": rid, "peers": peers},
                "logging": {"level": "info", "format": "json"},
                **({"tls": {"cert_file": self.tls["cert.pem"], "key_file": self.tls["key.pem"],
                            "ca_file": self.tls["ca.pem"]}} if self.tls else {}),
            }))
            (self.tmp / rid).mkdir()
            self.procs[rid] = await self.net.start(
                host, [TRUSTNET, "registry", "--config", str(config)],
                env=clean_env({"REGISTRY_CLUSTER_SECRET": self.secret}), cwd=self.tmp,
                name=rid, log_file=self.tmp / f"{rid}.log")
        for proc in self.procs.values():
            await proc.wait_for_log(lambda d: d.get("message") == "registry listening")

    async def request(self, rid: str, method: str, path: str, json: Any = None,
                      timeout: float = 15.0):
        """One HTTP request to replica `rid`, made on its own host."""
        return await self.net.http(self.hosts[rid], method, HTTP, path, json=json,
                                   timeout=timeout,
                                   tls_ca=self.tls["ca.pem"] if self.tls else None)

    async def status(self, rid: str) -> dict:
        resp = await self.request(rid, "GET", "/cluster")
        assert resp.status == 200, resp
        return resp.json()

    async def leader(self, among: list[str]) -> str:
        """The leader that every replica of `among` agrees on."""
        async def agreed() -> str:
            leaders = {(await self.status(rid))["leader"] for rid in among}
            assert len(leaders) == 1 and None not in leaders and leaders <= set(among), leaders
            return leaders.pop()
        return await eventually(agreed, what=f"one leader among {among}")

    async def register(self, rid: str, node: str, ipv6: str) -> None:
        resp = await self.request(rid, "POST", "/nodes", {"id": node, "ipv6": ipv6})
        assert resp.status == 201, resp

    async def stale_nodes(self, rid: str) -> set[str]:
        resp = await self.request(rid, "GET", "/nodes?limit=1000&consistency=stale")
        assert resp.status == 200, resp
        return {n["id"] for n in resp.json()["nodes"]}

    def dump(self) -> str:
        return "\n".join(p.describe(tail=40) for p in self.procs.values())


@pytest.fixture(params=["ws", "wss"])
async def group(network, tmp_path, request):
    """The group over plain websockets, and over TLS (https:// API, wss:// Raft)."""
    g = Group(network, tmp_path, tls=request.param == "wss")
    request.node.stash[DUMP_KEY] = g.dump
    yield g


async def test_a_cut_off_leader_gives_way_and_the_group_converges_after_the_heal(group):
    """The leader's host is cut off (nftables drops all but loopback). The
    other two elect a leader and go on committing; the cut-off replica
    acknowledges no write and serves no linearizable read. After the heal it
    follows the new leader, and all three hold every acknowledged write."""
    await group.start()
    everyone = list(REPLICAS)
    old = await group.leader(everyone)
    acked = set()
    for i in range(5):
        await group.register(everyone[i % 3], f"before-{i}", f"fd00::{i + 1:x}")
        acked.add(f"before-{i}")

    await group.net.partition(group.hosts[old])
    rest = [rid for rid in everyone if rid != old]
    new = await group.leader(rest)
    assert new != old
    for i in range(5):
        await group.register(rest[i % 2], f"during-{i}", f"fd00::1:{i + 1:x}")
        acked.add(f"during-{i}")

    # The cut-off replica: no write acknowledged, no linearizable read.
    resp = await group.request(old, "POST", "/nodes", {"id": "lost", "ipv6": "fd00::2:1"},
                               timeout=30)
    assert resp.status in (503, 504), resp
    assert "error" in resp.json(), resp
    resp = await group.request(old, "GET", "/nodes/during-0", timeout=30)
    assert resp.status in (503, 504), resp
    # (its own stale copy is what it had when it was cut off)
    assert await group.stale_nodes(old) == {f"before-{i}" for i in range(5)}

    await group.net.heal(group.hosts[old])

    async def converged() -> None:
        states = {rid: await group.status(rid) for rid in everyone}
        assert {s["leader"] for s in states.values()} == {new}, states
        assert len({s["applied"] for s in states.values()}) == 1, states
        for rid in everyone:
            assert await group.stale_nodes(rid) >= acked, rid
        assert len({frozenset(await group.stale_nodes(rid)) for rid in everyone}) == 1
    await eventually(converged, what="the group after the heal", timeout=60)
    resp = await group.request(old, "GET", "/nodes/during-4")  # linearizable again
    assert resp.status == 200, resp
    await group.register(old, "after", "fd00::3:1")  # forwarded to the leader
