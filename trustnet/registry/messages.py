"""What callers ask the RegistryActor: typed messages with stable wire tags.

The HTTP routes ask these in the registry's own process. The writes (all
behind the API key when one is set) are local (`message(..., local=True)`):
refused from the network, so a process that reaches the actor port cannot
skip the key. Reads are open, as over HTTP (a node asks GetNode for a
peer's key). Nodes write with node_protocol's signed messages; replicas
forward heartbeats as LeaderHeartbeat. The actor turns writes into registry
commands (commands.py), stamping the time, so `apply` itself stays
deterministic.
"""

from __future__ import annotations

from actors.codec import message

DEFAULT_PORT = 9000
DEFAULT_DOMAIN = "default"
# In replicated mode a write's answer carries [index, term] of the log entry
# it was committed in under this key (the HTTP facade moves it to X-Raft-*).
RAFT_POSITION = "raft"


@message("registry.req.register", local=True)
class Register:
    node_id: str
    ipv6: str
    port: int = DEFAULT_PORT
    domain: str = DEFAULT_DOMAIN
    public_key: str | None = None  # set for signed registrations: binds the name
    request_id: str = ""  # client session id (replicated mode): a retried write applies once


@message("registry.req.deregister", local=True)
class Deregister:
    node_id: str
    request_id: str = ""  # client session id (replicated mode): a retried write applies once


@message("registry.req.heartbeat", local=True)
class Heartbeat:
    node_id: str


@message("registry.req.get_node")
class GetNode:
    node_id: str


@message("registry.req.list_nodes")
class ListNodes:
    domain: str | None = None
    limit: int = 100
    after: str | None = None
    encoded: bool = False  # answer with the page as JSON bytes (what the HTTP API sends)


@message("registry.req.list_domains")
class ListDomains:
    pass


@message("registry.req.create_domain", local=True)
class CreateDomainReq:
    name: str
    request_id: str = ""  # client session id (replicated mode): a retried write applies once


@message("registry.req.list_peers")
class ListPeers:
    node_id: str | None = None


@message("registry.req.add_peer", local=True)
class AddPeerReq:
    node_a: str
    node_b: str
    request_id: str = ""  # client session id (replicated mode): a retried write applies once


@message("registry.req.remove_peer", local=True)
class RemovePeerReq:
    node_a: str
    node_b: str
    request_id: str = ""  # client session id (replicated mode): a retried write applies once


@message("registry.req.status")
class Status:
    pass


@message("registry.req.reputation")
class ReputationOf:
    node_id: str


@message("registry.req.release_name", local=True)
class ReleaseName:
    """Admin: free a name from its key (the API key guards the route)."""

    node_id: str
    request_id: str = ""  # client session id (replicated mode): a retried write applies once


@message("registry.req.leader_heartbeat", trusted=True)
class LeaderHeartbeat:
    """A follower's RegistryActor forwards a node's heartbeat to the leader's
    (leases live on the leader). `statement` set: a signed heartbeat. A
    receiver that does not lead refuses with "not_leader" (never forwards)."""

    node_id: str = ""
    statement: str = ""


@message("registry.req.reported_link", trusted=True)
class ReportedLink:
    """A follower's RegistryActor tells the leader's what a node's link
    report said, once the report is verified and its peers-table change
    committed: reputation is kept on the leader, which checkpoints it."""

    peer: str
    state: str

