"""The web console (issue 17): server-rendered pages and a small script, served by `corral up`'s HTTP server.

`mount(app, gateway)` adds the pages to the FastAPI app of corral/http.py. They are one more face
of the client (corral/client.py): every page reads and every button acts through `Gateway.client`
for the signed-in token, so a tap token sees everything and is refused (403) every change, exactly
as over the JSON API. Nothing here reads DuckDB or NATS by itself.

Sign-in: a form with one field, `token`. A good token opens a session: a random id in a cookie
(HttpOnly, SameSite=Strict, Secure over HTTPS) that maps, in this process's memory, to the token
and a CSRF secret. The token is re-checked on every request, so revoking it ends its sessions at
once; a restart of `corral up` ends them all (sign in again). Every form that changes state carries
the CSRF secret and is refused (403) without it; the sign-in form carries a one-time value of its
own cookie (double submit), so a foreign page cannot sign a browser in either. docs/console.md.
"""

import asyncio
import contextlib
import hmac
import secrets
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote

from fastapi import Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse

from corral.client import Client
from corral.errors import Forbidden, UsageError
from corral.tokens import Token

STATIC = Path(__file__).parent / "static"
# The API's SSE stream (corral/http.py gives it to `mount`): (client, request, **filters) -> response.
EventStream = Callable[..., Awaitable[StreamingResponse]]
SESSION_COOKIE = "corral_session"
LOGIN_COOKIE = "corral_login"
SESSION_IDLE_S = 12 * 3600.0
MAX_SESSIONS = 10_000
MAX_FORM_BYTES = 1_000_000
TOKEN_CHECK_S = 2.0  # how soon an open stream notices its token was revoked

SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


@dataclass
class Session:
    """A signed-in browser: the token it signed in with (kept in memory only) and its CSRF secret."""

    token_text: str
    name: str
    role: str
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    seen: float = field(default_factory=time.monotonic)
    ended: asyncio.Event = field(default_factory=asyncio.Event)  # set at sign-out: its open streams stop


class Sessions:
    """Sessions by their random id, in this process's memory; idle ones expire."""

    def __init__(self) -> None:
        self._by_id: dict[str, Session] = {}

    def open(self, token_text: str, token: Token) -> str:
        if len(self._by_id) >= MAX_SESSIONS:
            self._expire()
            while len(self._by_id) >= MAX_SESSIONS:  # the oldest go first
                self.close(next(iter(self._by_id)))
        sid = secrets.token_urlsafe(32)
        self._by_id[sid] = Session(token_text, token.name, token.role)
        return sid

    def get(self, sid: str | None) -> Session | None:
        if not sid:
            return None
        session = self._by_id.get(sid)
        if session is None:
            return None
        now = time.monotonic()
        if now - session.seen > SESSION_IDLE_S:
            self.close(sid)
            return None
        session.seen = now
        return session

    def close(self, sid: str | None) -> None:
        session = self._by_id.pop(sid, None) if sid else None
        if session is not None:
            session.ended.set()

    def _expire(self) -> None:
        now = time.monotonic()
        for sid, session in list(self._by_id.items()):
            if now - session.seen > SESSION_IDLE_S:
                self.close(sid)


class SignIn(Exception):
    """No (valid) session: pages redirect to the sign-in form, scripts get 401."""


@dataclass
class Who:
    """The signed-in caller of a page: its session and the client acting for its token."""

    sid: str
    session: Session
    token: Token
    client: Client

    @property
    def operator(self) -> bool:
        return self.token.role == "operator"


