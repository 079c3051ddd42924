"""Messages between nodes (peer links, mesh traffic) and inside a node.

Wire messages between nodes carry stable ``node.*`` tags. Payloads travel as
JSON text (``payload``) so the codec stays strict and any JSON value works.
"""

from __future__ import annotations

from actors.codec import message

# ------------------------------------------------------------ link handshake
# A (dialler) -> B's "mesh": LinkHello; B answers LinkChallenge.
# A -> B's "mesh": LinkProof; B answers {"ok": true} or refuses.


@message("node.link.hello")
class LinkHello:
    node_id: str      # the dialler's name
    address: str      # where the dialler's actors are reached
    target: str       # the name the dialler expects to reach
    challenge: str    # random, hex; the acceptor signs it
    links: int = 0    # how many links the dialler has: one with none gets room


@message("node.link.challenge")
class LinkChallenge:
    node_id: str      # the acceptor's name
    signature: str    # acceptor's signature over the dialler's challenge
    challenge: str    # random, hex; the dialler signs it


@message("node.link.proof")
class LinkProof:
    node_id: str
    target: str
    signature: str


@message("node.link.close")
class LinkClose:
    node_id: str
    reason: str


@message("node.link.ping")
class Ping:
    node_id: str
    seq: int


@message("node.link.pong")
class Pong:
    seq: int


# ------------------------------------------------------------ mesh traffic

@message("node.mesh.flood")
class Flood:
    """A broadcast (target None) or a flood-routed direct message."""

    msg_id: str
    origin: str
    via: str          # the linked peer that forwarded it to us
    hops_left: int
    payload: str      # JSON text
    target: str | None = None


@message("node.mesh.direct")
class Direct:
    """A direct message over a link between origin and target."""

    msg_id: str
    origin: str
    target: str
    payload: str


# ------------------------------------------------------------ local (API -> actors)

@message("node.local.broadcast", local=True)
class Broadcast:
    payload: str


@message("node.local.send", local=True)
class Send:
    target: str
    payload: str


@message("node.local.inbox", local=True)
class GetInbox:
    since: int = 0
    limit: int = 100


@message("node.local.peers", local=True)
class GetPeers:
    pass


@message("node.local.link_lost", local=True)
class LinkLost:
    peer: str
    reason: str
    serial: int  # which link to `peer`: a replaced one's report must not close its successor


@message("node.local.heartbeat_status", local=True)
class HeartbeatStatus:
    pass


@message("node.local.report_links", local=True)
class ReportLinks:
    """Heartbeat -> mesh after registering again: the registry dropped this
    node's rows of the peers table with its lapsed lease; report every open
    link again."""
