"""A forge adapter speaking GitHub's REST shape, over urllib: read a repository, open a pull request.

`GET {base_url}/repos/{owner}/{repo}` (checks the token and reachability, gives the default branch)
and `POST {base_url}/repos/{owner}/{repo}/pulls` with {title, body, head, base} answered by
{number, html_url}. The token travels only in the Authorization header; it is never part of a
message this module raises.
"""

import json
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from corral.errors import CorralError

TIMEOUT_S = 30.0
USER_AGENT = "corral"

# git@github.com:owner/name.git, ssh://git@host/owner/name, https://host/owner/name(.git)
_REMOTE_URL = re.compile(r"(?:[^/:@]+@)?[^/:]+[:/](?P<owner>[A-Za-z0-9_.-]+)/(?P<name>[A-Za-z0-9_.-]+?)(?:\.git)?/?")


class ForgeError(CorralError):
    """The forge refused a request or could not be reached."""

    status = 502  # the HTTP API's answer: a gateway (the forge) failed

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.forge_status = status  # what the forge answered, if it did


@dataclass(frozen=True)
class PullRequest:
    number: int
    url: str


def repo_from_remote_url(url: str) -> str | None:
    """'owner/name' from a remote URL like git@github.com:owner/name.git, or None if it has no such shape."""
    text = url.strip()
    for scheme in ("https://", "http://", "ssh://", "git://"):
        if text.startswith(scheme):
            text = text[len(scheme) :]
            break
    else:
        if "://" in text or text.startswith(("/", ".", "~")) or ":" not in text:
            return None  # a local path or an unknown scheme
    match = _REMOTE_URL.fullmatch(text)
    return f"{match['owner']}/{match['name']}" if match else None


def _hint(status: int) -> str:
    if status == 401:
        return "the token was not accepted: check the token in the [forge] token_env variable"
    if status == 403:
        return "the token may not do this (it needs pull-request write access), or a rate limit was hit"
    if status == 404:
        return "no such repository for this token: check [forge] repo and base_url, and the token's access"
    if status == 422:
        return "fix what the forge names above (an existing pull request for the branch, or an unknown base branch)"
    if status >= 500:
        return "the forge failed on its side; try again later"
    return "check [forge] in corral.toml"


def _forge_message(body: bytes) -> str:
    """GitHub-shaped error text: message plus the errors' messages, on one line."""
    try:
        data = json.loads(body)
    except ValueError:
        text = body.decode(errors="replace").strip()
        return " ".join(text.split())[:200]
    if not isinstance(data, dict):
        return ""
    parts = [str(data.get("message") or "").strip()]
    for item in data.get("errors") or []:
        if isinstance(item, dict):
            detail = item.get("message") or " ".join(str(item.get(k)) for k in ("field", "code") if item.get(k))
            if detail:
                parts.append(str(detail))
        elif item:
            parts.append(str(item))
    return " ".join(": ".join(p for p in parts if p).split())


class Forge:
    """One repository on a forge: base URL, owner/name and a token."""

    def __init__(self, base_url: str, repo: str, token: str, *, timeout_s: float = TIMEOUT_S) -> None:
        self.base_url = base_url.rstrip("/")
        self.repo = repo
        self._token = token
        self.timeout_s = timeout_s

    def __repr__(self) -> str:  # never show the token
        return f"Forge({self.base_url!r}, {self.repo!r})"

    def _request(self, method: str, path: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
        url = f"{self.base_url}/repos/{self.repo}{path}"
        data = json.dumps(payload).encode() if payload is not None else None
        request = urllib.request.Request(url, data=data, method=method)
        request.add_header("Authorization", f"Bearer {self._token}")
        request.add_header("Accept", "application/vnd.github+json")
        request.add_header("User-Agent", USER_AGENT)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        what = f"{method} {url}"
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                body = response.read()
        except urllib.error.HTTPError as exc:
            detail = _forge_message(exc.read() or b"")
            shown = f": {detail}" if detail else ""
            raise ForgeError(
                f"the forge answered HTTP {exc.code} to {what}{shown}; {_hint(exc.code)}", status=exc.code
            ) from None
        except (TimeoutError, urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ForgeError(
                f"cannot reach the forge at {self.base_url} ({reason}); check [forge] base_url and the network"
            ) from None
        try:
            result = json.loads(body) if body.strip() else {}
        except ValueError:
            raise ForgeError(
                f"the forge answered {what} with something that is not JSON; is {self.base_url} a GitHub-shaped API?"
            ) from None
        if not isinstance(result, dict):
            raise ForgeError(f"the forge answered {what} with unexpected JSON (not an object)")
        return result

    def repository(self) -> dict[str, Any]:
        """The repository as the forge describes it (default_branch, ...); checks the token too."""
        return self._request("GET", "")

    def open_pull_request(self, *, title: str, body: str | None, head: str, base: str) -> PullRequest:
        result = self._request("POST", "/pulls", {"title": title, "body": body or "", "head": head, "base": base})
        number, url = result.get("number"), result.get("html_url")
        if not isinstance(number, int) or not isinstance(url, str):
            raise ForgeError("the forge accepted the pull request but its answer has no number and html_url")
        return PullRequest(number=number, url=url)
