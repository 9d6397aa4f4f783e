"""`network = "allow"`: the agent reaches only the host:port pairs of its allow list (docs/sandbox.md).

The agent runs in a network namespace of its own (bwrap `--unshare-net`: only a loopback). Its
shim puts two kinds of listening sockets *into* that namespace, and serves them from its own
event loop, connecting out from the host's namespace:

- an HTTP proxy on `127.0.0.1:PROXY_PORT` (HTTP CONNECT for https, absolute-URI forwarding for
  plain http), named to the agent in HTTPS_PROXY / HTTP_PROXY / ALL_PROXY (and lower case): it
  lets through the listed pairs only, answers 403 to the rest and records each refusal as
  `network.blocked` (host, port, how: `connect` or `proxy`);
- a transparent forward for each listed loopback pair (`127.0.0.1:PORT`, `localhost:PORT`,
  `[::1]:PORT`): inside, `127.0.0.1:PORT` (and `[::1]:PORT`) reach the host's. Agent CLIs bypass
  proxies for localhost (NO_PROXY), and a local model server is what they talk to.

Nothing else listens inside, and the namespace has no route out: any other connection is refused
(loopback) or finds the network unreachable. A refused loopback connection is seen too: a packet
socket on the namespace's loopback, filtered in the kernel to the resets that refuse a
connection, records it as `network.blocked` with how `direct`.

How the sockets get in: bwrap starts with `--info-fd` (it writes the sandbox's pid) and
`--block-fd` (it waits before running the agent). The shim opens `/proc/PID/ns/net`, and a
short-lived thread of its own `setns`es into it (namespace membership is per thread), makes the
sockets there and ends; then the shim releases bwrap and the agent starts with everything in
place. As root no user namespace is made, so the shim may join it; where it cannot, the run fails
at spawn with the reason. The shim outlives a supervisor restart, and so do the sockets it serves.
"""

import asyncio
import contextlib
import ctypes
import os
import socket
import struct
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from typing import Any

# (ipaddress, json, threading and urllib.parse are imported where used: every shim imports this
# module, and only a shim under `allow` needs them)

PROXY_PORT = 3128  # inside the agent's namespace: nothing else listens there (another if it is listed)
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
MAX_HEAD = 64 * 1024
HEAD_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 30.0
INFO_TIMEOUT_S = 30.0
COPY_SIZE = 64 * 1024
MAX_BLOCKED_EVENTS = 1000  # network.blocked per execution (an agent retrying in a loop stops being recorded)
CLONE_NEWNET = 0x40000000
PROXY_VARS = ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "https_proxy", "http_proxy", "all_proxy")
NO_PROXY = "localhost,127.0.0.1,::1"

Record = Callable[[str, dict[str, Any]], None]


# --- the allow list ----------------------------------------------------------------------------


def parse_entry(entry: str) -> tuple[str, int]:
    """`host:port` (`[v6]:port` for an IPv6 address) as (host in lower case, port); ValueError says why."""
    import ipaddress

    text = entry.strip() if isinstance(entry, str) else ""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text:
        raise ValueError(f"allow entry {entry!r} is not host:port (e.g. api.anthropic.com:443 or 127.0.0.1:8080)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"allow entry {entry!r}: {host!r} is not an IPv6 address") from None
    elif ":" in host:
        raise ValueError(f"allow entry {entry!r}: write an IPv6 address in brackets, e.g. [::1]:8080")
    elif not all(part and len(part) <= 63 for part in host.split(".")) or not all(
        c.isalnum() or c in "-._" for c in host
    ):
        raise ValueError(f"allow entry {entry!r}: {host!r} is not a host name or address")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"allow entry {entry!r}: the port must be a number from 1 to 65535")
    return host.lower(), int(port_text)


def allow_problem(entries: Iterable[str]) -> str | None:
    """Why an allow list cannot be used (one line), or None."""
    for entry in entries:
        try:
            parse_entry(entry)
        except ValueError as exc:
            return str(exc)
    return None


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parsed(entries: Iterable[str]) -> list[tuple[str, int]]:
    return list(dict.fromkeys(parse_entry(e) for e in entries))


def proxy_port(entries: Iterable[str]) -> int:
    """The proxy's port inside: PROXY_PORT unless a listed loopback pair takes it."""
    taken = {port for host, port in parsed(entries) if is_loopback(host)}
    port = PROXY_PORT
    while port in taken:
        port += 1
    return port


