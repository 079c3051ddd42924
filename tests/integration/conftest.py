"""Fixtures for tests that run TrustNet as real processes on [::1]."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import pytest
import trio

# registry_process.py sits beside this file; make it importable however
# pytest imports this directory (rootdir-relative or as a package).
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from registry_process import RegistryProcess  # noqa: E402


@pytest.fixture
async def start_registry(tmp_path):
    """``await start_registry(config=..., env=..., db_path=...)``: a started
    :class:`RegistryProcess` (its ``base_url`` is set). Every process started
    through it is killed and reaped on teardown, whatever the test did."""
    procs: list[RegistryProcess] = []
    async with trio.open_nursery() as nursery:

        async def start(**kwargs) -> RegistryProcess:
            kwargs.setdefault("name", f"registry{len(procs)}")
            reg = RegistryProcess(tmp_path, **kwargs)
            procs.append(reg)
            await reg.start(nursery)
            return reg

        try:
            yield start
        finally:
            with trio.CancelScope(shield=True):
                for reg in procs:
                    await reg.aclose()
            nursery.cancel_scope.cancel()


@pytest.fixture
async def http():
    """An httpx client for the registry (real sockets, trio backend).

    One connection per request, as curl does. Idle keep-alive connections
    hold a stopping registry for hypercorn's whole graceful_timeout, and
    keep-alive reuse has its own test (test_registry_process.py).
    """
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=httpx.Timeout(15.0), limits=limits) as client:
        yield client
