"""Structured logs: one JSON object per line on stdout (architecture record, section 9).

    setup_logging("registry", level="info")
    logging.getLogger(__name__).info("node registered", extra={"node_id": "n1"})
    # -> {"timestamp":"2026-01-30T14:23:15.123Z","level":"info","service":"registry",
    #     "message":"node registered","logger":"trustnet.x","node_id":"n1"}

Every ``extra={...}`` field becomes a top-level key. With ``exc_info`` the line
also carries ``error`` (``"ValueError: boom"``) and ``traceback``. Levels are
the spec's: debug, info, warn, error, fatal (``logger.critical`` is fatal).

Third-party loggers go through the same handler; the chatty ones are held at
warn. hypercorn needs :func:`hypercorn_logging` on its Config so its error log
comes out as JSON and its access log stays quiet (the app logs requests).
"""

from __future__ import annotations

import logging
import sys
import traceback
from datetime import UTC, datetime
from typing import IO, Any

import orjson

__all__ = ["JsonFormatter", "TextFormatter", "hypercorn_logging", "level_name", "setup_logging"]

LEVELS: dict[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "fatal": logging.CRITICAL,
    "critical": logging.CRITICAL,
}

# Loggers that are chatty at info/debug: held at warn whatever the service level.
NOISY_LOGGERS = (
    "hypercorn.access",
    "httpx",
    "httpcore",
    "asyncio",
    "quart.serving",
)

# Attributes every LogRecord has; anything else on a record came from `extra`.
_RECORD_ATTRS = frozenset(
    logging.LogRecord("", 0, "", 0, "", (), None).__dict__
) | {"message", "asctime", "taskName"}

_CORE = ("timestamp", "level", "service", "message", "logger")

_HANDLER_MARK = "_trustnet_handler"


def level_name(levelno: int) -> str:
    """The spec's level name for a stdlib level number."""
    if levelno >= logging.CRITICAL:
        return "fatal"
    if levelno >= logging.ERROR:
        return "error"
    if levelno >= logging.WARNING:
        return "warn"
    if levelno >= logging.INFO:
        return "info"
    return "debug"


def _timestamp(created: float) -> str:
    # "2026-01-30T14:23:15.123Z": the same string as strftime("%Y-%m-%dT%H:%M:%S.")
    # plus the milliseconds, at about half the cost (it runs for every line)
    return datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def _safe_str(value: Any) -> str:
    try:
        return str(value)
    except Exception:  # noqa: BLE001 - a broken __str__ must not break logging
        try:
            return f"<unprintable {type(value).__name__}>"
        except Exception:  # noqa: BLE001
            return "<unprintable>"


def _default(value: Any) -> Any:
    """orjson fallback: sets become lists, bytes text, everything else str()."""
    if isinstance(value, (set, frozenset)):
        return list(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8", "backslashreplace")
    return _safe_str(value)


_OPTS = orjson.OPT_NON_STR_KEYS


def _dumps(obj: dict[str, Any]) -> bytes:
    try:
        return orjson.dumps(obj, default=_default, option=_OPTS)
    except Exception:  # noqa: BLE001 - e.g. ints over 64 bits, surrogates, deep nesting
        safe = {}
        for k, v in obj.items():
            try:
                orjson.dumps(v, default=_default, option=_OPTS)
                safe[k] = v
            except Exception:  # noqa: BLE001
                safe[k] = _safe_str(v).encode("utf-8", "backslashreplace").decode("utf-8")
        return orjson.dumps(safe, default=_default, option=_OPTS)


def _message(record: logging.LogRecord) -> str:
    try:
        return record.getMessage().rstrip("\n")
    except Exception:  # noqa: BLE001 - bad %-args must not lose the line
        return f"{_safe_str(record.msg)} (bad log arguments: {_safe_str(record.args)})"


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _RECORD_ATTRS and not k.startswith("_")}


