"""The shell allow/deny lists: one evaluation, before a command runs and after it is reported.

The validator (actors/policy.py) applies `shell_deny` and `shell_allow` to every shell command an
adapter reports; that is detection after the fact. The same `ShellRules` also run *before* a
command does, inside each agent CLI's own pre-tool mechanism (docs/policy.md, "Before a command
runs"): the PreToolUse hook of Claude Code and Codex (`python -I -m actors.shellhook`, which gets
the lists from `CORRAL_SHELL_POLICY` in its environment), and an admin policy file for Gemini
CLI's policy engine (`gemini_policy_toml`, the same globs as regular expressions on the JSON of its
tool call). The shim's adapters then record each refusal as `shell.blocked`.

Standard library only: the hook starts once per shell command an agent runs, and the shim imports
this too.
"""

import json
import re
from collections.abc import Iterable, Mapping
from typing import Any, Final

ENV: Final = "CORRAL_SHELL_POLICY"  # the lists, as JSON, in the environment of the CLI (and so of its hooks)
MARKER: Final = "corral shell policy"  # begins every refusal a CLI shows; adapters look for it
RULES: Final = ("shell_deny", "shell_not_allowed")


def command_regex(patterns: Iterable[str]) -> re.Pattern[str] | None:
    """One regex matching a whole shell command against any glob (`*` matches anything)."""
    parts = []
    for pattern in patterns:
        words = pattern.strip().split()
        parts.append(r"\s+".join(re.escape(w).replace(r"\*", ".*").replace(r"\?", ".") for w in words))
    return re.compile(r"\s*(?:" + "|".join(parts) + r")\s*\Z", re.S) if parts else None


_SEGMENT_SPLIT = re.compile(r"\s*(?:&&|\|\||;|\n)\s*")


def command_segments(command: str) -> list[str]:
    """The simple commands of a shell line (split on `;`, `&&`, `||`, newlines); pipes stay whole."""
    return [s for s in _SEGMENT_SPLIT.split(command.strip()) if s]


class ShellRules:
    """`shell_allow` and `shell_deny` of one policy, compiled once.

    A plain class, not a dataclass: `dataclasses` imports `inspect`, a third of the hook's start.
    """

    __slots__ = ("_allow", "_deny", "allow", "deny")

    def __init__(self, allow: Iterable[str] = (), deny: Iterable[str] = ()) -> None:
        self.allow: tuple[str, ...] = tuple(allow)
        self.deny: tuple[str, ...] = tuple(deny)
        self._allow = command_regex(self.allow)
        self._deny = command_regex(self.deny)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ShellRules) and (self.allow, self.deny) == (other.allow, other.deny)

    def __hash__(self) -> int:
        return hash((self.allow, self.deny))

    def __repr__(self) -> str:
        return f"ShellRules(allow={self.allow!r}, deny={self.deny!r})"

    def findings(self, command: str) -> list[tuple[str, str]]:
        """(rule, message) for each list the command breaks: the whole line and each of its parts
        against the deny list, each part against the allow list (when there is one)."""
        out: list[tuple[str, str]] = []
        whole = command.strip()
        segments = command_segments(whole) or [whole]
        if self._deny is not None:
            deny = self._deny
            hit = next((s for s in (whole, *segments) if deny.match(s)), None)
            if hit is not None:
                out.append(("shell_deny", f"denied shell command: {hit[:200]}"))
        if self._allow is not None:
            allow = self._allow
            for segment in segments:
                if not allow.match(segment):
                    out.append(("shell_not_allowed", f"not in the allow list: {segment[:200]}"))
                    break
        return out

    def refusal(self, command: str) -> tuple[str, str] | None:
        """Why the command must not run, (rule, message); None when it may."""
        found = self.findings(command)
        return found[0] if found else None

    @property
    def empty(self) -> bool:
        return not self.allow and not self.deny

    def to_json(self) -> str:
        return json.dumps({"allow": list(self.allow), "deny": list(self.deny)}, separators=(",", ":"))

    @classmethod
    def from_data(cls, data: Any) -> "ShellRules":
        """From `{"allow": [...], "deny": [...]}`; ValueError for anything else."""
        if not isinstance(data, Mapping) or set(data) - {"allow", "deny"}:
            raise ValueError('expected {"allow": [globs], "deny": [globs]}')
        lists = []
        for key in ("allow", "deny"):
            value = data.get(key) or []
            if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
                raise ValueError(f"{key!r} must be a list of non-empty command globs")
            lists.append(tuple(value))
        return cls(allow=lists[0], deny=lists[1])

    @classmethod
    def from_json(cls, text: str) -> "ShellRules":
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"not JSON: {exc}") from None
        return cls.from_data(data)


def refusal_text(rule: str, message: str) -> str:
    """What the CLI shows its model for a refused command: one line, starting with MARKER."""
    what = "matches the deny list" if rule == "shell_deny" else "is not on the allow list"
    return f"{MARKER}: refused ({rule}): this command {what} and was not run ({message})"