def allowed(pairs: Sequence[tuple[str, int]], host: str, port: int) -> bool:
    """Whether a request for host:port may pass: listed as such (the loopback names are one host)."""
    host = host.lower().strip("[]")
    if (host, port) in pairs:
        return True
    return is_loopback(host) and any(is_loopback(h) and p == port for h, p in pairs)


def environment(sandbox: Mapping[str, Any], env: Mapping[str, str]) -> dict[str, str]:
    """The agent's environment under `allow`: the proxy named in every variable CLIs read."""
    if sandbox.get("mode") != "bwrap" or sandbox.get("network") != "allow":
        return dict(env)
    url = f"http://127.0.0.1:{sandbox.get('proxy_port') or proxy_port(sandbox.get('allow') or ())}"
    out = {**env, **dict.fromkeys(PROXY_VARS, url)}
    no_proxy = env.get("NO_PROXY") or env.get("no_proxy")
    out["NO_PROXY"] = out["no_proxy"] = f"{no_proxy},{NO_PROXY}" if no_proxy else NO_PROXY
    return out


# --- into the namespace ------------------------------------------------------------------------


def _in_netns(pid: int, make: Callable[[], list[socket.socket]]) -> list[socket.socket]:
    """Run `make` in a new thread that joined the network namespace of `pid`; the thread then ends."""
    import threading

    result: dict[str, Any] = {}

    def inside() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    errno = ctypes.get_errno()
                    raise OSError(errno, f"setns into the agent's network namespace: {os.strerror(errno)}")
            finally:
                os.close(fd)
            result["sockets"] = make()
        except BaseException as exc:  # handed to the caller
            result["error"] = exc

    thread = threading.Thread(target=inside, name="corral-netns", daemon=True)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    sockets: list[socket.socket] = result["sockets"]
    return sockets


def _listen(address: str, port: int) -> socket.socket | None:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address, port))
        sock.listen(128)
        sock.setblocking(False)
    except OSError:
        sock.close()
        if family == socket.AF_INET6:
            return None  # no IPv6 in the namespace: its loopback has only 127.0.0.1
        raise
    return sock


# A classic BPF program for a packet socket (SOCK_DGRAM, ETH_P_IP: data starts at the IP header):
# keep TCP segments whose flags are exactly RST+ACK with sequence number 0, the reset a kernel sends
# for a SYN that found no listener ("connection refused"); drop everything else in the kernel.
_BPF = (
    (0x30, 0, 0, 9),  # ldb [9]            the IP protocol
    (0x15, 0, 7, 6),  # jeq #6 (TCP)       else drop
    (0xB1, 0, 0, 0),  # ldxb 4*([0]&0xf)   the IP header's length
    (0x50, 0, 0, 13),  # ldb [x+13]         the TCP flags
    (0x54, 0, 0, 0x3F),  # and #0x3f
    (0x15, 0, 3, 0x14),  # jeq #RST|ACK     else drop
    (0x40, 0, 0, 4),  # ld [x+4]           the sequence number
    (0x15, 0, 1, 0),  # jeq #0             else drop
    (0x06, 0, 0, 0xFFFF),  # ret #65535         keep
    (0x06, 0, 0, 0),  # ret #0             drop
)
_SO_ATTACH_FILTER = 26
_ETH_P_IP = 0x0800
_PACKET_OUTGOING = 4


def _reset_watch() -> socket.socket | None:
    """A packet socket on the namespace's loopback that sees only refusing resets (None if none can be made)."""
    try:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(_ETH_P_IP))
    except (OSError, AttributeError):
        return None
    try:
        program = b"".join(struct.pack("HBBI", *ins) for ins in _BPF)
        buffer = ctypes.create_string_buffer(program)
        fprog = struct.pack("HL", len(_BPF), ctypes.addressof(buffer))
        sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, fprog)
        sock.bind(("lo", _ETH_P_IP))
        # what arrived before the filter was attached: drained, so only resets are read
        sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:
                sock.recv(65536)
    except OSError:
        sock.close()
        return None
    return sock


def _refused_port(packet: bytes) -> tuple[str, int] | None:
    """(address, port) a refusing reset answers (its source), from an IPv4 packet."""
    if len(packet) < 20 or packet[0] >> 4 != 4:
        return None
    header = (packet[0] & 0x0F) * 4
    if len(packet) < header + 14:
        return None
    source = socket.inet_ntoa(packet[12:16])
    port = struct.unpack_from("!H", packet, header)[0]
    return source, int(port)


