"""trustnet.logs: one parseable JSON object per line with the spec's fields."""

import io
import logging
import re
import warnings
from datetime import datetime

import orjson
import pytest

from trustnet.logs import hypercorn_logging, level_name, setup_logging

TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


@pytest.fixture
def stream():
    """A captured stream; the root logger is restored afterwards."""
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    buf = io.StringIO()
    yield buf
    for h in list(root.handlers):
        if h not in saved[1]:
            root.removeHandler(h)
    root.setLevel(saved[0])
    logging.captureWarnings(False)


def lines(buf: io.StringIO) -> list[dict]:
    text = buf.getvalue()
    assert text.endswith("\n")
    return [orjson.loads(line) for line in text.splitlines()]


def test_json_line_has_required_fields_and_extras(stream):
    setup_logging("registry", "info", "json", stream=stream)
    logging.getLogger("trustnet.test").info(
        "node %s registered", "abc123",
        extra={"node_id": "abc123", "ipv6_addr": "fd10:1234:abc1::1", "request_id": "req-001"},
    )
    (doc,) = lines(stream)
    assert TS.match(doc["timestamp"]), doc["timestamp"]
    assert datetime.fromisoformat(doc["timestamp"]).utcoffset().total_seconds() == 0
    assert doc["level"] == "info"
    assert doc["service"] == "registry"
    assert doc["message"] == "node abc123 registered"
    assert doc["logger"] == "trustnet.test"
    assert doc["node_id"] == "abc123"
    assert doc["ipv6_addr"] == "fd10:1234:abc1::1"
    assert doc["request_id"] == "req-001"
    assert "error" not in doc and "traceback" not in doc
    assert list(doc)[:5] == ["timestamp", "level", "service", "message", "logger"]


@pytest.mark.parametrize(
    "method, expected",
    [("debug", "debug"), ("info", "info"), ("warning", "warn"), ("error", "error"), ("critical", "fatal")],
)
def test_level_names(stream, method, expected):
    setup_logging("node", "debug", stream=stream)
    getattr(logging.getLogger("t"), method)("m")
    assert lines(stream)[0]["level"] == expected


def test_level_name_mapping():
    assert level_name(logging.WARNING) == "warn"
    assert level_name(logging.CRITICAL) == "fatal"
    assert level_name(5) == "debug"


def test_level_threshold(stream):
    setup_logging("node", "warn", stream=stream)
    log = logging.getLogger("t")
    log.info("hidden")
    log.warning("shown")
    assert [d["message"] for d in lines(stream)] == ["shown"]


def test_exception_fields(stream):
    setup_logging("registry", stream=stream)
    try:
        raise ConnectionRefusedError("connection refused")
    except ConnectionRefusedError:
        logging.getLogger("t").exception("Failed to connect to registry", extra={"attempt": 1})
    (doc,) = lines(stream)
    assert doc["level"] == "error"
    assert doc["error"] == "ConnectionRefusedError: connection refused"
    assert "Traceback (most recent call last)" in doc["traceback"]
    assert doc["attempt"] == 1


def test_explicit_error_extra_is_kept(stream):
    setup_logging("registry", stream=stream)
    logging.getLogger("t").error("Failed to connect", extra={"error": "connection refused", "retry_after_seconds": 5})
    (doc,) = lines(stream)
    assert doc["error"] == "connection refused"
    assert doc["retry_after_seconds"] == 5


def test_non_json_extras_are_stringified(stream):
    class Unprintable:
        def __str__(self):
            raise RuntimeError("no")

    class Custom:
        def __str__(self):
            return "custom!"

    setup_logging("registry", stream=stream)
    logging.getLogger("t").info(
        "x",
        extra={"obj": Custom(), "bad": Unprintable(), "big": 2**80, "tags": {"a"}, "raw": b"\xffok",
               "nested": {"k": Custom(), 1: "int key"}},
    )
    (doc,) = lines(stream)
    assert doc["obj"] == "custom!"
    assert doc["bad"] == "<unprintable Unprintable>"
    assert doc["big"] == str(2**80)
    assert doc["tags"] == ["a"]
    assert doc["raw"] == "\\xffok"
    assert doc["nested"] == {"k": "custom!", "1": "int key"}