def _exception_fields(record: logging.LogRecord) -> dict[str, str]:
    out: dict[str, str] = {}
    exc_info = record.exc_info
    if exc_info and exc_info[1] is not None:
        exc = exc_info[1]
        try:
            out["error"] = "".join(traceback.format_exception_only(exc)).strip()
        except Exception:  # noqa: BLE001
            out["error"] = f"{type(exc).__name__}: {_safe_str(exc)}"
        try:
            out["traceback"] = "".join(traceback.format_exception(exc)).rstrip()
        except Exception:  # noqa: BLE001
            pass
    elif record.exc_text:
        out["traceback"] = record.exc_text
    if record.stack_info:
        out["stack"] = record.stack_info
    return out


class JsonFormatter(logging.Formatter):
    """One JSON object per record, no newlines inside."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "timestamp": _timestamp(record.created),
            "level": level_name(record.levelno),
            "service": self.service,
            "message": _message(record),
            "logger": record.name,
        }
        for k, v in _extras(record).items():
            # an extra cannot replace a core field; it is kept as "level_" etc.
            doc[f"{k}_" if k in _CORE else k] = v
        for k, v in _exception_fields(record).items():
            doc.setdefault(k, v)  # an explicit extra "error" wins over the exception text
        return _dumps(doc).decode("utf-8")


def _kv_value(value: Any) -> str:
    """A value for ``key=value``: bare when it is a simple string, else JSON."""
    if isinstance(value, str) and value and not any(c.isspace() or c in '"=' for c in value):
        return value
    return _dumps({"v": value}).decode("utf-8")[5:-1]


class TextFormatter(logging.Formatter):
    """A readable line for humans: time, level, service, logger, message, k=v extras.

    A traceback, if any, follows on the next lines.
    """

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        parts = [
            _timestamp(record.created),
            f"{level_name(record.levelno):<5}",
            f"{self.service}",
            f"[{record.name}]",
            _message(record).replace("\n", "\\n"),
        ]
        extras = _extras(record)
        exc = _exception_fields(record)
        if "error" in exc:
            extras.setdefault("error", exc["error"])
        parts.extend(f"{k}={_kv_value(v)}" for k, v in extras.items())
        line = " ".join(parts)
        if "traceback" in exc:
            line += "\n" + exc["traceback"]
        if "stack" in exc:
            line += "\n" + exc["stack"]
        return line


def setup_logging(service: str, level: str = "info", fmt: str = "json",
                  stream: IO[str] | None = None) -> logging.Handler:
    """Configure the root logger to write ``fmt`` ("json" or "text") lines to
    ``stream`` (default: the current ``sys.stdout``) at ``level``.

    Idempotent: a second call replaces the handler installed by the first one
    (other handlers, such as pytest's, are left alone). Returns the handler.
    """
    try:
        levelno = LEVELS[level.strip().lower()]
    except (KeyError, AttributeError):
        raise ValueError(f"log level must be one of debug|info|warn|error|fatal, got {level!r}") from None
    if fmt == "json":
        formatter: logging.Formatter = JsonFormatter(service)
    elif fmt == "text":
        formatter = TextFormatter(service)
    else:
        raise ValueError(f"log format must be json or text, got {fmt!r}")

    handler = logging.StreamHandler(stream if stream is not None else sys.stdout)
    handler.setFormatter(formatter)
    setattr(handler, _HANDLER_MARK, True)

    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, _HANDLER_MARK, False):
            root.removeHandler(old)
            old.close()
    root.addHandler(handler)
    root.setLevel(levelno)

    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(max(levelno, logging.WARNING))
    # hypercorn's error log: no handler of its own, through ours
    herr = logging.getLogger("hypercorn.error")
    herr.handlers.clear()
    herr.propagate = True
    herr.setLevel(logging.NOTSET)
    # `warnings.warn` goes through logging ("py.warnings") instead of raw stderr
    logging.captureWarnings(True)
    return handler


def hypercorn_logging(config: Any) -> Any:
    """Point a ``hypercorn.config.Config`` at our logging; returns it.

    hypercorn otherwise installs its own plain-text handlers: the error log is
    routed to the ``hypercorn.error`` logger (JSON through the root handler) and
    the access log is switched off since the app logs its requests itself.
    """
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.logconfig = None
    config.logconfig_dict = None
    return config
