"""PeerLinkActor: one authenticated link to one peer (a child of the links supervisor).

The MeshActor starts it once the challenge–response succeeded and stops it.
It pings the peer's link actor for us ("link:<our id>" at the peer's address)
every peer_timeout/3; three missed pongs in a row (or a peer that no longer
has a link for us) and it tells the mesh the link is lost; the mesh stops it,
reports the link closed and replaces it.
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from actors import Actor, ActorError, ActorNotFound, Ref

from .context import NodeContext
from .messages import LinkLost, Ping, Pong

log = logging.getLogger("trustnet.node.link")

MISSED_PONGS = 3


def link_name(peer: str) -> str:
    return f"link:{peer}"


class PeerLinkActor(Actor):
    def __init__(self, node: NodeContext, mesh: Ref, peer: str, address: str, direction: str,
                 serial: int):
        self.node = node
        self.serial = serial
        self.mesh = mesh
        self.peer = peer
        self.address = address
        self.direction = direction
        self.rtt: float | None = None
        self.misses = 0
        self.lost = False

    async def on_start(self) -> None:
        self.remote = self.node.system.ref(link_name(self.node.node_id), self.address)
        self.nursery.start_soon(self._ping_loop)

    async def receive(self, msg: Any) -> Any:
        if isinstance(msg, Ping):
            return Pong(msg.seq)
        return await super().receive(msg)

    async def _ping_loop(self) -> None:
        interval = self.node.params.ping_interval
        seq = 0
        next_at = trio.current_time() + interval
        while not self.lost:
            await trio.sleep_until(next_at)
            next_at += interval
            seq += 1
            sent = trio.current_time()
            try:
                await self.remote.ask(Ping(self.node.node_id, seq), timeout=interval)
            except ActorNotFound:
                await self._lose("peer has no link to us")
            except ActorError as exc:
                self.misses += 1
                log.debug("pong missed", extra={"peer": self.peer, "misses": self.misses,
                                                "error": str(exc)})
                if self.misses >= MISSED_PONGS:
                    await self._lose(f"{MISSED_PONGS} missed pongs")
            else:
                self.misses = 0
                self.rtt = trio.current_time() - sent
            next_at = max(next_at, trio.current_time())

    async def _lose(self, reason: str) -> None:
        self.lost = True
        log.warning("peer link lost", extra={"peer": self.peer, "reason": reason})
        try:
            # Waits while the mesh's mailbox is full (a flood can fill it):
            # dropped, the dead link would stay counted and fed forever.
            await self.mesh.tell(LinkLost(self.peer, reason, self.serial))
        except ActorError as exc:
            log.debug("mesh not told of lost link", extra={"peer": self.peer, "error": str(exc)})
