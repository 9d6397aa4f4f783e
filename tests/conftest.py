"""Fixtures: a real nats-server per test, real git repositories, the real `corral` CLI."""

import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from actors.bus import Bus, connect_bus
from corral.server import EmbeddedServer

ROOT = Path(__file__).resolve().parents[1]
AGENT = ROOT / "examples" / "agent.py"


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[EmbeddedServer]:
    """A real nats-server with JetStream on a free loopback port and a temporary store."""
    server = EmbeddedServer(tmp_path / "nats-store", log_file=tmp_path / "nats.log").start()
    yield server
    server.stop()


@pytest.fixture
async def bus(nats_server: EmbeddedServer) -> AsyncIterator[Bus]:
    connected = await connect_bus(nats_server.url)
    yield connected
    await connected.close()


def make_repo(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    git = ["git", "-C", str(path), "-c", "user.email=t@example.com", "-c", "user.name=t"]
    subprocess.run(["git", "init", "-q", "-b", "main", str(path)], check=True)
    (path / "README.md").write_text("# demo\n")
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "init"], check=True)
    return path


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return make_repo(tmp_path / "repo")


@dataclass
class Cli:
    """Runs the installed `corral` command with an isolated CORRAL_HOME."""

    home: Path
    env: dict[str, str]

    def __call__(self, *args: str, timeout: float = 120, check: bool = False) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "corral", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=ROOT,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"corral {' '.join(args)} failed ({result.returncode}): {result.stderr}")
        return result

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "corral", *args],
            env=self.env,
            cwd=ROOT,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )


def agent_command(*args: str) -> list[str]:
    return ["--", sys.executable, str(AGENT), *args]


@pytest.fixture
def cli(tmp_path: Path, nats_server: EmbeddedServer) -> Cli:
    """The CLI against this test's nats-server (CORRAL_NATS_URL)."""
    env = {**os.environ, "CORRAL_HOME": str(tmp_path / "home"), "CORRAL_NATS_URL": nats_server.url}
    return Cli(tmp_path / "home", env)


@pytest.fixture
def embedded_cli(tmp_path: Path) -> Cli:
    """The CLI with no NATS URL: every command starts (and stops) the embedded server itself."""
    env = {k: v for k, v in os.environ.items() if k != "CORRAL_NATS_URL"}
    env["CORRAL_HOME"] = str(tmp_path / "home")
    return Cli(tmp_path / "home", env)


def processes_mentioning(text: str) -> list[int]:
    """Return pids of live processes whose command line contains text."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if text in cmdline and ") Z " not in stat:
            found.append(int(entry.name))
    return found
