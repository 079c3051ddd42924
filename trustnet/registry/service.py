"""`trustnet registry`: the registry process.

The RegistryActor runs under a supervisor; the HTTP server runs beside it.
SIGINT/SIGTERM stop the HTTP server gracefully (in-flight requests finish),
then the supervisor stops the actors in reverse start order. A supervisor that
gives up, or a database that cannot be opened, ends the process with exit 1.

With replication.enabled the process is one replica of a Raft group: it opens
the Raft log (raft.db beside the registry database) and supervises
"consensus" (ConsensusActor) before "registry" (RegistryActor in replicated
mode) on the same websocket transport, so listen.ws_port carries both Raft
traffic and nodes' links. On SIGTERM the registry stops first, then the
consensus actor hands leadership over (on_stop) before the process exits 0.
"""

from __future__ import annotations

import logging
import os

import hypercorn.config
import hypercorn.trio
import trio

from actors import ActorSystem, ChildSpec, Restart, Supervisor, run_root
from actors.ws import WebsocketTransport
from trustnet.config import RegistryConfig, replica_addresses
from trustnet.consensus.actor import ConsensusActor, ConsensusConfig
from trustnet.consensus.core import RaftConfig
from trustnet.gc_tuning import settle_heap
from trustnet.consensus.replica import ReplicaSpec, open_stores
from trustnet.logs import hypercorn_logging
from trustnet.signals import watch_signals
from trustnet.tls import client_context, server_context

from .actor import RegistryActor
from .http import create_app
from .state import RegistryState, StorageError

log = logging.getLogger("trustnet.registry")

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2


def registry_supervisor(system: ActorSystem, state: RegistryState,
                        config: RegistryConfig, replica: ReplicaSpec | None = None,
                        storage: object = None) -> Supervisor:
    def start() -> RegistryActor:
        return RegistryActor(state, ttl=config.leases.ttl,
                             checkpoint_interval=config.leases.checkpoint_interval,
                             heartbeat_interval=config.leases.heartbeat_interval,
                             consensus=system.ref("consensus") if replica is not None else None)

    children = [ChildSpec("registry", start, Restart.PERMANENT, mailbox_size=10_000)]
    if replica is not None:
        def start_consensus() -> ConsensusActor:
            return ConsensusActor(replica.id, voters=replica.voters, addresses=replica.addresses,
                                  storage=storage, state=state, config=replica.config)

        children.insert(0, ChildSpec("consensus", start_consensus, Restart.PERMANENT,
                                     mailbox_size=10_000))
    return Supervisor(system, "registry-root", children, intensity=5, period=30.0)


def replica_spec(config: RegistryConfig) -> ReplicaSpec:
    r = config.replication
    addresses = replica_addresses(config)
    raft_path = os.path.join(os.path.dirname(config.database.path) or ".", "raft.db")
    consensus = ConsensusConfig(
        tick=r.tick, raft=RaftConfig(heartbeat_ticks=r.heartbeat_ticks,
                                     election_ticks=r.election_ticks),
        snapshot_threshold=r.snapshot_threshold)
    # A joining replica founds nothing: its members come from the leader's
    # log once an administrator adds it (POST /cluster/members).
    voters = () if r.join else tuple(sorted(addresses))
    return ReplicaSpec(id=r.id, addresses=addresses, registry_path=config.database.path,
                       raft_path=raft_path, voters=voters, config=consensus)


def hypercorn_config(config: RegistryConfig) -> hypercorn.config.Config:
    host = config.listen.host
    hc = hypercorn.config.Config()
    hc.bind = [f"[{host}]:{config.listen.port}" if ":" in host else f"{host}:{config.listen.port}"]
    hc.graceful_timeout = 5.0
    hc.keep_alive_timeout = 75.0
    if config.tls.enabled:  # https:// (hypercorn builds its context from the files)
        hc.certfile, hc.keyfile = config.tls.cert_file, config.tls.key_file
    return hypercorn_logging(hc)


