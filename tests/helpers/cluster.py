"""Real processes for the chaos tests: the 3-node NATS cluster of deploy/ and `corral up` instances.

The cluster is started exactly as docs/deployment.md says (`nats-server -c deploy/node-X.conf
-sd DIR`); its ports are read from those files, so the recipe and the tests cannot drift apart.
"""

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import nats.errors

from corral.server import find_nats_server, stop_process
from events.auth import CredentialSet, credential_set, environment_credentials
from events.subjects import ALL_EVENTS
from replay.history import follow, last_sequence

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
NODES = ("a", "b", "c")


def wait_until(check: Callable[[], Any], *, timeout_s: float, what: str, every_s: float = 0.1) -> Any:
    """Poll `check` until it returns something truthy; fail with `what` after the timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(every_s)


def _accepts(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
        return sock.recv(4).startswith(b"INFO")
    return False


def _port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _stop(process: subprocess.Popen[bytes] | None, *, timeout_s: float = 15.0) -> None:
    stop_process(process, timeout_s=timeout_s)


@dataclass
class Node:
    """One nats-server of the cluster, started from deploy/node-<name>.conf."""

    name: str
    store: Path
    log: Path
    env: dict[str, str] = field(default_factory=dict)  # CORRAL_PASS_<USER> for nats-auth.conf
    process: subprocess.Popen[bytes] | None = None

    @property
    def config(self) -> Path:
        return DEPLOY / f"node-{self.name}.conf"

    @property
    def server_name(self) -> str:
        return f"corral-{self.name}"

    @property
    def port(self) -> int:
        found = re.search(r"^port:\s*(\d+)", self.config.read_text(), re.MULTILINE)
        assert found, f"{self.config} has no client port"
        return int(found.group(1))

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        if _port_in_use(self.port):
            raise AssertionError(f"port {self.port} of {self.config.name} is taken; stop what listens there")
        self.store.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [find_nats_server(), "-c", str(self.config), "-sd", str(self.store)],
                env={**os.environ, **self.env},
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def wait_accepting(self, timeout_s: float = 20.0) -> None:
        def up() -> bool:
            assert self.process is not None, "start() first"
            assert self.process.poll() is None, f"{self.server_name} exited; see {self.log}"
            return _accepts(self.port)

        wait_until(up, timeout_s=timeout_s, what=f"{self.server_name} to accept connections")

    def kill(self) -> None:
        """SIGKILL: the node dies without a word to the others."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        _stop(self.process)


@dataclass
class LocalCluster:
    """The three nodes of deploy/ on loopback, each with its own store under `root`."""

    root: Path
    credentials: CredentialSet
    nodes: list[Node] = field(default_factory=list)

    def __post_init__(self) -> None:
        env = self.credentials.server_env()  # as `corral credentials --server-env FILE` writes them
        self.nodes = [
            Node(name, self.root / f"nats-{name}", self.root / f"nats-{name}.log", env) for name in NODES
        ]

    @property
    def urls(self) -> str:
        """The value of `corral up --nats` for this cluster."""
        return ",".join(node.url for node in self.nodes)

    def node(self, server_name: str) -> Node:
        return next(node for node in self.nodes if node.server_name == server_name)

    async def start(self, timeout_s: float = 60.0) -> None:
        """Start the three nodes and return once JetStream has a meta leader (streams can be made)."""
        for node in self.nodes:
            node.start()
        for node in self.nodes:
            await asyncio.to_thread(node.wait_accepting)
        nc = await nats.connect(self.urls.split(","), **admin_options(None))
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                with contextlib.suppress(Exception):
                    reply = await nc.request("$JS.API.INFO", b"", timeout=2)
                    if "error" not in json.loads(reply.data):
                        return
                assert time.monotonic() < deadline, "the cluster elected no JetStream leader; see nats-*.log"
                await asyncio.sleep(0.25)
        finally:
            await nc.close()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@dataclass
