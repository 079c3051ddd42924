"""TLS between nodes (peers.tls): what a node's transport is given.

Each node serves wss:// with a certificate it signs itself for its identity
key; a dialler pins the key the registry lists for the node at the address
it dials (`pin`), and puts in its hello a signature by its own key over both
addresses and the time (`hello`), which the acceptor checks against the key
the registry lists for the node the hello names, at the address the
connection claims (`check`). Both ends of every connection are then the
nodes the registry says, before any mesh message crosses it; the link
handshake (handshake.py) then binds the link to both names as before.
"""

from __future__ import annotations

import ssl
import time

from actors import ProtocolError
from trustnet.identity import MAX_SKEW, NodeIdentity
from trustnet.tls import peer_pin, peer_server_context

from .context import NodeContext
from .handshake import check_hello_identity, hello_identity, hello_node


class PeerTLS:
    def __init__(self, identity: NodeIdentity, node_id: str, key_file: str, ipv6: str,
                 data_dir: str):
        """OSError or ssl.SSLError if the certificate cannot be written or loaded."""
        self.identity = identity
        self.node_id = node_id
        self.server: ssl.SSLContext = peer_server_context(identity.private_key, key_file,
                                                          node_id, ipv6, data_dir)
        self.node: NodeContext | None = None  # set once the node's context exists

    def _mesh(self):  # the current MeshActor, None before it started
        return self.node.actors.get("mesh") if self.node is not None else None

    def pin(self, address: str) -> bytes | None:
        """The key a peer's certificate must carry: the one the registry lists
        for the node at `address` (None: not a known peer, so the transport
        checks the certificate against the CA, which a node's fails)."""
        mesh = self._mesh()
        key = mesh.key_at(address) if mesh is not None else None
        try:
            return peer_pin(key) if key else None
        except ValueError:
            return None

    def hello(self, to: str) -> dict:
        assert self.node is not None, "dialling before the node's context exists"
        return hello_identity(self.identity, self.node_id, self.node.system.address, to,
                              time.time())

    async def check(self, address: str, ident: object) -> None:
        """ProtocolError unless the hello's identity is the signature of the
        node the registry lists at `address`."""
        try:
            peer = hello_node(ident)
        except ValueError as exc:
            raise ProtocolError(str(exc)) from None
        mesh = self._mesh()
        if mesh is None or self.node is None:
            raise ProtocolError("this node is not taking links yet")
        known = await mesh.lookup(peer)
        if known is None:
            raise ProtocolError(f"the registry lists no node {peer!r}")
        if known["address"] != address:
            raise ProtocolError(f"the registry lists {peer!r} at {known['address']}, "
                                f"not {address}")
        try:
            check_hello_identity(known.get("public_key"), ident, address,  # type: ignore[arg-type]
                                 self.node.system.address, time.time(), MAX_SKEW)
        except ValueError as exc:
            raise ProtocolError(str(exc)) from None
