"""What every actor of a node shares: its parameters, identity and actor system."""

from __future__ import annotations

import logging
import random
from typing import Any

import attrs
import trio

from actors import ActorSystem, Ref
from actors.ws import format_address, normalize_address
from trustnet.identity import NodeIdentity

# The registry refuses with its own Refused subclasses (NotFound, Conflict,
# Invalid, BadStatement). Importing them registers them with the codec, so a
# node gets them back as Refused with their codes ("not_found": register
# again, "name_taken": fatal), not as an opaque RemoteError.
import trustnet.registry.commands  # noqa: F401
import trustnet.registry.nodes  # noqa: F401

log = logging.getLogger("trustnet.node")

REGISTRY_ACTOR = "registry"


class NodeFatal(Exception):
    """The node cannot go on (registry unreachable, name refused): exit 1."""


@attrs.frozen
class NodeParams:
    node_id: str
    ipv6: str
    port: int
    registry_address: str                # ws://[addr]:port of the registry's actors
    domain: str = "default"
    heartbeat_interval: float = 30.0
    startup_timeout: float = 30.0
    unreachable_timeout: float = 120.0
    request_timeout: float = 5.0
    max_connections: int = 10
    peer_timeout: float = 60.0
    rotate_interval: float = 300.0
    maintain_interval: float | None = None  # default: min(5 s, ping interval)
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    seed: int | None = None              # set in simulations: every choice replays
    # More replicas of a replicated registry, tried in turn when the current
    # one stops answering (registry.ws lists them, comma-separated).
    registry_fallbacks: tuple[str, ...] = ()
    peer_scheme: str = "ws"              # "wss": links to peers over TLS (peers.tls)

    @property
    def ping_interval(self) -> float:
        return self.peer_timeout / 3

    @property
    def maintain_every(self) -> float:
        return self.maintain_interval or min(5.0, self.ping_interval)

    @classmethod
    def from_config(cls, config: Any, port: int | None = None) -> "NodeParams":
        return cls(node_id=config.node_id, ipv6=config.advertise_ipv6,
                   port=config.node.listen_port if port is None else port,
                   registry_address=config.registry_addresses[0],
                   registry_fallbacks=config.registry_addresses[1:],
                   domain=config.node.domain,
                   heartbeat_interval=config.registry.heartbeat_interval,
                   startup_timeout=config.registry.startup_timeout,
                   unreachable_timeout=config.registry.unreachable_timeout,
                   request_timeout=config.registry.request_timeout,
                   max_connections=config.peers.max_connections,
                   peer_timeout=config.peers.peer_timeout,
                   rotate_interval=config.peers.rotate_interval,
                   peer_scheme="wss" if config.peers_tls else "ws")


def node_address(node: dict[str, Any], scheme: str = "ws") -> str:
    """Where a node (as the registry lists it) is reached: ws://[ipv6]:port
    (wss:// when the mesh's links are TLS)."""
    return normalize_address(format_address(str(node["ipv6"]), int(node["port"]), scheme))


# What a registry replica answers when it cannot serve a node now (cut off
# from a majority, no leader, a leader change under way): another replica
# may, and the same request later may go through.
REPLICA_REFUSALS = frozenset({"no_leader", "not_leader", "commit_unknown", "not_committed",
                              "unavailable"})


@attrs.define
class NodeContext:
    params: NodeParams
    identity: NodeIdentity
    system: ActorSystem
    fatal_event: trio.Event = attrs.field(factory=trio.Event)
    fatal_reason: str | None = None
    # The current instance of each named actor (set in on_start): introspection, tests.
    actors: dict[str, Any] = attrs.field(factory=dict)
    registry_index: int = 0  # which of the registry's addresses is in use
    # What outlives a restart of the actor that keeps it (the mesh's inbox and
    # seen floods): name -> object.
    kept: dict[str, Any] = attrs.field(factory=dict)

    @property
    def node_id(self) -> str:
        return self.params.node_id

    @property
    def registry_addresses(self) -> tuple[str, ...]:
        return (self.params.registry_address, *self.params.registry_fallbacks)

    @property
    def registry_address(self) -> str:
        return self.registry_addresses[self.registry_index]

    @property
    def registry(self) -> Ref:
        return self.system.ref(REGISTRY_ACTOR, self.registry_address)

    def next_registry(self, error: str) -> None:
        """The current registry replica did not answer, or cannot serve us
        now (no leader where it is): use the next one (any replica serves a
        node: it forwards to the leader)."""
        addresses = self.registry_addresses
        if len(addresses) < 2:
            return
        before = self.registry_address
        self.registry_index = (self.registry_index + 1) % len(addresses)
        log.warning("registry replica not answering, trying the next",
                    extra={"registry": before, "next": self.registry_address, "error": error})

    def rng(self, purpose: str) -> random.Random:
        """Seeded in simulations; the OS's randomness in a real node."""
        if self.params.seed is None:
            return random.SystemRandom()
        return random.Random(f"{purpose}:{self.params.seed}:{self.node_id}")

    def fatal(self, reason: str, **extra: Any) -> None:
        if self.fatal_reason is None:
            log.critical(reason, extra={"node_id": self.node_id, **extra})
            self.fatal_reason = reason
        self.fatal_event.set()
