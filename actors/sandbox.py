"""The sandbox of one execution: the agent command wrapped in bubblewrap (`bwrap`), built from the shim's spec.

Without it an agent could write anywhere its user can: `../`, absolute paths, through symlinks,
git's own files; the validator only saw that afterwards. Inside it (docs/sandbox.md) the agent sees:

- the host read-only (`--ro-bind / /`), a new /dev and /proc (its own pid namespace: it sees and
  signals only its own processes), a private empty /tmp (tmpfs);
- `$CORRAL_HOME` hidden under an empty tmpfs (credentials, DuckDB, spools, other worktrees);
- writable: its worktree; in the repository's `.git` only what its own git operations write (the
  object store, its worktree gitdir, the directory of its branch ref `refs/heads/corral/`, its
  branch's reflog), with git's files that change what git *does* bound read-only over them (the
  worktree's `.git` link, the gitdir's `commondir`, `gitdir`, `config`, `config.worktree`, packs,
  `objects/info`, every other execution's branch); config, hooks, info and other refs stay read-only;
- writable: the state its agent CLI needs (each adapter's `state_paths`: Claude Code's ~/.claude, ...);
- paths given to it on its command line or in its environment that the private /tmp hid, read-only;
- no capabilities (root inside cannot remount), no new privileges; under `network = "none"` a
  network namespace of its own (loopback only);
- binaries of the shell deny list that are a bare command name (`sudo *`, `mkfs*`) covered by
  /dev/null wherever its PATH finds them, and so are the host daemons' control sockets
  (`CONTROL_SOCKETS`: Docker, the D-Bus system bus, ...);
- a private `refs/heads/corral/` holding only its own branch ref (`sync_branch` moves the real
  one when it ends).

`wrap` runs in the shim just before the agent starts (the paths are looked at then); `decide`
runs in the spawner (is a sandbox possible, what goes in the spec). Standard library only.
"""

import contextlib
import fnmatch
import functools
import importlib
import json
import os
import shlex
import shutil
import socket
import struct
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from actors import netallow
from actors.worktree import linked_gitdir

MODES = ("auto", "on", "off")
NETWORKS = ("open", "none", "allow")
DEFAULT_BWRAP = "bwrap"
INSTALL_HINT = 'install bubblewrap (apt-get install bubblewrap) or set [sandbox] mode = "off" (or --sandbox off)'
PROBE_TIMEOUT_S = 10.0
HIDDEN_TMP = Path("/tmp")
TMP_VARS = ("TMPDIR", "TMP", "TEMP")
# Sockets of daemons that act for whoever connects (as root: on the whole host): covered by /dev/null.
CONTROL_SOCKETS: tuple[str, ...] = (
    "/run/docker.sock",
    "/var/run/docker.sock",
    "/run/containerd/containerd.sock",
    "/run/podman/podman.sock",
    "/run/crio/crio.sock",
    "/run/dbus/system_bus_socket",
    "/var/run/dbus/system_bus_socket",
    "/run/systemd/private",
    "/run/snapd.socket",
    "/run/libvirt/libvirt-sock",
)
# Signals an agent's exit status may carry through bwrap (it exits 128 + N for a child killed by N).
_MAX_SIGNAL = 64


class SandboxUnavailable(Exception):
    """No sandbox can be made here; the message is one line saying what is missing and what to do."""


# --- the spawner's side: can one be made, and what goes in the spec -----------------------------


def find_bwrap(program: str = DEFAULT_BWRAP) -> str | None:
    """The bwrap binary a setting names (a path, or a name looked up on PATH); None if there is none."""
    if os.sep in program:
        return program if os.path.isfile(program) and os.access(program, os.X_OK) else None
    return shutil.which(program)


