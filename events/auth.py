"""NATS users per actor role, their permissions, and where each Corral process finds its credentials.

One table (ROLES) says what every role may publish and subscribe to; `render_auth_conf` turns it
into the `authorization` block of nats-server's configuration (the shipped `nats-auth.conf` is
its output for the default operator, and a test keeps the two equal). Passwords never appear in
a configuration file: the file references environment variables (`password: $CORRAL_PASS_SPAWNER`)
that Corral sets when it starts the embedded server.

Credentials are generated once per CORRAL_HOME into `credentials.json` (mode 0600). A process
finds the password of a role in CORRAL_NATS_CREDS (a file of the same shape), else in
CORRAL_HOME; a human's own identity may instead come from CORRAL_NATS_USER / CORRAL_NATS_PASSWORD.
Nothing here ever goes on a command line or into an event. See docs/security.md.

Only the standard library is imported: the shim and the server launcher use this module too.
"""

import contextlib
import os
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import orjson

from events.subjects import API_POSITION, API_SQL
from events.subjects import HEALTH_BUCKET as HEALTH_BUCKET
from events.subjects import OUTPUT_STREAM as OUTPUT_STREAM
from events.subjects import STREAM as STREAM

VERSION: Final = "0.1.0"  # Corral's version (corral.__version__), in the health records
CREDENTIALS_FILE: Final = "credentials.json"
DEFAULT_OPERATOR: Final = "operator"
ENV_USER: Final = "CORRAL_NATS_USER"
ENV_PASSWORD: Final = "CORRAL_NATS_PASSWORD"
ENV_CREDS: Final = "CORRAL_NATS_CREDS"
SERVER_ENV_PREFIX: Final = "CORRAL_PASS_"
# Every variable that carries a NATS credential: an agent never inherits them (actors/spawner.py).
CREDENTIAL_ENV: Final = (ENV_USER, ENV_PASSWORD, ENV_CREDS)

HEALTH_STREAM: Final = f"KV_{HEALTH_BUCKET}"
DECIDE_API: Final = "corral.api.approval.decide"  # + ".<user>": the user is the subject's last token
# + ".<token name>": a decision the HTTP gateway (role `api`) takes for one of its bearer tokens
TOKEN_DECIDE_API: Final = f"{DECIDE_API}.token"
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_PASSWORD = re.compile(r"[A-Za-z0-9_.~+/=!@#%^&*()-]{8,256}")  # quoted for nats-server: no quote, no backslash


class AuthError(ValueError):
    """A credentials file or an operator name that cannot be used."""


def _events(*types: str) -> list[str]:
    return [f"corral.evt.*.{kind}" for kind in types]


def _stream_reads(stream: str) -> tuple[str, ...]:
    """Reading one stream: its info, direct and API gets, ephemeral/ordered consumers, flow control.

    A consumer is created only with its name in the subject (`CONSUMER.CREATE.<stream>.<name>[.<filter>]`,
    actors/bus.py names every ephemeral one): the name-less `CONSUMER.CREATE.<stream>` takes the
    name from the payload, and on nats-server 2.10+ it rewrites an existing durable of that name
    (tested), so nobody is granted it. `deny` (durable_denies) keeps other roles' durable names out.
    """
    return (
        f"$JS.API.STREAM.INFO.{stream}",
        f"$JS.API.STREAM.MSG.GET.{stream}",
        f"$JS.API.DIRECT.GET.{stream}",
        f"$JS.API.DIRECT.GET.{stream}.>",
        f"$JS.API.CONSUMER.CREATE.{stream}.*",
        f"$JS.API.CONSUMER.CREATE.{stream}.*.>",
        f"$JS.API.CONSUMER.INFO.{stream}.>",
        f"$JS.FC.{stream}.>",
    )


# Reading the log (CORRAL, and CORRAL_OUTPUT under log retention) and the health bucket: stream
# info, ordered/ephemeral consumers, direct gets, flow-control replies. Every role reads; events
# are not secret (see docs/security.md).
READ_PUBLISH: Final = (
    "$JS.API.INFO",
    "$JS.API.STREAM.NAMES",  # nats-py finds the stream of a subscription by its subject
    *_stream_reads(STREAM),
    *_stream_reads(OUTPUT_STREAM),
    *_stream_reads(HEALTH_STREAM),
)
READ_SUBSCRIBE: Final = ("_INBOX.>", "corral.evt.>")
# The streams only the provisioner creates and updates (limits, subjects, replicas, sealing):
# nobody else may publish any other $JS.API.STREAM.* subject than the reads above.
PROVISIONED_STREAMS: Final = (STREAM, OUTPUT_STREAM, HEALTH_STREAM)
PROVISIONER: Final = "provisioner"


