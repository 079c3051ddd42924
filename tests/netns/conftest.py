"""Fixtures for tests that run TrustNet on several IPv6 hosts (network namespaces).

Every test here is marked ``netns`` and skips with the reason when namespaces
cannot be used (not root, iproute2 or nftables missing, no CAP_SYS_ADMIN).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# netns.py sits beside this file, and builds on ../integration/logged_process.py;
# make both importable however pytest imports this directory (rootdir-relative
# or as a package).
_HERE = str(Path(__file__).resolve().parent)
for _dir in (str(Path(_HERE).parent / "integration"), _HERE):
    if _dir not in sys.path:
        sys.path.insert(0, _dir)

import netns  # noqa: E402


def pytest_collection_modifyitems(config, items):
    for item in items:
        if Path(str(item.path)).resolve().parent == Path(_HERE):
            item.add_marker(pytest.mark.netns)


@pytest.fixture
def netns_available():
    """Skips the test (with the reason) when namespaces cannot be used here."""
    reason = netns.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture
async def network(netns_available):
    """A :class:`netns.Network` (empty: add hosts with ``await network.add_host``).

    Every process and namespace it made is gone after the test, pass or fail."""
    async with netns.open_network() as net:
        yield net


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test's report gets the process logs its fixtures left under
    netns.DUMP_KEY. pytest-trio runs async fixture teardown inside the call
    phase, so the logs are gathered here rather than in the fixture."""
    report = yield
    dump = item.stash.get(netns.DUMP_KEY, None)
    if dump is not None and report.when == "call" and report.failed:
        try:
            report.sections.append(("process logs", dump()))
        except Exception as exc:  # noqa: BLE001 - a report must not fail
            report.sections.append(("process logs", f"unavailable: {exc!r}"))
    return report