@functools.lru_cache(maxsize=8)
def probe(program: str = DEFAULT_BWRAP) -> str | None:
    """Why no sandbox can be made with `program` (one line), or None when it works; run once per process.

    It runs `true` under the same kind of sandbox `wrap` builds (read-only host, new /dev, /proc,
    pid and network namespaces, no capabilities), so a kernel without unprivileged user
    namespaces, or a container that forbids mounts, is found here and not at each spawn.
    """
    found = find_bwrap(program)
    if found is None:
        return f"no sandbox: {program} not found; {INSTALL_HINT}"
    args = [found, *_base_args(network="none"), "--", "true"]
    try:
        # own process group: a Ctrl-C at the terminal must not read as "bwrap does not work here"
        done = subprocess.run(
            args, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, check=False, process_group=0
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"no sandbox: {found} cannot run ({exc}); {INSTALL_HINT}"
    if done.returncode != 0:
        why = " ".join((done.stderr or done.stdout or f"exit code {done.returncode}").split())[:300]
        return f"no sandbox: {found} does not work here ({why}); {INSTALL_HINT}"
    return None


def decide(
    mode: str | None,
    network: str | None,
    *,
    program: str = DEFAULT_BWRAP,
    hide: Iterable[str | Path] = (),
    deny: Iterable[str] = (),
    path_var: str | None = None,
    allow: Iterable[str] = (),
) -> dict[str, Any]:
    """The spec's `sandbox` entry for a request; SandboxUnavailable if it asks for one that cannot be made.

    `auto` (the default) and `on` both need a working sandbox: only an explicit `off` runs the
    agent unconfined. `hide`: directories the agent must not see ($CORRAL_HOME). `deny`: the
    shell deny list's patterns (only bare command names become unexecutable binaries), found on
    `path_var` (the agent's PATH) and the standard directories: resolved here, in the long-lived
    spawner, where the directory listings are cached. `allow`: the host:port pairs of
    `network = "allow"` (actors/netallow.py).
    """
    mode = mode or "auto"
    network = network or "open"
    if mode not in MODES:
        raise SandboxUnavailable(f"unknown sandbox mode {mode!r} (expected one of: {', '.join(MODES)})")
    if network not in NETWORKS:
        raise SandboxUnavailable(network_problem(network) or f"unknown network {network!r}")
    allow = list(allow) if network == "allow" else []
    if (problem := netallow.allow_problem(allow)) is not None:
        raise SandboxUnavailable(problem)
    if mode == "off":
        return {"mode": "off", "network": "open"}
    problem = probe(program)
    if problem is not None:
        raise SandboxUnavailable(problem)
    return {
        "mode": "bwrap",
        "network": network,
        "bwrap": find_bwrap(program),
        "hide": [str(Path(p).resolve()) for p in hide],
        "deny": (names := denied_names(deny)),
        "deny_paths": [str(p) for p in denied_paths(tuple(names), path_var or os.environ.get("PATH") or os.defpath)],
        **({"allow": allow, "proxy_port": netallow.proxy_port(allow)} if network == "allow" else {}),
    }


def for_run(decided: dict[str, Any], run_dir: str | Path) -> dict[str, Any]:
    """The spec's sandbox for one run directory: where its private branch directory goes."""
    if decided.get("mode") != "bwrap":
        return decided
    return {**decided, "branch_dir": str(Path(run_dir) / "branch")}


def network_problem(network: str) -> str | None:
    """Why a network setting cannot be used (one line), or None."""
    if network in NETWORKS:
        return None
    return f"unknown network {network!r} (expected one of: {', '.join(NETWORKS)})"


def denied_names(patterns: Iterable[str]) -> list[str]:
    """The command names of deny patterns that deny a program whatever its arguments.

    `sudo *`, `curl`, `mkfs*` deny every use of sudo, curl, mkfs.*: their binaries can go.
    `rm -rf /` or `git push --force*` deny some uses only: the binary stays (the adapters' pre-tool
    hooks and the validator check those).
    """
    names = []
    for pattern in patterns:
        words = pattern.split()
        if not words or len(words) > 2 or (len(words) == 2 and words[1] != "*"):
            continue
        name = words[0]
        if "/" in name or not name.strip("*?") or any(c in name for c in "[]|&;<>$`'\"\\"):
            continue
        if len(words) == 1 and name.endswith("*"):
            names.append(name)  # `mkfs*`: the name is a glob; `*` also swallows the arguments
        elif "*" not in name and "?" not in name:
            names.append(name)
    return list(dict.fromkeys(names))


# --- the shim's side: the argv ------------------------------------------------------------------


def wrap(
    spec: Mapping[str, Any], command: Sequence[str], extra: Sequence[str] = (), join: Sequence[str] = ()
) -> list[str]:
    """`command` as the spec's sandbox runs it: bwrap's argv around it, or the command itself when off.

    `extra`: more bwrap options (network = "allow": its --info-fd and --block-fd, actors/netallow.py).
    `join`: the files the process writes "0" into before anything runs, to join the execution's
    cgroups (actors/limits.py `join_files`: v1 `tasks`, v2 `cgroup.procs`): done by the `sh` that
    execs bwrap (single-threaded: its one thread is the whole process), so the shim needs no
    `preexec_fn` (which makes Python fork instead of vfork: ~15 ms a spawn here, bench/spawn.py).

    bwrap's monitor (the process outside that waits for the sandbox) must not die of a signal
    meant for the agent, or its end reads as the agent's while the agent still runs: the shim's
    graceful SIGTERM skips it (`monitor_of`), and the agent runs in a session of its own
    (`--new-session`), so a `kill 0` of the agent's reaches only the sandbox. (Its init, pid 1
    inside, gets no signal it has no handler for: the kernel's rule for a namespace's init.)"""
    sandbox = spec.get("sandbox") or {}
    joins = "".join(f"{_join_line(path)}; " for path in join)
    if sandbox.get("mode") != "bwrap":
        return ["/bin/sh", "-c", f'{joins}exec "$0" "$@"', *command] if joins else list(command)
    bwrap = [str(sandbox["bwrap"]), *sandbox_args(spec), *extra, "--"]
    return ["/bin/sh", "-c", f'{joins}exec "$0" "$@"', *bwrap, *command] if joins else [*bwrap, *command]


def monitor_of(spec: Mapping[str, Any], pid: int | None) -> int | None:
    """The pid of bwrap's monitor in a sandboxed execution (the process the shim started), else None."""
    return pid if (spec.get("sandbox") or {}).get("mode") == "bwrap" else None


JOIN_FAILED = 126  # the exit status of an agent start that could not join its cgroup (nothing ran)


def _join_line(path: str) -> str:
    """sh: move this process into the group of a join file, or stop before anything runs."""
    where = shlex.quote(path)
    message = shlex.quote(f"corral: cannot join the execution's cgroup ({path})")
    return f"{{ echo 0 > {where}; }} 2>/dev/null || {{ echo {message} >&2; exit {JOIN_FAILED}; }}"


def in_force(spec: Mapping[str, Any]) -> dict[str, Any]:
    """What execution.started records: {"mode": "bwrap", "network": ...} or {"mode": "off"}."""
    sandbox = spec.get("sandbox") or {}
    if sandbox.get("mode") != "bwrap":
        return {"mode": "off"}
    if sandbox.get("network") == "allow":
        return {"mode": "bwrap", "network": "allow", "allow": list(sandbox.get("allow") or ())}
    shadow = {"workspace": "shadow"} if spec.get("shadow") else {}  # an overlay over its worktree (actors/shadow.py)
    return {"mode": "bwrap", "network": sandbox.get("network", "open"), **shadow}


def exit_status(spec: Mapping[str, Any], returncode: int) -> int:
    """The agent's own exit status: bwrap reports a child killed by signal N as exit code 128 + N.

    Mapped back to -N (a signal) as a shell would read it; an agent that itself exits 128 + N
    reads as killed by N (docs/sandbox.md).
    """
    if (spec.get("sandbox") or {}).get("mode") == "bwrap" and 128 < returncode <= 128 + _MAX_SIGNAL:
        return -(returncode - 128)
    return returncode


def _base_args(*, network: str) -> list[str]:
    args = [
        "--ro-bind", "/", "/",
        "--dev", "/dev",
        "--proc", "/proc",
        "--tmpfs", str(HIDDEN_TMP),
        "--unshare-pid",
        "--unshare-ipc",
        "--new-session",  # setsid: the agent's process group holds no process outside (and no terminal)
        "--cap-drop", "ALL",
    ]  # fmt: skip
    if network in ("none", "allow"):  # allow: the shim serves the allowed pairs inside (actors/netallow.py)
        args.append("--unshare-net")
    return args


def sandbox_args(spec: Mapping[str, Any]) -> list[str]:
    """bwrap's options for one execution (mounts are applied in order: later ones cover earlier ones)."""
    sandbox = spec.get("sandbox") or {}
    env: Mapping[str, str] = spec.get("env") or {}
    cwd = Path(spec["cwd"])
    hidden = [Path(p) for p in sandbox.get("hide") or () if os.path.isdir(p)]  # (a missing one hides nothing)
    args = _base_args(network=str(sandbox.get("network", "open")))
    git = _git_paths(cwd)

    # 1. what the private /tmp hid and the agent must read: the repository's .git, its own
    #    command line's and environment's paths (a script, a config file, HOME)
    readable = [p for p in (git.get("common"), *_given_paths(spec["command"], env, HIDDEN_TMP)) if p is not None]
    for path in _outermost(p for p in readable if _under(p, HIDDEN_TMP) and not _under_any(p, hidden)):
        args += ["--ro-bind", str(path), str(path)]
    # 2. $CORRAL_HOME (and whatever else the spawner hides), empty
    for path in hidden:
        args += ["--tmpfs", str(path)]
    # what the spawner made for the agent's CLI to read (the shell policy's hook settings, in the
    # run directory: actors/adapters shell_guard), read-only, even inside what was hidden
    for path in (Path(p) for p in spec.get("readable") or ()):
        if path.exists():
            args += ["--ro-bind", str(path), str(path)]
    # a temporary directory the environment names inside /tmp: made, empty, in the private /tmp
    for key in TMP_VARS:
        value = env.get(key, "")
        if value.startswith(str(HIDDEN_TMP) + "/") and not _under_any(Path(value), hidden):
            args += ["--dir", os.path.normpath(value)]
    # 3. writable: the worktree, git's files of this execution's own operations, the CLI's state
    writable: list[Path] = [cwd]
    for key in ("objects", "gitdir", "reflog"):
        if git.get(key) is not None:
            writable.append(git[key])
    writable += state_paths(spec.get("agent"), env)
    for path in writable:
        if path.exists():
            args += ["--bind", str(path), str(path)]
    # its branch: the directory of its ref (refs/heads/corral) is, inside, a private one holding
    # only its own ref; `sync_branch` moves what the agent committed to the real ref when it ends
    private = _private_branch(sandbox.get("branch_dir"), git.get("common"), git.get("branch"))
    if private is not None:
        args += ["--bind", str(private[0]), str(private[1])]
    # 4. read-only again: what in those would change what git does, and other executions' branches
    for path in git.get("protected", ()):
        args += ["--ro-bind", str(path), str(path)]
    # (hook for helper SHELL) files the CLI's shell-policy mechanism reads (spec `readable`, e.g. Gemini
    # CLI's admin policy in the run directory): read-only, even inside a hidden directory
    for path in spec.get("readable") or ():
        args += ["--ro-bind", str(path), str(path)]
    # 5. denied programs: /dev/null wherever the agent's PATH finds them
    deny_paths = sandbox.get("deny_paths")
    if deny_paths is None:  # a spec written by an older spawner
        deny_paths = denied_paths(tuple(sandbox.get("deny") or ()), env.get("PATH") or os.defpath)
    for path in (Path(p) for p in deny_paths):
        if path.is_file():
            args += ["--ro-bind", "/dev/null", str(path)]
    # the host daemons' control sockets: a read-only mount does not stop connect(), and root on
    # the Docker socket or the system bus (systemd-run) is root on the host
    for socket_path in CONTROL_SOCKETS:
        if os.path.exists(socket_path) and not os.path.isdir(socket_path):
            args += ["--ro-bind", "/dev/null", socket_path]
    # 6. the hiding tmpfs read-only (what was bound inside it stays writable): a write there fails
    for path in hidden:
        args += ["--remount-ro", str(path)]
    args += ["--chdir", str(cwd)]
    return args


def _under(path: Path, root: Path) -> bool:
    return path == root or path.is_relative_to(root)


def _under_any(path: Path, roots: Sequence[Path]) -> bool:
    return any(_under(path, root) for root in roots)


def _outermost(paths: Iterable[Path]) -> list[Path]:
    """The paths without those inside another one of them (a bind of the outer one covers them)."""
    chosen: list[Path] = []
    for path in sorted(set(paths), key=lambda p: len(p.parts)):
        if path != HIDDEN_TMP and not any(_under(path, c) for c in chosen):
            chosen.append(path)
    return chosen


def _given_paths(command: Sequence[str], env: Mapping[str, str], within: Path) -> list[Path]:
    """Existing absolute paths inside `within` on the command line (`--opt=PATH` too) and in
    environment values (only those are looked up: a stat per PATH entry was ~0.5 ms of each spawn)."""
    words = list(command[1:]) + [v for k, v in env.items() if k not in ("PWD", "OLDPWD", *TMP_VARS)]
    words += [w.split("=", 1)[1] for w in command[1:] if w.startswith("-") and "=" in w]
    prefix = str(within).rstrip("/") + "/"
    found = []
    for word in [command[0], *words] if command else words:
        for part in word.split(os.pathsep) if word.count(os.pathsep) else [word]:
            # (normalized first: /tmp/../etc is not inside /tmp, /x/../tmp/y is)
            if (
                part.startswith("/")
                and "\0" not in part
                and len(part) < 4096
                and (os.path.normpath(part) + "/").startswith(prefix)
            ):
                with contextlib.suppress(OSError, ValueError):
                    path = Path(os.path.normpath(part))
                    if path.exists():
                        found.append(path)
    return found


def state_paths(agent: str | None, env: Mapping[str, str]) -> list[Path]:
    """The files and directories an agent CLI writes its state to (each adapter's `state_paths`).

    Directories that do not exist yet are made (on the host, before the sandbox starts), so the
    CLI finds them writable; a file that does not exist is left out.
    """
    if not agent or agent == "command":
        return []
    from actors.adapters import AGENTS

    module_name = AGENTS.get(agent)
    if module_name is None:
        return []
    declared = getattr(importlib.import_module(module_name), "state_paths", None)
    if declared is None:
        return []
    out = []
    for path, is_dir in declared(env):
        if is_dir:
            with contextlib.suppress(OSError):
                path.mkdir(parents=True, exist_ok=True)
        out.append(path)
    return out


def home_of(env: Mapping[str, str]) -> Path:
    """The agent's home directory (its HOME, else this process's)."""
    return Path(env.get("HOME") or os.path.expanduser("~"))


STANDARD_BIN_DIRS = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")


def denied_paths(names: tuple[str, ...], path_var: str) -> list[Path]:
    """Every file a denied name (or name glob) finds on `path_var` or the standard directories, as
    the file it resolves to (one bind covers every path to it, /bin/su and /usr/bin/su alike).

    Cached by the directories' modification times: a program installed or removed is seen.
    """
    dirs = tuple(dict.fromkeys(d for d in [*path_var.split(os.pathsep), *STANDARD_BIN_DIRS] if d.startswith("/")))
    stamps = []
    for directory in dirs:
        try:
            stamps.append(os.stat(directory).st_mtime_ns)
        except OSError:
            stamps.append(0)
    return _denied_paths(names, dirs, tuple(stamps))


@functools.lru_cache(maxsize=64)
def _denied_paths(names: tuple[str, ...], dirs: tuple[str, ...], _stamps: tuple[int, ...]) -> list[Path]:
    found: list[Path] = []
    for name in names:
        for directory in dirs:
            try:
                entries = [name] if "*" not in name and "?" not in name else os.listdir(directory)
            except OSError:
                continue
            for entry in entries:
                if not fnmatch.fnmatchcase(entry, name):
                    continue
                candidate = Path(directory) / entry
                if candidate.is_file():
                    found.append(candidate)
    return list(dict.fromkeys(Path(os.path.realpath(p)) for p in found if p.is_file()))


def _git_paths(worktree: Path) -> dict[str, Any]:
    """Where a linked worktree's git operations write, and what in there stays read-only.

    A commit in a linked worktree writes its objects into the common `objects/` (a temporary file
    renamed into `objects/xx/`), its index and HEAD into the worktree gitdir
    (`.git/worktrees/<name>`), and its branch as `refs/heads/corral/<id>.lock` renamed over the
    ref, plus a line appended to `logs/refs/heads/corral/<id>`. Everything else of the common
    dir stays read-only: config, hooks, info, packed-refs, other refs and worktrees.
    """
    out: dict[str, Any] = {"protected": []}
    link = worktree / ".git"
    gitdir = linked_gitdir(worktree)
    if gitdir is None:
        if link.is_dir():  # a worktree that is a whole repository: its own .git, read-only but its objects
            out["common"] = link
        return out
    try:
        common = (gitdir / (gitdir / "commondir").read_text().strip()).resolve()
    except OSError:
        return out
    out.update(common=common, objects=common / "objects", gitdir=gitdir)
    protected = [link, gitdir / "commondir", gitdir / "gitdir", gitdir / "config", gitdir / "config.worktree"]
    protected += [common / "objects" / "pack", common / "objects" / "info"]
    try:
        head = (gitdir / "HEAD").read_text().strip()
    except OSError:
        head = ""
    if head.startswith("ref: refs/heads/"):
        ref = head.removeprefix("ref: ")
        if (common / ref).parent != common / "refs" / "heads":  # corral/<id>: never refs/heads itself
            out["branch"] = ref
        if (common / "logs" / ref).is_file():
            out["reflog"] = common / "logs" / ref
    out["protected"] = [p for p in protected if p.exists()]
    return out


def _private_branch(directory: str | None, common: Path | None, ref: str | None) -> tuple[Path, Path] | None:
    """Make the private directory of the execution's branch ref: (it, where it is bound inside).

    Git updates a ref by writing `<ref>.lock` in the ref's directory and renaming it over the ref,
    so the directory must be writable; the real `refs/heads/corral` holds every execution's branch.
    Inside the sandbox that directory is a private one with only this execution's ref (the others
    stay readable through packed-refs only if packed); its value at start is kept beside it.
    """
    if not directory or common is None or ref is None:
        return None
    start = _read_ref(common, ref)
    if start is None:
        return None
    private = Path(directory)
    private.mkdir(parents=True, exist_ok=True)
    (private / Path(ref).name).write_text(start + "\n")
    meta = {"common": str(common), "ref": ref, "start": start}
    Path(f"{private}.json").write_text(json.dumps(meta))
    target = common / Path(ref).parent
    target.mkdir(parents=True, exist_ok=True)
    return private, target


def _read_ref(common: Path, ref: str) -> str | None:
    """A branch's commit from its loose file, else from packed-refs (None if it has none)."""
    with contextlib.suppress(OSError):
        value = (common / ref).read_text().strip()
        if value and not value.startswith("ref:"):
            return value
    with contextlib.suppress(OSError):
        for line in (common / "packed-refs").read_text().splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1] == ref:
                return parts[0]
    return None