def test_bad_format_args_do_not_lose_the_line(stream):
    # through the handler directly: pytest's own capture handler would raise here
    handler = setup_logging("registry", stream=stream)
    record = logging.getLogger("t").makeRecord("t", logging.INFO, __file__, 1, "count %d", ("not a number",), None)
    handler.handle(record)
    (doc,) = lines(stream)
    assert doc["message"] == "count %d (bad log arguments: ('not a number',))"


def test_extras_cannot_overwrite_core_fields(stream):
    setup_logging("registry", stream=stream)
    logging.getLogger("t").info("real", extra={"level": "bogus", "service": "other"})
    (doc,) = lines(stream)
    assert (doc["level"], doc["service"]) == ("info", "registry")
    assert (doc["level_"], doc["service_"]) == ("bogus", "other")


def test_multiline_message_stays_one_line(stream):
    setup_logging("registry", stream=stream)
    logging.getLogger("t").info("a\nb")
    assert stream.getvalue().count("\n") == 1
    assert lines(stream)[0]["message"] == "a\nb"


def test_idempotent(stream):
    setup_logging("registry", stream=stream)
    setup_logging("registry", stream=stream)
    logging.getLogger("t").info("once")
    assert len(lines(stream)) == 1
    ours = [h for h in logging.getLogger().handlers if getattr(h, "_trustnet_handler", False)]
    assert len(ours) == 1


def test_second_call_switches_stream_and_level(stream):
    other = io.StringIO()
    setup_logging("registry", "info", stream=other)
    setup_logging("registry", "debug", stream=stream)
    logging.getLogger("t").debug("d")
    assert other.getvalue() == ""
    assert lines(stream)[0]["message"] == "d"


def test_text_format(stream):
    setup_logging("node", "info", "text", stream=stream)
    logging.getLogger("trustnet.x").warning("peer timeout", extra={"node_id": "n1", "note": "two words"})
    line = stream.getvalue()
    assert line.count("\n") == 1
    assert re.match(r"^\d{4}-\d\d-\d\dT\S+Z warn\s+node \[trustnet\.x\] peer timeout ", line), line
    assert "node_id=n1" in line
    assert 'note="two words"' in line
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(line)


def test_text_format_exception(stream):
    setup_logging("node", "info", "text", stream=stream)
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("t").exception("failed")
    first, *rest = stream.getvalue().splitlines()
    assert 'error="ValueError: boom"' in first
    assert any("Traceback" in r for r in rest)


@pytest.mark.parametrize("kwargs", [{"level": "verbose"}, {"fmt": "xml"}])
def test_bad_arguments(kwargs, stream):
    with pytest.raises(ValueError):
        setup_logging("registry", stream=stream, **kwargs)


def test_hypercorn_error_log_is_json_and_access_log_quiet(stream):
    setup_logging("registry", "info", stream=stream)
    logging.getLogger("hypercorn.access").info('GET / 200')
    logging.getLogger("hypercorn.error").info("Running on http://[::]:8000")
    (doc,) = lines(stream)
    assert doc["logger"] == "hypercorn.error"
    assert doc["message"] == "Running on http://[::]:8000"


def test_noisy_loggers_are_held_at_warn(stream):
    setup_logging("node", "debug", stream=stream)
    logging.getLogger("httpx").info("HTTP Request: GET ...")
    logging.getLogger("httpcore").debug("frame")
    logging.getLogger("httpx").warning("shown")
    assert [d["message"] for d in lines(stream)] == ["shown"]


def test_hypercorn_config_is_pointed_at_our_logging(stream):
    hypercorn_config = pytest.importorskip("hypercorn.config")
    from hypercorn.logging import Logger

    setup_logging("registry", stream=stream)
    cfg = hypercorn_config.Config()
    cfg.accesslog = "-"  # as a deployment might set it: we still switch it off
    cfg.errorlog = "-"  # hypercorn's default: its own plain-text stderr handler
    assert hypercorn_logging(cfg) is cfg
    hlog = Logger(cfg)  # what hypercorn builds when serving
    assert hlog.access_logger is None
    assert hlog.error_logger.handlers == []  # no plain-text handler beside our JSON one
    hlog.error_logger.warning("from hypercorn")
    (doc,) = lines(stream)
    assert (doc["logger"], doc["level"], doc["message"]) == ("hypercorn.error", "warn", "from hypercorn")


def test_warnings_are_logged(stream):
    setup_logging("registry", stream=stream)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("old api", DeprecationWarning, stacklevel=1)
    (doc,) = lines(stream)
    assert doc["logger"] == "py.warnings"
    assert "old api" in doc["message"]
