"""A warm start for shims: one process that has imported actors.shim forks the shim of each execution.

`python -m actors.shim RUN_DIR` pays an interpreter and its imports (asyncio, orjson, the adapters) on
every execution: about 150 ms on an idle machine, most of a pipeline stage's start, and much more on
a loaded one. The spawner starts this server once (`python -m actors.shimfork SOCKET`); for each
execution it sends the run directory on the server's Unix socket and gets back the pid of a shim
forked from the warm process. The server is single-threaded and runs no event loop, so a fork is
safe; the child starts its own session (it outlives the spawner and the server, as a shim started by
Popen does), writes to RUN_DIR/shim.log, and runs actors.shim.main as `python -m actors.shim` would.
The server dies with the spawner (PR_SET_PDEATHSIG); when it cannot be reached the spawner starts
the shim the old way (actors/spawner.py start_shim). CORRAL_SHIM_FORK=0 turns it off.
"""

import asyncio
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Final

PR_SET_PDEATHSIG: Final = 1
ENV_SWITCH: Final = "CORRAL_SHIM_FORK"
START_TIMEOUT_S: Final = 10.0


class ForkedShim:
    """A shim forked by the server, as the spawner uses a Popen: pid, poll(), wait(timeout).

    It is the server's child, not the spawner's: it has ended when its pid is gone or a zombie."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                state = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                state = "X"
            if state in ("Z", "X"):
                self.returncode = 0  # (its exit status is the server's to collect)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"shim {self.pid}", timeout or 0.0)
            time.sleep(0.02)
        return 0


class ShimStarter:
    """The spawner's side: starts the server, asks it for shims, stops it."""

    def __init__(self, run_root: Path) -> None:
        self.path = run_root / "shimfork.sock"
        self.server: subprocess.Popen[bytes] | None = None

    def open(self) -> None:
        if os.environ.get(ENV_SWITCH, "1") == "0":
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        log = open(self.path.with_suffix(".log"), "ab")  # noqa: SIM115 (the child keeps its own copy)
        with log:
            self.server = subprocess.Popen(
                [sys.executable, "-m", "actors.shimfork", str(self.path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,  # the spawner's terminal signals are not its
            )

    async def start(self, run_dir: Path) -> ForkedShim | None:
        """A shim forked for `run_dir`, or None when the server is not (or no longer) there."""
        if self.server is None or self.server.poll() is not None:
            return None
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.path.exists():  # the server is still importing
            if self.server.poll() is not None or time.monotonic() > deadline:
                return None
            await asyncio.sleep(0.01)
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(self.path)), START_TIMEOUT_S)
            try:
                writer.write(str(run_dir).encode() + b"\n")
                await writer.drain()
                answer = await asyncio.wait_for(reader.readline(), START_TIMEOUT_S)
            finally:
                writer.close()
        except (OSError, TimeoutError):
            return None
        try:
            return ForkedShim(int(answer))
        except ValueError:
            return None

    def close(self) -> None:
        if self.server is not None and self.server.poll() is None:
            self.server.terminate()
            try:
                self.server.wait(5.0)
            except subprocess.TimeoutExpired:
                self.server.kill()
                self.server.wait()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


# --- the server -------------------------------------------------------------------------------------


def _reap(*_: object) -> None:
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass


def _retitle(words: list[str]) -> None:
    """Make this process's command line read `words` (as `ps` and /proc/PID/cmdline show it): tools that
    find a shim by `actors.shim RUN_DIR` find a forked one too. Written over the argv strings the
    kernel shows (Python keeps its own copy); left as it is when the new line does not fit."""
    with contextlib.suppress(OSError, IndexError, ValueError):
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        start, end = int(fields[45]), int(fields[46])  # arg_start, arg_end (fields 48 and 49)
        text = b"\0".join(word.encode() for word in words) + b"\0"
        if 0 < start < end and len(text) <= end - start:
            ctypes.memmove(start, text.ljust(end - start, b"\0"), end - start)


def _child(run_dir: str, ready: int) -> None:
    """In the forked child: become `python -m actors.shim RUN_DIR`; never returns. `ready` is written
    once it has its own session and its command line (the spawner gets its pid after that)."""
    code = 1
    try:
        os.setsid()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        log = os.open(os.path.join(run_dir, "shim.log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(devnull)
        os.close(log)
        os.chdir(run_dir)
        _retitle([sys.executable, "-m", "actors.shim", run_dir])
        from actors import shim

        # Listening before the spawner learns the pid: its watch connects at the first try (a
        # connection waits in the backlog until the shim's loop takes it), not after retries.
        with contextlib.suppress(OSError):  # (else the shim binds it itself, as a Popen'd one does)
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(shim.socket_address(Path(run_dir)))
            listener.listen(64)
            shim.LISTENER = listener
        os.write(ready, b".")
        os.close(ready)

        sys.argv = [shim.__file__ or "actors.shim", run_dir]
        code = shim.main()
    except BaseException:
        with contextlib.suppress(Exception):
            traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def serve(path: str) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)  # the spawner gone: so is this server
    if os.getppid() == 1:
        return 0
    import gc

    import actors.limits  # the warm part: everything a shim imports (its cgroups module too)
    import actors.shim  # noqa: F401

    gc.collect()
    gc.freeze()
    signal.signal(signal.SIGCHLD, _reap)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    tmp = path + ".tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    listener.bind(tmp)
    os.chmod(tmp, 0o600)
    listener.listen(64)
    os.rename(tmp, path)  # ready
    while True:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(5.0)
            try:
                line = conn.makefile("rb").readline().decode().strip()
            except OSError:
                continue
            if not line or not os.path.isdir(line):
                with contextlib.suppress(OSError):
                    conn.sendall(b"refused\n")
                continue
            ready_r, ready_w = os.pipe()
            pid = os.fork()
            if pid == 0:
                listener.close()
                conn.close()
                os.close(ready_r)
                _child(line, ready_w)
            os.close(ready_w)
            with contextlib.suppress(OSError):
                os.read(ready_r, 1)  # its session is its own (or it died: b"")
            os.close(ready_r)
            with contextlib.suppress(OSError):
                conn.sendall(f"{pid}\n".encode())


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.stderr.write("usage: python -m actors.shimfork SOCKET\n")
        sys.exit(2)
    sys.exit(serve(sys.argv[1]))
