"""Several IPv6 hosts on one machine: network namespaces joined by a bridge.

    async with open_network() as net:                    # namespaces tn-<6 hex>-*
        reg = await net.add_host("registry", "fd10:1234:ffff::1")
        a = await net.add_host("node-1")                   # address: ula_for("node-1")
        proc = await net.start(a, ["trustnet", "node"], env={...}, cwd=tmp_path)
        await proc.wait_for_log(lambda d: d.get("message") == "node API listening")
        resp = await net.http(a, "GET", 9100, "/peers")    # from inside a's namespace, to [::1]
        stream = await net.connect_tcp(a, reg.address, 8001)
        await net.partition(a)                             # a sees no traffic but its own lo
        await net.heal(a)
    # every process killed and reaped, every namespace deleted (with the bridge,
    # the veths and the nft tables inside them), also when the body raised

Layout. One "switch" namespace (``tn-<tag>-sw``) holds a Linux bridge; every
host is a namespace (``tn-<tag>-<i>``) whose ``eth0`` is one end of a veth pair,
the other end a port of the bridge. Nothing is created in the caller's
namespace, so the machine's own interfaces are never touched. Each host gets
one address on ``eth0`` in fd10:1234::/32 (added with ``nodad`` and with DAD
off in the namespace: usable at once) plus ``lo``.

Processes run as ``ip netns exec NS argv...``: ip execs the command, so the
process id the harness holds is the command's own and SIGKILL reaches it.
Their stdout is read line by line; lines that are JSON objects are kept parsed
(TrustNet logs one JSON object per line), see :class:`NsProcess`.

Sockets from the test into a host: :meth:`Network.connect_tcp` creates the
socket while the calling thread is switched into the host's namespace
(``setns``; a socket stays in the namespace it was made in) and switches back
before anything else runs, so the test reaches ``[::1]`` of any host (its local
API) or any address on the bridge, as that host.

Partitions: :meth:`Network.partition` loads an nft table in the host's
namespace that drops every packet in and out except on ``lo`` (or only those
to and from given addresses); :meth:`Network.heal` deletes the table.

Clean-up, in layers: the context manager's exit (always runs); an ``atexit``
hook and a SIGTERM handler that do the same synchronously if the interpreter
is leaving with networks still up; and a marker file per network
(``/run/trustnet-netns/<tag>`` holding the owner's pid) so that the next run
removes what a SIGKILLed run left behind — only for owners that are dead, so
parallel runs never touch each other.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import orjson
import pytest
import trio

# tests/integration/logged_process.py; conftest.py puts tests/integration on sys.path.
from logged_process import LoggedProcess, ProcessExited

__all__ = [
    "DUMP_KEY",
    "HarnessError",
    "Host",
    "HttpResponse",
    "Network",
    "NsProcess",
    "ProcessExited",
    "cleanup_stale",
    "collapsed",
    "list_namespaces",
    "open_network",
    "unavailable_reason",
]

PREFIX = "tn-"
PREFIXLEN = 32  # fd10:1234::/32: every host on the bridge is on-link
MARKER_DIR = Path("/run/trustnet-netns")
NFT_TABLE = "tn_partition"
IP_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0


DUMP_KEY: pytest.StashKey[Callable[[], str]] = pytest.StashKey()
"""A fixture stores ``() -> str`` under ``request.node.stash[DUMP_KEY]``: the
conftest adds its result (process logs) to the report of a failed test."""


T = TypeVar("T")
BOUND = 30.0  # seconds: the failure bound for anything that should "just happen"
TRUSTNET = str(Path(sys.executable).parent / "trustnet")
"""The console script of the venv running the tests."""


def clean_env(extra: Mapping[str, str]) -> dict[str, str]:
    """This process's environment without any variable TrustNet reads, plus ``extra``."""
    from trustnet.config import REGISTRY_ENV_VARS
    from trustnet.node.config import NODE_ENV_VARS

    drop = {*REGISTRY_ENV_VARS, *NODE_ENV_VARS, "REGISTRY_WS_PORT", "TRUSTNET_NODE_API"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(extra)
    return env


class HarnessError(RuntimeError):
    """A namespace, link, address or rule could not be set up."""


# --------------------------------------------------------------------------- availability

_probe_result: list[str | None] = []


def unavailable_reason() -> str | None:
    """Why namespaces cannot be used here (not root, no ip/nft, ...), or None.

    The first call also creates and deletes a probe namespace with an nft
    table in it, so a container without CAP_SYS_ADMIN or nf_tables is caught."""
    if _probe_result:
        return _probe_result[0]
    reason = _probe()
    _probe_result.append(reason)
    return reason


def _probe() -> str | None:
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root (run the tests as root)"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"'{tool}' is not installed (iproute2 / nftables)"
    if not hasattr(os, "setns"):
        return "os.setns is missing (Python >= 3.12 on Linux)"
    ns = f"{PREFIX}{secrets.token_hex(3)}-probe"
    try:
        for argv in (["ip", "netns", "add", ns],
                     ["ip", "-n", ns, "link", "add", "br0", "type", "bridge"],
                     ["ip", "netns", "exec", ns, "nft", "add", "table", "inet", NFT_TABLE]):
            done = subprocess.run(argv, capture_output=True, timeout=IP_TIMEOUT, check=False)
            if done.returncode != 0:
                return (f"cannot set up a network namespace here: {' '.join(argv)}: "
                        f"{done.stderr.decode(errors='replace').strip()}")
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot set up a network namespace here: {exc}"
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
    return None


def list_namespaces() -> list[str]:
    """The names `ip netns list` shows."""
    done = subprocess.run(["ip", "netns", "list"], capture_output=True, check=False)
    return [line.split()[0] for line in done.stdout.decode().splitlines() if line.strip()]


# --------------------------------------------------------------------------- commands

async def _run(argv: list[str], *, stdin: bytes | None = None,
               timeout: float = IP_TIMEOUT) -> str:
    """Run a setup command; its stdout, or HarnessError with its stderr."""
    with trio.fail_after(timeout):
        done = await trio.run_process(argv, stdin=stdin if stdin is not None else b"",
                                      capture_stdout=True, capture_stderr=True, check=False)
    if done.returncode != 0:
        raise HarnessError(f"{' '.join(argv)} exited {done.returncode}: "
                           f"{done.stderr.decode(errors='replace').strip()}")
    return done.stdout.decode(errors="replace")


def _ns_pids(ns: str) -> list[int]:
    done = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, check=False)
    return [int(p) for p in done.stdout.split() if p.isdigit()]