def branch_moved(spec: Mapping[str, Any]) -> tuple[dict[str, Any], str] | None:
    """(the private branch's record, the commit it is at now) when the agent moved its private
    branch, else None: two small reads, no git (the shim asks a thread for `sync_branch` only then)."""
    directory = (spec.get("sandbox") or {}).get("branch_dir")
    if not directory:
        return None
    try:
        meta = json.loads(Path(f"{directory}.json").read_text())
        now = (Path(directory) / Path(meta["ref"]).name).read_text().strip()
    except (OSError, ValueError, KeyError):
        return None
    if not now or now == meta["start"]:
        return None
    return meta, now


def sync_branch(spec: Mapping[str, Any]) -> str | None:
    """After the agent ended: its private branch ref onto the real one (compare-and-swap).

    Returns what happened in one line when something did (moved, or why not), else None. The
    real ref moved meanwhile (`corral commit` while it ran) is left alone: the agent's commits stay
    reachable from its worktree's reflog, and the line says so.
    """
    moved = branch_moved(spec)
    if moved is None:
        return None
    meta, now = moved
    done = subprocess.run(
        [
            "git",
            "-C",
            str(spec["cwd"]),
            "update-ref",
            "-m",
            "corral: the agent's commits",
            meta["ref"],
            now,
            meta["start"],
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        why = " ".join(done.stderr.split())[:300]
        return f"{meta['ref']} not moved to the agent's {now[:12]}: {why}"
    return f"{meta['ref']} moved to the agent's {now[:12]}"


def prepare_worktree(worktree: str | Path) -> None:
    """Make the worktree gitdir's `config` and `config.worktree` exist (empty) before anything runs in it.

    The sandbox binds them read-only; a file that does not exist cannot be bound, and the agent
    could create it (git reads `config.worktree` when the repository enables worktreeConfig).
    Done before `workspace.created`, so the validator's baseline of git's files includes them.
    """
    gitdir = linked_gitdir(worktree)
    if gitdir is None:
        return
    with contextlib.suppress(OSError):
        for name in ("config", "config.worktree"):
            (gitdir / name).touch(exist_ok=True)


# --- the shim's control socket: only callers outside any sandbox -------------------------------


def peer_outside(sock: socket.socket | None) -> bool:
    """Whether the process at the other end of a unix socket shares this process's mount namespace.

    Under `network = "open"` a sandboxed agent shares the host's network namespace, so it can
    reach every shim's abstract socket (their names are in /proc/net/unix): a caller in another
    mount namespace (a sandbox) is refused. True when it cannot be told (no peer credentials).
    """
    if sock is None:
        return True
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return True  # not a unix socket with credentials: nothing to tell
    pid = struct.unpack("3i", creds)[0]
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt") == os.readlink("/proc/self/ns/mnt")
    except OSError:
        return False  # gone already, or hidden from us: not answered
