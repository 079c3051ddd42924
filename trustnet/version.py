"""Version and build information (architecture record, section 11).

``build_info()`` is what ``GET /version`` returns. The Docker build sets
``TRUSTNET_BUILD_TIME`` and ``TRUSTNET_COMMIT``; from a source checkout the
commit comes from git and the build time is the package's install time.
Nothing here raises: unknown values are ``"unknown"``.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import subprocess
from datetime import UTC, datetime
from pathlib import Path

__all__ = ["build_info", "version"]

DIST_NAME = "trustnet"
UNKNOWN = "unknown"
_SOURCE_ROOT = Path(__file__).resolve().parent.parent


def version() -> str:
    """The installed package version (semver), ``"0.0.0+unknown"`` when not installed."""
    try:
        return importlib.metadata.version(DIST_NAME)
    except Exception:  # noqa: BLE001 - PackageNotFoundError, broken metadata
        return "0.0.0+unknown"


@functools.cache
def _git_commit(root: Path = _SOURCE_ROOT) -> str:
    """Short HEAD commit when ``root`` is a git checkout (a ``.git`` dir or file)."""
    if not (root / ".git").exists():
        return UNKNOWN
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=root, capture_output=True, text=True, timeout=5, check=True,
        )
    except Exception:  # noqa: BLE001 - no git, not a repo, no commits, timeout
        return UNKNOWN
    return out.stdout.strip() or UNKNOWN


@functools.cache
def _install_time() -> str:
    """UTC modification time of the package's metadata, i.e. when it was installed."""
    try:
        dist = importlib.metadata.distribution(DIST_NAME)
        for f in dist.files or ():
            if f.name in ("METADATA", "PKG-INFO"):
                mtime = Path(str(f.locate())).stat().st_mtime
                return datetime.fromtimestamp(mtime, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except Exception:  # noqa: BLE001
        pass
    return UNKNOWN


def build_info() -> dict[str, str]:
    """``{"version", "build_time", "commit"}``; never fails."""
    env_time = os.environ.get("TRUSTNET_BUILD_TIME", "").strip()
    env_commit = os.environ.get("TRUSTNET_COMMIT", "").strip()
    return {
        "version": version(),
        "build_time": env_time or _install_time(),
        "commit": env_commit or _git_commit(),
    }
