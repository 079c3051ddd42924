"""SIGINT/SIGTERM as an orderly shutdown, for the registry and node services."""

from __future__ import annotations

import logging
import signal

import trio


async def watch_signals(shutdown: trio.Event, log: logging.Logger) -> None:
    """Set `shutdown` at the first SIGINT or SIGTERM (logged with its name)."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("shutting down", extra={"signal": signal.Signals(signum).name})
            shutdown.set()
            return
