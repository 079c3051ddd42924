"""RegistryActor: the one owner of the registry state.

Every change becomes a command (commands.py) applied by RegistryState. Writes
that queue up together are applied as one batch, one transaction, one fsync;
an ask is answered only after its batch committed. Heartbeats only touch the
in-memory LeaseTable; deadlines reach the disk in periodic checkpoints and
expirations are commands like any other. Nodes heartbeat through sessions
(sessions.py): one signed opening, then a MAC per heartbeat.

Replicated mode (`consensus` set, issue 4): writes become commands as above
and are proposed to the local ConsensusActor (which forwards them to the
leader) from tasks, so the mailbox keeps flowing; each is answered once
committed and applied. Leases live on the leader only: a follower forwards
heartbeats to the leader's RegistryActor (LeaderHeartbeat, or the session
message marked forwarded; sessions live with the leases); only the leader
sweeps and checkpoints, through the log, and its expiries carry its term. A
new leader adopts the stored leases with a bounded grace: max(stored
deadline, min(election + ttl, last heartbeat + 2 ttl)), at most election +
ttl, so frequent elections cannot keep a dead node alive forever; after an
outage of the group (the last leader's pulse, which every checkpoint
carries, is old) every lease gets election + ttl, as nodes could not
heartbeat meanwhile (_become_leader, _adopt).
"""

from __future__ import annotations

import logging
import os
import random
import time
from typing import Any, Callable

import attrs
import orjson
import trio

from actors import Actor, ActorError, Letter, Ref, Refused, UseMailbox
from trustnet.consensus.actor import ClusterStatus, CommitUnknown, NoLeader, Propose, ReadBarrier
from trustnet.identity import IdentityError

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
from .sessions import NoSession, SessionTable
from .state import RegistryState, iso_utc

log = logging.getLogger("trustnet.registry")

WRITES = (m.Register, m.Deregister, m.CreateDomainReq, m.AddPeerReq, m.RemovePeerReq,
          m.ReleaseName, np.SignedRegister, np.LinkReport)
LINK_STATES = ("open", "closed", "failed")
# What renews a lease; in replicated mode they go to the leader.
LEASE_MESSAGES = (m.Heartbeat, np.SignedHeartbeat, m.LeaderHeartbeat, np.OpenSession,
                  np.SessionHeartbeat)
MAX_BATCH = 512
# A sweep this many seconds late means the process stood still (see _after_stall).
STALL_GRACE_AFTER = 1.0
CHECKPOINT_CHUNK = 250