class Up:
    """One `corral up` process (its own CORRAL_HOME), stderr kept in a file to read its report lines."""

    home: Path
    args: list[str]
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def stderr_file(self) -> Path:
        return self.home.parent / f"{self.home.name}.stderr"

    @property
    def stderr(self) -> str:
        return self.stderr_file.read_text(errors="replace") if self.stderr_file.exists() else ""

    def runtime(self) -> dict[str, Any] | None:
        with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
            data: dict[str, Any] = json.loads((self.home / "runtime.json").read_text())
            return data
        return None

    def start(self, *, timeout_s: float = 60.0) -> "Up":
        """Start `corral up ARGS` and return once it has published its address (it is ready)."""
        with contextlib.suppress(FileNotFoundError):
            (self.home / "runtime.json").unlink()  # left by a killed predecessor
        self.home.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        with open(self.stderr_file, "ab") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "corral", "up", *self.args],
                env={**self.env, "CORRAL_HOME": str(self.home)},
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )

        def ready() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"corral up {' '.join(self.args)} exited {self.process.returncode}: {self.stderr}")
            runtime = self.runtime()
            return bool(runtime and runtime.get("ready") and runtime.get("pid") == self.process.pid)

        wait_until(ready, timeout_s=timeout_s, what=f"corral up {' '.join(self.args)} to be ready")
        return self

    def kill(self) -> None:
        """SIGKILL: no clean-up at all (the shims of its agents live on in their own sessions)."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self) -> int | None:
        """SIGTERM (as Ctrl-C) and wait; return the exit code."""
        _stop(self.process, timeout_s=60.0)
        return self.process.returncode if self.process else None


# --- counting ------------------------------------------------------------------------------------


def admin_options(home: Path | None) -> dict[str, str]:
    """How the test itself connects to a server with Corral's users: as `admin` of `home`'s
    credentials (an embedded server), else as CORRAL_NATS_USER (the `nats_server` fixture sets
    it, and the cluster's test)."""
    found = credential_set(home, {}) if home is not None else None
    admin = found.get("admin") if found is not None else environment_credentials()
    return {"user": admin.user, "password": admin.password} if admin is not None else {}


async def read_log(url: str, *, home: Path | None = None, timeout_s: float = 60.0) -> list[dict[str, Any]]:
    """Every event stored in the stream, in order, each with its `seq`.

    `home`: the CORRAL_HOME whose credentials open the server (an embedded one has users).
    Retried while the cluster is electing a new leader (a node was just killed)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return await _read_log_once(url, admin_options(home))
        except (nats.errors.Error, TimeoutError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(1.0)


async def _read_log_once(url: str, options: dict[str, str]) -> list[dict[str, Any]]:
    nc = await nats.connect(url.split(","), **options)
    try:
        js = nc.jetstream(timeout=10)
        last = await last_sequence(js)
        events: list[dict[str, Any]] = []
        if last == 0:
            return events

        async def collect(seq: int, msg: Any) -> bool:
            events.append({"seq": seq, **json.loads(msg.data)})
            return seq >= last

        await asyncio.wait_for(follow(js, ALL_EVENTS, collect), 30)
        return events
    finally:
        await nc.close()


async def wait_for_exits(url: str, ids: list[str], *, timeout_s: float, home: Path | None = None) -> None:
    """Wait until every execution in `ids` has a terminal event in the stream."""
    deadline = time.monotonic() + timeout_s
    while True:
        events = await read_log(url, home=home)
        ended = {e["execution_id"] for e in events if e["type"] in ("execution.exited", "execution.failed")}
        missing = set(ids) - ended
        if not missing:
            return
        assert time.monotonic() < deadline, f"executions never ended: {sorted(missing)}"
        await asyncio.sleep(1.0)


async def wait_for_output(
    url: str, ids: list[str], *, chunks: int, timeout_s: float = 60.0, home: Path | None = None
) -> None:
    """Wait until each execution has at least `chunks` output events stored (it is mid-run)."""
    deadline = time.monotonic() + timeout_s
    while True:
        counts = {eid: 0 for eid in ids}
        for event in await read_log(url, home=home):
            if event["type"] == "output" and event["execution_id"] in counts:
                counts[event["execution_id"]] += 1
        if min(counts.values()) >= chunks:
            return
        assert time.monotonic() < deadline, f"no output yet: {counts}"
        await asyncio.sleep(0.5)
