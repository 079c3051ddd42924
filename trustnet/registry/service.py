"""`trustnet registry`: the registry process.

The RegistryActor runs under a supervisor; the HTTP server runs beside it.
SIGINT/SIGTERM stop the HTTP server gracefully (in-flight requests finish),
then the supervisor stops the actors in reverse start order. A supervisor that
gives up, or a database that cannot be opened, ends the process with exit 1.
"""

from __future__ import annotations

import logging
import signal

import hypercorn.config
import hypercorn.trio
import trio

from actors import ActorSystem, ChildSpec, Restart, Supervisor, run_root
from actors.ws import WebsocketTransport
from trustnet.config import RegistryConfig
from trustnet.logs import hypercorn_logging

from .actor import RegistryActor
from .http import create_app
from .state import RegistryState, StorageError

log = logging.getLogger("trustnet.registry")

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2


def registry_supervisor(system: ActorSystem, state: RegistryState,
                        config: RegistryConfig) -> Supervisor:
    def start() -> RegistryActor:
        return RegistryActor(state, ttl=config.leases.ttl,
                             checkpoint_interval=config.leases.checkpoint_interval,
                             heartbeat_interval=config.leases.heartbeat_interval)

    return Supervisor(system, "registry-root",
                      [ChildSpec("registry", start, Restart.PERMANENT, mailbox_size=10_000)],
                      intensity=5, period=30.0)


def hypercorn_config(config: RegistryConfig) -> hypercorn.config.Config:
    host = config.listen.host
    hc = hypercorn.config.Config()
    hc.bind = [f"[{host}]:{config.listen.port}" if ":" in host else f"{host}:{config.listen.port}"]
    hc.graceful_timeout = 5.0
    hc.keep_alive_timeout = 75.0
    return hypercorn_logging(hc)


async def serve(config: RegistryConfig) -> int:
    if config.replication.enabled:
        # Say so rather than silently run unreplicated.
        log.critical("replication.enabled: this version runs a single replica; "
                     "set replication.enabled to false")
        return EXIT_CONFIG
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


async def _run(config: RegistryConfig, state: RegistryState) -> int:
    if not config.api_key:
        log.warning("REGISTRY_API_KEY is not set: the registry accepts writes from anyone")
    try:
        # Nodes' actor links (signed heartbeats, link reports) come in here.
        transport = WebsocketTransport(config.listen.host, config.listen.ws_port)
    except OSError as exc:
        log.critical("cannot listen for node links",
                     extra={"port": config.listen.ws_port, "error": str(exc)})
        return EXIT_FAILURE
    system = ActorSystem(transport=transport)
    supervisor = registry_supervisor(system, state, config)
    app = create_app(system.ref("registry"), api_key=config.api_key,
                     max_body_bytes=config.http.max_body_bytes,
                     ask_timeout=config.http.request_timeout)
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
        nursery.start_soon(_watch_signals, shutdown)
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


async def _watch_signals(shutdown: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("shutting down", extra={"signal": signal.Signals(signum).name})
            shutdown.set()
            return
