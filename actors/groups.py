"""Trio wraps every nursery error in an ExceptionGroup; a single failure is
easier to reason about (and to catch) as itself."""

from __future__ import annotations

import contextlib
from typing import Iterator

import trio


def _leaves(error: BaseException) -> list[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        return [leaf for sub in error.exceptions for leaf in _leaves(sub)]
    return [error]


def sole_exception(error: BaseException) -> BaseException | None:
    """The one real failure in a (nested) group, else None.

    Cancelled leaves do not count when there is a real failure beside them:
    they are the other tasks of the nursery being torn down because of it (a
    cancel scope that is still cancelled raises again at the next checkpoint).
    A group of Cancelled only is one Cancelled: the tasks of an actor with
    helpers all see the same cancellation, and that is an orderly stop.
    """
    leaves = _leaves(error)
    failures = [leaf for leaf in leaves if not isinstance(leaf, trio.Cancelled)]
    if len(failures) == 1:
        return failures[0]
    if not failures:
        return leaves[0]
    return None


@contextlib.contextmanager
def collapsed() -> Iterator[None]:
    """Re-raise a group holding one real exception as that exception."""
    try:
        yield
    except BaseExceptionGroup as group:
        leaf = sole_exception(group)
        if leaf is None:
            raise
        leaf.__suppress_context__ = True
        raise leaf