def health_publish(role: str) -> tuple[str, ...]:
    """What an actor of `role` writes besides its events: its own instances' health records only."""
    return (f"$KV.{HEALTH_BUCKET}.{role}.>",)


def _work_consumers(*durables: str) -> list[str]:
    """A durable pull consumer shared by the instances of one actor: fetch, ack.

    Creating and updating it is `CONSUMER.CREATE.CORRAL.<durable>[.<filter>]`, granted to
    everyone by _stream_reads and denied to every role but its owner (durable_denies)."""
    grants = []
    for durable in durables:
        grants += [f"$JS.API.CONSUMER.MSG.NEXT.{STREAM}.{durable}", f"$JS.ACK.{STREAM}.{durable}.>"]
    return grants


def durable_denies(durables: Iterable[str]) -> list[str]:
    """Everything that creates, updates, deletes, fetches from or acks for these durables."""
    denied = []
    for stream in (STREAM, OUTPUT_STREAM):
        for name in durables:
            denied += [
                f"$JS.API.CONSUMER.CREATE.{stream}.{name}",
                f"$JS.API.CONSUMER.CREATE.{stream}.{name}.>",
                f"$JS.API.CONSUMER.DURABLE.CREATE.{stream}.{name}",
                f"$JS.API.CONSUMER.DELETE.{stream}.{name}",
                f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{name}",
                f"$JS.ACK.{stream}.{name}.>",
            ]
    return denied


