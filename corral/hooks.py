"""Webhook triggers (issue 18): `POST /api/hooks/{name}` runs a `[hooks.NAME]`'s pipeline with variables
from the JSON body, adds a ticket its pipeline runs (`ticket = true`: the body's `title` and `goal`), or
starts a run of a template (`template`, with its `task` rendered from the body). See
docs/orchestration.md#webhook-triggers.

A caller proves itself with an HMAC-SHA256 signature (the key in the environment variable the hook's
`secret_env` names, on the host that serves the API) over `<timestamp>.<body>`, sent as
`X-Corral-Timestamp: <unix seconds>` and `X-Corral-Signature: sha256=<hex>`, or with an operator's
bearer token. A timestamp more than MAX_SKEW_S away from now is refused (a replayed old request),
and a signed request names what it starts by its signature: the same delivery sent again within the
window is recorded once (the run's `pipeline.requested`, the ticket's `ticket.created` or the
execution's `execution.requested` expects sequence 0 on its subject).
"""

import hashlib
import hmac
import os
import re
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, Any, Final

import orjson
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, ValidationError, model_validator

from corral.errors import CorralError, UsageError
from events.approvals import encode

SIGNATURE_HEADER: Final = "x-corral-signature"
TIMESTAMP_HEADER: Final = "x-corral-timestamp"
MAX_SKEW_S: Final = 300.0
MAX_BODY_BYTES: Final = 64 * 1024
MAX_VALUE_CHARS: Final = 4000
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_VAR = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_ID_ALPHABET: Final = "0123456789abcdefghjkmnpqrstvwxyz"

if TYPE_CHECKING:
    from corral.client import Client
    from corral.home import Home
    from corral.tokens import Token