# --- the shim's side ---------------------------------------------------------------------------


class Gate:
    """bwrap's info and block pipes for one agent start under `allow`; then the served sockets."""

    def __init__(self, sandbox: Mapping[str, Any], record: Record) -> None:
        self.pairs = parsed(sandbox.get("allow") or ())
        self.proxy_port = int(sandbox.get("proxy_port") or proxy_port(sandbox.get("allow") or ()))
        self.record = record
        self.info_r, self.info_w = os.pipe()
        self.block_r, self.block_w = os.pipe()
        for fd in (self.info_r, self.block_w):
            os.set_inheritable(fd, False)
        self.servers: list[asyncio.AbstractServer] = []
        self.watch: socket.socket | None = None
        self.blocked = 0
        self._tasks: set[asyncio.Task[None]] = set()

    @classmethod
    def wanted(cls, spec: Mapping[str, Any], record: Record) -> "Gate | None":
        sandbox = spec.get("sandbox") or {}
        if sandbox.get("mode") == "bwrap" and sandbox.get("network") == "allow":
            return cls(sandbox, record)
        return None

    def bwrap_args(self) -> list[str]:
        return ["--info-fd", str(self.info_w), "--block-fd", str(self.block_r)]

    @property
    def child_fds(self) -> tuple[int, int]:
        return self.info_w, self.block_r

    def started(self) -> None:
        """The agent's process was made: the shim's copies of bwrap's ends go."""
        for fd in (self.info_w, self.block_r):
            with contextlib.suppress(OSError):
                os.close(fd)

    def abandon(self) -> None:
        """Close every pipe end (a spawn that failed, or the end)."""
        for fd in (self.info_r, self.info_w, self.block_r, self.block_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    async def _sandbox_pid(self) -> int:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[bytes] = loop.create_future()
        got = bytearray()
        os.set_blocking(self.info_r, False)

        def ready() -> None:
            try:
                data = os.read(self.info_r, 4096)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            got.extend(data)
            if not data or b"}" in got:
                loop.remove_reader(self.info_r)
                if not done.done():
                    done.set_result(bytes(got))

        loop.add_reader(self.info_r, ready)
        try:
            info = await asyncio.wait_for(done, INFO_TIMEOUT_S)
        finally:
            with contextlib.suppress(ValueError, OSError):
                loop.remove_reader(self.info_r)
        import json

        try:
            return int(json.loads(info)["child-pid"])
        except (ValueError, KeyError, TypeError):
            raise OSError("bwrap did not report its sandbox (no --info-fd output)") from None

    async def attach(self) -> None:
        """Make the sockets inside the agent's namespace, serve them, release the agent."""
        pid = await self._sandbox_pid()
        loopback_ports = sorted({port for host, port in self.pairs if is_loopback(host)})

        def make() -> list[socket.socket]:
            made: list[socket.socket] = []
            try:
                for port in [self.proxy_port, *loopback_ports]:
                    for address in ("127.0.0.1", "::1"):
                        sock = _listen(address, port)
                        if sock is not None:
                            made.append(sock)
                watch = _reset_watch()
                if watch is not None:
                    made.append(watch)
            except BaseException:
                for sock in made:
                    sock.close()
                raise
            return made

        made = _in_netns(pid, make)
        for sock in made:
            if sock.family == socket.AF_PACKET:
                self.watch = sock
                asyncio.get_running_loop().add_reader(sock.fileno(), self._resets)
                continue
            port = sock.getsockname()[1]
            handler = self._proxy if port == self.proxy_port else self._forwarder(port)
            self.servers.append(await asyncio.start_server(handler, sock=sock, limit=MAX_HEAD))
        self.release()

    def release(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self.block_w, b"x")
        with contextlib.suppress(OSError):
            os.close(self.block_w)
        with contextlib.suppress(OSError):
            os.close(self.info_r)

    def close(self) -> None:
        for server in self.servers:
            server.close()
        if self.watch is not None:
            with contextlib.suppress(ValueError, OSError):
                asyncio.get_running_loop().remove_reader(self.watch.fileno())
            self.watch.close()
            self.watch = None
        for task in list(self._tasks):
            task.cancel()

    # refusals

    def _blocked(self, host: str, port: int, how: str) -> None:
        self.blocked += 1
        if self.blocked <= MAX_BLOCKED_EVENTS:
            self.record("network.blocked", {"host": host, "port": port, "how": how})

    def _resets(self) -> None:
        watch = self.watch
        if watch is None:
            return
        while True:
            try:
                packet, address = watch.recvfrom(65536)
            except BlockingIOError:
                return
            except OSError:
                return
            if len(address) > 2 and address[2] == _PACKET_OUTGOING:
                continue  # a loopback packet is seen leaving and arriving: counted once
            refused = _refused_port(packet)
            if refused is not None:
                self._blocked(refused[0], refused[1], "direct")

    # the forwards

    def _forwarder(self, port: int) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any]:
        hosts = [h for h, p in self.pairs if p == port and is_loopback(h)]
        target = "127.0.0.1" if "127.0.0.1" in hosts or "localhost" in hosts else hosts[0]

        async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await self._tracked(self._connect_and_pipe(reader, writer, target, port, b""))

        return forward

    async def _connect_and_pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, port: int, first: bytes
    ) -> None:
        try:
            up_reader, up_writer = await asyncio.wait_for(asyncio.open_connection(host, port), CONNECT_TIMEOUT_S)
        except (OSError, TimeoutError):
            writer.close()
            return
        if first:
            up_writer.write(first)
        await _pipe(reader, writer, up_reader, up_writer)

    async def _tracked(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await work
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        finally:
            if task is not None:
                self._tasks.discard(task)

    # the proxy

    async def _proxy(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._tracked(self._proxy_one(reader, writer))

    async def _proxy_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        from urllib.parse import urlsplit

        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT_S)
        except (asyncio.LimitOverrunError, asyncio.IncompleteReadError, TimeoutError, ValueError):
            await _answer(writer, 400, "a request head of at most 64 KiB, ending with an empty line")
            return
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split()
        if len(parts) != 3:
            await _answer(writer, 400, "not an HTTP request line")
            return
        method, target, version = parts
        if method.upper() == "CONNECT":
            try:
                host, port = parse_entry(target)
            except ValueError:
                await _answer(writer, 400, f"CONNECT needs host:port (got {target!r})")
                return
            if not allowed(self.pairs, host, port):
                self._blocked(host, port, "connect")
                await _answer(writer, 403, f"{host}:{port} is not on this execution's allow list")
                return
            try:
                up_reader, up_writer = await asyncio.wait_for(asyncio.open_connection(host, port), CONNECT_TIMEOUT_S)
            except (OSError, TimeoutError) as exc:
                await _answer(writer, 502, f"cannot reach {host}:{port}: {exc}")
                return
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await _pipe(reader, writer, up_reader, up_writer)
            return
        url = urlsplit(target)
        if url.scheme.lower() != "http" or not url.hostname:
            await _answer(writer, 400, "this proxy takes CONNECT host:port, or an absolute http:// URL")
            return
        try:
            port = url.port or 80
        except ValueError:
            await _answer(writer, 400, f"bad port in {target!r}")
            return
        host = url.hostname.lower()
        if not allowed(self.pairs, host, port):
            self._blocked(host, port, "proxy")
            await _answer(writer, 403, f"{host}:{port} is not on this execution's allow list")
            return
        path = url.path or "/"
        if url.query:
            path += "?" + url.query
        kept = [
            line
            for line in lines[1:]
            if line
            and line.split(":", 1)[0].strip().lower() not in ("proxy-connection", "proxy-authorization", "connection")
        ]
        # one request per connection to the server: the proxy does not parse responses to reuse it
        rewritten = "\r\n".join([f"{method} {path} {version}", *kept, "Connection: close", "", ""]).encode("latin-1")
        await self._connect_and_pipe(reader, writer, host, port, rewritten)


async def _answer(writer: asyncio.StreamWriter, status: int, text: str) -> None:
    reason = {400: "Bad Request", 403: "Forbidden", 502: "Bad Gateway"}[status]
    body = f"corral: {text}\n".encode()
    writer.write(
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n".encode()
        + body
    )
    with contextlib.suppress(ConnectionError, OSError):
        await writer.drain()
    writer.close()


async def _copy(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    try:
        while data := await source.read(COPY_SIZE):
            sink.write(data)
            await sink.drain()
        if sink.can_write_eof():
            sink.write_eof()
    except (ConnectionError, OSError):
        sink.close()


async def _pipe(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    up_reader: asyncio.StreamReader,
    up_writer: asyncio.StreamWriter,
) -> None:
    """Copy both ways until both ends have finished; then close both."""
    try:
        await asyncio.gather(_copy(reader, up_writer), _copy(up_reader, writer))
    finally:
        writer.close()
        up_writer.close()
