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


# No key is known for the address: actors.ws then accepts no certificate.
NO_PIN = b""


class PeerTLS:
    def __init__(self, identity: NodeIdentity, node_id: str, key_file: str, ipv6: str,
                 data_dir: str):
        """OSError or ssl.SSLError if the certificate cannot be written or loaded."""
        self.identity = identity
        self.node_id = node_id
        self.server: ssl.SSLContext = peer_server_context(identity.private_key, key_file,
                                                          node_id, ipv6, data_dir)
        self.node: NodeContext | None = None  # set once the node's context exists
        self.checking = 0  # hellos whose identity is being checked

    def _mesh(self):  # the current MeshActor, None before it started
        return self.node.actors.get("mesh") if self.node is not None else None

    def _is_registry(self, address: str) -> bool:
        return self.node is not None and address in self.node.registry_addresses

    def _key_at(self, address: str) -> str | None:
        mesh = self._mesh()
        return mesh.key_at(address) if mesh is not None else None

    def pin(self, address: str) -> bytes | None:
        """The key a wss:// peer's certificate must carry: the one of the node
        this node dials there or has a link with (MeshActor.key_at). A
        registry replica's certificate is checked against its CA instead
        (None). Any other address gets a pin nothing matches: a TLS dial to
        a node this node cannot name fails, rather than fall back to a CA."""
        if self._is_registry(address):
            return None
        key = self._key_at(address)
        try:
            return peer_pin(key) if key else NO_PIN
        except ValueError:
            return NO_PIN

    def hello(self, to: str) -> dict | None:
        """What a hello to `to` carries: this node's signature, bound to the
        key pinned there (so only that node can check it); nothing to a
        registry replica."""
        if self._is_registry(to):
            return None
        assert self.node is not None, "dialling before the node's context exists"
        return hello_identity(self.identity, self.node_id, self.node.system.address, to,
                              self._key_at(to) or "", time.time())

    async def check(self, address: str, ident: object) -> None:
        """ProtocolError unless the hello's identity is the signature, for
        this node, of the node the registry lists at `address`. Each costs a
        registry lookup: at most 2 x max_connections at a time."""
        try:
            peer = hello_node(ident)
        except ValueError as exc:
            raise ProtocolError(str(exc)) from None
        mesh = self._mesh()
        if mesh is None or self.node is None:
            raise ProtocolError("this node is not taking links yet")
        if self.checking >= 2 * self.node.params.max_connections:
            raise ProtocolError(f"busy: {self.checking} hellos are being checked")
        self.checking += 1
        try:
            await self._check(mesh, peer, address, ident)  # type: ignore[arg-type]
        finally:
            self.checking -= 1

    async def _check(self, mesh, peer: str, address: str, ident: dict) -> None:
        assert self.node is not None
        known = await mesh.lookup(peer)
        if known is None:
            raise ProtocolError(f"the registry lists no node {peer!r}")
        if known["address"] != address:
            raise ProtocolError(f"the registry lists {peer!r} at {known['address']}, "
                                f"not {address}")
        try:
            check_hello_identity(known.get("public_key"), ident, address,
                                 self.node.system.address, self.identity.public_key,
                                 time.time(), MAX_SKEW)
        except ValueError as exc:
            raise ProtocolError(str(exc)) from None
