"""Node configuration: ``node.yaml`` plus environment overrides (record, section 8).

    node:     id, listen_host, listen_port, advertise, data_dir, domain
    registry: url, ws (one address, or the replicas' separated by commas;
              wss:// for a registry with TLS), ca_file (what its certificate
              is checked against), heartbeat_interval, startup_timeout,
              unreachable_timeout
    peers:    max_connections, peer_timeout, rotate_interval, tls (links to
              peers over wss://, each node's self-signed certificate pinned
              to the key the registry lists for it; default: when the
              registry is wss://)
    http:     host, port (the local API)
    logging:  level, format

Errors are :class:`trustnet.config.ConfigError` (one line naming source and
field); the CLI prints them and exits 2.
"""

from __future__ import annotations

import os
import re
import types
from collections.abc import Mapping

import attrs

from trustnet.addressing import canonical_ipv6, ula_for
from trustnet.config import (
    ConfigError,
    Duration,
    IPHost,
    ListenPort,
    LoggingConfig,
    NonEmptyStr,
    PositiveInt,
    load_config,
)

__all__ = ["NODE_ENV_VARS", "NodeConfig", "load_node_config"]

NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
NODE_NAME_RULE = "1-64 characters: letters, digits, '.', '_' or '-', starting with a letter or digit"


@attrs.frozen
class NodeSection:
    id: str | None = None
    listen_host: IPHost = IPHost("::")
    listen_port: ListenPort = ListenPort(9000)
    advertise: NonEmptyStr = NonEmptyStr("::1")  # an IPv6 address, or "ula"
    data_dir: NonEmptyStr = NonEmptyStr("~/.trustnet")
    domain: NonEmptyStr = NonEmptyStr("default")


@attrs.frozen
class RegistrySection:
    url: NonEmptyStr = NonEmptyStr("http://[::1]:8000")
    ws: NonEmptyStr = NonEmptyStr("ws://[::1]:8001")
    heartbeat_interval: Duration = Duration(30.0)
    startup_timeout: Duration = Duration(30.0)
    unreachable_timeout: Duration = Duration(120.0)
    request_timeout: Duration = Duration(5.0)
    # What a wss:// registry's certificate is checked against (PEM); None:
    # the system's trust store.
    ca_file: NonEmptyStr | None = None


@attrs.frozen
class PeersSection:
    max_connections: PositiveInt = PositiveInt(10)
    peer_timeout: Duration = Duration(60.0)
    rotate_interval: Duration = Duration(300.0)
    # Links to peers over TLS (wss://); None: when the registry is wss://.
    # Every node of a mesh must agree (the scheme is part of each address).
    tls: bool | None = None


@attrs.frozen
class NodeHttpSection:
    host: IPHost = IPHost("::1")
    port: ListenPort = ListenPort(9100)


@attrs.frozen
class NodeConfig:
    node: NodeSection = attrs.field(factory=NodeSection)
    registry: RegistrySection = attrs.field(factory=RegistrySection)
    peers: PeersSection = attrs.field(factory=PeersSection)
    http: NodeHttpSection = attrs.field(factory=NodeHttpSection)
    logging: LoggingConfig = attrs.field(factory=LoggingConfig)

    @property
    def node_id(self) -> str:
        assert self.node.id is not None
        return self.node.id

    @property
    def advertise_ipv6(self) -> str:
        """The IPv6 address peers and the registry reach this node at."""
        if self.node.advertise.strip().lower() == "ula":
            return str(ula_for(self.node_id))
        return canonical_ipv6(self.node.advertise)

    @property
    def data_dir(self) -> str:
        return os.path.expanduser(self.node.data_dir)

    @property
    def ping_interval(self) -> float:
        return self.peers.peer_timeout / 3

    @property
    def registry_addresses(self) -> tuple[str, ...]:
        """registry.ws: one websocket address, or a replicated registry's
        replicas separated by commas (tried in turn), normalized.
        ValueError if one is not a ws:// (or wss://) address."""
        from actors.ws import normalize_address
        return tuple(normalize_address(part.strip()) for part in self.registry.ws.split(","))

    @property
    def registry_tls(self) -> bool:
        """Whether the registry is dialled over TLS (its addresses are wss://)."""
        from actors.ws import is_tls
        return any(is_tls(address) for address in self.registry_addresses)

    @property
    def peers_tls(self) -> bool:
        """Whether links to peers are TLS (peers.tls, else as the registry)."""
        return self.registry_tls if self.peers.tls is None else self.peers.tls