def _destroy_sync(namespaces: Iterable[str]) -> list[str]:
    """SIGKILL every process in these namespaces, delete them; the ones left."""
    namespaces = list(namespaces)
    for ns in namespaces:
        for pid in _ns_pids(ns):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
    for ns in namespaces:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
    present = set(list_namespaces())
    return [ns for ns in namespaces if ns in present]


def _pid_alive(pid: int) -> bool:
    """True for a running process (a zombie is dead: it only waits to be reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def cleanup_stale() -> list[str]:
    """Remove the namespaces of networks whose owner process is dead; their names."""
    removed: list[str] = []
    if not MARKER_DIR.is_dir():
        return removed
    present = list_namespaces()
    for marker in MARKER_DIR.iterdir():
        try:
            pid = int(marker.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pid = -1
        if pid > 0 and _pid_alive(pid):
            continue
        mine = [ns for ns in present if ns.startswith(f"{PREFIX}{marker.name}-")]
        _destroy_sync([ns for ns in mine if not ns.endswith("-sw")]
                      + [ns for ns in mine if ns.endswith("-sw")])
        removed += mine
        with contextlib.suppress(OSError):
            marker.unlink()
    return removed


# --------------------------------------------------------------------------- safety net

_live: dict[str, "Network"] = {}
_live_lock = threading.RLock()  # the SIGTERM handler may run while it is held
_net_installed = False


def _emergency_cleanup() -> None:
    with _live_lock:
        nets = list(_live.values())
        _live.clear()
    for net in nets:
        net._destroy_sync()


def _on_sigterm(signum: int, frame: Any) -> None:
    _emergency_cleanup()
    previous = _previous_sigterm
    if callable(previous):
        previous(signum, frame)
    elif previous != signal.SIG_IGN:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)


_previous_sigterm: Any = None


def _install_safety_net() -> None:
    global _net_installed, _previous_sigterm
    if _net_installed:
        return
    _net_installed = True
    atexit.register(_emergency_cleanup)
    if threading.current_thread() is threading.main_thread():
        _previous_sigterm = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, _on_sigterm)


# --------------------------------------------------------------------------- hosts

class Host:
    """One namespace on the bridge: ``ns`` (its name), ``address`` (on eth0)."""

    def __init__(self, name: str, ns: str, address: str, index: int):
        self.name = name
        self.ns = ns
        self.address = address
        self.index = index
        self.partitioned = False

    def url(self, port: int, scheme: str = "http") -> str:
        return f"{scheme}://[{self.address}]:{port}"

    def __repr__(self) -> str:
        return f"Host({self.name!r}, ns={self.ns!r}, address={self.address})"


class HttpResponse:
    def __init__(self, status: int, headers: dict[str, str], body: bytes):
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return orjson.loads(self.body)

    def __repr__(self) -> str:
        return f"HttpResponse({self.status}, {self.body[:500]!r})"


# --------------------------------------------------------------------------- processes

class NsProcess(LoggedProcess):
    """A process in a host's namespace, its stdout parsed line by line.

    ``lines``: every stdout line that is a JSON object; ``raw_lines``: every
    line; ``stderr``: all of stderr (see :class:`LoggedProcess`). Started by
    :meth:`Network.start`; stdout lines also go to ``log_file`` when given."""

    stop_timeout = STOP_TIMEOUT

    def __init__(self, net: "Network", host: Host, argv: list[str], name: str,
                 log_file: Path | None = None):
        super().__init__()
        self.net = net
        self.log_file = log_file
        self.host = host
        self.argv = argv
        self.name = name

    @property
    def label(self) -> str:
        return f"{self.name} in {self.host.ns}"

    def _add_line(self, raw: bytes) -> None:
        if self.log_file is not None:
            with contextlib.suppress(OSError), open(self.log_file, "ab") as f:
                f.write(raw + b"\n")
        super()._add_line(raw)


class Finished:
    """A command run to completion in a namespace."""

    def __init__(self, returncode: int, stdout: bytes, stderr: bytes):
        self.returncode = returncode
        self.stdout = stdout.decode("utf-8", "replace")
        self.stderr = stderr.decode("utf-8", "replace")

    def __repr__(self) -> str:
        return (f"Finished({self.returncode}, stdout={self.stdout[-1500:]!r}, "
                f"stderr={self.stderr[-1500:]!r})")


# --------------------------------------------------------------------------- network

class Network:
    """Hosts on one bridge; use through :func:`open_network`."""

    def __init__(self, tag: str | None = None):
        self.tag = tag or secrets.token_hex(3)
        self.switch = f"{PREFIX}{self.tag}-sw"
        self.hosts: dict[str, Host] = {}
        self.processes: list[NsProcess] = []
        self.namespaces: list[str] = []  # created, in order (the switch first)
        self._reserved: set[str] = set()
        self._next_index = 0
        self._nursery: trio.Nursery | None = None
        self._marker = MARKER_DIR / self.tag
        self._closed = False

    def __repr__(self) -> str:
        return f"Network({self.tag}, hosts={list(self.hosts)})"

    # ------------------------------------------------------------ setup

    async def _setup(self) -> None:
        await trio.to_thread.run_sync(cleanup_stale)
        MARKER_DIR.mkdir(parents=True, exist_ok=True)
        self._marker.write_text(f"{os.getpid()}\n")
        with _live_lock:
            _live[self.tag] = self
        _install_safety_net()
        await self._add_namespace(self.switch)
        await _run(["ip", "-n", self.switch, "link", "add", "br0", "type", "bridge"])
        await _run(["ip", "-n", self.switch, "link", "set", "br0", "up"])

    async def _add_namespace(self, ns: str) -> None:
        await _run(["ip", "netns", "add", ns])
        self.namespaces.append(ns)
        await _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        # No duplicate address detection: an address is usable the moment it is added.
        await _run(["ip", "netns", "exec", ns, "sysctl", "-qw",
                    "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0"])

    async def add_host(self, name: str, address: str | ipaddress.IPv6Address | None = None
                       ) -> Host:
        """A new namespace on the bridge with ``address`` (default: ula_for(name))."""
        if name in self.hosts or name in self._reserved:
            raise ValueError(f"host {name!r} exists")
        if address is None:
            from trustnet.addressing import ula_for
            address = ula_for(name)
        addr = ipaddress.IPv6Address(str(address)).compressed
        # reserved before the first await: hosts may be added concurrently
        self._reserved.add(name)
        index = self._next_index
        self._next_index += 1
        ns = f"{PREFIX}{self.tag}-{index}"
        port = f"v{index}"
        await self._add_namespace(ns)
        await _run(["ip", "-n", self.switch, "link", "add", port, "type", "veth",
                    "peer", "name", "eth0", "netns", ns])
        await _run(["ip", "-n", self.switch, "link", "set", port, "master", "br0"])
        await _run(["ip", "-n", self.switch, "link", "set", port, "up"])
        await _run(["ip", "-n", ns, "link", "set", "eth0", "up"])
        await _run(["ip", "-n", ns, "-6", "addr", "add", f"{addr}/{PREFIXLEN}", "dev", "eth0",
                    "nodad"])
        host = Host(name, ns, addr, index)
        self.hosts[name] = host
        return host

    # ------------------------------------------------------------ processes

    def _exec_argv(self, host: Host, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", host.ns, *argv]

    async def start(self, host: Host, argv: list[str], *, env: Mapping[str, str] | None = None,
                    cwd: str | os.PathLike[str] | None = None, name: str | None = None,
                    log_file: str | os.PathLike[str] | None = None) -> NsProcess:
        """Start ``argv`` in ``host``'s namespace, stdout and stderr captured.

        ``env`` is the whole environment (default: this process's); stdout
        lines are also appended to ``log_file`` when given."""
        assert self._nursery is not None, "use open_network()"
        proc = NsProcess(self, host, argv, name or host.name,
                         Path(log_file) if log_file is not None else None)
        await proc._launch(self._nursery, self._exec_argv(host, argv), env=env, cwd=cwd)
        self.processes.append(proc)
        return proc

    async def run(self, host: Host, argv: list[str], *, env: Mapping[str, str] | None = None,
                  stdin: bytes = b"", timeout: float = 30.0) -> Finished:
        """Run ``argv`` in ``host``'s namespace to completion (killed after ``timeout``)."""
        with trio.fail_after(timeout):
            done = await trio.run_process(
                self._exec_argv(host, argv), env=dict(env) if env is not None else None,
                stdin=stdin, capture_stdout=True, capture_stderr=True, check=False)
        return Finished(done.returncode, done.stdout, done.stderr)

    # ------------------------------------------------------------ sockets

    def socket_in(self, host: Host, family: int = socket.AF_INET6,
                  kind: int = socket.SOCK_STREAM) -> socket.socket:
        """A new socket that lives in ``host``'s namespace.

        Only the calling thread switches namespace, and only between two
        system calls: it is back home before anything else can run on it."""
        with open(f"/run/netns/{host.ns}", "rb") as there, \
                open("/proc/thread-self/ns/net", "rb") as home:
            os.setns(there.fileno(), os.CLONE_NEWNET)
            try:
                return socket.socket(family, kind)
            finally:
                os.setns(home.fileno(), os.CLONE_NEWNET)

    async def connect_tcp(self, host: Host, address: str, port: int, *,
                          timeout: float = 10.0) -> trio.SocketStream:
        """A TCP connection made from inside ``host`` to ``[address]:port``."""
        sock = trio.socket.from_stdlib_socket(self.socket_in(host))
        try:
            with trio.fail_after(timeout):
                await sock.connect((str(address), port))
        except BaseException:
            sock.close()
            raise
        return trio.SocketStream(sock)

    async def can_connect(self, host: Host, address: str, port: int, *,
                          timeout: float = 2.0) -> bool:
        """True when a TCP connect from ``host`` to ``[address]:port`` is answered
        (accepted or refused: the packets got through); False when it times out."""
        try:
            stream = await self.connect_tcp(host, address, port, timeout=timeout)
        except ConnectionRefusedError:
            return True
        except (OSError, trio.TooSlowError):
            return False
        await stream.aclose()
        return True

    async def http(self, host: Host, method: str, port: int, path: str, *,
                   address: str = "::1", json: Any = None, body: bytes | None = None,
                   timeout: float = 10.0, tls_ca: str | None = None) -> HttpResponse:
        """One HTTP/1.1 request made from inside ``host`` (default: to its own
        [::1]); over TLS, the certificate checked against ``tls_ca``, when given."""
        if json is not None:
            body = orjson.dumps(json)
        with trio.fail_after(timeout):
            stream: trio.abc.Stream = await self.connect_tcp(host, address, port, timeout=timeout)
            if tls_ca is not None:
                stream = trio.SSLStream(stream, ssl.create_default_context(cafile=tls_ca),
                                        server_hostname=address, https_compatible=True)
                await stream.do_handshake()
            async with stream:
                head = (f"{method} {path} HTTP/1.1\r\nHost: [{address}]:{port}\r\n"
                        "Connection: close\r\nAccept: application/json\r\n")
                if body is not None:
                    head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                await stream.send_all(head.encode() + b"\r\n" + (body or b""))
                data = bytearray()
                # Read up to the end of the body: a server may keep the socket
                # open after "Connection: close" (hypercorn does for a while).
                while not _http_complete(data):
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        break
                    data += chunk
        return _parse_http(bytes(data))

    # ------------------------------------------------------------ partitions

    async def partition(self, host: Host, *, peers: Iterable[Host | str] | None = None) -> None:
        """Drop ``host``'s traffic: all of it but ``lo``, or only to and from ``peers``."""
        if peers is None:
            rules_in, rules_out, policy = 'iif "lo" accept', 'oif "lo" accept', "drop"
        else:
            addrs = ", ".join(p.address if isinstance(p, Host) else str(p) for p in peers)
            rules_in = f"ip6 saddr {{ {addrs} }} drop"
            rules_out = f"ip6 daddr {{ {addrs} }} drop"
            policy = "accept"
        ruleset = (f"table inet {NFT_TABLE} {{\n"
                   f"  chain input {{ type filter hook input priority -300; policy {policy}; "
                   f"{rules_in}; }}\n"
                   f"  chain output {{ type filter hook output priority -300; policy {policy}; "
                   f"{rules_out}; }}\n"
                   f"}}\n")
        if host.partitioned:
            await self.heal(host)
        await _run(["ip", "netns", "exec", host.ns, "nft", "-f", "-"], stdin=ruleset.encode())
        host.partitioned = True

    async def heal(self, host: Host) -> None:
        """Remove ``host``'s partition table (no-op when there is none)."""
        if host.partitioned:
            await _run(["ip", "netns", "exec", host.ns, "nft", "delete", "table", "inet",
                        NFT_TABLE])
            host.partitioned = False

    # ------------------------------------------------------------ teardown

    async def aclose(self) -> None:
        """Kill and reap every process, delete every namespace. Idempotent."""
        if self._closed:
            return
        for proc in self.processes:
            proc.kill()
        for proc in self.processes:
            await proc.aclose()
        left = await trio.to_thread.run_sync(self._destroy_sync)
        if left:
            raise HarnessError(f"namespaces left behind: {left}")

    def _destroy_sync(self) -> list[str]:
        """Synchronous teardown (also the atexit / SIGTERM path); what is left."""
        if self._closed:
            return []
        self._closed = True
        for proc in self.processes:
            proc.kill()
        # hosts first: their veth ends go, then the switch with the bridge
        order = [ns for ns in self.namespaces if ns != self.switch] + \
                [ns for ns in self.namespaces if ns == self.switch]
        left = _destroy_sync(order)
        with contextlib.suppress(OSError):
            self._marker.unlink()
        with _live_lock:
            _live.pop(self.tag, None)
        return left


def _http_complete(data: bytes | bytearray) -> bool:
    """True once ``data`` holds a whole response (by Content-Length or last chunk)."""
    head, sep, rest = bytes(data).partition(b"\r\n\r\n")
    if not sep:
        return False
    headers = {}
    for line in head.decode("latin-1").split("\r\n")[1:]:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        return rest.endswith(b"0\r\n\r\n")
    if "content-length" in headers:
        return len(rest) >= int(headers["content-length"])
    return False  # read to EOF


def _parse_http(data: bytes) -> HttpResponse:
    head, sep, rest = data.partition(b"\r\n\r\n")
    if not sep:
        raise HarnessError(f"not an HTTP response: {data[:300]!r}")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    status = int(status_line.split()[1])
    headers: dict[str, str] = {}
    for line in header_lines:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = bytearray()
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            body += rest[:size]
            rest = rest[size + 2:]
        return HttpResponse(status, headers, bytes(body))
    if "content-length" in headers:
        rest = rest[:int(headers["content-length"])]
    return HttpResponse(status, headers, rest)


@contextlib.asynccontextmanager
async def open_network(tag: str | None = None) -> AsyncIterator[Network]:
    """A :class:`Network`; on exit every process and namespace it made is gone."""
    reason = unavailable_reason()
    if reason is not None:
        raise HarnessError(reason)
    net = Network(tag)
    try:
        with collapsed():
            async with trio.open_nursery() as nursery:
                net._nursery = nursery
                try:
                    await net._setup()
                    yield net
                finally:
                    with trio.CancelScope(shield=True):
                        for proc in net.processes:
                            proc.kill()
                        for proc in net.processes:
                            await proc.aclose()
                    nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await net.aclose()


@contextlib.contextmanager
def collapsed():
    """A nursery's group holding one real error re-raised as that error."""
    try:
        yield
    except BaseExceptionGroup as group:
        leaves = _leaves(group)
        real = [e for e in leaves if not isinstance(e, trio.Cancelled)]
        if len(real) == 1:
            real[0].__suppress_context__ = True
            raise real[0] from None
        raise


def _leaves(error: BaseException) -> list[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        return [leaf for sub in error.exceptions for leaf in _leaves(sub)]
    return [error]


async def eventually(check: Callable[[], Awaitable[T]], *, what: str,
                     timeout: float = BOUND, interval: float = 0.2) -> T:
    """Run ``check`` until it returns without an AssertionError (its result).

    At ``timeout`` the last AssertionError is raised, prefixed with ``what``."""
    last: BaseException | None = None
    with trio.move_on_after(timeout):
        while True:
            try:
                return await check()
            except (AssertionError, OSError, trio.TooSlowError, HarnessError) as exc:
                last = exc
            await trio.sleep(interval)
    raise AssertionError(f"{what}: not within {timeout}s; last check: {last}") from last