async def serve(config: RegistryConfig) -> int:
    if config.replication.enabled:
        return await _serve_replica(config)
    try:
        state = RegistryState.open(config.database.path)
    except StorageError as exc:
        log.critical("cannot open the registry database",
                     extra={"path": config.database.path, "error": str(exc)})
        return EXIT_FAILURE
    try:
        return await _run(config, state)
    finally:
        state.close()


async def _serve_replica(config: RegistryConfig) -> int:
    spec = replica_spec(config)
    try:
        storage, state = open_stores(spec)
    except (StorageError, ValueError, OSError) as exc:
        log.critical("cannot open the registry or raft database",
                     extra={"path": config.database.path, "raft": spec.raft_path,
                            "error": str(exc)})
        return EXIT_FAILURE
    log.info("replica", extra={"replica": spec.id, "members": spec.addresses,
                               "raft": spec.raft_path})
    try:
        return await _run(config, state, spec, storage)
    finally:
        state.close()
        close = getattr(storage, "close", None)
        if close is not None:
            close()


async def _run(config: RegistryConfig, state: RegistryState,
               replica: ReplicaSpec | None = None, storage: object = None) -> int:
    if not config.api_key:
        log.warning("REGISTRY_API_KEY is not set: the registry accepts writes from anyone")
    try:
        # Nodes' actor links (signed heartbeats, link reports) come in here,
        # and in replicated mode the Raft traffic between replicas too.
        # Replicas prove the cluster secret to each other on these links;
        # nodes do not, and may not send what only replicas may.
        advertise = replica.addresses[replica.id] if replica is not None else None
        secret = config.replication.secret if replica is not None else None
        tls = config.tls
        transport = WebsocketTransport(
            config.listen.host, config.listen.ws_port, advertise=advertise,
            secret=secret.encode() if secret else None,
            tls_server=server_context(tls.cert_file, tls.key_file) if tls.enabled else None,
            tls_client=client_context(tls.ca_file) if tls.enabled else None)
    except OSError as exc:
        log.critical("cannot listen for node links",
                     extra={"port": config.listen.ws_port, "error": str(exc)})
        return EXIT_FAILURE
    system = ActorSystem(transport=transport)
    supervisor = registry_supervisor(system, state, config, replica, storage)
    app = create_app(system.ref("registry"), api_key=config.api_key,
                     max_body_bytes=config.http.max_body_bytes,
                     ask_timeout=config.http.request_timeout,
                     consensus=system.ref("consensus") if replica is not None else None)
    shutdown = trio.Event()
    actors_scope = trio.CancelScope()
    code = EXIT_OK

    async def supervise(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        nonlocal code
        with actors_scope:
            if await run_root(supervisor, task_status=task_status) != EXIT_OK:
                code = EXIT_FAILURE
                shutdown.set()

    http_done = trio.Event()

    async def serve_http(task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
        # serve() returns once in-flight requests finished after the trigger.
        try:
            await hypercorn.trio.serve(app, hypercorn_config(config),
                                       shutdown_trigger=shutdown.wait, task_status=task_status)
        finally:
            http_done.set()

    async with trio.open_nursery() as nursery:
        await nursery.start(system.serve)
        await nursery.start(supervise)
        settle_heap()  # see trustnet.gc_tuning
        nursery.start_soon(watch_signals, shutdown, log)
        try:
            binds = await nursery.start(serve_http)
        except OSError as exc:
            log.critical("cannot listen", extra={"bind": hypercorn_config(config).bind,
                                                 "error": str(exc)})
            code = EXIT_FAILURE
        else:
            log.info("registry listening", extra={"binds": binds, "ws": transport.address,
                                                   "database": config.database.path})
            await http_done.wait()
        actors_scope.cancel()  # the actors behind the routes go last
        nursery.cancel_scope.cancel()
    log.info("registry stopped", extra={"exit_code": code})
    return code
