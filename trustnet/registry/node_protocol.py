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
| LinkReport         | "link"            | {"peer", "state": "open"/"closed"/"failed", "rtt_ms": float or null} | {"ok": true} |
| Candidates         | (not signed)      |                                                   | {"peers": [{"id", "ipv6", "port", "domain", "public_key", "reputation"}]} |
| GetNode            | (registry.messages.GetNode: a node's public key for the link handshake) |

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
