"""The wire contract between a node and the registry (over the actor link).

A node reaches the registry's "registry" actor at the registry's websocket
address (``ws://[addr]:8001`` by default) and speaks these messages. What a
node says about itself travels as a signed statement (trustnet.identity):
the JSON text of ``{purpose, node_id, ts, nonce, body, sig}``, carried as a
string so the registry verifies exactly the bytes that were signed.

| message            | statement purpose | body                                              | answer |
| ---                | ---               | ---                                               | ---    |
| SignedRegister     | "register"        | {"ipv6", "port", "domain", "public_key"}          | {"node": node, "heartbeat_interval", "ttl"} |
| SignedHeartbeat    | "heartbeat"       | {}                                                | {"node_id", "lease_deadline", "ttl"} |
| OpenSession        | "session"         | {"share": X25519 public key, base64url}           | {"session", "share", "node_id", "lease_deadline", "ttl"} |
| SessionHeartbeat   | (MAC'd, see below)| session, counter, mac                             | {"node_id", "lease_deadline", "ttl"} |
| LinkReport         | "link"            | {"peer", "state": "open"/"closed"/"failed", "rtt_ms": float or null} | {"ok": true} |
| Candidates         | (not signed)      |                                                   | {"peers": [{"id", "ipv6", "port", "domain", "public_key", "reputation"}]} |
| GetNode            | (registry.messages.GetNode: a node's public key for the link handshake) |

A node heartbeats through a session (trustnet.registry.sessions): it opens
one with a signed OpenSession, which also renews its lease, both ends derive
a key from the two X25519 shares (identity.session_key), and each
SessionHeartbeat carries a counter above the last one and
identity.session_mac(key, session, counter). "no_session" (the registry
restarted, leadership moved, or the lease lapsed) and "bad_session" (a MAC or
counter that did not verify) mean: open a new session. SignedHeartbeat, one
signature per heartbeat, is still accepted.

Refusals (actors.Refused, codes): "not_found" (unknown node or lease
expired: register again), "bad_statement" (malformed, stale, replayed or not
signed by the key the name is bound to), "name_taken" (the name is bound to
another key; an administrator must release it), "ipv6_taken", "invalid".
"""

from __future__ import annotations

from actors.codec import message


@message("registry.node.register")
class SignedRegister:
    statement: str


@message("registry.node.heartbeat")
class SignedHeartbeat:
    statement: str


@message("registry.node.link_report")
class LinkReport:
    statement: str


@message("registry.node.candidates")
class Candidates:
    node_id: str
    limit: int = 20


@message("registry.node.open_session")
class OpenSession:
    """`forwarded`: sent on by a follower replica to the leader (which keeps
    leases and sessions); a replica that does not lead refuses it."""

    statement: str
    forwarded: bool = False


@message("registry.node.session_heartbeat")
class SessionHeartbeat:
    session: str
    counter: int
    mac: str
    forwarded: bool = False