class Console:
    """What the console's routes share: the API's gateway (tokens, buses, limiter) and the sessions."""

    def __init__(self, gateway: Any, events: "EventStream") -> None:
        self.gateway = gateway
        self.events = events  # the API's SSE stream (corral/http.py `_sse`)
        self.sessions = Sessions()

    async def who(self, request: Request) -> Who:
        sid = request.cookies.get(SESSION_COOKIE)
        session = self.sessions.get(sid)
        if session is None or sid is None:
            raise SignIn()
        token = self.gateway.tokens.find(session.token_text)
        if token is None:  # revoked since: the session ends with it
            self.sessions.close(sid)
            raise SignIn()
        client = await self.gateway.client(token)
        return Who(sid, session, token, client)

    async def form(self, request: Request) -> dict[str, str]:
        """An urlencoded form body (the console's script posts the same), first value of each field."""
        body = await request.body()
        if len(body) > MAX_FORM_BYTES:
            raise UsageError(f"the form is larger than {MAX_FORM_BYTES} bytes")
        fields = parse_qs(body.decode("utf-8", errors="replace"), keep_blank_values=True)
        return {k: v[0] for k, v in fields.items()}

    async def acting(self, request: Request) -> tuple[Who, dict[str, str]]:
        """A state-changing form post: signed in, and carrying this session's CSRF secret."""
        who = await self.who(request)
        form = await self.form(request)
        if not hmac.compare_digest(form.get("csrf", "").encode(), who.session.csrf.encode()):
            raise Forbidden("the form's CSRF token is missing or wrong; reload the page and try again")
        return who, form


def wants_json(request: Request) -> bool:
    return "application/json" in request.headers.get("accept", "")


def safe_next(target: str | None) -> str:
    """Only a path of this site (no scheme, no //host) to go back to after signing in."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


def html(body: str, status: int = 200, headers: dict[str, str] | None = None) -> HTMLResponse:
    return HTMLResponse(body, status_code=status, headers={**SECURITY_HEADERS, **(headers or {})})


_FLASH_KEY = secrets.token_bytes(32)  # signs the messages pages show from their URL (this process only)


def _flash_sig(message: str) -> str:
    return hmac.new(_FLASH_KEY, message.encode(), "sha256").hexdigest()[:32]


def with_message(back: str, message: str) -> str:
    """`back` with a message the page will show: signed, so a crafted link cannot make a page say anything."""
    sep = "&" if "?" in back else "?"
    return f"{back}{sep}msg={quote(message)}&sig={_flash_sig(message)}"


def message_of(request: Request) -> str | None:
    """The message a page was sent back with, if this server signed it."""
    message = request.query_params.get("msg")
    signature = request.query_params.get("sig", "")
    if not message or not hmac.compare_digest(signature.encode(), _flash_sig(message).encode()):
        return None
    return message


def done(request: Request, message: str, *, back: str, extra: dict[str, Any] | None = None) -> Response:
    """The answer to a form post: JSON for the script (with `next`, the page to show it on), else a
    redirect back with the message."""
    if wants_json(request):
        answer = {"ok": True, "message": message, "next": with_message(back, message), **(extra or {})}
        return JSONResponse(answer, headers=SECURITY_HEADERS)
    return RedirectResponse(with_message(back, message), status_code=303, headers=SECURITY_HEADERS)


async def sse(who: Who, console: Console, request: Request, **kwargs: Any) -> StreamingResponse:
    """The API's SSE stream (corral/http.py), for a cookie session instead of a bearer token.

    The stream ends when its session does (sign-out, expiry) or its token is revoked; the browser's
    EventSource then reconnects, gets 401 and the page goes to the sign-in form."""
    response = await console.events(who.client, request, **kwargs)
    response.headers.update({k: v for k, v in SECURITY_HEADERS.items() if k != "Cache-Control"})
    response.body_iterator = _while_signed_in(response.body_iterator, who, console)
    return response


async def _while_signed_in(body: AsyncIterable[Any], who: Who, console: Console) -> AsyncIterator[Any]:
    iterator = body.__aiter__()
    ended = asyncio.ensure_future(who.session.ended.wait())
    checked = time.monotonic()
    try:
        while True:
            chunk = asyncio.ensure_future(iterator.__anext__())
            while not chunk.done():
                await asyncio.wait({chunk, ended}, timeout=TOKEN_CHECK_S, return_when=asyncio.FIRST_COMPLETED)
                if time.monotonic() - checked >= TOKEN_CHECK_S:  # a revoked token ends its streams too
                    checked = time.monotonic()
                    if console.gateway.tokens.find(who.session.token_text) is None:
                        console.sessions.close(who.sid)
                if who.session.ended.is_set():
                    chunk.cancel()
                    with contextlib.suppress(BaseException):
                        await chunk
                    return
            try:
                value = chunk.result()
            except StopAsyncIteration:
                return
            yield value
    finally:
        ended.cancel()
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(BaseException):
                await aclose()