NODE_ENV_VARS: Mapping[str, str] = types.MappingProxyType({
    "NODE_NAME": "node.id",
    "NODE_LISTEN_PORT": "node.listen_port",
    "NODE_ADVERTISE": "node.advertise",
    "NODE_DATA_DIR": "node.data_dir",
    "REGISTRY_URL": "registry.url",
    "REGISTRY_WS": "registry.ws",
    "REGISTRY_CA_FILE": "registry.ca_file",
    "PEERS_TLS": "peers.tls",
    "NODE_HTTP_PORT": "http.port",
    "LOG_LEVEL": "logging.level",
    "LOG_FORMAT": "logging.format",
})


def _source(path: str | os.PathLike[str] | None, env: Mapping[str, str], field: str) -> str:
    for var, dotted in NODE_ENV_VARS.items():
        if dotted == field and var in env:
            return f"environment variable {var}"
    return os.fspath(path) if path is not None else "<defaults>"


def load_node_config(path: str | os.PathLike[str] | None, env: Mapping[str, str]) -> NodeConfig:
    """Load and check the node config; ConfigError names file/variable and field."""
    config = load_config(NodeConfig, path, env, NODE_ENV_VARS)

    def fail(field: str, problem: str) -> ConfigError:
        return ConfigError(_source(path, env, field), field, problem)

    node_id = config.node.id
    if node_id is None:
        raise fail("node.id", "required: set node.id in the file or NODE_NAME")
    if not isinstance(node_id, str) or not NODE_NAME.fullmatch(node_id):
        raise fail("node.id", f"{node_id!r} is not a valid node id: {NODE_NAME_RULE}")
    if config.node.listen_port == 0 and config.node.advertise:
        pass  # port 0 (tests): the transport picks one and registers what it got
    try:
        config.advertise_ipv6
    except ValueError as exc:
        raise fail("node.advertise", f"must be an IPv6 address or 'ula': {exc}") from None
    try:
        config.registry_addresses
    except ValueError:
        raise fail("registry.ws", "must be a ws://[addr]:port (or wss:// for a registry with "
                                  "TLS) address, or several separated by commas, got "
                                  f"{config.registry.ws!r}") from None
    from actors.ws import is_tls
    if len({is_tls(address) for address in config.registry_addresses}) > 1:
        raise fail("registry.ws", "mixes ws:// and wss:// addresses: the replicas of a "
                                  f"registry all serve TLS or none do, got {config.registry.ws!r}")
    if config.registry.ca_file is not None:
        from trustnet.tls import client_context
        if not config.registry_tls:
            raise fail("registry.ca_file", "is only used for a wss:// registry (registry.ws "
                                           f"is {config.registry.ws!r})")
        try:
            client_context(config.registry.ca_file)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise fail("registry.ca_file", "cannot load CA certificates from "
                                           f"{config.registry.ca_file!r}: {exc}") from None
    if not re.match(r"^https?://", config.registry.url):
        raise fail("registry.url", f"must be an http:// or https:// URL, got {config.registry.url!r}")
    if config.registry.unreachable_timeout < config.registry.heartbeat_interval:
        raise fail("registry.unreachable_timeout",
                   "must be at least registry.heartbeat_interval "
                   f"({config.registry.heartbeat_interval}s)")
    return config
