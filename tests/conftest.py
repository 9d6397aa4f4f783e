"""Fixtures: a real nats-server per test, real git repositories, the real `corral` CLI.

The nats-server runs with Corral's users and permissions (events/auth.py): its credentials are
generated into the test's CORRAL_HOME (`tmp_path/home`, the `cli` fixture's), so every CLI
process and actor connects as its own role exactly as in production. The test process itself
connects as `admin` (CORRAL_NATS_USER / CORRAL_NATS_PASSWORD, set for the test), since tests
publish events of every kind.
"""

import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from actors.bus import Bus, connect_bus
from actors.diskquota import release_all
from corral.server import EmbeddedServer
from events.auth import ENV_CREDS, ENV_PASSWORD, ENV_USER, CredentialSet, ensure_credentials
from projections.verify import AUTHORITY

ROOT = Path(__file__).resolve().parents[1]
AGENT = ROOT / "examples" / "agent.py"


CLIENT_CREDENTIAL_ENV = (ENV_USER, ENV_PASSWORD, ENV_CREDS)


@pytest.fixture(autouse=True)
def _disk_quota_mounts_released(request: pytest.FixtureRequest) -> Iterator[None]:
    """Worktrees outlive their runs, and so do their disk-quota mounts (actors/diskquota.py): a
    test's are released when it ends, so no loop device or mount is left behind (helper DISK)."""
    root = request.getfixturevalue("tmp_path") if "tmp_path" in request.fixturenames else None
    yield
    if root is not None:
        release_all(root)


@pytest.fixture
def credentials(tmp_path: Path) -> CredentialSet:
    """The NATS credentials of the test's system, in the `cli` fixture's CORRAL_HOME."""
    return ensure_credentials(tmp_path / "home")


@pytest.fixture
def nats_server(
    tmp_path: Path, credentials: CredentialSet, monkeypatch: pytest.MonkeyPatch
) -> Iterator[EmbeddedServer]:
    """A real nats-server with JetStream and Corral's users on a free loopback port and a temporary store."""
    server = EmbeddedServer(tmp_path / "nats-store", log_file=tmp_path / "nats.log", credentials=credentials).start()
    admin = credentials.get("admin")
    assert admin is not None
    monkeypatch.setenv(ENV_USER, admin.user)  # this process (and helpers it starts) may do anything
    monkeypatch.setenv(ENV_PASSWORD, admin.password)
    yield server
    server.stop()


@pytest.fixture
async def bus(nats_server: EmbeddedServer) -> AsyncIterator[Bus]:
    connected = await connect_bus(nats_server.url)
    yield connected
    await connected.close()


def cli_environment(**extra: str) -> dict[str, str]:
    """os.environ without the test's own NATS identity: CLI processes find theirs in CORRAL_HOME."""
    env = {k: v for k, v in os.environ.items() if k not in CLIENT_CREDENTIAL_ENV}
    env.update(extra)
    return env


GIT_USER = ("-c", "user.email=t@example.com", "-c", "user.name=t")


def git(cwd: Path, *args: str) -> str:
    """Run git in `cwd` as the tests' identity; return its stdout, stripped."""
    return subprocess.run(
        ["git", "-C", str(cwd), *GIT_USER, *args], capture_output=True, text=True, check=True
    ).stdout.strip()


def commit_all(cwd: Path, message: str = "cp") -> str:
    """Commit everything in `cwd` (an empty commit if nothing changed); return the commit."""
    git(cwd, "add", "-A")
    git(cwd, "commit", "-qm", message, "--allow-empty")
    return git(cwd, "rev-parse", "HEAD")


def make_repo(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["git", "init", "-q", "-b", "main", str(path)], check=True)
    (path / "README.md").write_text("# demo\n")
    commit_all(path, "init")
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


def recording_actor(kind: str, default: str = "test") -> str:
    """An actor name the projector accepts for a synthetic event of type `kind` (projections/verify.py)."""
    roles = AUTHORITY.get(kind)
    return f"{roles[0]}-test-1" if roles else default


def agent_command(*args: str) -> list[str]:
    return ["--", sys.executable, str(AGENT), *args]


@pytest.fixture
def cli(tmp_path: Path, nats_server: EmbeddedServer) -> Cli:
    """The CLI against this test's nats-server (CORRAL_NATS_URL)."""
    env = cli_environment(CORRAL_HOME=str(tmp_path / "home"), CORRAL_NATS_URL=nats_server.url)
    return Cli(tmp_path / "home", env)


@pytest.fixture
def embedded_cli(tmp_path: Path) -> Cli:
    """The CLI with no NATS URL: every command starts (and stops) the embedded server itself."""
    env = cli_environment(CORRAL_HOME=str(tmp_path / "home"))
    env.pop("CORRAL_NATS_URL", None)
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
