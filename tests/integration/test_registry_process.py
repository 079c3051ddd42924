"""`trustnet registry` as a real process on [::1], driven by a real HTTP client.

Issue 2, section 5 (integration tests) and the architecture record's
sections 8 (config + env), 9 (JSON logs), 12 (exit codes), 13 (the manual
curl commands) and 15 (the database is one file to copy). Timeouts are
failure bounds only; nothing here asserts on how long anything takes.
"""

from __future__ import annotations

import importlib.metadata
import ipaddress
import math
import os
import re
import shutil
import signal
import socket
import sqlite3
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import trio
import yaml

from http_wire import late_body_then_next
from registry_process import RegistryProcess, run_trustnet

SPEC_BODY = '{"id": "node-test", "ipv6": "fd10:1234::1"}'
"""The body of the spec's `curl -X POST http://localhost:8000/nodes -d '...'`, verbatim."""
CURL_FORM = {"Content-Type": "application/x-www-form-urlencoded"}
"""What `curl -d` sends as Content-Type."""

LEVELS = {"debug", "info", "warn", "error", "fatal"}
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?Z$")


# ---------------------------------------------------------------- helpers


def write_config(tmp_path: Path, doc: dict[str, Any] | str, name: str = "registry.yaml") -> Path:
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    return path


def node_ip(i: int) -> str:
    return str(ipaddress.IPv6Address("fd10:1234:1::") + i + 1)


async def register(http: httpx.AsyncClient, base: str, node_id: str, ipv6: str,
                   **extra: Any) -> httpx.Response:
    return await http.post(f"{base}/nodes", json={"id": node_id, "ipv6": ipv6, **extra})


async def all_pages(http: httpx.AsyncClient, base: str, *, limit: int,
                    domain: str | None = None) -> tuple[list[dict], int]:
    """Every node via keyset pagination; (nodes in order, number of pages)."""
    nodes: list[dict] = []
    after: str | None = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": limit}
        if domain is not None:
            params["domain"] = domain
        if after is not None:
            params["after"] = after
        r = await http.get(f"{base}/nodes", params=params)
        assert r.status_code == 200, r.text
        page = r.json()
        assert len(page["nodes"]) <= limit
        nodes.extend(page["nodes"])
        pages += 1
        after = page["next"]
        if after is None:
            return nodes, pages
        assert pages <= 10_000, "pagination does not end"


def assert_error_body(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"}, body
    assert isinstance(body["error"]["code"], str) and body["error"]["code"]
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]


def assert_log_line(doc: dict) -> None:
    """Section 9: timestamp (UTC ISO 8601), level, service, message."""
    assert TIMESTAMP.match(doc.get("timestamp", "")), doc
    stamp = datetime.fromisoformat(doc["timestamp"])
    assert stamp.utcoffset() == timedelta(0), doc
    assert abs(datetime.now(UTC) - stamp) < timedelta(hours=1), doc  # a sane clock, not a speed check
    assert doc.get("level") in LEVELS, doc
    assert doc.get("service") == "registry", doc
    assert isinstance(doc.get("message"), str) and doc["message"], doc