@dataclass(frozen=True)
class Role:
    """What one NATS user may do, beyond reading (READ_PUBLISH / READ_SUBSCRIBE)."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...] = ()
    responds: bool = False  # may answer requests it received (allow_responses)
    actor: bool = True  # an actor process: writes its instances' health records
    durables: tuple[str, ...] = ()  # durable consumers it alone may create, update and read from


SPAWNER_EVENTS: Final = (
    "execution.claimed",
    "execution.queued",
    "execution.held",  # its template's circuit breaker is open (actors/breakers.py)
    "setup.finished",  # a template's setup/teardown script, recorded by the shim (actors/scripts.py)
    "teardown.finished",
    "workspace.created",
    "execution.failed",
    "execution.exited",
    "priority.changed",
    "control.rejected",
    # recorded by the shim, published by the spawner
    "execution.started",
    "output",
    "heartbeat",
    "protocol.error",
    "input.delivered",
    "execution.paused",
    "execution.resumed",
    "timeout.extended",
    "execution.timed_out",
    "limit.exceeded",
    "file.touched",
    "approval.needed",
    "session.started",
    "agent.message",
    "tool.called",
    "tool.result",
    "shell.blocked",
    "usage",
    "network.blocked",
    "agent.result",
    "agent.capabilities",
)
OPERATOR_EVENTS: Final = (
    "execution.requested",
    "input.requested",
    "pause.requested",
    "resume.requested",
    "cancel.requested",
    "timeout.extend.requested",
    "priority.requested",
    "checkpoint.requested",
    "commit.requested",
    "rollback.requested",
    "pr.requested",
    "pr.opened",
    "pr.failed",
    "workspace.removed",
    "pipeline.requested",
    "pipeline.cancel.requested",
    "ticket.created",
)
QUERY_API: Final = (API_SQL, API_POSITION)

ROLES: Final[dict[str, Role]] = {
    "spawner": Role(publish=tuple(_events(*SPAWNER_EVENTS))),
    "watchdog": Role(
        publish=tuple(
            _events(
                "execution.stalled",
                "execution.timed_out",
                "execution.retry_scheduled",
                "execution.crash_loop",
                "execution.requested",
                "pause.requested",
                "cancel.requested",
            )
        )
    ),
    "checkpointer": Role(
        publish=tuple(
            _events(
                "checkpoint.created",
                "change.committed",
                "change.rolled_back",
                "workspace.promoted",  # the shadow workspace (docs/shadow.md)
                "workspace.discarded",
                "control.rejected",
                "pause.requested",
                "resume.requested",
            )
        )
    ),
    "validator": Role(
        publish=(
            *_events("validation.passed", "validation.failed", "approval.needed", "pause.requested"),
            *_work_consumers("validator", "validator-tools"),
        ),
        durables=("validator", "validator-tools"),
    ),
    "approver": Role(
        publish=tuple(
            _events(
                "approval.requested",
                "approval.decision.submitted",
                "approval.granted",
                "approval.denied",
                "approval.expired",
                "approval.needed",
                "control.rejected",
                "resume.requested",
                "cancel.requested",
                "execution.requested",
            )
        ),
        subscribe=(f"{DECIDE_API}.*", f"{TOKEN_DECIDE_API}.*"),
        responds=True,
    ),
    "projector": Role(
        publish=(
            *(
                grant
                for stream in (STREAM, OUTPUT_STREAM)  # its durable consumers on either stream
                for grant in (  # `projector_<digest>`: any name but another role's durables (deny)
                    f"$JS.API.CONSUMER.DELETE.{stream}.*",
                    f"$JS.API.CONSUMER.MSG.NEXT.{stream}.*",
                    f"$JS.ACK.{stream}.>",
                )
            ),
            "_INBOX.>",  # progress of a rebuild, to the inbox the requester named
        ),
        subscribe=(*QUERY_API, "corral.api.projections.>"),
        responds=True,
    ),
    "tap": Role(publish=QUERY_API, actor=False),
    # Sends webhook/Slack/ntfy notifications (actors/notifier.py): one shared durable, its records.
    "notifier": Role(
        publish=(*_events("notification.sent", "notification.failed"), *_work_consumers("notifier")),
        durables=("notifier",),
    ),
    # Runs pipelines (actors/conductor.py): claims each stage with an optimistic append, requests its
    # execution, cancels it when the run is cancelled; one shared durable of triggers.
    "conductor": Role(
        publish=(
            *_events(
                "pipeline.started",
                "stage.started",
                "stage.finished",
                "pipeline.finished",
                "pipeline.held",
                "breaker.counted",
                "breaker.opened",
                "breaker.closed",
                "approval.needed",
                "ticket.claimed",
                "ticket.finished",
                "schedule.fired",
                "pipeline.requested",
                "execution.requested",
                "cancel.requested",
            ),
            *_work_consumers("conductor"),
        ),
        durables=("conductor",),
    ),
    # The HTTP gateway (corral/http.py) for its operator tokens: what an operator may do, and
    # decisions only on `decide.token.<name>` (the approver records the token's name as decider).
    "api": Role(
        publish=(
            *_events(*OPERATOR_EVENTS),
            *QUERY_API,
            "corral.api.projections.>",
            f"{TOKEN_DECIDE_API}.*",
        ),
        actor=False,
    ),
    # `corral up` (or the command that starts the system) before anything else: the streams, their
    # limits and replicas. Its password stays in the credentials file of the host that provisions.
    PROVISIONER: Role(
        publish=(
            *(f"$JS.API.STREAM.{verb}.{stream}" for stream in PROVISIONED_STREAMS for verb in ("CREATE", "UPDATE")),
            # the sweep of durables no role owns (events/consumers.py): list, delete, record each
            *(f"$JS.API.CONSUMER.{verb}.{stream}" for stream in PROVISIONED_STREAMS for verb in ("LIST", "NAMES")),
            *(f"$JS.API.CONSUMER.DELETE.{stream}.*" for stream in PROVISIONED_STREAMS),
            *_events("consumer.removed"),
        ),
        actor=False,
    ),
}
ACTOR_ROLES: Final = (
    "spawner",
    "watchdog",
    "checkpointer",
    "validator",
    "approver",
    "projector",
    "notifier",
    "conductor",
)


def operator_role(name: str) -> Role:
    """A human (or a tool acting for one): control requests, queries, and decisions as `name` only."""
    return Role(
        publish=(
            *_events(*OPERATOR_EVENTS),
            *QUERY_API,
            "corral.api.projections.>",
            f"{DECIDE_API}.{name}",
        ),
        actor=False,
    )


def check_name(name: str, what: str = "operator name") -> str:
    """Return name if it can be a NATS user and a subject token, else raise AuthError."""
    if not _NAME.fullmatch(name):
        raise AuthError(f"{what} {name!r}: use 1-64 letters, digits, '_' or '-'")
    if name in ROLES or name in ("admin", "token"):
        raise AuthError(f"{what} {name!r} is a built-in role; choose another name")
    return name


def server_variable(user: str) -> str:
    """The environment variable holding `user`'s password for nats-server (CORRAL_PASS_<USER>)."""
    return SERVER_ENV_PREFIX + re.sub(r"[^A-Z0-9]", "_", user.upper())


