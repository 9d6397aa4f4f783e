"""Bearer tokens of the HTTP API: `corral token create NAME --role operator|tap`, `list`, `revoke`.

A token is printed once and stored only as its SHA-256 in `$CORRAL_HOME/tokens.json` (mode 0600):
it is 32 random bytes, so a fast hash is enough (nothing to brute-force), and the file leaks no
usable secret. A token acts as its role (docs/api.md): `operator` through the HTTP gateway's
NATS user `api` (decisions recorded as taken by the token's name), `tap` through the read-only
NATS user `tap`. Revoking rewrites the file; a running server re-reads it when it changes.
"""

import argparse
import contextlib
import hashlib
import hmac
import os
import secrets
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import orjson

from corral import render
from corral.errors import Conflict, NotFound, UsageError
from corral.home import Home
from events.auth import AuthError, check_name

TOKENS_FILE: Final = "tokens.json"
ROLES: Final = ("operator", "tap")
PREFIX: Final = "corral_"


@dataclass(frozen=True)
class Token:
    name: str
    role: str
    digest: str  # sha256 hex of the token
    created_at: str

    def public(self) -> dict[str, Any]:
        return {"name": self.name, "role": self.role, "created_at": self.created_at}


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def tokens_path(home: Home) -> Path:
    return home.root / TOKENS_FILE


def read_tokens(path: Path) -> list[Token]:
    """The tokens in `path` ([] without the file); a damaged file is an error naming it."""
    try:
        raw = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        return []
    except (OSError, orjson.JSONDecodeError) as exc:
        raise UsageError(f"{path} cannot be read ({exc}); fix or remove it (every token is then lost)") from None
    try:
        return [Token(str(t["name"]), str(t["role"]), str(t["sha256"]), str(t["created_at"])) for t in raw["tokens"]]
    except (KeyError, TypeError) as exc:
        raise UsageError(f"{path} is not a tokens file ({exc}); fix or remove it") from None


def _write_tokens(path: Path, tokens: list[Token]) -> None:
    """Write the file aside (0600) and move it in place: a reader sees the old file or the new one."""
    body = {
        "version": 1,
        "tokens": [{"name": t.name, "role": t.role, "sha256": t.digest, "created_at": t.created_at} for t in tokens],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tokens-")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(orjson.dumps(body, option=orjson.OPT_INDENT_2))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def create_token(home: Home, name: str, role: str) -> tuple[Token, str]:
    """A new token for `name`: (its record, the token text, shown once)."""
    try:
        check_name(name, "token name")
    except AuthError as exc:
        raise UsageError(str(exc)) from None
    if role not in ROLES:
        raise UsageError(f"--role must be one of: {', '.join(ROLES)} (got {role!r})")
    path = tokens_path(home)
    tokens = read_tokens(path)
    if any(t.name == name for t in tokens):
        raise Conflict(f"a token named {name!r} exists; revoke it first (`corral token revoke {name}`)")
    text = f"{PREFIX}{secrets.token_urlsafe(32)}"
    token = Token(name, role, _digest(text), datetime.now(UTC).isoformat(timespec="seconds"))
    _write_tokens(path, [*tokens, token])
    return token, text


def revoke_token(home: Home, name: str) -> Token:
    path = tokens_path(home)
    tokens = read_tokens(path)
    found = [t for t in tokens if t.name == name]
    if not found:
        raise NotFound(f"no token named {name!r}; `corral token list` lists them")
    _write_tokens(path, [t for t in tokens if t.name != name])
    return found[0]


class TokenBook:
    """The tokens a server accepts, re-read whenever the file changes (a revoke applies at once)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._tokens: dict[str, Token] = {}

    def _refresh(self) -> None:
        try:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            stamp = None
        if stamp == self._stamp and stamp is not None:
            return
        try:
            self._tokens = {t.digest: t for t in read_tokens(self.path)}
        except UsageError:
            self._tokens = {}  # a damaged file accepts nobody (fail closed)
        self._stamp = stamp

    def find(self, text: str) -> Token | None:
        """The token `text` is, or None. Compared by digest in constant time."""
        self._refresh()
        digest = _digest(text)
        for known, token in self._tokens.items():
            if hmac.compare_digest(known, digest):
                return token
        return None


class FailureLimiter:
    """At most `limit` failed logins per client address in `window_s`; then refused until it passes."""

    def __init__(self, limit: int = 10, window_s: float = 60.0) -> None:
        self.limit = limit
        self.window_s = window_s
        self._failures: dict[str, list[float]] = {}

    def blocked_for(self, client: str) -> float:
        """Seconds until `client` may try again (0: now)."""
        now = time.monotonic()
        recent = [t for t in self._failures.get(client, []) if now - t < self.window_s]
        self._failures[client] = recent
        if len(recent) < self.limit:
            return 0.0
        return max(0.1, self.window_s - (now - recent[0]))

    def failed(self, client: str) -> None:
        self._failures.setdefault(client, []).append(time.monotonic())
        if len(self._failures) > 10_000:  # forget the quietest addresses: bounded memory under a scan
            for key in list(self._failures)[:5_000]:
                del self._failures[key]


# --- the command -------------------------------------------------------------------------------


def add_parsers(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> dict[str, Any]:
    """Add `corral token` to `sub`; return {command name: handler(home, args)}."""
    token = sub.add_parser("token", help="bearer tokens of the HTTP API: create, list, revoke (docs/api.md)")
    actions = token.add_subparsers(dest="token_cmd", metavar="ACTION", required=True)
    create = actions.add_parser("create", help="make a token (printed once; stored hashed)")
    create.add_argument("name", metavar="NAME", help="who uses it: recorded as the decider of its decisions")
    create.add_argument("--role", required=True, choices=ROLES, help="operator: read and control; tap: read only")
    create.add_argument("--json", action="store_true")
    listing = actions.add_parser("list", help="list tokens (names, roles, creation times; never the tokens)")
    listing.add_argument("--json", action="store_true")
    revoke = actions.add_parser("revoke", help="revoke a token (a running server refuses it at once)")
    revoke.add_argument("name", metavar="NAME")
    revoke.add_argument("--json", action="store_true")
    return {"token": cmd_token}


def cmd_token(home: Home, args: Any) -> int:
    home.ensure()
    if args.token_cmd == "create":
        token, text = create_token(home, args.name, args.role)
        if args.json:
            render.print_json({**token.public(), "token": text})
        else:
            print(text)
            sys.stderr.write(
                f"corral: token {token.name!r} ({token.role}) created; it is shown only now: "
                f"send it as `Authorization: Bearer <token>`\n"
            )
        return 0
    if args.token_cmd == "list":
        tokens = [t.public() for t in read_tokens(tokens_path(home))]
        if args.json:
            render.print_json(tokens)
        elif tokens:
            print(render.table(["name", "role", "created"], [[t["name"], t["role"], t["created_at"]] for t in tokens]))
        else:
            sys.stderr.write("corral: no tokens; `corral token create NAME --role operator|tap` makes one\n")
        return 0
    revoked = revoke_token(home, args.name)
    if args.json:
        render.print_json({**revoked.public(), "revoked": True})
    else:
        print(f"revoked {revoked.name} ({revoked.role})")
    return 0