def free_port() -> int:
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
        s.bind(("::1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- the spec's manual commands


async def test_spec_manual_commands(start_registry, http):
    reg = await start_registry()
    base = reg.base_url

    r = await http.get(f"{base}/health")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert r.json()["status"] == "ok"

    # curl -X POST http://localhost:8000/nodes -d '{"id": "node-test", "ipv6": "fd10:1234::1"}'
    r = await http.post(f"{base}/nodes", content=SPEC_BODY.encode(), headers=CURL_FORM)
    assert r.status_code == 201, r.text
    node = r.json()
    assert node["id"] == "node-test"
    assert node["ipv6"] == "fd10:1234::1"
    assert node["port"] == 9000  # the spec's default
    assert isinstance(node["domain"], str) and node["domain"]

    # curl http://localhost:8000/nodes | jq .
    r = await http.get(f"{base}/nodes")
    assert r.status_code == 200, r.text
    listed = {n["id"]: n for n in r.json()["nodes"]}
    assert set(listed) == {"node-test"}
    assert listed["node-test"]["ipv6"] == "fd10:1234::1"

    r = await http.get(f"{base}/nodes/node-test")
    assert r.status_code == 200 and r.json()["ipv6"] == "fd10:1234::1"

    r = await http.get(f"{base}/version")
    assert r.status_code == 200
    assert r.json()["version"] == importlib.metadata.version("trustnet")

    # No REGISTRY_API_KEY: the registry runs open and says so at start.
    warnings = [d for d in reg.lines if d["level"] == "warn" and "REGISTRY_API_KEY" in d["message"]]
    assert warnings, reg.describe()
    assert reg.logs("node registered", node_id="node-test")

    assert await reg.stop() == 0


@pytest.mark.skipif(shutil.which("curl") is None, reason="no curl binary")
async def test_spec_manual_commands_with_real_curl(start_registry):
    reg = await start_registry()
    base = reg.base_url
    curl = [shutil.which("curl"), "--silent", "--show-error", "--globoff", "--max-time", "15",
            "--write-out", "\n%{http_code}"]

    async def run(*args: str) -> tuple[int, Any]:
        with trio.fail_after(30):
            done = await trio.run_process([*curl, *args], capture_stdout=True, capture_stderr=True,
                                          check=False)
        assert done.returncode == 0, done.stderr
        body, _, status = done.stdout.decode().rpartition("\n")
        return int(status), orjson.loads(body)

    status, health = await run(f"{base}/health")
    assert status == 200 and health["status"] == "ok"

    status, node = await run("-X", "POST", f"{base}/nodes", "-d", SPEC_BODY)
    assert status == 201, node
    assert node["id"] == "node-test" and node["ipv6"] == "fd10:1234::1"

    # The same command again updates the same node: 200, still one node.
    status, node = await run("-X", "POST", f"{base}/nodes", "-d", SPEC_BODY)
    assert status == 200, node

    status, listing = await run(f"{base}/nodes")
    assert status == 200
    assert [n["id"] for n in listing["nodes"]] == ["node-test"]

    # Each curl request is in the log with method, path and status.
    posts = reg.logs("request", method="POST", path="/nodes")
    assert [d["status"] for d in posts] == [201, 200], reg.describe()
    assert await reg.stop() == 0


# ---------------------------------------------------------------- configuration


async def test_environment_overrides_the_config_file(start_registry, http, tmp_path):
    # The file's port is held by another socket: if the file won, the registry
    # could not listen and would exit 1.
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as held:
        held.bind(("::1", 0))
        held.listen()
        file_port = held.getsockname()[1]
        env_port = free_port()
        assert env_port != file_port
        file_db = tmp_path / "from-file.db"
        env_db = tmp_path / "from-env.db"
        reg = await start_registry(
            config={"listen": {"host": "::", "port": file_port},
                    "database": {"path": str(file_db)},
                    "leases": {"heartbeat_interval": "30s"}},
            env={"REGISTRY_PORT": str(env_port), "REGISTRY_LISTEN": "::1",
                 "REGISTRY_DB_PATH": str(env_db), "REGISTRY_HEARTBEAT_INTERVAL": "2s"},
        )
        assert reg.port == env_port
        listening = reg.logs("registry listening")[0]
        assert listening["binds"] == [f"http://[::1]:{env_port}"]
        assert listening["database"] == str(env_db)

        r = await http.get(f"http://[::1]:{env_port}/health")
        assert r.status_code == 200 and r.json()["status"] == "ok"

        loaded = reg.logs("config loaded")[0]["config"]
        assert loaded["listen"] == {"host": "::1", "port": env_port, "ws_port": 0}
        assert loaded["database"]["path"] == str(env_db)
        assert loaded["leases"]["heartbeat_interval"] == 2.0

        r = await register(http, reg.base_url, "env-node", "fd10:1234::e")
        assert r.status_code == 201
        assert await reg.stop() == 0
    assert env_db.exists()
    assert not file_db.exists()


CONFIG_ERRORS = {
    # case: (config text or None for a missing file, env, what the message names)
    "missing file": (None, {}, ["no such file"]),
    "bad yaml": ("listen: [\n  port: 8000\n", {}, ["invalid YAML", "line "]),
    "unknown key": ("listen:\n  prot: 8000\n", {}, ["listen.prot", "unknown key"]),
    "wrong type": ("listen:\n  port: \"8000\"\n", {}, ["listen.port", "'8000'"]),
    "port out of range": ("listen:\n  port: 70000\n", {}, ["listen.port", "70000"]),
    "bad env var": ("listen:\n  port: 8000\n", {"REGISTRY_PORT": "abc"},
                    ["REGISTRY_PORT", "listen.port", "'abc'"]),
}


@pytest.mark.parametrize("case", list(CONFIG_ERRORS))
async def test_invalid_configuration_exits_2_with_one_line(case, tmp_path):
    text, env, names = CONFIG_ERRORS[case]
    path = tmp_path / "registry.yaml"
    if text is not None:
        path.write_text(text)
    done = await run_trustnet("registry", "--config", str(path), env=env, cwd=tmp_path)
    assert done.returncode == 2, done
    message = done.stderr.strip()
    assert message and "\n" not in message, done  # one line
    assert "Traceback" not in done.stderr
    source = "REGISTRY_PORT" if env else str(path)
    assert source in message, done
    for word in names:
        assert word in message, (word, done)
    assert done.stdout == "", done  # nothing started, nothing logged as JSON
    assert not (tmp_path / "data").exists()  # and no database created


def _missing_directory(tmp: Path) -> Path:
    return tmp / "no-such-dir" / "registry.db"


def _a_directory(tmp: Path) -> Path:
    (tmp / "adir").mkdir()
    return tmp / "adir"


def _foreign_sqlite(tmp: Path) -> Path:
    path = tmp / "other.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE recipes (name TEXT, stars INTEGER)")
    conn.execute("INSERT INTO recipes VALUES ('soup', 5)")
    conn.commit()
    conn.close()
    return path


def _garbage(tmp: Path) -> Path:
    path = tmp / "junk.db"
    path.write_bytes(os.urandom(8192))
    return path


DB_CASES = {
    # case: (make the path under tmp_path, words the error must contain)
    "directory missing": (_missing_directory, ["does not exist"]),
    "path is a directory": (_a_directory, ["is a directory"]),
    "foreign sqlite file": (_foreign_sqlite, ["not a TrustNet registry database"]),
    "garbage file": (_garbage, ["not a TrustNet registry database"]),
}


@pytest.mark.parametrize("case", list(DB_CASES))
async def test_unusable_database_exits_1_with_a_fatal_log_line(case, tmp_path):
    make, words = DB_CASES[case]
    db = make(tmp_path)
    before = db.read_bytes() if db.is_file() else None
    config = write_config(tmp_path, {"listen": {"host": "::1", "port": 0},
                                     "database": {"path": str(db)}})
    done = await run_trustnet("registry", "--config", str(config), cwd=tmp_path)
    assert done.returncode == 1, done
    lines = done.lines  # every line is JSON
    for doc in lines:
        assert_log_line(doc)
    fatal = [d for d in lines if d["level"] == "fatal"]
    assert len(fatal) == 1, done
    [line] = fatal
    assert "database" in line["message"], line
    assert line.get("path") == str(db), line
    assert str(db) in line["error"], line
    for word in words:
        assert word in line["error"], (word, line)
    assert "traceback" not in line, line  # a clear message, not a crash
    assert not any(d["message"] == "registry listening" for d in lines)
    assert "Traceback" not in done.stderr, done
    # Nothing the registry refused was touched.
    if before is not None:
        assert db.read_bytes() == before
        assert not Path(f"{db}-wal").exists()
    assert not (tmp_path / "no-such-dir").exists()


# ---------------------------------------------------------------- logs


async def test_every_stdout_line_is_a_json_log_line(start_registry, http):
    reg = await start_registry()
    base = reg.base_url
    r = await http.post(f"{base}/nodes", json={"id": "log-node", "ipv6": "fd10:1234::42"},
                        headers={"X-Request-Id": "it-req-42"})
    assert r.status_code == 201
    assert r.headers["X-Request-Id"] == "it-req-42"
    r = await http.get(f"{base}/nodes/nobody")
    assert_error_body(r, 404, "not_found")
    generated = r.headers["X-Request-Id"]
    assert generated
    r = await http.post(f"{base}/nodes", content=b"{not json", headers=CURL_FORM)
    assert_error_body(r, 400, "malformed_json")

    req = await reg.wait_for_log(lambda d: d.get("request_id") == generated, timeout=10)
    assert await reg.stop() == 0

    assert reg.bad_lines == []
    assert reg.raw_lines and len(reg.lines) == len(reg.raw_lines)
    for doc in reg.lines:
        assert_log_line(doc)
    assert bytes(reg.stderr) == b"", reg.describe()

    [post] = reg.logs("request", request_id="it-req-42")
    assert post["method"] == "POST" and post["path"] == "/nodes" and post["status"] == 201
    assert isinstance(post["duration_ms"], (int, float)) and post["duration_ms"] >= 0
    assert req["method"] == "GET" and req["path"] == "/nodes/nobody" and req["status"] == 404
    assert reg.logs("request", method="POST", path="/nodes", status=400)

    [registered] = reg.logs("node registered")
    assert registered["node_id"] == "log-node" and registered["level"] == "info"
    messages = [d["message"] for d in reg.lines]
    for expected in ("config loaded", "registry listening", "shutting down", "registry stopped"):
        assert expected in messages, messages
    assert reg.logs("registry stopped")[-1]["exit_code"] == 0


# ---------------------------------------------------------------- durability and shutdown


async def test_data_survives_a_restart_and_a_copied_file(start_registry, http, tmp_path):
    reg = await start_registry()
    base = reg.base_url
    assert (await register(http, base, "keep-a", "fd10:1234::a", port=9101, domain="blue")).status_code == 201
    assert (await register(http, base, "keep-b", "fd10:1234::b")).status_code == 201
    r = await http.post(f"{base}/peers", json={"node_a": "keep-a", "node_b": "keep-b"})
    assert r.status_code == 201, r.text
    assert (await http.post(f"{base}/nodes/keep-a/heartbeat")).status_code == 200
    assert await reg.stop() == 0

    async def check(reg: RegistryProcess) -> None:
        base = reg.base_url
        r = await http.get(f"{base}/nodes/keep-a")
        assert r.status_code == 200, r.text
        node = r.json()
        assert (node["id"], node["ipv6"], node["port"], node["domain"]) == \
            ("keep-a", "fd10:1234::a", 9101, "blue")
        nodes, _ = await all_pages(http, base, limit=100)
        assert [n["id"] for n in nodes] == ["keep-a", "keep-b"]
        peers = (await http.get(f"{base}/peers", params={"node": "keep-b"})).json()["peers"]
        assert [(p["node_a"], p["node_b"]) for p in peers] == [("keep-a", "keep-b")]
        domains = {d["name"] for d in (await http.get(f"{base}/domains")).json()["domains"]}
        assert "blue" in domains
        # the leases came back too: the nodes can heartbeat without re-registering
        assert (await http.post(f"{base}/nodes/keep-b/heartbeat")).status_code == 200
        assert reg.logs("registry state loaded")[0]["nodes"] == 2

    reg2 = await start_registry(db_path=reg.db_path)
    await check(reg2)
    assert await reg2.stop() == 0

    # Section 15: a backup is a copy of the one file (taken while stopped).
    backup = tmp_path / "backup" / "registry.db"
    backup.parent.mkdir()
    shutil.copyfile(reg.db_path, backup)
    reg3 = await start_registry(db_path=backup)
    await check(reg3)
    assert await reg3.stop() == 0


@pytest.mark.parametrize(("sig", "keepalive"), [(signal.SIGTERM, 64), (signal.SIGINT, 0)],
                         ids=["SIGTERM-keepalive", "SIGINT-connection-per-request"])
async def test_signal_stops_gracefully_and_keeps_acknowledged_writes(start_registry, sig, keepalive):
    reg = await start_registry()
    base = reg.base_url
    total = 240
    ok: dict[str, httpx.Response] = {}
    failed: dict[str, BaseException] = {}
    after_signal: list[str] = []
    signalled = False
    enough = trio.Event()

    async def one(client: httpx.AsyncClient, i: int) -> None:
        nonlocal signalled
        node_id = f"inflight-{i:04d}"
        try:
            r = await register(client, base, node_id, node_ip(i))
        except httpx.TimeoutException:
            raise  # a hang is a failure, not a refusal
        except httpx.TransportError as exc:  # refused or cut off by the shutdown: allowed
            failed[node_id] = exc
            return
        ok[node_id] = r
        if signalled:
            after_signal.append(node_id)
        if len(ok) >= 30 and not signalled:
            # Signal right here, while the other requests are still out.
            reg.send_signal(sig)
            signalled = True
            enough.set()

    limits = httpx.Limits(max_connections=64, max_keepalive_connections=keepalive)
    async with httpx.AsyncClient(timeout=httpx.Timeout(20.0), limits=limits) as client:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for i in range(total):
                    nursery.start_soon(one, client, i)
                await enough.wait()
            code = await reg.wait()

    assert code == 0, reg.describe()
    # Requests in flight when the signal came were answered, not dropped. On
    # a loaded machine a connection-per-request client may have none in
    # flight at that instant; on keep-alive connections there always are.
    if keepalive:
        assert after_signal, (len(ok), len(failed))
    for node_id, r in ok.items():
        assert r.status_code == 201, (node_id, r.status_code, r.text)
        body = r.json()
        assert body["id"] == node_id and body["ipv6"] == node_ip(int(node_id[-4:]))
    assert len(ok) + len(failed) == total
    [shut] = reg.logs("shutting down")
    assert shut["signal"] == sig.name
    assert reg.logs("registry stopped")[-1]["exit_code"] == 0
    assert not [d for d in reg.lines if d["level"] in ("error", "fatal")], reg.describe()
    print(f"{sig.name}: {len(ok)} answered ({len(after_signal)} after the signal), "
          f"{len(failed)} refused or cut off")

    # Every acknowledged write is on disk.
    reg2 = await start_registry(db_path=reg.db_path)
    async with httpx.AsyncClient(timeout=httpx.Timeout(20.0)) as client:
        stored, _ = await all_pages(client, reg2.base_url, limit=1000)
    stored_ids = {n["id"] for n in stored}
    assert set(ok) <= stored_ids, sorted(set(ok) - stored_ids)[:10]
    assert await reg2.stop() == 0


# A write refused by the API-key check is answered before its body arrives;
# hypercorn 0.18 would then neither read that body nor close the keep-alive
# connection, so the next request on it would never be answered.
async def test_refused_write_leaves_the_keep_alive_connection_usable(start_registry):
    key = "it-keepalive-key"
    reg = await start_registry(env={"REGISTRY_API_KEY": key})
    body = orjson.dumps({"id": "ka-node", "ipv6": "fd10:1234::99"})
    (status, _, payload), after = await late_body_then_next(reg.port, "POST", "/nodes", body,
                                                            "/health")
    assert status == 401, payload
    if after is not None:  # else the registry closed the connection
        assert after[0] == 200, after
    assert await reg.stop() == 0


# ---------------------------------------------------------------- scale


async def test_1000_registrations_then_query_by_domain(start_registry):
    reg = await start_registry()
    base = reg.base_url
    domains = ["alpha", "beta", "gamma", "delta"]
    expected: dict[str, set[str]] = {d: set() for d in domains}
    statuses: list[int] = []

    async def one(client: httpx.AsyncClient, i: int) -> None:
        domain = domains[i % len(domains)] if i % 7 else "alpha"  # uneven sizes
        node_id = f"n{i:04d}"
        r = await register(client, base, node_id, node_ip(i), domain=domain, port=9000 + i % 100)
        statuses.append(r.status_code)
        if r.status_code == 201:
            expected[domain].add(node_id)

    async with httpx.AsyncClient(timeout=httpx.Timeout(30.0),
                                 limits=httpx.Limits(max_connections=50)) as client:
        with trio.fail_after(120):
            for batch in range(0, 1000, 100):
                async with trio.open_nursery() as nursery:
                    for i in range(batch, batch + 100):
                        nursery.start_soon(one, client, i)
        assert statuses.count(201) == 1000, sorted(set(statuses))
        assert sum(len(v) for v in expected.values()) == 1000

        for domain, limit in (("alpha", 97), ("beta", 100), ("gamma", 1000), ("delta", 33)):
            nodes, pages = await all_pages(client, base, limit=limit, domain=domain)
            ids = [n["id"] for n in nodes]
            assert len(ids) == len(set(ids)), f"{domain}: a node on two pages"
            assert ids == sorted(ids), f"{domain}: pages out of order"
            assert set(ids) == expected[domain], domain
            assert all(n["domain"] == domain for n in nodes)
            assert pages == max(1, math.ceil(len(ids) / limit)), (domain, pages)

        everything, _ = await all_pages(client, base, limit=1000)
        assert len(everything) == 1000

        r = await client.get(f"{base}/nodes", params={"domain": "no-such-domain"})
        assert_error_body(r, 404, "not_found")
    assert await reg.stop() == 0


async def test_100_concurrent_heartbeats(start_registry):
    reg = await start_registry()
    base = reg.base_url
    ids = [f"hb-{i:03d}" for i in range(100)]
    async with httpx.AsyncClient(timeout=httpx.Timeout(30.0),
                                 limits=httpx.Limits(max_connections=100)) as client:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for i, node_id in enumerate(ids):
                    async def reg_one(node_id=node_id, i=i):
                        r = await register(client, base, node_id, node_ip(i))
                        assert r.status_code == 201, r.text
                    nursery.start_soon(reg_one)

        answers: dict[str, httpx.Response] = {}
        before = time.time()

        async def beat(node_id: str) -> None:
            answers[node_id] = await client.post(f"{base}/nodes/{node_id}/heartbeat")

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for node_id in ids:
                    nursery.start_soon(beat, node_id)
        assert sorted(answers) == ids
        for node_id, r in answers.items():
            assert r.status_code == 200, (node_id, r.text)
            body = r.json()
            assert body["node_id"] == node_id
            # renewed from the moment of this heartbeat, not left as at registration
            assert body["lease_deadline"] >= before + body["ttl"] - 1.0, body

        assert_error_body(await client.post(f"{base}/nodes/not-registered/heartbeat"), 404)
    assert await reg.stop() == 0
    assert len(reg.logs("request", path="/nodes/hb-000/heartbeat", status=200)) == 1


# ---------------------------------------------------------------- leases


async def test_lease_expiry_removes_silent_nodes_only(start_registry, http):
    reg = await start_registry(config={"leases": {"heartbeat_interval": "0.3s",
                                                  "ttl_multiplier": 3,
                                                  "checkpoint_interval": "0.2s"}})
    base = reg.base_url
    assert (await register(http, base, "silent", "fd10:1234::5")).status_code == 201
    assert (await register(http, base, "alive", "fd10:1234::6")).status_code == 201
    beats: list[int] = []

    async def keep_alive() -> None:
        while True:
            r = await http.post(f"{base}/nodes/alive/heartbeat")
            beats.append(r.status_code)
            assert r.status_code == 200, r.text
            await trio.sleep(0.1)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(keep_alive)
        expired = await reg.wait_for_log(
            lambda d: d.get("message") == "node expired" and d.get("node_id") == "silent",
            timeout=20)
        # a few more sweeps with "alive" still heartbeating
        await trio.sleep(1.0)
        nursery.cancel_scope.cancel()

    assert expired["level"] == "error"
    assert_log_line(expired)
    assert_error_body(await http.get(f"{base}/nodes/silent"), 404, "not_found")
    assert_error_body(await http.post(f"{base}/nodes/silent/heartbeat"), 404)
    nodes, _ = await all_pages(http, base, limit=100)
    assert [n["id"] for n in nodes] == ["alive"]
    assert (await http.get(f"{base}/nodes/alive")).status_code == 200
    assert beats and set(beats) == {200}
    assert not reg.logs("node expired", node_id="alive"), reg.describe()
    assert len(reg.logs("node expired", node_id="silent")) == 1

    # The expired node registers again like a new one.
    r = await register(http, base, "silent", "fd10:1234::5")
    assert r.status_code == 201, r.text
    assert (await http.post(f"{base}/nodes/silent/heartbeat")).status_code == 200
    assert await reg.stop() == 0


# ---------------------------------------------------------------- API key


async def test_api_key_guards_writes(start_registry, http):
    key = "it-Secret-Key-9f3c"
    reg = await start_registry(env={"REGISTRY_API_KEY": key})
    base = reg.base_url
    body = {"id": "guarded", "ipv6": "fd10:1234::77"}

    r = await http.post(f"{base}/nodes", json=body)
    assert_error_body(r, 401)
    assert r.headers.get("WWW-Authenticate", "").lower().startswith("bearer")
    assert_error_body(await http.post(f"{base}/nodes", json=body,
                                      headers={"Authorization": "Bearer wrong-key"}), 403)
    assert_error_body(await http.post(f"{base}/nodes", json=body,
                                      headers={"Authorization": f"Basic {key}"}), 403)
    assert_error_body(await http.delete(f"{base}/nodes/guarded"), 401)
    # nothing was written by the refused requests
    assert_error_body(await http.get(f"{base}/nodes/guarded"), 404)

    auth = {"Authorization": f"Bearer {key}"}
    r = await http.post(f"{base}/nodes", json=body, headers=auth)
    assert r.status_code == 201, r.text
    assert_error_body(await http.post(f"{base}/nodes/guarded/heartbeat"), 401)
    assert (await http.post(f"{base}/nodes/guarded/heartbeat", headers=auth)).status_code == 200
    # reads stay open
    assert (await http.get(f"{base}/nodes/guarded")).status_code == 200
    assert (await http.get(f"{base}/health")).status_code == 200

    assert await reg.stop() == 0
    assert not [d for d in reg.lines if "REGISTRY_API_KEY" in d["message"]]
    assert all(key not in line for line in reg.raw_lines), "the API key leaked into the log"
    assert reg.logs("config loaded")[0]["config"]["api_key"] == "***"


# ---------------------------------------------------------------- the CLI


async def test_version_flag():
    done = await run_trustnet("--version")
    assert done.returncode == 0, done
    assert done.stdout == f"trustnet {importlib.metadata.version('trustnet')}\n"


async def test_addr_prints_a_deterministic_ula():
    first = await run_trustnet("addr", "node-1")
    again = await run_trustnet("addr", "node-1")
    other = await run_trustnet("addr", "node-2")
    for done in (first, again, other):
        assert done.returncode == 0, done
    addr = ipaddress.IPv6Address(first.stdout.strip())
    assert first.stdout == f"{addr}\n"
    assert addr in ipaddress.IPv6Network("fd10:1234::/32")
    assert addr not in ipaddress.IPv6Network("fd10:1234:ffff::/48")  # the registry's block
    assert again.stdout == first.stdout
    assert other.stdout != first.stdout


# ---------------------------------------------------------------- TLS


@pytest.mark.skipif(shutil.which("curl") is None, reason="no curl binary")
async def test_tls_serves_the_api_on_https_and_nodes_on_wss(start_registry, tmp_path):
    """REGISTRY_TLS_CERT/KEY (record section 10: a mounted certificate):
    the spec's curl commands work over https:// with the CA, plain http://
    gets nothing, a node given the CA registers and heartbeats over wss://,
    and a node that does not trust the certificate exits 1 saying why."""
    import ssl

    from node_process import NodeProcess
    from trustnet.tls import make_certificates, write_certificates

    files = write_certificates(make_certificates(["::1"]), str(tmp_path / "certs"))
    reg = await start_registry(
        config={"leases": {"heartbeat_interval": "500ms"}},
        env={"REGISTRY_TLS_CERT": files["cert.pem"], "REGISTRY_TLS_KEY": files["key.pem"],
             "REGISTRY_API_KEY": "k" * 32})
    assert reg.base_url.startswith("https://[::1]:") and reg.ws_address.startswith("wss://[::1]:")

    with trio.fail_after(30):
        done = await trio.run_process(
            [shutil.which("curl"), "--silent", "--show-error", "--globoff", "--cacert",
             files["ca.pem"], "-H", "Authorization: Bearer " + "k" * 32, "-X", "POST",
             f"{reg.base_url}/nodes", "-d", SPEC_BODY], capture_stdout=True, capture_stderr=True,
            check=False)
    assert done.returncode == 0, done.stderr
    assert orjson.loads(done.stdout)["ipv6"] == "fd10:1234::1"
    with pytest.raises(httpx.HTTPError):
        async with httpx.AsyncClient() as plain:
            await plain.get(reg.base_url.replace("https://", "http://") + "/health", timeout=5.0)

    verify = ssl.create_default_context(cafile=files["ca.pem"])
    async with httpx.AsyncClient(verify=verify, timeout=10.0) as https, \
            trio.open_nursery() as nursery:
        trusting = NodeProcess(tmp_path, "n1", "::1", registry_ws=reg.ws_address,
                               registry_url=reg.base_url,
                               config={"registry": {"ca_file": files["ca.pem"]}})
        doubting = NodeProcess(tmp_path, "n2", "::1", registry_ws=reg.ws_address,
                               registry_url=reg.base_url,
                               config={"registry": {"startup_timeout": "1s",
                                                    "unreachable_timeout": "1s"}})
        try:
            api = await trusting.start(nursery)
            with trio.fail_after(20):
                while True:
                    r = await https.get(f"{reg.base_url}/nodes/n1")
                    health = (await https.get(api + "/health")).json()
                    if r.status_code == 200 and health.get("heartbeat_session"):
                        break
                    await trio.sleep(0.1)
            assert r.json()["public_key"] == trusting.public_key
            with pytest.raises(Exception):  # NodeExited: it never got ready
                await doubting.start(nursery)
            assert await doubting.wait() == 1
            [fatal] = [d for d in doubting.lines if d.get("level") == "fatal"]
            assert "CERTIFICATE_VERIFY_FAILED" in fatal["error"], doubting.describe()
            assert doubting.logs("TLS handshake failed"), doubting.describe()
        finally:
            with trio.CancelScope(shield=True):
                await trusting.aclose()
                await doubting.aclose()
            nursery.cancel_scope.cancel()
