"""RegistryActor: the one owner of the registry state.

Every change becomes a command (commands.py) applied by RegistryState. Writes
that queue up together are applied as one batch, one transaction, one fsync;
an ask is answered only after its batch committed. Heartbeats only touch the
in-memory LeaseTable; deadlines reach the disk in periodic checkpoints and
expirations are commands like any other.
"""

from __future__ import annotations

import logging
import random
import time
from datetime import UTC, datetime
from typing import Any, Callable

import trio

from actors import Actor, Letter, Refused

from . import messages as m
from . import node_protocol as np
from .commands import (
    AddPeer,
    CheckpointLeases,
    CreateDomain,
    DeleteNode,
    ExpireNodes,
    LeaseEntry,
    NotFound,
    RegisterNode,
    ReleaseIdentity,
    RemovePeer,
    ReputationEntry,
    SetReputation,
)
from .leases import LeaseTable
from .nodes import BadStatement, ReputationBook, StatementGate, candidates, register_request
from .state import RegistryState

log = logging.getLogger("trustnet.registry")

WRITES = (m.Register, m.Deregister, m.CreateDomainReq, m.AddPeerReq, m.RemovePeerReq,
          m.ReleaseName, np.SignedRegister, np.LinkReport)
LINK_STATES = ("open", "closed", "failed")
MAX_BATCH = 512
CHECKPOINT_CHUNK = 2000