class RegistryActor(Actor):
    def __init__(self, state: RegistryState, *, ttl: float, checkpoint_interval: float,
                 sweep_interval: float | None = None, heartbeat_interval: float | None = None,
                 clock: Callable[[], float] = time.time, consensus: Ref | None = None,
                 propose_timeout: float = 8.0, watch_interval: float = 0.05,
                 monotonic: Callable[[], float] = trio.current_time):
        """`clock`: the system time leases are kept in; `monotonic`: a time
        no one sets, against which steps of `clock` are noticed (_now)."""
        self.state = state
        self.consensus = consensus  # None: apply writes directly (one replica)
        self.propose_timeout = propose_timeout
        self.watch_interval = watch_interval
        self.raft: dict = {}  # last ClusterStatus of the local consensus (replicated mode)
        self.leader_term = 0  # the term this replica leads in; 0 when it does not
        self.leader_since = 0.0
        self._outage = 0.0  # how long the group had no leader before this one (see _become_leader)
        self._adopting = 0  # the term whose read barrier is under way (_refresh_raft)
        # Ids of an expiry proposed but not answered in time (it may still
        # commit): if a later expiry finds them gone, that was theirs.
        self._expiry_unknown: set[str] = set()
        self.up_since = 0.0  # when this instance loaded the leases (a lone registry)
        self.ttl = ttl
        self.heartbeat_interval = heartbeat_interval or ttl / 3
        self.gate = StatementGate()
        self.reputation = ReputationBook(self.heartbeat_interval)
        self.rng = random.Random()
        self.checkpoint_interval = checkpoint_interval
        self.sweep_interval = sweep_interval or min(1.0, ttl / 6)
        self.clock = clock
        self.monotonic = monotonic
        self.leases = LeaseTable(ttl)
        self._clock_mark = (0.0, 0.0)  # (monotonic, system) time of the last _now()
        self.sessions = SessionTable()  # heartbeat sessions, kept with the leases

    # ------------------------------------------------------------ lifecycle

    async def on_start(self) -> None:
        self._clock_mark = self.monotonic(), self.clock()
        if self.consensus is not None:
            await self._refresh_raft()
            self.nursery.start_soon(self._watch_leadership)
            self.nursery.start_soon(self._sweep_loop)
            self.nursery.start_soon(self._checkpoint_loop)
            log.info("registry replica started", extra={"applied_index": self.state.applied_index})
            return
        now = self.up_since = self._now()
        # Nodes could not heartbeat while the registry was down: every lease
        # gets at least one full TTL from now before it can expire. The last
        # heartbeat shown stays the one the node really sent.
        for node_id, (deadline, last) in self.state.lease_table().items():
            self.leases.grant(node_id, last if last is not None else now,
                              max(deadline or 0.0, now + self.ttl))
        self.leases.take_dirty()
        self.nursery.start_soon(self._sweep_loop)
        self.nursery.start_soon(self._checkpoint_loop)
        log.info("registry state loaded", extra={"nodes": len(self.leases),
                                                 "applied_index": self.state.applied_index})

    async def on_stop(self) -> None:
        if self.consensus is not None:
            with trio.move_on_after(1.0):
                await self._checkpoint()
            return
        await self._checkpoint(pace=False)  # stopping: nothing to make room for

    # ------------------------------------------------------------ letters

    async def handle(self, letter: Letter) -> None:
        # Heartbeats queued together (what a link's frame batch brings) are
        # answered together, so their replies leave in one frame too. (A
        # session heartbeat that finds us idle never queues: answered inline.)
        while isinstance(letter.msg, (np.SessionHeartbeat, np.SignedHeartbeat)) and (
                self.consensus is None or self.leader_term):
            kind = type(letter.msg)
            if kind is np.SessionHeartbeat:
                # Let the links read what has arrived first: a bigger batch
                # (what the worker thread does for signed ones, for free).
                await trio.lowlevel.checkpoint()
                if self.consensus is not None and not self.leader_term:
                    continue  # leadership went meanwhile: forwarded below
            batch, after = self._gather(letter, kind)
            if kind is np.SessionHeartbeat:
                self._session_heartbeats(batch)
            else:
                await self._signed_heartbeats(batch)
            if after is None:
                return
            letter = after
        if self.consensus is not None and self._handle_replicated(letter):
            return
        if not isinstance(letter.msg, WRITES):
            await super().handle(letter)
            return
        # Let the request handlers that are ready to run queue their writes
        # first: they join this batch and its one fsync. Measured with 8
        # connections registering: 866 -> 1,060/s (medians of 6 alternated runs).
        await trio.lowlevel.checkpoint()
        batch, after = self._gather(letter, WRITES)
        try:
            self._commit(batch)
        except BaseException as exc:
            for queued in batch[1:]:  # the kernel fails the first one
                queued.fail(exc if isinstance(exc, Refused) else
                            RuntimeError(f"registry write failed: {exc}"))
            raise
        if after is not None:
            await super().handle(after)

    def _gather(self, first: Letter, kinds) -> tuple[list[Letter], Letter | None]:
        """The run of letters of `kinds` queued behind `first`, and the one
        of another kind that ended it."""
        box = self.system.mailbox_of(self.ref.name)
        batch = [first]
        while len(batch) < MAX_BATCH:
            try:
                letter = box.get_nowait()
            except trio.WouldBlock:
                return batch, None
            if not isinstance(letter.msg, kinds):
                return batch, letter
            batch.append(letter)
        return batch, None

    def _session_heartbeats(self, batch: list[Letter]) -> None:
        for k, letter in enumerate(batch):
            try:
                letter.answer(self._lease_message(letter.msg))
            except Refused as refusal:
                letter.fail(refusal)
            except BaseException as exc:
                for queued in batch[k:]:  # answered ones ignore it
                    queued.fail(RuntimeError(f"registry heartbeat failed: {exc}"))
                raise

    async def _signed_heartbeats(self, batch: list[Letter]) -> None:
        """Signed heartbeats, as a batch: the Ed25519 checks (most of the
        cost) run in a worker thread (cryptography releases the GIL) while
        this process goes on reading links, so the next batch gathers
        meanwhile. Measured (bench/heartbeats.py): +25-30% heartbeats/s over
        verifying here, even for batches of one."""
        now = self._now()
        checked: list[tuple[Letter, dict, str]] = []
        for letter in batch:
            try:
                stmt = self.gate.parse(letter.msg.statement)
                key = self._bound_key(stmt["node_id"])
                self.gate.precheck(stmt, "heartbeat", now)
            except Refused as refusal:
                letter.fail(refusal)
                continue
            checked.append((letter, stmt, key))
        pairs = [(stmt, key) for _, stmt, key in checked]
        verified = await trio.to_thread.run_sync(self.gate.verify_all, pairs) if pairs else []
        if self.consensus is not None and not self.leader_term:
            # Leadership went while the thread checked them: the leader
            # renews leases, not us (it checks them again).
            for letter, _, _ in checked:
                self.nursery.start_soon(self._forward_heartbeat, letter, letter.msg)
            return
        now = self._now()
        for (letter, stmt, _), ok in zip(checked, verified):
            try:
                self.gate.admit(stmt, ok, now)
                letter.answer(self._renew(stmt["node_id"]))
            except Refused as refusal:
                letter.fail(refusal)

    def _commit(self, batch: list[Letter]) -> None:
        now = self._now()
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
        # On the event loop, fsync and all: measured, a worker thread made
        # registrations slower (the loop then answers requests one by one
        # and batches shrink; a blocked loop lets them queue into one batch).
        results = self.state.apply_next(commands)
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
                if peer == stmt["node_id"]:
                    # Refused up front: it would otherwise count for the
                    # reporter's own reputation.
                    raise BadStatement("a node does not report a link to itself",
                                       {"node_id": peer})
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
            if self.consensus is None or self.leader_term:
                # The command stored this very lease (at, lease_deadline): no
                # checkpoint needs to write it again.
                self.leases.grant(cmd.node_id, cmd.at, cmd.lease_deadline, stored=True)
            log.info("node registered" if created else "node updated",
                     extra={"node_id": cmd.node_id, "ipv6_addr": result["ipv6"]})
            return {"created": created, "node": self._fresh(result),
                    "heartbeat_interval": self.heartbeat_interval, "ttl": self.ttl}
        if isinstance(cmd, DeleteNode):
            self._drop_lease(cmd.node_id)
            log.info("node deregistered", extra={"node_id": cmd.node_id})
        if isinstance(cmd, ReleaseIdentity):
            log.warning("node name released", extra={"node_id": cmd.node_id})
        return result

    def _after_link_report(self, msg: np.LinkReport, cmd: Any, result: Any) -> dict:
        stmt = self.gate.parse(msg.statement)
        state, peer = stmt["body"]["state"], stmt["body"]["peer"]
        if self.consensus is not None and not self.leader_term:
            self._report_to_leader(m.ReportedLink(peer, state))
        else:
            self._count_link(peer, state)
        # Closing a link the registry never saw is fine; a refusal here is
        # only worth a note in the answer.
        return {"ok": True, "recorded": not isinstance(result, Refused)}

    def _count_link(self, peer: str, state: str) -> None:
        if peer in self.leases:  # not names nobody holds: the book would only grow
            self.reputation.link_report(peer, state)

    def _report_to_leader(self, msg: m.ReportedLink) -> None:
        """Best effort, as reputation is soft state: with no leader known, or
        its link full, the report counts for nothing."""
        address = self._leader_address()
        if address is None:
            log.debug("link report not counted: no leader", extra={"peer": msg.peer})
            return
        try:
            self.system.ref("registry", address).tell_nowait(msg)
        except ActorError as exc:
            log.debug("link report not counted", extra={"peer": msg.peer, "error": str(exc)})

    def _bound_key(self, node_id: str) -> str:
        key = self.state.public_key_of(node_id)
        if key is None:
            raise BadStatement(f"node {node_id!r} has no key: register with a signed "
                               "statement first", {"node_id": node_id})
        return key

    # What the HTTP facade asks most: answered in its task when we are idle
    # (actors.actor.Actor.inline), none of them awaits.
    inline = (m.Heartbeat, np.SessionHeartbeat, m.GetNode, m.ListNodes, m.ListDomains,
              m.ListPeers, m.ReputationOf, m.Status)

    def answer_now(self, msg: Any) -> Any:
        if self.consensus is not None and isinstance(msg, LEASE_MESSAGES) and not self.leader_term:
            raise UseMailbox()  # a follower forwards it to the leader (see handle)
        return self._answer(msg)

    async def receive(self, msg: Any) -> Any:
        return self._answer(msg)

    def _answer(self, msg: Any) -> Any:
        match msg:
            case np.SessionHeartbeat() | np.OpenSession() | m.Heartbeat():
                return self._lease_message(msg)
            case np.Candidates(node_id, limit):
                return {"peers": self._candidates(node_id, limit)}
            case m.ReportedLink(peer, state):
                if self.leader_term and state in LINK_STATES:
                    self._count_link(peer, state)
                return None
            case m.ReputationOf(node_id):
                node = self.state.get_node(node_id)
                return {**self.reputation.breakdown(node_id), "stored": node["reputation"]}
            case m.GetNode(node_id):
                return self._fresh(self.state.get_node(node_id))
            case m.ListNodes(domain, limit, after, encoded):
                page = self.state.node_page_json(domain, limit, after, self.leases)
                return page if encoded else orjson.loads(page)
            case m.ListDomains():
                return self.state.list_domains()
            case m.ListPeers(node_id):
                return self.state.list_peers(node_id)
            case m.Status():
                status = {"ready": True, "nodes": len(self.leases),
                          "applied_index": self.state.applied_index}
                if self.consensus is not None:
                    status.update(replica=self.raft.get("id"), role=self.raft.get("role"),
                                  leader=self.raft.get("leader"), term=self.raft.get("term"),
                                  nodes=self.state.node_count(), leases=len(self.leases))
                return status
        raise Refused("unhandled_message",
                      f"{type(self).__name__} does not handle {type(msg).__name__}")

    # ------------------------------------------------------------ leases

    def _heartbeat(self, node_id: str) -> dict:
        now = self._now()
        deadline = self.leases.deadline(node_id)
        if deadline is not None and deadline <= now:
            # The lease ran out before the sweep saw it: expire it now (as the
            # sweep would) rather than bring a lapsed lease back to life.
            if self.consensus is not None:  # the sweep's committed expiry removes it
                raise NotFound(f"node {node_id!r}'s lease has expired: register again",
                               {"node_id": node_id})
            self.expire_due()
        last = self.leases.last_renewal(node_id)
        if last is not None:  # the registry's own downtime makes no heartbeat late
            last = max(last, self.up_since, self.leader_since)
        deadline = self.leases.renew(node_id, now)
        if deadline is not None:
            self.reputation.heartbeat(node_id, now, last)
        if deadline is None:
            raise NotFound(f"node {node_id!r} is not registered (its lease may have "
                           "expired): register again", {"node_id": node_id})
        return {"node_id": node_id, "lease_deadline": deadline, "ttl": self.ttl}

    def _candidates(self, node_id: str, limit: int) -> list[dict]:
        me = self.state.get_node(node_id)
        pool = self.state.list_nodes(me["domain"], 1000, leases=self.leases)["nodes"]
        if len(pool) <= limit:  # too few in the domain: look beyond it
            pool += [n for n in self.state.list_nodes(None, 1000, leases=self.leases)["nodes"]
                     if n["domain"] != me["domain"]]
        now = self._now()
        if self.consensus is not None and not self.leader_term:
            # A follower keeps no leases: the stored deadlines (a checkpoint
            # behind the leader's) are good enough for hints.
            live = {n["id"] for n in pool if (n.get("lease_deadline") or 0.0) > now}
        else:
            # Live: a lease that has not run out (one past its deadline may
            # not have been swept yet).
            live = {n["id"] for n in pool if (self.leases.deadline(n["id"]) or 0.0) > now}
        return candidates(me, pool, live, max(1, min(limit, 100)), self.rng)

    def _fresh(self, node: dict) -> dict:
        """A stored node row with its live lease (the disk copy lags by a checkpoint)."""
        node.update(self.leases.live_fields(node["id"], iso_utc) or {})
        return node

    async def _sweep_loop(self) -> None:
        while True:
            asleep = trio.current_time()
            await trio.sleep(self.sweep_interval)
            # Late from the sleep alone: the time the expiry below waits on
            # consensus is not the process standing still.
            self._after_stall(trio.current_time() - asleep - self.sweep_interval)
            # (both look at the system clock first: _now)
            if self.consensus is not None:
                await self._expire_replicated()
            else:
                self.expire_due()

    def _after_stall(self, stalled: float) -> None:
        """The sweep woke `stalled` seconds late (monotonic time): the process
        did not run (a VM or process pause, a blocked event loop), and the
        heartbeats of that time are still queued in its sockets. Their
        leases get that time back, or the first sweep would expire every
        node that was only waiting to be heard."""
        if stalled < STALL_GRACE_AFTER or not self.leases:
            return
        self.leases.extend(stalled)
        log.warning("the registry did not run for a while; leases extended by as much",
                    extra={"stalled_seconds": round(stalled, 3), "leases": len(self.leases)})

    def _now(self) -> float:
        """The system clock's time, which leases are kept in, after checking
        that it did not move more than monotonic time since the last look
        (someone set it, or NTP stepped it). Every deadline then moves by
        the step, so each lease lasts as long in real time: a step forward
        does not expire every node at once, a step back does not keep silent
        ones listed for the length of the step. Each renewal and sweep looks
        first, so no deadline is computed across an unnoticed step."""
        mono, wall = self.monotonic(), self.clock()
        last_mono, last_wall = self._clock_mark
        self._clock_mark = mono, wall
        step = (wall - last_wall) - (mono - last_mono)
        if abs(step) < STALL_GRACE_AFTER or not self.leases:
            return wall
        self.leases.extend(step, stored_too=True)
        # the times heartbeats are measured from for punctuality move too
        self.up_since += step if self.up_since else 0.0
        self.leader_since += step if self.leader_since else 0.0
        log.warning("the system clock stepped; lease deadlines moved by as much",
                    extra={"step_seconds": round(step, 3), "leases": len(self.leases)})
        return wall

    def expire_due(self) -> list[str]:
        now = self._now()
        due = self.leases.expired(now)
        if not due:
            return []
        [result] = self.state.apply_next([ExpireNodes(node_ids=tuple(due), at=now)])
        for node_id in due:
            self._drop_lease(node_id)
        for node_id in result["expired"]:
            log.error("node expired", extra={"node_id": node_id, "ttl": self.ttl})
        return result["expired"]

    async def _checkpoint_loop(self) -> None:
        while True:
            await trio.sleep(self.checkpoint_interval)
            await self._checkpoint()

    async def _checkpoint(self, pace: bool = True) -> None:
        """Write changed scores and renewed deadlines in small chunks,
        yielding between them, so a big checkpoint never stalls the event
        loop for long (with 100,000 nodes, one transaction of all 7,000 scores
        and chunks of 2,000 leases made a heartbeat's p99 ~150 ms)."""
        if self.consensus is not None:
            await self._checkpoint_replicated()
            return
        # No fsync for either: what a crash can lose of them changes nothing
        # that matters. A restarted registry gives every lease a full TTL
        # anyway (on_start), and a score is a running estimate.
        scores = self.reputation.take_dirty()
        for i in range(0, len(scores), CHECKPOINT_CHUNK):
            await self._apply_soft([_set_scores(scores[i:i + CHECKPOINT_CHUNK])], pace)
        for chunk in self.leases.dirty_chunks(CHECKPOINT_CHUNK):
            await self._apply_soft([_checkpoint_leases(chunk)], pace)

    async def _apply_soft(self, commands: list[Any], pace: bool) -> None:
        """Apply without fsync; `pace`: then rest as long as that took, so a
        checkpoint takes at most half of the event loop while requests wait."""
        started = time.perf_counter()
        self.state.apply_next(commands, durable=False)
        await trio.sleep(time.perf_counter() - started if pace else 0)


    # ------------------------------------------------------------ replicated mode

    def _handle_replicated(self, letter: Letter) -> bool:
        """Writes and heartbeats in replicated mode; False: handle as usual."""
        msg = letter.msg
        if isinstance(msg, WRITES):
            now = self._now()
            try:
                cmd = self._command(msg, now)
            except Refused as refusal:
                letter.fail(refusal)
                return True
            rid = getattr(msg, "request_id", "") or os.urandom(8).hex()
            self.nursery.start_soon(self._propose_write, letter, cmd, rid, now)
            return True
        if isinstance(msg, LEASE_MESSAGES):
            if self.leader_term:
                try:
                    letter.answer(self._lease_message(msg))
                except Refused as refusal:
                    letter.fail(refusal)
            elif isinstance(msg, m.LeaderHeartbeat) or getattr(msg, "forwarded", False):
                # forwarded once, never again
                letter.fail(Refused("not_leader", "this replica does not lead",
                                    {"leader": self.raft.get("leader")}))
            else:
                self.nursery.start_soon(self._forward_heartbeat, letter, msg)
            return True
        return False

    async def _propose_write(self, letter: Letter, cmd: Any, rid: str, now: float) -> None:
        existed: set[str] = set()
        if isinstance(cmd, RegisterNode) and (
                cmd.node_id in self.leases or self._stored(cmd.node_id) is not None):
            existed.add(cmd.node_id)
        try:
            committed = await self.consensus.ask(Propose(cmd, rid, with_index=True),
                                                 timeout=self.propose_timeout)
        except Refused as refusal:
            if isinstance(letter.msg, np.LinkReport) and refusal.code not in CONSENSUS_CODES:
                letter.answer(self._after_link_report(letter.msg, cmd, refusal))
            else:
                letter.fail(refusal)
            return
        except ActorError as exc:
            letter.fail(CommitUnknown(f"write not confirmed: {exc}"))
            return
        result = committed["result"]
        if isinstance(letter.msg, np.LinkReport):
            answer = self._after_link_report(letter.msg, cmd, result)
        else:
            answer = self._after_apply(cmd, result, now, existed)
        if isinstance(answer, dict):  # where it was committed, for X-Raft-Index/Term
            answer = {**answer, m.RAFT_POSITION: [committed["index"], committed["term"]]}
        letter.answer(answer)

    def _stored(self, node_id: str) -> dict | None:
        try:
            return self.state.get_node(node_id)
        except NotFound:
            return None

    async def _refresh_raft(self) -> None:
        try:
            st = await self.consensus.ask(ClusterStatus(hops=1), timeout=2.0)
        except ActorError:
            return
        self.raft = st
        leads = st.get("role") == "leader"
        if leads and self.leader_term != st["term"]:
            # Adopt the leases only once every entry committed before this
            # term is applied here (a read barrier: the new leader has
            # committed an entry of its own term, and applied up to it), or
            # they and the last leader's pulse would be read a few entries
            # old. One barrier per term: every heartbeat waiting for the
            # lease table looks again (each barrier costs a Raft round).
            term = st["term"]
            if self._adopting == term:
                return
            self._adopting = term
            try:
                barrier = await self.consensus.ask(ReadBarrier(), timeout=self.propose_timeout)
                st = await self.consensus.ask(ClusterStatus(hops=1), timeout=2.0)
            except ActorError:
                return  # the next look tries again
            finally:
                self._adopting = 0
            self.raft = st
            # Still the same leadership (not lost and won again meanwhile,
            # which would need its own barrier).
            if (st.get("role") == "leader" and st["term"] == term == barrier["term"]
                    and self.leader_term != term):
                self._become_leader(term)
        elif not leads and self.leader_term:
            log.info("registry lost leadership", extra={"term": self.leader_term})
            self.leader_term = 0
            self._forget_leases()

    async def _watch_leadership(self) -> None:
        while True:
            await trio.sleep(self.watch_interval)
            await self._refresh_raft()

    def _become_leader(self, term: int) -> None:
        self.leader_term, self.leader_since = term, self._now()
        self._forget_leases()
        pulse = self.state.leader_pulse()
        # Leaders pulse every checkpoint interval: a last pulse older than
        # two of them (more than any election between two leaders takes)
        # means the group was down, or without a leader, since about then.
        self._outage = (self.ttl if pulse is None else
                        max(0.0, self.leader_since - pulse - 2 * self.checkpoint_interval))
        for node_id, (deadline, last) in self.state.lease_table().items():
            self._adopt(node_id, deadline, last)
        if not self._outage:
            self.leases.take_dirty()  # nothing new to checkpoint: they came from the log
        # else the graces it gave are written with its first pulse: a leader
        # after it, finding that pulse recent, would not see the outage, and
        # would go by the nodes' last heartbeats, from before it.
        if self.leases:
            self.nursery.start_soon(self._checkpoint_replicated)  # this leader's first pulse
        log.info("registry leads", extra={"term": term, "nodes": len(self.leases),
                                          "outage_seconds": round(self._outage, 3)})

    def _adopt(self, node_id: str, deadline: float | None, last: float | None,
               now: float | None = None) -> None:
        """Track a stored lease on the leader, with the bounded grace: one
        TTL from the election, but no more than 2 TTL after the node's last
        heartbeat (frequent elections must not keep a dead node listed),
        unless the group was down before this election (its nodes could not
        heartbeat then; a last heartbeat from before that, or before an
        earlier outage, says nothing): then one TTL, as after a lone
        registry's restart."""
        grace = self.leader_since + self.ttl
        if last is not None and not self._outage:
            grace = min(grace, last + 2 * self.ttl)
        # A stored deadline more than a TTL ahead was written before the
        # clock stepped back (its leader did not get to rewrite it): as if
        # renewed now, not for the length of the step.
        now = self.leader_since if now is None else now
        deadline = min(max(deadline or 0.0, grace), now + self.ttl)
        self.leases.grant(node_id, last if last is not None else self.leader_since, deadline)

    def _lease_message(self, msg: Any) -> dict:
        """A heartbeat of any kind (or a session opening), on the replica
        that keeps the leases."""
        if isinstance(msg, np.SessionHeartbeat):
            session = self.sessions.check(msg.session, msg.counter, msg.mac)
            if self.state.public_key_of(session.node_id) != session.public_key:
                self.sessions.drop(session.node_id)  # the name was released (and taken)
                raise NoSession(f"node {session.node_id!r} is no longer bound to the key "
                                "that opened this session", {"node_id": session.node_id})
            return self._renew(session.node_id)
        if isinstance(msg, np.OpenSession):
            return self._open_session(msg.statement)
        return self._leader_heartbeat(getattr(msg, "node_id", ""), getattr(msg, "statement", ""))

    def _open_session(self, statement: str) -> dict:
        """A signed "session" statement opens a heartbeat session (and counts
        as a signed heartbeat): the answer carries its id and our key share."""
        stmt = self.gate.parse(statement)
        node_id = stmt["node_id"]
        key = self._bound_key(node_id)
        body = self.gate.check(stmt, key, "session", self._now())
        if set(body) != {"share"}:
            raise BadStatement("a session statement's body is exactly {\"share\": ...}",
                               {"node_id": node_id})
        renewed = self._renew(node_id)  # first: no session for a node without a lease
        try:
            session, share = self.sessions.open(node_id, key, body["share"])
        except IdentityError as exc:
            raise BadStatement(str(exc), {"node_id": node_id}) from None
        return {**renewed, "session": session, "share": share}

    def _drop_lease(self, node_id: str) -> None:
        self.leases.drop(node_id)
        self.sessions.drop(node_id)

    def _forget_leases(self) -> None:
        """Leadership came or went: leases (and the sessions that renew them)
        start over."""
        self.leases = LeaseTable(self.ttl)
        self.sessions.clear()
        self._expiry_unknown.clear()

    def _leader_heartbeat(self, node_id: str, statement: str) -> dict:
        if statement:
            stmt = self.gate.parse(statement)
            self.gate.check(stmt, self._bound_key(stmt["node_id"]), "heartbeat", self._now())
            node_id = stmt["node_id"]
        elif self.state.public_key_of(node_id) is not None:
            raise Refused("signature_required",
                          f"node {node_id!r} is bound to a key: its heartbeats must be "
                          "signed statements", {"node_id": node_id})
        return self._renew(node_id)

    def _renew(self, node_id: str) -> dict:
        """A checked heartbeat renews the lease (on the leader, if replicated)."""
        if self.consensus is not None:
            if not self.leader_term:
                raise Refused("not_leader", "this replica does not lead: leases live on "
                              "the leader", {"leader": self.raft.get("leader")})
            if not self.state.has_node(node_id):
                # Removed by a command this actor did not propose (a
                # deregistration through a follower, an expiry a new leader
                # inherited): a lease without a row would be renewed for ever
                # while the node stayed invisible. It must register again.
                self._drop_lease(node_id)
                raise NotFound(f"node {node_id!r} is not registered (its lease may have "
                               "expired): register again", {"node_id": node_id})
            if node_id not in self.leases:
                # Registered through another replica since this one took over.
                node = self._stored(node_id)
                if node is not None:
                    self.leases.grant(node_id, self._now(), node.get("lease_deadline"))
        return self._heartbeat(node_id)

    def _leader_address(self) -> str | None:
        leader = self.raft.get("leader")
        if leader is None or leader == self.raft.get("id"):
            return None
        return (self.raft.get("members") or {}).get(leader)

    async def _forward_heartbeat(self, letter: Letter, msg: Any) -> None:
        if isinstance(msg, (np.OpenSession, np.SessionHeartbeat)):
            onward = attrs.evolve(msg, forwarded=True)
        else:
            onward = m.LeaderHeartbeat(getattr(msg, "node_id", ""), getattr(msg, "statement", ""))
        deadline = trio.current_time() + self.propose_timeout
        while trio.current_time() < deadline:
            if self.leader_term:
                try:
                    letter.answer(self._lease_message(msg))
                except Refused as refusal:
                    letter.fail(refusal)
                return
            address = self._leader_address()
            if address is not None:
                try:
                    letter.answer(await self.system.ref("registry", address).ask(
                        onward,
                        timeout=max(0.1, deadline - trio.current_time())))
                    return
                except Refused as refusal:
                    if refusal.code != "not_leader":
                        letter.fail(refusal)
                        return
                except ActorError:
                    pass
            await trio.sleep(0.1)
            await self._refresh_raft()
        letter.fail(NoLeader("no leader took the heartbeat in time", {"replica": self.raft.get("id")}))

    async def _propose_local(self, cmd: Any) -> Any:
        """Propose an internal command only if this replica leads (hops=1: the
        local consensus must not forward it to another leader)."""
        return await self.consensus.ask(Propose(cmd, "", hops=1), timeout=self.propose_timeout)

    async def _expire_replicated(self) -> None:
        if not self.leader_term:
            return
        now = self._now()
        for node_id, deadline, last in self.state.leases_due(now, now + self.ttl):
            if node_id not in self.leases:  # registered through another replica
                self._adopt(node_id, deadline, last, now)
            if deadline is not None and deadline > now + self.ttl:
                # Stored before the clock stepped back (no deadline is more
                # than a TTL ahead), by a leader that did not get to write it
                # again: an expiry would not remove the row (it removes only
                # rows whose stored deadline has passed). Write ours.
                self.leases.mark_dirty([node_id])
        due = self.leases.expired(now)
        if not due:
            return
        try:
            result = await self._propose_local(
                ExpireNodes(node_ids=tuple(due), at=now, term=self.leader_term))
        except (Refused, ActorError) as exc:
            log.warning("expiry not committed", extra={"nodes": len(due), "error": str(exc)})
            if not isinstance(exc, Refused) or exc.code == "commit_unknown":
                self._expiry_unknown.update(due)  # it may still commit: see below
            return
        for node_id in due:
            if (self.leases.deadline(node_id) or 0.0) <= now:  # not renewed meanwhile
                self._drop_lease(node_id)
        expired = set(result["expired"])
        # An expiry whose answer timed out but which committed later left
        # nothing for this one to remove: it is still this node's expiry.
        late = [n for n in due if n not in expired and n in self._expiry_unknown
                and not self.state.has_node(n)]
        self._expiry_unknown.difference_update(due)
        for node_id in [*result["expired"], *late]:
            log.error("node expired", extra={"node_id": node_id, "ttl": self.ttl})

    async def _checkpoint_replicated(self) -> None:
        if not self.leader_term:
            return
        try:
            scores = self.reputation.take_dirty()
            if scores:
                await self._propose_local(_set_scores(scores))
            for chunk in self.leases.dirty_chunks(CHECKPOINT_CHUNK):
                try:
                    await self._propose_local(_checkpoint_leases(chunk))
                except BaseException:
                    self.leases.mark_dirty(n for n, _, _ in chunk)  # at the next checkpoint
                    raise
            # The pulse after the chunks (see CheckpointLeases): committed, it
            # says they are too, so a later leader never reads a recent pulse
            # beside leases this one did not get to write.
            if self.leases:
                await self._propose_local(_checkpoint_leases([], self._now()))
        except (Refused, ActorError) as exc:
            log.warning("lease checkpoint not committed", extra={"error": str(exc)})


def _set_scores(scores: list[tuple[str, float]]) -> SetReputation:
    """The command that stores changed scores (a checkpoint's, either mode)."""
    return SetReputation(entries=tuple(ReputationEntry(node_id=n, reputation=r)
                                       for n, r in scores))


def _checkpoint_leases(dirty: list[tuple[str, float, float]], at: float = 0.0) -> CheckpointLeases:
    """The command that stores renewed leases (LeaseTable.take_dirty's
    entries); `at`: the leader's pulse (replicated mode)."""
    return CheckpointLeases(entries=tuple(LeaseEntry(node_id=n, deadline=d, last_heartbeat=h)
                                          for n, d, h in dirty), at=at)


CONSENSUS_CODES = frozenset({"no_leader", "not_leader", "not_committed", "commit_unknown"})