# --- Gemini CLI: the lists as rules of its policy engine --------------------------------------------

# Gemini tests a rule's `argsPattern` against its stable JSON of the tool call's arguments, in which
# each top-level pair is framed by NUL characters: \0"command":"<the command, JSON-escaped>"\0. So
# a pattern framed the same way matches the whole command, as `command_regex` does.
_GEMINI_SPACE = r"(\s|\\[tnrfb]|\\u000[bB])"  # one whitespace character, raw or as JSON escapes it
_GEMINI_ONE = r"(\\u[0-9a-fA-F][0-9a-fA-F][0-9a-fA-F][0-9a-fA-F]|\\[^u]|[^\\])"  # one character, escaped or not
GEMINI_PRIORITY_DENY: Final = 999  # the highest a policy file may give (admin tier: above every other tier)
GEMINI_PRIORITY_ALLOW: Final = 998
GEMINI_PRIORITY_NOT_ALLOWED: Final = 997


def _js_literal(char: str) -> str:
    """One character of a command as a JavaScript regex matches it inside a JSON string.

    Every ASCII punctuation character is written `\\xHH`, so no `(`, `)` or quantifier of the
    command's own reaches the pattern's text (Gemini's safety check reads that text).
    """
    escaped = json.dumps(char, ensure_ascii=False)[1:-1]  # as JSON.stringify writes it (\" \\ \n \u001b)
    return "".join(c if not c.isascii() or c.isalnum() or c == " " else f"\\x{ord(c):02x}" for c in escaped)


GEMINI_MAX_PATTERN: Final = 2048  # Gemini drops a longer pattern (and its rule) as unsafe
_GEMINI_UNSAFE = re.compile(r"\([^)]*[*+?{].*\)[*+?{]")  # Gemini's own test for nested quantifiers


def gemini_safe(pattern: str) -> bool:
    """Whether Gemini CLI keeps a pattern: its `isSafeRegExp` (a dropped rule would not block)."""
    return len(pattern) <= GEMINI_MAX_PATTERN and _GEMINI_UNSAFE.search(pattern) is None


def gemini_pattern(glob: str) -> str:
    """A command glob as a Gemini `argsPattern` matching the whole command; ValueError if Gemini
    would drop it (too long).

    Only groups without a quantifier inside are used: Gemini refuses patterns it takes for
    catastrophic backtracking (a quantified group containing a quantifier).
    """
    words = glob.strip().split()
    body = []
    for index, word in enumerate(words):
        if index:
            body.append(_GEMINI_SPACE + "+")
        for char in word:
            body.append(r"[\s\S]*" if char == "*" else _GEMINI_ONE if char == "?" else _js_literal(char))
    pattern = '\\x00"command":"' + _GEMINI_SPACE + "*" + "".join(body) + _GEMINI_SPACE + '*"\\x00'
    if not gemini_safe(pattern):
        raise ValueError(f"shell glob {glob!r} is too long for Gemini CLI's policy engine (shorten it)")
    return pattern


def _toml_string(text: str) -> str:
    return json.dumps(text)  # a TOML basic string takes JSON's escapes


def gemini_policy_toml(rules: ShellRules) -> str:
    """An admin-tier policy file for Gemini CLI's policy engine (`gemini --admin-policy FILE`).

    Each deny glob is a `deny` rule; an allow list becomes `allow` rules above one `deny` for every
    other shell command. Gemini checks the whole command and then each command it parses out of it
    (`a && b`, `a | b`), so an allow list holds for each part, pipes included.
    """
    lines = ["# Written by Corral for one execution: its shell policy (docs/policy.md). Do not edit.", ""]

    def rule(decision: str, priority: int, pattern: str | None, message: str | None) -> None:
        lines.append("[[rule]]")
        lines.append('toolName = "run_shell_command"')
        if pattern is not None:
            lines.append(f"argsPattern = {_toml_string(pattern)}")
        lines.append(f'decision = "{decision}"')
        lines.append(f"priority = {priority}")
        if message is not None:
            lines.append(f"deny_message = {_toml_string(message)}")
        lines.append("")

    for glob in rules.deny:
        rule("deny", GEMINI_PRIORITY_DENY, gemini_pattern(glob), refusal_text("shell_deny", f"pattern {glob!r}"))
    if rules.allow:
        for glob in rules.allow:
            rule("allow", GEMINI_PRIORITY_ALLOW, gemini_pattern(glob), None)
        rule("deny", GEMINI_PRIORITY_NOT_ALLOWED, None, refusal_text("shell_not_allowed", "no allow pattern matches"))
    return "\n".join(lines)


_REFUSED = re.compile(re.escape(MARKER) + r": refused \((?P<rule>shell_deny|shell_not_allowed)\)")


def refused_rule(text: str) -> str | None:
    """The rule named in a refusal a CLI reported (its tool result, its log line), or None."""
    found = _REFUSED.search(text)
    return found["rule"] if found else None
