"""MeshActor: chooses peers, opens and accepts authenticated links, carries messages.

Links. Every `maintain_every` seconds, while it has fewer than
`max_connections` links (inbound, outbound and handshakes in progress count
together), the mesh asks the registry for candidates (same domain first,
then by reputation), and dials some of them in random order, same domain
first. A dial is the challenge–response of trustnet.node.handshake over the
kernel's actor messaging: LinkHello -> LinkChallenge (the acceptor proved its
key), LinkProof -> ok (the dialler proved its key). Each side verifies the
other's signature against the public key the registry lists for that name;
a peer that fails is refused, logged, and reported as a failed link. Inbound
handshakes beyond the limit are refused ("full"), except from a dialler that
has no link at all: once it has proved its key, a full node drops one of its
own links at random to make room for it (at most once per `maintain_every`).
Without that, in a mesh where every node is at its limit, which is where a
mesh larger than max_connections settles, a node that joins late would wait
for a rotation (minutes) to get a first link. When both sides dial each
other at once, the dial from the smaller name wins ("dial_race"): the
smaller refuses the other's hello while it dials, or the other's proof if
its own dial started after that hello.

A lost link (three missed pongs) is closed, reported, and the peer is backed
off (jittered exponential) before it is dialled again. Every `rotate_interval`
a node at its limit drops one random link so that the graph keeps mixing and
a mesh split by a partition merges again once the partition heals.

Messages. A broadcast floods over the links with a random id, a hop limit and
dedup (trustnet.node.flood): every node delivers it once. A flood is taken
only over the link of the peer it names as `via`, a direct message only
over the link of its origin (and a LinkClose only from the peer it closes).
A direct message goes over the link to its target, opened on demand from
the registry's address for it; if no link can be opened it is flooded with
a target, and only the target delivers it.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any

import attrs
import orjson
import trio

from actors import Actor, ActorError, ChildSpec, Letter, Refused, Restart, Supervisor
from trustnet.registry.messages import GetNode
from trustnet.registry.node_protocol import Candidates, LinkReport

from .context import REPLICA_REFUSALS, NodeContext, node_address
from .flood import DEFAULT_HOPS, MAX_PAYLOAD, Inbox, SeenSet, arriving_hops, flood_step
from .handshake import check_proof, new_challenge, sign_challenge
from .messages import (
    Broadcast,
    Direct,
    Flood,
    GetInbox,
    GetPeers,
    LinkChallenge,
    LinkClose,
    LinkHello,
    LinkLost,
    LinkProof,
    ReportLinks,
    Send,
)
from .peerlink import PeerLinkActor, link_name

log = logging.getLogger("trustnet.node.mesh")

MESH_ACTOR = "mesh"

HANDSHAKE_TIMEOUT = 10.0
KNOWN_LIMIT = 1024  # peers' addresses and keys kept from the registry's answers
EVENTS_LIMIT = 1000


def _named_peer(msg: Flood | Direct | LinkClose) -> str:
    """The peer whose link a mesh message must come over: a flood's `via`, a
    close's sender, a direct message's origin."""
    return (msg.via if isinstance(msg, Flood) else
            msg.node_id if isinstance(msg, LinkClose) else msg.origin)


def forget_old_backoffs(backoff: dict[str, tuple[int, float]], now: float,
                        horizon: float) -> None:
    """Drop the backoff of peers whose wait ended more than `horizon` ago:
    without it the table keeps every peer that ever failed, gone ones too."""
    for peer in [p for p, (_, until) in backoff.items() if now - until > horizon]:
        del backoff[peer]


def trim_known(known: dict[str, dict[str, Any]], keep: set[str], limit: int) -> None:
    """Past `limit` entries, keep only the peers in `keep` (linked, dialled,
    in a handshake): the rest is a cache, asked again when needed."""
    if len(known) > limit:
        for peer in [p for p in known if p not in keep]:
            del known[peer]


@attrs.define
class LinkInfo:
    peer: str
    address: str
    direction: str  # "in" | "out"
    since: float
    serial: int  # this process's count of links opened, told back in LinkLost
    link: str  # `address` as the transport names its link (Letter.sender)
    key: str | None = None  # the peer's key its handshake checked (what TLS pins)


@attrs.define
class PendingIn:
    challenge: str
    public_key: str
    address: str
    since: float
    make_room: bool = False  # over the limit: a node without links, let in once proved


class MeshActor(Actor):
    def __init__(self, node: NodeContext, links: Supervisor, *, inbox_size: int = 1000,
                 hops: int = DEFAULT_HOPS):
        self.node = node
        self.p = node.params
        self.me = node.node_id
        self.links_sup = links
        self.links: dict[str, LinkInfo] = {}
        self.table_lock = trio.Lock()  # held while a link is opened or closed
        self.opened = 0  # links opened so far: the next link's serial
        self.dialing: dict[str, float] = {}
        self.pending_in: dict[str, PendingIn] = {}
        self.unreported: dict[str, str] = {}  # peer -> link state the registry has not taken
        self.proving: dict[str, trio.Event] = {}  # peers whose LinkProof is being handled
        # Proved inbound links being filed: they hold their slot from the
        # room check on, so two proofs at once cannot both take the last one.
        self.accepting: set[str] = set()
        self.hellos_looking_up = 0  # hellos waiting for the registry's answer
        self.backoff: dict[str, tuple[int, float]] = {}  # peer -> (failures, not before)
        self.known: dict[str, dict[str, Any]] = {}  # peer -> {"address", "public_key"}
        self.dial_keys: dict[str, str] = {}  # address dialled -> the key expected there
        # Kept by the node, not by this instance: a restarted mesh must not
        # deliver floods still in flight again, nor number received messages
        # from 1 again (a client reading /messages?since=N would miss them).
        self.seen = node.kept.setdefault("mesh.seen", SeenSet())
        self.inbox = node.kept.setdefault("mesh.inbox", Inbox(inbox_size))
        self.hops = hops
        self.rng = node.rng("mesh")
        self.challenges = node.rng("challenge")
        self.last_rotate = 0.0
        self.last_made_room = -float("inf")
        # (time, event, peer), the latest EVENTS_LIMIT: for tests
        self.events: deque[tuple[float, str, str]] = deque(maxlen=EVENTS_LIMIT)

    # ------------------------------------------------------------ lifecycle

    async def on_start(self) -> None:
        self.last_rotate = trio.current_time()
        self.node.actors["mesh"] = self
        self.nursery.start_soon(self._maintain_loop)

    async def on_stop(self) -> None:
        for peer in list(self.links):
            self._tell_peer_mesh(self.links[peer].address, LinkClose(self.me, "shutting down"))

    @property
    def occupied(self) -> int:
        """Links open, being dialled, or proved and being filed. Inbound
        handshakes are not counted until proved (anyone can start one with a
        registered name and never prove it): they are bounded apart, and room
        is checked again at their proof."""
        return len(self.links.keys() | self.dialing.keys() | self.accepting)

    # ------------------------------------------------------------ letters

    async def handle(self, letter: Letter) -> None:
        if isinstance(letter.msg, (Flood, Direct, LinkClose)) and not self._came_from_link(letter):
            # The peer's proof may be ahead of it in the mailbox, its link
            # not filed yet (the dialler files its link first and may send
            # over it at once): wait for that proof, then look again.
            proving = self.proving.get(_named_peer(letter.msg))
            if proving is None:
                return
            with trio.move_on_after(self.p.request_timeout):
                await proving.wait()
            if not self._came_from_link(letter):
                return
        # These wait on other actors: answer them from a helper task so the
        # mailbox keeps moving (pings, floods) meanwhile.
        if isinstance(letter.msg, (LinkHello, LinkProof, Send)):
            if isinstance(letter.msg, LinkProof):
                self.proving.setdefault(letter.msg.node_id, trio.Event())
            self.nursery.start_soon(self._answer_later, letter)
            return
        await super().handle(letter)

    def _came_from_link(self, letter: Letter) -> bool:
        """A flood names the peer it came from (`via`), a direct message its
        origin, a close the peer that closes; each must be a peer we have a
        link with, and the message must have come from that peer's address
        (else anyone could pass theirs for a linked peer's, or close our
        links)."""
        msg = letter.msg
        peer = _named_peer(msg)
        info = self.links.get(peer)
        if info is not None and letter.sender in (None, info.link):
            return True
        log.debug("mesh message not from a link of the peer it names, dropped",
                  extra={"peer": peer, "sender": letter.sender,
                         "type": type(msg).__name__})
        return False

    async def _answer_later(self, letter: Letter) -> None:
        msg = letter.msg
        try:
            if isinstance(msg, LinkHello):
                result = await self._on_hello(msg)
            elif isinstance(msg, LinkProof):
                result = await self._on_proof(msg)
            else:
                result = await self._on_send(msg)
        except Refused as exc:
            letter.fail(exc)
        except ActorError as exc:
            letter.fail(Refused("unavailable", str(exc)))
        except Exception as exc:  # noqa: BLE001
            # What another node sent must not crash the mesh (each crash
            # drops every link, and a few in a row end the node): a bug
            # here is logged and answered, not a way to take nodes down.
            log.exception("mesh request failed", extra={"type": type(msg).__name__})
            letter.fail(Refused("internal_error", f"{type(exc).__name__}: {exc}"))
        else:
            letter.answer(result)
        finally:
            proving = self.proving.pop(msg.node_id, None) if isinstance(msg, LinkProof) else None
            if proving is not None:
                proving.set()  # the messages that came behind it may go on

    async def receive(self, msg: Any) -> Any:
        match msg:
            case Flood():
                self._on_flood(msg)
                return None
            case Direct():
                return self._on_direct(msg)
            case LinkLost(peer, reason, serial):
                info = self.links.get(peer)
                if info is not None and info.serial == serial:
                    await self._close(peer, reason, notify=True, only=info)
                    self._back_off(peer)
                return None
            case LinkClose(peer, reason):
                if peer in self.links:
                    log.info("peer closed the link", extra={"peer": peer, "reason": reason})
                    await self._close(peer, f"peer: {reason}", notify=False,
                                      only=self.links[peer])
                return None
            case ReportLinks():
                for peer in sorted(self.links):
                    self._report(peer, "open")
                return None
            case Broadcast(payload):
                return self._broadcast(payload)
            case GetInbox(since, limit):
                return {"messages": self.inbox.since(since, limit), "last_seq": self.inbox.last_seq}
            case GetPeers():
                return {"node_id": self.me, "max_connections": self.p.max_connections,
                        "peers": self.peers()}
        return await super().receive(msg)

    def peers(self) -> list[dict[str, Any]]:
        out = []
        now = trio.current_time()
        for peer in sorted(self.links):
            info = self.links[peer]
            child = self.links_sup.child(link_name(peer))
            rtt = getattr(child, "rtt", None)
            out.append({"id": peer, "address": info.address, "direction": info.direction,
                        "age_seconds": round(now - info.since, 3),
                        "rtt_ms": None if rtt is None else round(rtt * 1000, 3)})
        return out

    # ------------------------------------------------------------ maintenance

    async def _maintain_loop(self) -> None:
        while True:
            try:
                await self._maintain()
            except ActorError as exc:
                log.debug("mesh maintenance skipped", extra={"error": str(exc)})
            await trio.sleep(self.p.maintain_every * self.rng.uniform(0.8, 1.2))

    async def _maintain(self) -> None:
        self._report_again()
        now = trio.current_time()
        for peer in [p for p, pend in self.pending_in.items() if now - pend.since > HANDSHAKE_TIMEOUT]:
            del self.pending_in[peer]
        forget_old_backoffs(self.backoff, now, self.p.backoff_max)
        trim_known(self.known, self.links.keys() | self.dialing.keys() | self.pending_in.keys(),
                   KNOWN_LIMIT)
        if (now - self.last_rotate >= self.p.rotate_interval
                and len(self.links) >= self.p.max_connections):
            self.last_rotate = now
            victim = self.rng.choice(sorted(self.links))
            log.info("rotating a link", extra={"peer": victim})
            await self._close(victim, "rotated", notify=True)
            self.backoff[victim] = (0, now + self.p.rotate_interval)
        want = self.p.max_connections - self.occupied
        if want <= 0:
            return
        answer = await self.node.registry.ask(
            Candidates(self.me, max(20, 4 * self.p.max_connections)),
            timeout=self.p.request_timeout)
        now = trio.current_time()
        same, other = [], []
        for cand in answer.get("peers", []):
            peer = cand.get("id")
            if not isinstance(peer, str) or peer == self.me:
                continue
            try:
                self.known[peer] = {"address": node_address(cand, self.p.peer_scheme),
                                    "public_key": cand.get("public_key")}
            except (KeyError, ValueError, TypeError):
                continue
            # (A handshake pending in its name is no reason to wait: anyone
            # can start one; a real crossing dial is settled by dial_race.)
            if (peer in self.links or peer in self.dialing
                    or self.backoff.get(peer, (0, 0.0))[1] > now):
                continue
            (same if cand.get("domain") == self.p.domain else other).append(peer)
        # The registry ranks them: same domain first, then by reputation. Dial
        # `room` of the best 4 x room at random: a node one link short picks
        # among the best few, and nodes that start together do not all dial
        # the same few first (which then refuse them "full": 50 real nodes
        # took 11 s to connect, not 0.1 s, when each dialled its top `room`;
        # 5.7 s with the best 2 x room).
        room = max(0, self.p.max_connections - self.occupied)
        best = (same + other)[:4 * room]
        self.rng.shuffle(best)
        for peer in best[:room]:
            self.dialing[peer] = now
            self.nursery.start_soon(self._dial_task, peer)

    async def _dial_task(self, peer: str, done: trio.Event | None = None) -> None:
        try:
            await self._dial(peer)
        finally:
            self.dialing.pop(peer, None)
            if done is not None:
                done.set()

    def _back_off(self, peer: str) -> None:
        failures = self.backoff.get(peer, (0, 0.0))[0] + 1
        cap = min(self.p.backoff_max, self.p.backoff_initial * 2 ** min(failures, 16))
        self.backoff[peer] = (failures, trio.current_time() + cap / 2 + self.rng.uniform(0, cap / 2))

    # ------------------------------------------------------------ dialling

    async def _dial(self, peer: str) -> bool:
        """Open a link to `peer` (challenge–response); True when it is open."""
        self.dialing.setdefault(peer, trio.current_time())
        known = self.known.get(peer)
        if known is None or not known.get("public_key"):
            known = await self.lookup(peer)
            if known is None:
                return False
        address, key = known["address"], known["public_key"]
        if address in self.dial_keys:  # another dial to that address is under way
            return False
        self.dial_keys[address] = key  # what a TLS connection there must present
        try:
            return await self._handshake(peer, address, key)
        finally:
            self.dial_keys.pop(address, None)

    async def _handshake(self, peer: str, address: str, key: str) -> bool:
        remote = self.node.system.ref(MESH_ACTOR, address)
        challenge = new_challenge(self.challenges)
        timeout = self.p.request_timeout
        mine: LinkInfo | None = None  # the link this dial opened
        try:
            answer = await remote.ask(LinkHello(self.me, self.node.system.address, peer, challenge,
                                                links=len(self.links)), timeout=timeout)
            if not isinstance(answer, LinkChallenge) or answer.node_id != peer:
                return self._failed(peer, "answered the hello with something else")
            if not check_proof(key, answer.signature, challenge, peer, self.me, peer):
                fresh = await self.lookup(peer)  # the key may have been re-bound
                key = fresh["public_key"] if fresh else None
                if not check_proof(key, answer.signature, challenge, peer, self.me, peer):
                    return self._failed(peer, "signature does not match the registered key")
            if peer in self.links:
                return True  # its own dial to us got there first
            if len(self.links) >= self.p.max_connections:
                # Links accepted meanwhile took the room: the peer's side of
                # this handshake times out unproved.
                log.debug("no room left for a dialled link", extra={"peer": peer})
                return False
            mine = await self._open_link(peer, address, "out", key)
            proof = sign_challenge(self.node.identity, answer.challenge, self.me, self.me, peer)
            await remote.ask(LinkProof(self.me, peer, proof), timeout=timeout)
        except Refused as exc:
            if mine is not None:
                await self._close(peer, f"refused: {exc.code}", notify=False, only=mine)
            if exc.code not in ("dial_race",):
                log.info("link refused by peer", extra={"peer": peer, "code": exc.code,
                                                        "error": exc.message})
                self._back_off(peer)
            return False
        except ActorError as exc:
            if mine is not None:
                await self._close(peer, "handshake failed", notify=False, only=mine)
            log.debug("dial failed", extra={"peer": peer, "error": str(exc)})
            self._back_off(peer)
            return False
        self.backoff.pop(peer, None)
        return True

    def _failed(self, peer: str, why: str) -> bool:
        log.warning("peer failed the link handshake, refused",
                    extra={"peer": peer, "error": why})
        self._report(peer, "failed")
        self._back_off(peer)
        return False

    async def lookup(self, peer: str) -> dict[str, Any] | None:
        """{"address", "public_key"} of `peer` as the registry lists it now
        (kept in `known`), None if it lists no such node."""
        try:
            node = await self.node.registry.ask(GetNode(peer), timeout=self.p.request_timeout)
        except Refused:
            return None
        try:
            known = {"address": node_address(node, self.p.peer_scheme),
                     "public_key": node.get("public_key")}
        except (KeyError, ValueError, TypeError):
            return None
        self.known[peer] = known
        return known

    def key_at(self, address: str) -> str | None:
        """What a TLS connection to `address` must present (peer_tls): the key
        of the peer this node is dialling there, has a link with there (the
        key its handshake checked) or is in a handshake with there; None for
        any other address. Not the `known` cache: anyone can put entries
        there (a hello names any registered node), and an entry can be
        stale."""
        key = self.dial_keys.get(address)
        if key is not None:
            return key
        for info in self.links.values():
            if info.address == address:
                return info.key
        for pending in self.pending_in.values():  # a handshake it answered, not yet proved
            if pending.address == address:
                return pending.public_key
        return None

    # ------------------------------------------------------------ accepting

    async def _on_hello(self, hello: LinkHello) -> LinkChallenge:
        peer = hello.node_id
        if hello.target != self.me:
            raise Refused("wrong_node", f"this is {self.me!r}, not {hello.target!r}")
        if peer == self.me:
            raise Refused("invalid", "a node does not link to itself")
        if peer in self.dialing and self.me < peer:
            raise Refused("dial_race", f"{self.me!r} is dialling {peer!r}")
        # Hellos waiting on the registry's answer count too, or a burst would
        # all pass this check before any of them is pending.
        under_way = len(self.pending_in) + self.hellos_looking_up
        if peer not in self.pending_in and under_way >= self.p.max_connections:
            raise Refused("busy", f"{self.me!r} has {under_way} link handshakes under way")
        isolated = hello.links == 0
        self._check_room(peer, isolated)
        self.hellos_looking_up += 1
        try:
            known = await self.lookup(peer)
        finally:
            self.hellos_looking_up -= 1
        if known is None or not known.get("public_key"):
            raise Refused("unknown_peer", f"the registry lists no key for {peer!r}")
        # The link goes to the address the registry lists for the name, and
        # the hello must come from it: not wherever the hello says.
        try:
            claimed = self.node.system.transport.link_address(hello.address)
            listed = self.node.system.transport.link_address(known["address"])
        except ValueError as exc:
            raise Refused("invalid", f"hello address {hello.address!r}: {exc}") from None
        if claimed != listed:
            raise Refused("wrong_address", f"the registry lists {peer!r} at {listed}, "
                                           f"not {hello.address!r}")
        make_room = self._check_room(peer, isolated)
        challenge = new_challenge(self.challenges)
        self.pending_in[peer] = PendingIn(challenge, known["public_key"], known["address"],
                                          trio.current_time(), make_room)
        signature = sign_challenge(self.node.identity, hello.challenge, self.me, peer, self.me)
        return LinkChallenge(self.me, signature, challenge)

    def _check_room(self, peer: str, isolated: bool) -> bool:
        """Refused("full") if there is no room for `peer`; True if there is
        only because a link will be dropped for it (it has none)."""
        # Our own dial to `peer`, if any, holds the slot its link would take.
        if (peer in self.links or peer in self.pending_in
                or self.occupied - (peer in self.dialing) < self.p.max_connections):
            return False
        if (isolated and self.links
                and trio.current_time() - self.last_made_room >= self.p.maintain_every
                and not any(pend.make_room for pend in self.pending_in.values())):
            return True
        raise Refused("full", f"{self.me!r} has {self.p.max_connections} links already")

    def _crossed(self, peer: str, pending: PendingIn) -> bool:
        """Did our dial to `peer` cross its dial to us? Its hello came before
        ours was under way (else the hello was refused), so both handshakes
        ran; each side must keep the same one, the dial from the smaller
        name, or each ends up keeping the other's (both "in"). A link of
        ours older than its hello is a stale one it is replacing (say it
        restarted) and does not count."""
        mine = self.links.get(peer)
        return peer in self.dialing or (
            mine is not None and mine.direction == "out" and mine.since >= pending.since)

    async def _make_room(self, newcomer: str) -> None:
        """Drop random links (not the newcomer's) while over the limit, our
        dials under way included: each of them takes a link when it ends."""
        self.last_made_room = trio.current_time()
        while self.occupied > self.p.max_connections:
            victims = sorted(p for p in self.links if p != newcomer and p not in self.dialing)
            if not victims:
                return
            victim = self.rng.choice(victims)
            log.info("dropping a link to make room for a node without links",
                     extra={"peer": victim, "newcomer": newcomer})
            await self._close(victim, "made room for a node without links", notify=True)

    async def _on_proof(self, proof: LinkProof) -> dict[str, bool]:
        peer = proof.node_id
        pending = self.pending_in.get(peer)
        if pending is None or proof.target != self.me:
            raise Refused("no_handshake", f"no link handshake with {peer!r} in progress")
        if not check_proof(pending.public_key, proof.signature, pending.challenge,
                           peer, peer, self.me):
            log.warning("peer failed the link handshake, refused",
                        extra={"peer": peer, "error": "signature does not match the registered key"})
            self.pending_in.pop(peer, None)
            # Not reported to the registry: whoever dialled only claimed the
            # name, and a report would lower the reputation of its real owner.
            # (A node we dial at its registered address that fails is reported.)
            raise Refused("auth_failed", f"{peer!r} did not prove it holds its registered key")
        if self.me < peer and self._crossed(peer, pending):
            self.pending_in.pop(peer, None)
            raise Refused("dial_race", f"{self.me!r} dialled {peer!r} meanwhile")
        if (peer not in self.links and not pending.make_room
                and self.occupied - (peer in self.dialing) >= self.p.max_connections):
            self.pending_in.pop(peer, None)  # the room went to others meanwhile
            raise Refused("full", f"{self.me!r} has {self.p.max_connections} links already")
        self.accepting.add(peer)
        try:
            await self._open_link(peer, pending.address, "in", pending.public_key)
        finally:
            self.accepting.discard(peer)
            if self.pending_in.get(peer) is pending:
                del self.pending_in[peer]
        if pending.make_room:
            await self._make_room(peer)
        return {"ok": True}

    # ------------------------------------------------------------ links

    async def _open_link(self, peer: str, address: str, direction: str,
                         key: str | None = None) -> LinkInfo:
        """Start the link's actor (replacing any link to `peer`) and file it.
        Opening and closing hold the table lock: they await the links
        supervisor, and two of them for one peer (a proof and our dial)
        interleaved used to file one link while the other's actor ran."""
        async with self.table_lock:
            if peer in self.links:
                await self._close_now(peer, "replaced", notify=False)
            name = link_name(peer)
            mesh = self.ref
            self.opened += 1
            serial = self.opened

            def start() -> PeerLinkActor:
                return PeerLinkActor(self.node, mesh, peer, address, direction, serial)

            spec = ChildSpec(name, start, Restart.TEMPORARY, mailbox_size=100)
            try:
                await self.links_sup.start_child(spec)
            except ValueError:  # an actor of a link no longer filed: take its place
                await self.links_sup.stop_child(name)
                await self.links_sup.start_child(spec)
            link = self.node.system.transport.link_address(address)
            info = self.links[peer] = LinkInfo(peer, address, direction, trio.current_time(),
                                               serial, link, key)
        self.events.append((trio.current_time(), "open", peer))
        log.info("link opened", extra={"peer": peer, "address": address, "direction": direction,
                                       "links": len(self.links)})
        self._report(peer, "open")
        return info

    async def _close(self, peer: str, reason: str, *, notify: bool,
                     only: LinkInfo | None = None) -> None:
        """Close the link to `peer` (if it is still `only`, when given)."""
        async with self.table_lock:
            await self._close_now(peer, reason, notify=notify, only=only)

    async def _close_now(self, peer: str, reason: str, *, notify: bool,
                         only: LinkInfo | None = None) -> None:
        info = self.links.get(peer)
        if info is None or (only is not None and info is not only):
            return
        del self.links[peer]
        child = self.links_sup.child(link_name(peer))
        rtt = getattr(child, "rtt", None)
        await self.links_sup.stop_child(link_name(peer))
        if notify:
            self._tell_peer_mesh(info.address, LinkClose(self.me, reason))
        self.events.append((trio.current_time(), "close", peer))
        log.info("link closed", extra={"peer": peer, "reason": reason, "links": len(self.links)})
        self._report(peer, "closed", rtt)

    def _tell_peer_mesh(self, address: str, msg: Any) -> bool:
        try:
            self.node.system.ref(MESH_ACTOR, address).tell_nowait(msg)
            return True
        except ActorError as exc:
            log.debug("send to peer failed", extra={"address": address, "error": str(exc)})
            return False

    def _report(self, peer: str, state: str, rtt: float | None = None) -> None:
        """Tell the registry (its peers table) that a link opened, closed or
        failed. An open or close that does not get through (the registry
        unreachable, no leader) is sent again at the next maintenance round,
        the latest state per peer only, until it does: else the table keeps
        links that are gone (or misses ones that are up) for good."""
        body = {"peer": peer, "state": state,
                "rtt_ms": None if rtt is None else round(rtt * 1000, 3)}
        stmt = orjson.dumps(self.node.identity.statement("link", self.me, body)).decode()
        if state in ("open", "closed"):
            self.unreported.pop(peer, None)  # re-inserted last: the oldest go first
            self.unreported[peer] = state  # until the registry took it (or a newer one)
            while len(self.unreported) > KNOWN_LIMIT:
                del self.unreported[next(iter(self.unreported))]

        async def send() -> None:
            try:
                await self.node.registry.ask(LinkReport(stmt), timeout=self.p.request_timeout)
            except Refused as exc:
                if exc.code not in REPLICA_REFUSALS:  # else: again, later
                    self._reported(peer, state)  # taken, or never will be: do not insist
                log.debug("link report refused", extra={"peer": peer, "code": exc.code})
            except ActorError as exc:
                log.debug("link report not delivered", extra={"peer": peer, "error": str(exc)})
            else:
                self._reported(peer, state)

        self.nursery.start_soon(send)

    def _reported(self, peer: str, state: str) -> None:
        if self.unreported.get(peer) == state:
            del self.unreported[peer]

    def _report_again(self) -> None:
        for peer, state in sorted(self.unreported.items()):
            self._report(peer, state)

    # ------------------------------------------------------------ messages

    def _new_id(self) -> str:
        return f"{self.rng.getrandbits(64):016x}"

    def _broadcast(self, payload: str) -> dict[str, Any]:
        msg_id = self._new_id()
        self.seen.add(msg_id, trio.current_time())
        sent = 0
        for peer in sorted(self.links):
            msg = Flood(msg_id, self.me, self.me, self.hops - 1, payload)
            sent += self._tell_peer_mesh(self.links[peer].address, msg)
        log.info("broadcast sent", extra={"msg_id": msg_id, "links": sent})
        return {"id": msg_id, "sent_to": sent}

    def _on_flood(self, msg: Flood) -> None:
        if len(msg.payload) > MAX_PAYLOAD:
            log.warning("flood with an oversized payload dropped",
                        extra={"via": msg.via, "msg_id": msg.msg_id, "bytes": len(msg.payload)})
            return
        if msg.hops_left > (believed := arriving_hops(msg.hops_left, self.hops)):
            msg = attrs.evolve(msg, hops_left=believed)
        now = trio.current_time()
        deliver, forward = flood_step(self.seen, now, self.me, msg.msg_id, msg.origin, msg.via,
                                      msg.hops_left, msg.target, sorted(self.links))
        if deliver:
            self.inbox.add(msg_id=msg.msg_id, origin=msg.origin,
                           kind="broadcast" if msg.target is None else "direct",
                           payload=msg.payload, at=now, hops=self.hops - msg.hops_left)
        relay = attrs.evolve(msg, via=self.me, hops_left=msg.hops_left - 1)
        for peer in forward:
            self._tell_peer_mesh(self.links[peer].address, relay)

    def _on_direct(self, msg: Direct) -> None:
        if msg.target != self.me or len(msg.payload) > MAX_PAYLOAD:
            log.debug("direct message dropped", extra={"origin": msg.origin, "target": msg.target})
            return
        if self.seen.add(msg.msg_id, trio.current_time()):
            self.inbox.add(msg_id=msg.msg_id, origin=msg.origin, kind="direct",
                           payload=msg.payload, at=trio.current_time(), hops=1)

    async def _on_send(self, msg: Send) -> dict[str, Any]:
        target = msg.target
        if target == self.me:
            raise Refused("invalid", "a node does not send to itself")
        msg_id = self._new_id()
        if target not in self.links:
            # All of it within request_timeout (the local API waits longer):
            # a send the client was told timed out must not go out later.
            looked_up = False
            with trio.move_on_after(self.p.request_timeout) as budget:
                if await self.lookup(target) is None:
                    raise Refused("not_found", f"the registry lists no node {target!r}")
                looked_up = True
                # A link on demand only with room for it (else the message is
                # flooded toward its target) and not beside a dial to the
                # target already under way (two would spoil each other's
                # handshake). The dial runs on its own: if it outlasts the
                # budget the message is flooded, and the link still opens.
                if target not in self.dialing and self.occupied < self.p.max_connections:
                    self.dialing[target] = trio.current_time()
                    dialled = trio.Event()
                    self.nursery.start_soon(self._dial_task, target, dialled)
                    await dialled.wait()
            if not looked_up:  # nothing says the target exists: nothing is sent
                raise Refused("unavailable", f"the registry did not say where {target!r} is "
                                             f"within {self.p.request_timeout:g}s")
            if budget.cancelled_caught:
                log.debug("no link to the target in time, flooding",
                          extra={"peer": target, "seconds": self.p.request_timeout})
        info = self.links.get(target)
        if info is not None and self._tell_peer_mesh(
                info.address, Direct(msg_id, self.me, target, msg.payload)):
            return {"id": msg_id, "route": "link"}
        if not self.links:
            raise Refused("unreachable", f"no link to {target!r} could be opened and this node "
                                         "has no links to relay through")
        self.seen.add(msg_id, trio.current_time())
        for peer in sorted(self.links):
            self._tell_peer_mesh(self.links[peer].address,
                                 Flood(msg_id, self.me, self.me, self.hops - 1, msg.payload, target))
        return {"id": msg_id, "route": "flood"}
