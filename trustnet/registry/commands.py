"""Registry commands: the entries of the replicated log, and their refusals.

A command is a frozen attrs message with a stable wire tag. Consensus
commits it, then every replica hands it to `RegistryState.apply`, so a
command carries everything apply needs, including every timestamp: apply
never reads a clock. Timestamps are Unix seconds (UTC) as floats.

Commands are not validated when built: a command is data that may have
come from the log of an older or buggier version, and apply is the one
place that decides (deterministically) to refuse it.
"""

from __future__ import annotations

from actors.codec import message, refusal
from actors.errors import Refused

__all__ = [
    "AddPeer",
    "CheckpointLeases",
    "Command",
    "Conflict",
    "CreateDomain",
    "DeleteNode",
    "ExpireNodes",
    "Invalid",
    "LeaseEntry",
    "NotFound",
    "RegisterNode",
    "ReleaseIdentity",
    "RemovePeer",
    "ReputationEntry",
    "SetReputation",
]


# ------------------------------------------------------------------ refusals


@refusal
class NotFound(Refused):
    """The node, domain or peer link named by the command does not exist."""

    def __init__(self, message: str, details: dict | None = None):
        super().__init__("not_found", message, details)


@refusal
class Conflict(Refused):
    """The command collides with existing state; code "ipv6_taken" or "domain_exists"."""

    def __init__(self, code: str, message: str, details: dict | None = None):
        super().__init__(code, message, details)


@refusal
class Invalid(Refused):
    """A field of the command is malformed (defence in depth behind the HTTP layer)."""

    def __init__(self, message: str, details: dict | None = None):
        super().__init__("invalid", message, details)


# ------------------------------------------------------------------ commands


@message("registry.register_node")
class RegisterNode:
    """Register a node, or update it if its id is known.

    A domain named for the first time is created. `public_key=None` keeps
    the key already registered (a re-registration need not repeat it).
    Registering counts as a heartbeat at `at`.
    """

    node_id: str
    ipv6: str
    port: int
    domain: str
    at: float
    lease_deadline: float
    public_key: str | None = None


@message("registry.delete_node")
class DeleteNode:
    node_id: str


@message("registry.create_domain")
class CreateDomain:
    name: str
    at: float


@message("registry.add_peer")
class AddPeer:
    """Record a link between two nodes; the pair is unordered."""

    node_a: str
    node_b: str
    at: float


@message("registry.remove_peer")
class RemovePeer:
    node_a: str
    node_b: str


@message("registry.expire_nodes")
class ExpireNodes:
    """Remove the nodes whose lease the leader saw run out; absent ids are skipped.

    `term` (replicated mode: the proposing leader's term, > 0) also skips a
    node whose stored lease deadline is after `at`: a registration or lease
    checkpoint committed after the leader decided, which it did not see (a
    deposed or stalled leader's expiry never evicts a renewed node)."""

    node_ids: tuple[str, ...]
    at: float
    term: int = 0


@message("registry.lease_entry")
class LeaseEntry:
    node_id: str
    deadline: float
    last_heartbeat: float


@message("registry.checkpoint_leases")
class CheckpointLeases:
    """Persist the leader's in-memory leases, so a new leader starts from them.

    `at` (the leader's clock; 0 in entries written before it existed) is the
    registry's pulse: a leader checkpoints at least every checkpoint interval
    while it holds leases, so a new leader that finds the last pulse long ago
    knows the whole group was down (or had no leader) for that long, and that
    nodes could not heartbeat meanwhile."""

    entries: tuple[LeaseEntry, ...]
    at: float = 0.0


@message("registry.release_identity")
class ReleaseIdentity:
    """An administrator frees a name from the key it was bound to."""

    node_id: str


@message("registry.reputation_entry")
class ReputationEntry:
    node_id: str
    reputation: float


@message("registry.set_reputation")
class SetReputation:
    """Persist reputations the leader computed (unknown ids are skipped)."""

    entries: tuple[ReputationEntry, ...]


Command = (
    RegisterNode | DeleteNode | CreateDomain | AddPeer | RemovePeer | ExpireNodes
    | CheckpointLeases | ReleaseIdentity | SetReputation
)
