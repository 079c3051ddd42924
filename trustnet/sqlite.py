"""What the registry's and the Raft log's SQLite files share."""

from __future__ import annotations

import contextlib
import sqlite3
from typing import Iterator


class Transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any exception.

    The connections are opened with isolation_level=None: every transaction
    is one of these, never an implicit one."""

    def __init__(self, conn: sqlite3.Connection):
        self._conn = conn

    def __enter__(self) -> None:
        # IMMEDIATE takes the write lock now, not halfway through a batch.
        self._conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: type | None, *rest: object) -> None:
        if exc_type is None:
            try:
                self._conn.execute("COMMIT")
                return
            except BaseException:
                self._rollback()
                raise
        self._rollback()

    def _rollback(self) -> None:
        if self._conn.in_transaction:
            self._conn.execute("ROLLBACK")


@contextlib.contextmanager
def unsynced_transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """A Transaction written to the file but not fsync'd (synchronous=OFF for
    its COMMIT), for a change that safety never needs: WAL keeps it atomic,
    and the next synced commit makes it durable with it."""
    level = conn.execute("PRAGMA synchronous").fetchone()[0]
    conn.execute("PRAGMA synchronous = OFF")
    try:
        with Transaction(conn):
            yield
    finally:
        conn.execute(f"PRAGMA synchronous = {int(level)}")