class RegistryActor(Actor):
    def __init__(self, state: RegistryState, *, ttl: float, checkpoint_interval: float,
                 sweep_interval: float | None = None, heartbeat_interval: float | None = None,
                 clock: Callable[[], float] = time.time):
        self.state = state
        self.ttl = ttl
        self.heartbeat_interval = heartbeat_interval or ttl / 3
        self.gate = StatementGate()
        self.reputation = ReputationBook(self.heartbeat_interval)
        self.rng = random.Random()
        self.checkpoint_interval = checkpoint_interval
        self.sweep_interval = sweep_interval or min(1.0, ttl / 6)
        self.clock = clock
        self.leases = LeaseTable(ttl)

    # ------------------------------------------------------------ lifecycle

    async def on_start(self) -> None:
        now = self.clock()
        # Nodes could not heartbeat while the registry was down: every lease
        # gets at least one full TTL from now before it can expire.
        for node_id, (deadline, _) in self.state.lease_table().items():
            self.leases.grant(node_id, now, max(deadline or 0.0, now + self.ttl))
        self.leases.take_dirty()
        self.nursery.start_soon(self._sweep_loop)
        self.nursery.start_soon(self._checkpoint_loop)
        log.info("registry state loaded", extra={"nodes": len(self.leases),
                                                 "applied_index": self.state.applied_index})

    async def on_stop(self) -> None:
        await self._checkpoint()

    # ------------------------------------------------------------ letters

    async def handle(self, letter: Letter) -> None:
        if not isinstance(letter.msg, WRITES):
            await super().handle(letter)
            return
        batch, after = self._gather_writes(letter)
        try:
            self._commit(batch)
        except BaseException as exc:
            for queued in batch[1:]:  # the kernel fails the first one
                queued.fail(exc if isinstance(exc, Refused) else
                            RuntimeError(f"registry write failed: {exc}"))
            raise
        if after is not None:
            await super().handle(after)

    def _gather_writes(self, first: Letter) -> tuple[list[Letter], Letter | None]:
        """The run of writes queued behind `first`, and the read that ended it."""
        box = self.system.mailbox_of(self.ref.name)
        batch = [first]
        while len(batch) < MAX_BATCH:
            try:
                letter = box.get_nowait()
            except trio.WouldBlock:
                return batch, None
            if not isinstance(letter.msg, WRITES):
                return batch, letter
            batch.append(letter)
        return batch, None

    def _commit(self, batch: list[Letter]) -> None:
        now = self.clock()
        accepted: list[tuple[Letter, Any]] = []
        for letter in batch:
            try:
                accepted.append((letter, self._command(letter.msg, now)))
            except Refused as refusal:  # a bad statement fails its own ask only
                letter.fail(refusal)
        if not accepted:
            return
        commands = [cmd for _, cmd in accepted]
        existed = {c.node_id for c in commands
                   if isinstance(c, RegisterNode) and c.node_id in self.leases}
        start = self.state.applied_index + 1
        results = self.state.apply_batch(list(enumerate(commands, start)))
        for (letter, cmd), result in zip(accepted, results):
            if isinstance(letter.msg, np.LinkReport):
                letter.answer(self._after_link_report(letter.msg, cmd, result))
            elif isinstance(result, Refused):
                letter.fail(result)
            else:
                letter.answer(self._after_apply(cmd, result, now, existed))

    def _command(self, msg: Any, now: float) -> Any:
        """The command a write asks for; signed ones are verified first."""
        match msg:
            case m.Register(node_id, ipv6, port, domain, public_key):
                return RegisterNode(node_id=node_id, ipv6=ipv6, port=port, domain=domain,
                                    at=now, lease_deadline=now + self.ttl, public_key=public_key)
            case np.SignedRegister(text):
                stmt = self.gate.parse(text)
                request = register_request(stmt)
                # Signed by the key it presents; the state refuses a key other
                # than the one the name is bound to.
                self.gate.check(stmt, request.public_key, "register", now)
                return self._command(request, now)
            case np.LinkReport(text):
                stmt = self.gate.parse(text)
                body = self.gate.check(stmt, self._bound_key(stmt["node_id"]), "link", now)
                peer, state = body.get("peer"), body.get("state")
                if not isinstance(peer, str) or state not in LINK_STATES:
                    raise BadStatement(f"a link report needs peer and state in {LINK_STATES}")
                if state == "open":
                    return AddPeer(node_a=stmt["node_id"], node_b=peer, at=now)
                return RemovePeer(node_a=stmt["node_id"], node_b=peer)
            case m.ReleaseName(node_id):
                return ReleaseIdentity(node_id=node_id)
            case m.Deregister(node_id):
                return DeleteNode(node_id=node_id)
            case m.CreateDomainReq(name):
                return CreateDomain(name=name, at=now)
            case m.AddPeerReq(a, b):
                return AddPeer(node_a=a, node_b=b, at=now)
            case m.RemovePeerReq(a, b):
                return RemovePeer(node_a=a, node_b=b)
        raise TypeError(f"not a registry write: {type(msg).__name__}")

    def _after_apply(self, cmd: Any, result: dict, now: float, existed: set[str]) -> Any:
        if isinstance(cmd, RegisterNode):
            created = cmd.node_id not in existed
            existed.add(cmd.node_id)
            self.leases.grant(cmd.node_id, now, cmd.lease_deadline)
            log.info("node registered" if created else "node updated",
                     extra={"node_id": cmd.node_id, "ipv6_addr": result["ipv6"]})
            return {"created": created, "node": self._fresh(result),
                    "heartbeat_interval": self.heartbeat_interval, "ttl": self.ttl}
        if isinstance(cmd, DeleteNode):
            self.leases.drop(cmd.node_id)
            log.info("node deregistered", extra={"node_id": cmd.node_id})
        if isinstance(cmd, ReleaseIdentity):
            log.warning("node name released", extra={"node_id": cmd.node_id})
        return result

    def _after_link_report(self, msg: np.LinkReport, cmd: Any, result: Any) -> dict:
        stmt = self.gate.parse(msg.statement)
        state, peer = stmt["body"]["state"], stmt["body"]["peer"]
        self.reputation.link_report(peer, state)
        # Closing a link the registry never saw is fine; a refusal here is
        # only worth a note in the answer.
        return {"ok": True, "recorded": not isinstance(result, Refused)}

    def _bound_key(self, node_id: str) -> str:
        key = self.state.public_key_of(node_id)
        if key is None:
            raise BadStatement(f"node {node_id!r} has no key: register with a signed "
                               "statement first", {"node_id": node_id})
        return key

    async def receive(self, msg: Any) -> Any:
        match msg:
            case m.Heartbeat(node_id):
                if self.state.public_key_of(node_id) is not None:
                    raise Refused("signature_required",
                                  f"node {node_id!r} is bound to a key: its heartbeats must be "
                                  "signed statements", {"node_id": node_id})
                return self._heartbeat(node_id)
            case np.SignedHeartbeat(text):
                stmt = self.gate.parse(text)
                self.gate.check(stmt, self._bound_key(stmt["node_id"]), "heartbeat", self.clock())
                return self._heartbeat(stmt["node_id"])
            case np.Candidates(node_id, limit):
                return {"peers": self._candidates(node_id, limit)}
            case m.ReputationOf(node_id):
                node = self.state.get_node(node_id)
                return {**self.reputation.breakdown(node_id), "stored": node["reputation"]}
            case m.GetNode(node_id):
                return self._fresh(self.state.get_node(node_id))
            case m.ListNodes(domain, limit, after):
                page = self.state.list_nodes(domain, limit, after)
                page["nodes"] = [self._fresh(n) for n in page["nodes"]]
                return page
            case m.ListDomains():
                return self.state.list_domains()
            case m.ListPeers(node_id):
                return self.state.list_peers(node_id)
            case m.Status():
                return {"ready": True, "nodes": len(self.leases),
                        "applied_index": self.state.applied_index}
        return await super().receive(msg)

    # ------------------------------------------------------------ leases

    def _heartbeat(self, node_id: str) -> dict:
        now = self.clock()
        deadline = self.leases.deadline(node_id)
        if deadline is not None and deadline <= now:
            # The lease ran out before the sweep saw it: expire it now (as the
            # sweep would) rather than bring a lapsed lease back to life.
            self.expire_due()
        last = self.leases.last_renewal(node_id)
        deadline = self.leases.renew(node_id, now)
        if deadline is not None:
            self.reputation.heartbeat(node_id, now, last)
        if deadline is None:
            raise NotFound(f"node {node_id!r} is not registered (its lease may have "
                           "expired): register again", {"node_id": node_id})
        return {"node_id": node_id, "lease_deadline": deadline, "ttl": self.ttl}

    def _candidates(self, node_id: str, limit: int) -> list[dict]:
        me = self.state.get_node(node_id)
        pool = self.state.list_nodes(me["domain"], 1000)["nodes"]
        if len(pool) <= limit:  # too few in the domain: look beyond it
            pool += [n for n in self.state.list_nodes(None, 1000)["nodes"]
                     if n["domain"] != me["domain"]]
        return candidates(me, pool, self.leases, max(1, min(limit, 100)), self.rng)

    def _fresh(self, node: dict) -> dict:
        """A stored node row with its live lease (the disk copy lags by a checkpoint)."""
        deadline = self.leases.deadline(node["id"])
        if deadline is not None:
            node["lease_deadline"] = deadline
            node["last_heartbeat"] = _iso(self.leases.last_renewal(node["id"]))
        return node

    async def _sweep_loop(self) -> None:
        while True:
            await trio.sleep(self.sweep_interval)
            self.expire_due()

    def expire_due(self) -> list[str]:
        now = self.clock()
        due = self.leases.expired(now)
        if not due:
            return []
        [result] = self.state.apply_batch(
            [(self.state.applied_index + 1, ExpireNodes(node_ids=tuple(due), at=now))])
        for node_id in due:
            self.leases.drop(node_id)
        for node_id in result["expired"]:
            log.error("node expired", extra={"node_id": node_id, "ttl": self.ttl})
        return result["expired"]

    async def _checkpoint_loop(self) -> None:
        while True:
            await trio.sleep(self.checkpoint_interval)
            await self._checkpoint()

    async def _checkpoint(self) -> None:
        """Write renewed deadlines in chunks, yielding between them so a big
        checkpoint never stalls the event loop for long."""
        scores = self.reputation.take_dirty()
        if scores:
            entries = tuple(ReputationEntry(node_id=n, reputation=r) for n, r in scores)
            self.state.apply_batch([(self.state.applied_index + 1,
                                     SetReputation(entries=entries))])
        dirty = self.leases.take_dirty()
        for i in range(0, len(dirty), CHECKPOINT_CHUNK):
            entries = tuple(LeaseEntry(node_id=n, deadline=d, last_heartbeat=h)
                            for n, d, h in dirty[i:i + CHECKPOINT_CHUNK])
            self.state.apply_batch([(self.state.applied_index + 1,
                                     CheckpointLeases(entries=entries))])
            await trio.sleep(0)


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    # == strftime("%Y-%m-%dT%H:%M:%S.%fZ") at about half the cost (it runs for every
    # node of a GET /nodes page)
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="microseconds")[:-6] + "Z"
