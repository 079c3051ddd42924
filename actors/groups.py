"""Trio wraps every nursery error in an ExceptionGroup; a single failure is
easier to reason about (and to catch) as itself."""

from __future__ import annotations

import contextlib
from typing import Iterator


def sole_exception(error: BaseException) -> BaseException | None:
    """The one leaf of a (nested) group with a single leaf, else None."""
    while isinstance(error, BaseExceptionGroup):
        if len(error.exceptions) != 1:
            return None
        error = error.exceptions[0]
    return error


@contextlib.contextmanager
def collapsed() -> Iterator[None]:
    """Re-raise a group holding one exception as that exception."""
    try:
        yield
    except BaseExceptionGroup as group:
        leaf = sole_exception(group)
        if leaf is None:
            raise
        leaf.__suppress_context__ = True
        raise leaf