def role_of(user: str, operators: Iterable[str]) -> Role | None:
    if user in ROLES:
        return ROLES[user]
    if user in operators:
        return operator_role(user)
    return None


def _quote(subjects: Iterable[str], indent: str = "        ") -> str:
    """Quoted subjects, wrapped to lines of about 110 characters, the closing bracket 2 spaces left."""
    lines: list[str] = []
    line = ""
    for subject in subjects:
        item = f'"{subject}",'
        if line and len(indent) + len(line) + len(item) > 110:
            lines.append(line)
            line = ""
        line = f"{line} {item}" if line else item
    lines.append(line)
    return "\n" + "\n".join(indent + text for text in lines).rstrip(",") + "\n" + indent[:-2]


def render_auth_conf(operators: Iterable[str] = (DEFAULT_OPERATOR,)) -> str:
    """The nats-server `authorization` block for every role and these operator users."""
    names = [check_name(o) for o in operators]
    lines = [
        "# nats-auth.conf — Corral's NATS users, one per actor role, written by events/auth.py",
        "# (render_auth_conf). Passwords are environment variables that Corral sets when it starts the",
        "# embedded server from $CORRAL_HOME/credentials.json; set them yourself for a server you run.",
        "# What each role may do, and why: docs/security.md.",
        "",
        "authorization {",
        "  users = [",
    ]

    def user(name: str, role: Role | None) -> None:
        variable = server_variable(name)
        if role is None:  # admin: everything (maintenance by hand; no Corral process uses it)
            perms = '{publish: ">", subscribe: ">"}'
        else:
            publish = [*READ_PUBLISH, *(health_publish(name) if role.actor else ()), *role.publish]
            subscribe = [*READ_SUBSCRIBE, *role.subscribe]
            responses = ", allow_responses: true" if role.responds else ""
            denied = durable_denies(d for other, r in ROLES.items() if other != name for d in r.durables)
            grants = f"[{_quote(publish)}]"
            if denied:  # deny wins over allow (nats-server)
                allow, deny = _quote(publish, " " * 10), _quote(denied, " " * 10)
                grants = f"{{\n        allow: [{allow}]\n        deny: [{deny}]\n      }}"
            perms = f"{{\n      publish: {grants}\n      subscribe: [{_quote(subscribe)}]{responses}\n    }}"
        lines.append(f"    {{user: {name}, password: ${variable}, permissions: {perms}}}")

    for name in (*ROLES, *names):
        user(name, role_of(name, names))
    user("admin", None)
    lines += ["  ]", "}", ""]
    return "\n".join(lines)


# --- credentials -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    """One NATS user and password."""

    user: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class CredentialSet:
    """Every user's password for one Corral system, and which users are operators."""

    users: dict[str, str] = field(repr=False)
    operators: tuple[str, ...] = (DEFAULT_OPERATOR,)

    def get(self, user: str) -> Credentials | None:
        password = self.users.get(user)
        return Credentials(user, password) if password else None

    def server_env(self) -> dict[str, str]:
        """The environment nats-server needs to resolve the passwords of render_auth_conf's file.

        nats-server parses a variable's value as configuration, so each is quoted: a password that
        looks like a number or a date stays a string.
        """
        return {server_variable(user): f'"{password}"' for user, password in self.users.items()}

    def auth_conf(self) -> str:
        return render_auth_conf(self.operators)

    def to_json(self) -> bytes:
        return orjson.dumps(
            {"version": 1, "operators": list(self.operators), "users": self.users}, option=orjson.OPT_INDENT_2
        )


def all_users(operators: Iterable[str]) -> list[str]:
    return [*ROLES, *operators, "admin"]


def generate(operators: Iterable[str] = (DEFAULT_OPERATOR,), existing: CredentialSet | None = None) -> CredentialSet:
    """A password for every role and operator (keeping the passwords `existing` already has)."""
    names = tuple(check_name(o) for o in operators)
    kept = existing.users if existing is not None else {}
    users = {user: kept.get(user) or secrets.token_urlsafe(24) for user in all_users(names)}  # [A-Za-z0-9_-]
    return CredentialSet(users=users, operators=names)