class HookRefused(CorralError):
    """A request the hook does not accept: `status` is the HTTP status to answer."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class Hook(BaseModel):
    """One `[hooks.NAME]` of corral.toml."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    pipeline: Annotated[StrictStr, Field(min_length=1)] | None = None  # the pipeline it runs (or the ticket's)
    template: Annotated[StrictStr, Field(min_length=1)] | None = None  # or a run of this template
    ticket: StrictBool = False  # with pipeline: the body is a ticket (title, goal, priority) the pipeline runs
    task: StrictStr | None = None  # a template's task, {{variables}} from the body
    repo: Annotated[StrictStr, Field(min_length=1)]
    base: StrictStr = "HEAD"
    secret_env: Annotated[StrictStr, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")] | None = None
    vars: dict[str, StrictStr] = Field(default_factory=dict)  # defaults; the body's values override
    accept: tuple[StrictStr, ...] | None = None  # the body keys taken as variables (None: every scalar one)

    @model_validator(mode="after")
    def _one_target(self) -> "Hook":
        if (self.pipeline is None) == (self.template is None):
            raise ValueError("give one of pipeline (a run, or with ticket = true a ticket) or template")
        if self.ticket and self.pipeline is None:
            raise ValueError("ticket = true needs the pipeline that runs the tickets")
        if self.task is not None and self.template is None:
            raise ValueError("task is a template's (a pipeline's stages have their own)")
        return self


def hooks_of(raw: dict[str, Any]) -> dict[str, Hook]:
    """The `[hooks]` table of corral.toml, checked (UsageError naming the bad key)."""
    found: dict[str, Hook] = {}
    for name, table in raw.items():
        if not _NAME.match(name):
            raise UsageError(f"hooks.{name}: a hook name is lowercase letters, digits, - and _")
        if not isinstance(table, dict):
            raise UsageError(f"hooks.{name}: expected a table")
        try:
            found[name] = Hook(name=name, **table)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise UsageError(f"hooks.{name}{'.' if where else ''}{where}: {first['msg']}") from None
    return found


def signature(secret: bytes, timestamp: str, body: bytes) -> str:
    """The X-Corral-Signature value for a request: sha256=<hex HMAC-SHA256(secret, timestamp + "." + body)>."""
    return "sha256=" + hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def verify(hook: Hook, headers: dict[str, str], body: bytes, *, now: float | None = None) -> str:
    """Check a signed request; return the run id it names (derived from its signature), or raise HookRefused."""
    given = headers.get(SIGNATURE_HEADER)
    stamp = headers.get(TIMESTAMP_HEADER)
    if not given or not stamp:
        raise HookRefused(
            f"hook {hook.name}: unsigned; send X-Corral-Timestamp and X-Corral-Signature "
            "(HMAC-SHA256 of '<timestamp>.<body>') or an operator's bearer token",
            401,
        )
    secret = os.environ.get(hook.secret_env) if hook.secret_env else None
    if not secret:
        raise HookRefused(
            f"hook {hook.name} takes no signatures here (no secret_env set on this host); use an operator token",
            401,
        )
    try:
        at = float(stamp)
    except ValueError:
        raise HookRefused("X-Corral-Timestamp is not a number of seconds since the epoch", 401) from None
    if abs((time.time() if now is None else now) - at) > MAX_SKEW_S:
        raise HookRefused(f"X-Corral-Timestamp is more than {MAX_SKEW_S:.0f}s from now: a replayed request?", 401)
    expected = signature(secret.encode(), stamp, body)
    if not hmac.compare_digest(expected, given.strip()):
        raise HookRefused(f"hook {hook.name}: bad signature", 401)
    return encode(hashlib.sha256(f"hook|{hook.name}|{expected}".encode()).digest(), _ID_ALPHABET, 8)


def variables(hook: Hook, body: bytes) -> dict[str, str]:
    """The run's variables: the hook's `vars`, then the top-level values of the body it accepts
    (strings, numbers, booleans; objects, arrays and nulls are left out)."""
    if len(body) > MAX_BODY_BYTES:
        raise HookRefused(f"the body is larger than {MAX_BODY_BYTES // 1024} KiB", 413)
    try:
        parsed = orjson.loads(body) if body.strip() else {}
    except orjson.JSONDecodeError:
        raise HookRefused("the body is not JSON", 422) from None
    if not isinstance(parsed, dict):
        raise HookRefused("the body is not a JSON object", 422)
    values = dict(hook.vars)
    for key, value in parsed.items():
        if hook.accept is not None and key not in hook.accept:
            continue
        if not _VAR.match(key) or isinstance(value, dict | list) or value is None:
            continue
        text = ("true" if value else "false") if isinstance(value, bool) else str(value)
        values[key] = text[:MAX_VALUE_CHARS]
    return values


async def fire_hook(
    home: "Home",
    name: str,
    headers: dict[str, str],
    body: bytes,
    token: "Token | None",
    *,
    client_for: Callable[["Token"], Awaitable["Client"]],
    failed: Callable[[], None],
) -> dict[str, Any]:
    """What `POST /api/hooks/{name}` does: {run_id, pipeline}, {ticket_id, title, pipeline} or {execution_id,
    template}, with `duplicate` when the delivery was recorded before. `token`: an operator's bearer token
    the HTTP face checked; without one the request must be signed (`failed` counts a bad one)."""
    from corral.config import load_config
    from corral.errors import NotFound
    from corral.pipelines import RunRequest, request_run
    from corral.tokens import Token

    hook = hooks_of(load_config(home).hooks).get(name)
    if hook is None:
        raise NotFound(f"no hook {name!r}: declare it as [hooks.{name}] in corral.toml")
    fixed_id: str | None = None
    if token is None:
        try:
            fixed_id = verify(hook, {k.lower(): v for k, v in headers.items()}, body)
        except HookRefused:
            failed()
            raise
        token = Token(name=f"hook:{name}", role="operator", digest="", created_at="")
    values = variables(hook, body)
    client = await client_for(token)
    if hook.template is not None:
        return await _run_template(client, hook, values, fixed_id, token.name)
    assert hook.pipeline is not None
    if hook.ticket:
        return await _add_ticket(client, hook, values, fixed_id, token.name)
    return await request_run(
        client, hook.pipeline, RunRequest(repo=hook.repo, base=hook.base, vars=values), run_id=fixed_id
    )


async def _add_ticket(
    client: "Client", hook: Hook, values: dict[str, str], ticket_id: str | None, requested_by: str
) -> dict[str, Any]:
    """A ticket from the body: `title` and `goal` (required), `priority` (a whole number); the other
    values are variables of its stages."""
    from corral.tickets import TicketSpec, create

    client._require_operator("add tickets")
    extra = dict(values)
    title, goal, priority = extra.pop("title", ""), extra.pop("goal", ""), extra.pop("priority", "0")
    try:
        spec = TicketSpec(title=title, goal=goal, repo=hook.repo, pipeline=hook.pipeline, priority=int(priority))
    except (ValidationError, ValueError) as exc:
        first = exc.errors(include_url=False)[0] if isinstance(exc, ValidationError) else None
        what = f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}" if first else "priority: not a whole number"
        raise HookRefused(f"hook {hook.name}: the body is no ticket ({what}); send title and goal", 422) from None
    added = await create(
        client.home,
        client.system,
        [spec],
        repo=hook.repo,
        pipeline=hook.pipeline,
        extra=extra,
        ticket_id=ticket_id,
        requested_by=requested_by,
    )
    return added[0]


async def _run_template(
    client: "Client", hook: Hook, values: dict[str, str], execution_id: str | None, requested_by: str
) -> dict[str, Any]:
    """A run of the hook's template (as `corral run -t` starts one), its task rendered from the values."""
    from actors.conductor import render
    from corral.client import RunSpec
    from events.envelope import new_event
    from events.errors import WrongLastSequence

    task = render(hook.task, values) if hook.task else None
    try:
        spec = RunSpec.model_validate({"repo": hook.repo, "template": hook.template, "task": task})
    except ValidationError as exc:
        raise UsageError(f"hook {hook.name}: {exc.errors(include_url=False)[0]['msg']}") from None
    new_id, request = await client.build_request(spec)
    request = request.model_copy(update={"labels": {**request.labels, "hook": hook.name}, "requested_by": requested_by})
    execution_id = execution_id or new_id
    answer: dict[str, Any] = {"execution_id": execution_id, "template": hook.template}
    try:
        await client.system.bus.publisher.publish(
            new_event(execution_id, request, actor="api"), expected_last_subject_seq=0
        )
    except WrongLastSequence:
        answer["duplicate"] = True
    return answer
