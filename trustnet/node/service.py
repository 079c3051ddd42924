"""`trustnet node`: the node process.

The transport (the node's actor system on node.listen_port) starts first,
then the supervision tree (HeartbeatActor registers before the mesh starts),
then the local HTTP API. SIGINT/SIGTERM: the HTTP server stops, then the tree
(links are closed with a LinkClose to each peer), exit 0. A fatal error
(registry unreachable, name refused, a supervisor that gave up): exit 1.
"""

from __future__ import annotations

import logging

import hypercorn.config
import hypercorn.trio
import trio

from actors import ActorSystem
from actors.ws import WebsocketTransport
import os
import ssl

from trustnet.gc_tuning import settle_heap
from trustnet.identity import KEY_FILE, IdentityError, NodeIdentity
from trustnet.logs import hypercorn_logging
from trustnet.signals import watch_signals
from trustnet.tls import client_context

from .config import NodeConfig
from .context import NodeContext, NodeParams
from .http import create_app
from .peer_tls import PeerTLS
from .tree import HEARTBEAT_ACTOR, run_node

log = logging.getLogger("trustnet.node")

EXIT_OK, EXIT_FAILURE = 0, 1


def hypercorn_config(config: NodeConfig) -> hypercorn.config.Config:
    host, port = config.http.host, config.http.port
    hc = hypercorn.config.Config()
    hc.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    hc.graceful_timeout = 5.0
    return hypercorn_logging(hc)


async def serve(config: NodeConfig) -> int:
    try:
        identity = NodeIdentity.load_or_create(config.data_dir)
    except (IdentityError, OSError) as exc:
        log.critical("cannot load the node key", extra={"data_dir": config.data_dir,
                                                        "error": str(exc)})
        return EXIT_FAILURE
    try:
        # A registry with TLS is dialled wss:// and checked against ca_file
        # (else the system's store, read now rather than on the first dial).
        # With peers.tls (the default when the registry is TLS) peers' links
        # are wss:// too, both ends authenticated by their registered keys.
        peer_tls, peer_options = None, {}
        if config.peers_tls:
            peer_tls = PeerTLS(identity, config.node_id, os.path.join(config.data_dir, KEY_FILE),
                               config.advertise_ipv6, config.data_dir)
            peer_options = {"tls_server": peer_tls.server, "tls_pin": peer_tls.pin,
                            "hello_identity": peer_tls.hello,
                            "check_identity": peer_tls.check,
                            # room for the registry lookup of a hello's identity
                            "hello_timeout": config.registry.request_timeout + 2.0}
        transport = WebsocketTransport(
            config.node.listen_host, config.node.listen_port, advertise=config.advertise_ipv6,
            tls_client=client_context(config.registry.ca_file) if config.registry_tls else None,
            **peer_options)
    except (OSError, ssl.SSLError) as exc:
        log.critical("cannot listen for peers", extra={"port": config.node.listen_port,
                                                       "error": str(exc)})
        return EXIT_FAILURE
    system = ActorSystem(transport=transport)
    node = NodeContext(NodeParams.from_config(config, port=transport.port), identity, system)
    if peer_tls is not None:
        peer_tls.node = node
    log.info("node starting", extra={"node_id": node.node_id, "address": system.address,
                                     "public_key": identity.public_key,
                                     "registry": node.registry_address})
    code = EXIT_OK
    shutdown = trio.Event()
    http_started, http_done, tree_done = False, trio.Event(), trio.Event()
    tree_scope = trio.CancelScope()
    # Longer than anything the mesh does for a request (a send that opens a
    # link takes up to request_timeout), so no answer comes after a timeout.
    app = create_app(system.ref("mesh"), system.ref(HEARTBEAT_ACTOR), node.node_id,
                     ask_timeout=max(10.0, node.params.request_timeout + 5.0))

    async def run_tree(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        nonlocal code
        try:
            with tree_scope:
                rc = await run_node(node, task_status=task_status)
                if rc != EXIT_OK:
                    code = rc
        finally:
            shutdown.set()
            tree_done.set()
        try:
            task_status.started()  # it ended before it was ready (fatal at start)
        except RuntimeError:
            pass

    async def stopper() -> None:
        await shutdown.wait()
        if http_started:  # let in-flight requests finish, then stop the actors
            with trio.move_on_after(6.0):
                await http_done.wait()
        tree_scope.cancel()

    async def serve_http(task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await hypercorn.trio.serve(app, hypercorn_config(config),
                                       shutdown_trigger=shutdown.wait, task_status=task_status)
        finally:
            http_done.set()

    async with trio.open_nursery() as nursery:
        await nursery.start(system.serve)
        nursery.start_soon(watch_signals, shutdown, log)
        nursery.start_soon(stopper)
        # The API opens once the node is registered and its mesh runs.
        await nursery.start(run_tree)
        settle_heap()  # see trustnet.gc_tuning
        if not shutdown.is_set():
            try:
                binds = await nursery.start(serve_http)
            except OSError as exc:
                log.critical("cannot listen for the local API",
                             extra={"bind": hypercorn_config(config).bind, "error": str(exc)})
                code = EXIT_FAILURE
                shutdown.set()
            else:
                http_started = True
                log.info("node API listening", extra={"binds": binds, "node_id": node.node_id})
        await shutdown.wait()
        with trio.move_on_after(15.0):
            await tree_done.wait()
            await trio.sleep(0.2)  # let the LinkClose frames to peers go out
        nursery.cancel_scope.cancel()
    log.info("node stopped", extra={"exit_code": code})
    return code