def read_credentials(path: Path) -> CredentialSet:
    """Load a credentials file; AuthError with the file's name when it is unusable."""
    try:
        raw = orjson.loads(path.read_bytes())
        users = raw["users"]
        operators = tuple(raw.get("operators") or ())
        if not isinstance(users, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in users.items()):
            raise TypeError("users must map names to passwords")
        if any(not _PASSWORD.fullmatch(v) for v in users.values()):
            raise TypeError("a password may hold letters, digits and -_.~+/=!@#%^&*() only")
    except OSError as exc:
        raise AuthError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
        raise AuthError(f"{path} is not a Corral credentials file ({exc}); remove it to generate new ones") from None
    return CredentialSet(users=dict(users), operators=operators)


def _write_private(path: Path, data: bytes) -> None:
    """Write a file only its owner can read, atomically (never a moment with wider permissions)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def ensure_credentials(root: Path, operators: Iterable[str] = (DEFAULT_OPERATOR,)) -> CredentialSet:
    """The credentials of the system in `root` (CORRAL_HOME): generated once, then kept.

    `operators` ([security] operators) is the list of operator users; passwords of users that
    stay are kept, a new name gets one, a removed name loses its user.

    Called by the process that starts the embedded server, under the home's system lock.
    """
    names = tuple(dict.fromkeys(check_name(o) for o in operators)) or (DEFAULT_OPERATOR,)
    path = root / CREDENTIALS_FILE
    existing = read_credentials(path) if path.exists() else None
    if existing is not None and existing.operators == names and set(all_users(names)) <= set(existing.users):
        _tighten(path)
        return existing
    # The operator list is the configuration's: a name removed there loses its NATS user.
    created = generate(names, existing)
    root.mkdir(parents=True, exist_ok=True)
    _write_private(path, created.to_json())
    return created


def _tighten(path: Path) -> None:
    with contextlib.suppress(OSError):
        if path.stat().st_mode & 0o077:
            path.chmod(0o600)


def _env(environ: dict[str, str] | None) -> dict[str, str]:
    return dict(os.environ) if environ is None else environ


def credential_set(root: Path | None, environ: dict[str, str] | None = None) -> CredentialSet | None:
    """The credentials file in effect: $CORRAL_NATS_CREDS, else CORRAL_HOME's, else None."""
    env = _env(environ)
    named = env.get(ENV_CREDS)
    if named:
        return read_credentials(Path(named).expanduser())
    if root is not None and (root / CREDENTIALS_FILE).is_file():
        return read_credentials(root / CREDENTIALS_FILE)
    return None


def environment_credentials(environ: dict[str, str] | None = None) -> Credentials | None:
    """CORRAL_NATS_USER and CORRAL_NATS_PASSWORD, when both are set."""
    env = _env(environ)
    user, password = env.get(ENV_USER), env.get(ENV_PASSWORD)
    return Credentials(user, password) if user and password else None


def client_credentials(role: str, root: Path | None, environ: dict[str, str] | None = None) -> Credentials | None:
    """The credentials a connection of `role` uses, or None (a server without authorization).

    `operator` is a human: CORRAL_NATS_USER (+ CORRAL_NATS_PASSWORD, or that user's password from
    the credentials file), else the file's first operator. An actor role takes its own entry of the
    credentials file, else CORRAL_NATS_USER / CORRAL_NATS_PASSWORD (one user for everything on a
    server you configured yourself).
    """
    env = _env(environ)
    user, password = env.get(ENV_USER) or None, env.get(ENV_PASSWORD) or None
    found = credential_set(root, env)
    if role == DEFAULT_OPERATOR:
        if user and password:
            return Credentials(user, password)
        if found is None:
            return None
        if user:
            mine = found.get(user)
            if mine is None:
                raise AuthError(
                    f"{ENV_USER}={user} has no password: set {ENV_PASSWORD}, or add {user} to [security] operators"
                )
            return mine
        return found.get(found.operators[0] if found.operators else DEFAULT_OPERATOR)
    if found is not None and (own := found.get(role)) is not None:
        return own
    if user and password:
        return Credentials(user, password)
    return None
