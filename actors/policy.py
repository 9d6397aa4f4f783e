"""Policy: what an agent may change and run, and which changes need a human's approval.

Pure model and evaluation, no I/O except reading a diff with git (`read_diff`). A `Policy` is a
frozen pydantic model validated from the `[policy]` table of corral.toml (merged with a
template's `[templates.NAME.policy]`); its `version` is a hash of its content, so cached results
are never reused across policies. See docs/policy.md.

Evaluation turns a checkpoint's diff (`FileChange`s) or a shell command into `Finding`s; the
policy's severities turn findings into `events.types.Violation`s. Findings of one file depend
only on its path, its old and new blob and the policy, so they are cached by that key.
"""

import difflib
import hashlib
import os
import posixpath
import re
import subprocess
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Final, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
)

from actors.shellpolicy import ShellRules, command_regex, command_segments
from actors.worktree import linked_gitdir
from events.types import Violation
from events.units import parse_duration  # the one duration syntax of corral.toml

Severity = Literal["info", "warning", "critical"]
Category = Literal["merge", "deps_add", "secrets", "deploy"]
CATEGORIES: Final[tuple[str, ...]] = ("merge", "deps_add", "secrets", "deploy")
Reaction = Literal["cancel", "continue"]
ExecutablePolicy = Literal["allow", "warn", "approve"]

ZERO_SHA: Final = "0" * 40
MODE_SYMLINK: Final = "120000"
MODE_GITLINK: Final = "160000"
MODE_EXEC: Final = "100755"

DEPENDENCY_FILES: Final[tuple[str, ...]] = (
    "requirements*.txt",
    "requirements/*.txt",
    "constraints*.txt",
    "pyproject.toml",
    "setup.py",
    "setup.cfg",
    "Pipfile",
    "Pipfile.lock",
    "poetry.lock",
    "uv.lock",
    "package.json",
    "package-lock.json",
    "yarn.lock",
    "pnpm-lock.yaml",
    "Cargo.toml",
    "Cargo.lock",
    "go.mod",
    "go.sum",
    "Gemfile",
    "Gemfile.lock",
    "composer.json",
    "composer.lock",
    "build.gradle",
    "build.gradle.kts",
    "pom.xml",
    "*.csproj",
    "environment.yml",
)
DEPLOY_PATHS: Final[tuple[str, ...]] = (
    ".github/workflows/**",
    ".gitlab-ci.yml",
    "deploy/**",
    "k8s/**",
    "helm/**",
    "terraform/**",
    "*.tf",
    "Dockerfile",
    "docker-compose*.yml",
    "fly.toml",
    "vercel.json",
    "netlify.toml",
    "Procfile",
    "app.yaml",
)
DEPLOY_COMMANDS: Final[tuple[str, ...]] = (
    "kubectl apply*",
    "kubectl delete*",
    "kubectl rollout*",
    "helm install*",
    "helm upgrade*",
    "terraform apply*",
    "terraform destroy*",
    "fly deploy*",
    "flyctl deploy*",
    "vercel *--prod*",
    "serverless deploy*",
    "sls deploy*",
    "docker push*",
    "npm publish*",
    "twine upload*",
    "cargo publish*",
    "gcloud *deploy*",
    "aws *deploy*",
    "heroku *",
)
MERGE_COMMANDS: Final[tuple[str, ...]] = ("git merge*", "git push*", "gh pr merge*", "git rebase*", "git cherry-pick*")
DEPS_COMMANDS: Final[tuple[str, ...]] = (
    "pip install *",
    "pip3 install *",
    "python -m pip install *",
    "uv add *",
    "uv pip install *",
    "poetry add *",
    "npm install *",
    "npm i *",
    "yarn add *",
    "pnpm add *",
    "cargo add *",
    "go get *",
    "gem install *",
    "bundle add *",
)
SHELL_DENY: Final[tuple[str, ...]] = (
    "sudo *",
    "su *",
    "rm -rf /",
    "rm -rf /*",
    "rm -rf ~*",
    "rm -rf .git",
    "rm -rf .git/*",
    "git push --force*",
    "git push -f*",
    "chmod -R 777 *",
    "mkfs*",
    "dd if=*",
    "* | sh",
    "* | bash",
    "*>*.git/*",
)
SECRET_FILES: Final[tuple[str, ...]] = (
    ".env",
    ".env.*",
    "*.pem",
    "*.key",
    "*.p12",
    "*.pfx",
    "id_rsa",
    "id_dsa",
    "id_ecdsa",
    "id_ed25519",
    ".netrc",
    ".npmrc",
    ".pypirc",
    "credentials.json",
)
SECRET_FILES_ALLOWED: Final[tuple[str, ...]] = (".env.example", ".env.sample", ".env.template", ".env.dist")
SECRET_PATTERNS: Final[dict[str, str]] = {
    "private key": r"-----BEGIN (?:[A-Z]+ )*PRIVATE KEY(?: BLOCK)?-----",
    "AWS access key": r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b",
    "GitHub token": r"\b(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{22,})",
    "Slack token": r"\bxox[abposr]-[A-Za-z0-9-]{10,}",
    "API key": r"\bsk-(?:ant-|proj-)?[A-Za-z0-9_-]{20,}",
    "Google API key": r"\bAIza[0-9A-Za-z_-]{35}\b",
    "Stripe key": r"\b[sr]k_live_[0-9a-zA-Z]{20,}",
    "assigned secret": (
        r"(?i:(?:api[_-]?key|secret[_-]?key|secret|token|passw(?:or)?d|access[_-]?key)"
        r"['\"]?\s*[:=]\s*['\"][^'\"\s]{12,}['\"])"
    ),
}

# Rules whose violations are always critical; categories are critical when approval is required.
ALWAYS_CRITICAL: Final = frozenset({"git_dir", "symlink_escape", "forbidden_path", "path_not_allowed", "shell_deny"})


# --- globs ---------------------------------------------------------------------------------------


def glob_regex(pattern: str) -> str:
    """A path glob as a regex (gitignore-like).

    A pattern without `/` matches a file name at any depth (`*.tf`, `.env`); with `/` it is
    anchored at the worktree root (`deploy/*.yml`). `*` and `?` stay within one path component,
    `**` crosses them, a trailing `/` or `/**` means everything below.
    """
    text = pattern.strip()
    if text.endswith("/"):
        text += "**"
    anchored = "/" in text.rstrip("/")
    text = text.lstrip("/")
    out = []
    i = 0
    while i < len(text):
        c = text[i]
        if text.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
            continue
        if text.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            end = text.find("]", i + 1)
            if end == -1:
                out.append(re.escape(c))
            else:
                body = text[i + 1 : end].replace("\\", "\\\\")
                out.append("[^" + body[1:] + "]" if body.startswith("!") else "[" + body + "]")
                i = end
        else:
            out.append(re.escape(c))
        i += 1
    body = "".join(out)
    if body.endswith("/.*"):
        body = body[:-3] + "(?:/.*)?"
    return body if anchored else f"(?:.*/)?{body}"


def compile_globs(patterns: Iterable[str]) -> re.Pattern[str] | None:
    """One regex matching any of the path globs (None when there are none)."""
    parts = [glob_regex(p) for p in patterns]
    return re.compile("(?:" + "|".join(parts) + r")\Z") if parts else None


# --- the policy ------------------------------------------------------------------------------------


def _duration(value: Any) -> Any:
    return parse_duration(value)


def _regex_list(value: Any) -> Any:
    if isinstance(value, list | tuple):
        for item in value:
            if isinstance(item, str):
                try:
                    re.compile(item)
                except re.error as exc:
                    raise ValueError(f"bad regular expression {item!r}: {exc}") from None
    return value


Globs = tuple[Annotated[StrictStr, Field(min_length=1)], ...]


class Policy(BaseModel):
    """The rules one execution runs under. Every field has a safe default; see docs/policy.md."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    allowed_paths: Globs = ()
    forbidden_paths: Globs = ()
    new_executables: ExecutablePolicy = "warn"
    max_files: Annotated[StrictInt, Field(ge=0)] = 0
    max_lines: Annotated[StrictInt, Field(ge=0)] = 0
    require_approval: tuple[Category, ...] = ("merge", "deps_add", "secrets", "deploy")
    dependency_files: Globs = DEPENDENCY_FILES
    deploy_paths: Globs = DEPLOY_PATHS
    deploy_commands: Globs = DEPLOY_COMMANDS
    merge_commands: Globs = MERGE_COMMANDS
    deps_commands: Globs = DEPS_COMMANDS
    secret_files: Globs = SECRET_FILES
    secret_patterns: Annotated[tuple[StrictStr, ...], BeforeValidator(_regex_list)] = ()
    shell_allow: Globs = ()
    shell_deny: Globs = SHELL_DENY
    approval_timeout_s: Annotated[float, BeforeValidator(_duration), Field(gt=0)] = 3600.0
    on_expire: Reaction = "cancel"
    on_reject: Reaction = "continue"
    on_violation_reject: Reaction = "cancel"
    budget: dict[str, Any] = Field(default_factory=dict)  # reserved for cost budgets: kept, not interpreted

    @field_validator("require_approval")
    @classmethod
    def _unique(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(dict.fromkeys(value))

    @cached_property
    def version(self) -> str:
        """A short hash of the policy's content: results cached under another version are not reused."""
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:12]

    @cached_property
    def _compiled(self) -> "_Compiled":
        return _Compiled(self)

    def severity(self, rule: str, category: str | None) -> Severity:
        if rule in ALWAYS_CRITICAL:
            return "critical"
        if rule == "executable":
            return "critical" if self.new_executables == "approve" else "warning"
        if category is not None and category in self.require_approval:
            return "critical"
        return "warning"

    # evaluation

    def file_key(self, change: "FileChange") -> tuple[str, ...]:
        """What a file's findings depend on: its path, blobs and modes, and this policy."""
        return (change.path, change.old_sha, change.new_sha, change.old_mode, change.new_mode, self.version)

    def check_files(self, changes: Sequence["FileChange"], *, cache: "FindingCache | None" = None) -> list[Violation]:
        """Violations of a checkpoint's changes (cached per file by path, blobs and policy version)."""
        c = self._compiled
        findings: list[Finding] = []
        total_lines = 0
        for change in changes:
            total_lines += change.added + change.deleted
            key = self.file_key(change)
            cached = cache.get(key) if cache is not None else None
            if cached is None:
                cached = c.file_findings(change)
                if cache is not None:
                    cache.put(key, cached)
            findings.extend(cached)
        if self.max_files and len(changes) > self.max_files:
            findings.append(
                Finding(None, "max_files", None, f"{len(changes)} files changed (policy allows {self.max_files})")
            )
        if self.max_lines and total_lines > self.max_lines:
            findings.append(
                Finding(None, "max_lines", None, f"{total_lines} lines changed (policy allows {self.max_lines})")
            )
        return [self.violation(f) for f in findings]

    @cached_property
    def shell_rules(self) -> ShellRules:
        """`shell_allow` and `shell_deny`, as the hooks apply them before a command runs (actors/shellpolicy.py)."""
        return ShellRules(allow=self.shell_allow, deny=self.shell_deny)

    def check_command(self, command: str) -> list[Violation]:
        """Violations of one shell command an agent reports running."""
        return [self.violation(f) for f in self._compiled.command_findings(command)]

    def check_skipped(self, skipped: Iterable[tuple[str, int]]) -> list[Violation]:
        """The `max_file_size` rule: files a checkpoint left out for their size ([checkpoints]
        max_file_size). They are not in the repository, so no other rule has seen their content."""
        return [
            self.violation(
                Finding(
                    path,
                    "max_file_size",
                    None,
                    f"{size} bytes: larger than [checkpoints] max_file_size, left out of the checkpoint "
                    "(its content was not checked)",
                )
            )
            for path, size in skipped
        ]

    def violation(self, finding: "Finding") -> Violation:
        return Violation(
            path=finding.path,
            rule=finding.rule,
            severity=self.severity(finding.rule, finding.category),
            message=finding.message,
            category=finding.category or finding.rule,
        )


class PolicyError(ValueError):
    """A policy table cannot be used; the message names the key."""


def parse_policy(raw: Any, *, where: str = "policy") -> Policy:
    """Validate a policy table; raise PolicyError with one line naming the dotted key."""
    if not isinstance(raw, dict):
        raise PolicyError(f"{where}: expected a table")
    raw = {("approval_timeout_s" if k == "approval_timeout" else k): v for k, v in raw.items()}
    try:
        return Policy.model_validate(raw)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        first = errors[0]
        loc = ""
        for part in first["loc"]:
            loc += f"[{part}]" if isinstance(part, int) else (f".{part}" if loc else str(part))
        loc = loc.replace("approval_timeout_s", "approval_timeout")
        kind = first["type"]
        if kind == "extra_forbidden":
            close = difflib.get_close_matches(loc, POLICY_KEYS, n=1)
            hint = f"did you mean {close[0]}?" if close else f"known: {', '.join(POLICY_KEYS)}"
            message = f"unknown key {where}.{loc} ({hint})"
        else:
            ctx = first.get("ctx") or {}
            text = str(ctx["error"]) if kind == "value_error" and "error" in ctx else first["msg"]
            got = first.get("input")
            shown = f" (got {got!r})" if isinstance(got, str | int | float) and "(got" not in text else ""
            message = f"{where}.{loc}: {text[:1].lower() + text[1:]}{shown}"
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise PolicyError(message + more) from None


POLICY_KEYS: Final[tuple[str, ...]] = tuple(
    "approval_timeout" if k == "approval_timeout_s" else k for k in Policy.model_fields
)


def merge_policy(base: dict[str, Any], override: dict[str, Any] | None) -> dict[str, Any]:
    """A template's (or a run's) policy keys replace the global ones, key by key."""
    return {**base, **(override or {})}


# --- findings ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Finding:
    path: str | None
    rule: str
    category: str | None
    message: str


@dataclass(slots=True)
class FileChange:
    """One file of a checkpoint's diff, as `git diff-tree --raw -p` reports it."""

    path: str
    status: str  # A, M, D, T
    old_mode: str
    new_mode: str
    old_sha: str
    new_sha: str
    added: int = 0
    deleted: int = 0
    added_text: str = ""  # the added lines, joined (no leading "+")
    binary: bool = False


class FindingCache:
    """A bounded LRU of per-file findings keyed by (path, blobs, modes, policy version)."""

    def __init__(self, size: int = 50_000) -> None:
        self.size = size
        self._data: OrderedDict[tuple[str, ...], list[Finding]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def get(self, key: tuple[str, ...]) -> list[Finding] | None:
        found = self._data.get(key)
        if found is None:
            self.misses += 1
            return None
        self.hits += 1
        self._data.move_to_end(key)
        return found

    def put(self, key: tuple[str, ...], findings: list[Finding]) -> None:
        self._data[key] = findings
        if len(self._data) > self.size:
            self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)


_GIT_COMPONENT = re.compile(r"(?:^|/)\.git(?:/|\Z)", re.IGNORECASE)


@dataclass
class _Compiled:
    policy: Policy
    allowed: re.Pattern[str] | None = field(init=False)
    forbidden: re.Pattern[str] | None = field(init=False)
    deps: re.Pattern[str] | None = field(init=False)
    deploy: re.Pattern[str] | None = field(init=False)
    secret_files: re.Pattern[str] | None = field(init=False)
    secret_ok: re.Pattern[str] | None = field(init=False)
    secrets: re.Pattern[str] = field(init=False)
    secret_names: list[str] = field(init=False)
    commands: list[tuple[str, re.Pattern[str]]] = field(init=False)

    def __post_init__(self) -> None:
        p = self.policy
        self.allowed = compile_globs(p.allowed_paths)
        self.forbidden = compile_globs(p.forbidden_paths)
        self.deps = compile_globs(p.dependency_files)
        self.deploy = compile_globs(p.deploy_paths)
        self.secret_files = compile_globs(p.secret_files)
        self.secret_ok = compile_globs(SECRET_FILES_ALLOWED)
        patterns = {**SECRET_PATTERNS, **{f"pattern {i + 1}": rx for i, rx in enumerate(p.secret_patterns)}}
        self.secret_names = list(patterns)
        self.secrets = re.compile("|".join(f"(?P<s{i}>{rx})" for i, rx in enumerate(patterns.values())))
        self.commands = [
            (category, rx)
            for category, patterns_ in (
                ("merge", p.merge_commands),
                ("deploy", p.deploy_commands),
                ("deps_add", p.deps_commands),
            )
            if (rx := command_regex(patterns_)) is not None
        ]

    def file_findings(self, change: FileChange) -> list[Finding]:
        path = change.path
        out: list[Finding] = []
        if _GIT_COMPONENT.search(path):
            out.append(Finding(path, "git_dir", None, f"writes into a .git directory: {path}"))
        if change.new_mode == MODE_GITLINK and change.status != "D":
            out.append(Finding(path, "git_dir", None, f"adds an embedded git repository at {path}"))
        if self.forbidden is not None and self.forbidden.match(path):
            out.append(Finding(path, "forbidden_path", None, f"{path} matches a forbidden path"))
        if self.allowed is not None and not self.allowed.match(path):
            out.append(Finding(path, "path_not_allowed", None, f"{path} is outside the allowed paths"))
        if change.status == "D":
            return out
        if change.new_mode == MODE_SYMLINK:
            target = change.added_text.strip("\n")
            if _escapes(path, target):
                out.append(Finding(path, "symlink_escape", None, f"symlink {path} -> {target} leaves the worktree"))
        if change.new_mode == MODE_EXEC and change.old_mode != MODE_EXEC and self.policy.new_executables != "allow":
            what = "new executable file" if change.status == "A" else "made executable"
            out.append(Finding(path, "executable", None, f"{what}: {path}"))
        if self.deps is not None and self.deps.match(path) and _adds_content(change):
            out.append(Finding(path, "deps_add", "deps_add", f"changes dependency manifest {path}"))
        if self.deploy is not None and self.deploy.match(path):
            out.append(Finding(path, "deploy", "deploy", f"changes deployment file {path}"))
        if (
            self.secret_files is not None
            and self.secret_files.match(path)
            and (self.secret_ok is None or not self.secret_ok.match(path))
        ):
            out.append(Finding(path, "secret_file", "secrets", f"adds or changes a secrets file: {path}"))
        if change.added_text and change.new_mode != MODE_SYMLINK:
            seen: set[str] = set()
            for match in self.secrets.finditer(change.added_text):
                name = self.secret_names[int(str(match.lastgroup)[1:])]
                if name not in seen:
                    seen.add(name)
                    out.append(Finding(path, "secret", "secrets", f"{name} in {path}"))
        return out

    def command_findings(self, command: str) -> list[Finding]:
        # the allow/deny lists: the very evaluation the CLIs' pre-tool hooks run (actors/shellpolicy.py)
        out = [Finding(None, rule, "shell", message) for rule, message in self.policy.shell_rules.findings(command)]
        whole = command.strip()
        segments = command_segments(whole) or [whole]
        for category, rx in self.commands:
            hit = next((s for s in segments if rx.match(s)), None)
            if hit is not None:
                out.append(Finding(None, category, category, f"{category} command: {hit[:200]}"))
        if re.search(r"(?:^|[\s'\"=>])\.git/(?:hooks|config|HEAD|refs|objects)", whole) and not any(
            f.rule == "shell_deny" for f in out
        ):
            out.append(Finding(None, "git_dir", None, f"command touches .git: {whole[:200]}"))
        return out


def _adds_content(change: FileChange) -> bool:
    if change.binary:
        return True
    for line in change.added_text.splitlines():
        text = line.strip()
        if text and not text.startswith(("#", "//")):
            return True
    return False


def _escapes(path: str, target: str) -> bool:
    """Does a symlink at `path` (relative to the worktree) pointing at `target` resolve outside it?"""
    if not target or target.startswith("/") or target.startswith("~"):
        return True
    joined = posixpath.normpath(posixpath.join(posixpath.dirname(path), target))
    return joined == ".." or joined.startswith("../")


# --- reading a diff ---------------------------------------------------------------------------------


def _unquote(path: str) -> str:
    """A path as git prints it: C-quoted when it has special characters."""
    if not (path.startswith('"') and path.endswith('"')):
        return path
    body = path[1:-1].encode("latin-1", "backslashreplace").decode("unicode_escape")
    return body.encode("latin-1").decode("utf-8", "replace")


def git_diff_args(parent: str | None, commit: str) -> list[str]:
    base = ["git", "-c", "core.quotePath=false", "diff-tree", "-r", "--no-renames", "--no-commit-id"]
    base += ["--raw", "--no-abbrev", "-p", "--no-color", "--no-ext-diff", "--src-prefix=a/", "--dst-prefix=b/"]
    return [*base, "--root", commit] if parent is None else [*base, parent, commit]


def read_diff(repo: str | Path, parent: str | None, commit: str) -> list[FileChange]:
    """The changes between two commits of `repo`, with modes, blobs and added lines (one git call)."""
    result = subprocess.run(
        git_diff_args(parent, commit),
        cwd=repo,
        capture_output=True,
        env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"},
        check=False,
    )
    if result.returncode != 0:
        error = result.stderr.decode(errors="replace").strip()
        raise RuntimeError(error or f"git diff-tree exited {result.returncode}")
    return parse_diff(result.stdout.decode("utf-8", "replace"))


def parse_diff(text: str) -> list[FileChange]:
    """Parse `git diff-tree --raw -p` output: the raw lines, then one patch per file."""
    changes: dict[str, FileChange] = {}
    order: list[FileChange] = []
    pos = 0
    length = len(text)
    while pos < length and text.startswith(":", pos):
        end = text.find("\n", pos)
        end = length if end == -1 else end
        meta, _, path = text[pos + 1 : end].partition("\t")
        old_mode, new_mode, old_sha, new_sha, status = meta.split(" ")[:5]
        change = FileChange(_unquote(path), status[:1], old_mode, new_mode, old_sha, new_sha)
        changes[change.path] = change
        order.append(change)
        pos = end + 1
    if not order:
        return order
    # Patches: "diff --git a/P b/P" blocks, in the same order as the raw lines; a type change (T)
    # has two: the old file deleted, then the new one created.
    blocks = [b for b in text[pos:].split("\ndiff --git ") if b.strip()]
    index = 0
    for change in order:
        parts = blocks[index : index + (2 if change.status == "T" else 1)]
        index += len(parts)
        added: list[str] = []
        deleted = 0
        for block in parts:
            hunk = block.find("\n@@")
            if hunk == -1:
                change.binary = change.binary or "Binary files" in block or "GIT binary patch" in block
                continue
            for line in block[hunk + 1 :].split("\n"):
                if line.startswith("+"):
                    added.append(line[1:])
                elif line.startswith("-"):
                    deleted += 1
        if change.binary:
            continue
        change.added = len(added)
        change.deleted = deleted
        change.added_text = "\n".join(added)
    return order


def git_protection_paths(worktree: str | Path) -> dict[str, tuple[int, int, str]]:
    """What an agent must not write in git's own files: the worktree's `.git` link, the repository's
    config and hooks. Returns {shown path: (size, mtime_ns, kind)} to compare between checkpoints."""
    root = Path(worktree)
    out: dict[str, tuple[int, int, str]] = {}
    link = root / ".git"
    try:
        st = link.lstat()
    except OSError:
        return out
    out[".git"] = (st.st_size, st.st_mtime_ns, "dir" if link.is_dir() else "file")
    gitdir: Path | None = None
    if link.is_file():
        gitdir = linked_gitdir(root)
    elif link.is_dir():
        gitdir = link
    if gitdir is None:
        return out
    common = gitdir
    commondir = gitdir / "commondir"
    if commondir.is_file():
        common = (gitdir / commondir.read_text().strip()).resolve()
    for name, path in (
        (".git/config", common / "config"),
        (".git/config.worktree", gitdir / "config.worktree"),
        (".git/info/attributes", common / "info" / "attributes"),
    ):
        try:
            st = path.stat()
        except OSError:
            continue
        out[name] = (st.st_size, st.st_mtime_ns, "file")
    hooks = common / "hooks"
    try:
        entries = list(os.scandir(hooks))
    except OSError:
        entries = []
    for entry in entries:
        if entry.name.endswith(".sample"):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        out[f".git/hooks/{entry.name}"] = (st.st_size, st.st_mtime_ns, "file")
    return out


def git_tampering(before: dict[str, tuple[int, int, str]], after: dict[str, tuple[int, int, str]]) -> list[Finding]:
    """Findings for git's own files that changed between two snapshots."""
    out = []
    for name in sorted(set(before) | set(after)):
        if before.get(name) == after.get(name):
            continue
        what = "created" if name not in before else "removed" if name not in after else "modified"
        out.append(Finding(name, "git_dir", None, f"{name} {what} (git's own files are protected)"))
    return out


def effective_policy(
    policy: dict[str, Any],
    templates: dict[str, dict[str, Any] | None],
    template: str | None,
    run: dict[str, Any] | None = None,
) -> Policy:
    """The policy of an execution: [policy], its template's policy keys over it, the run's over both."""
    override = templates.get(template) if template else None
    where = f"templates.{template}.policy" if override else "policy"
    if run:
        where = "policy"
    return parse_policy(merge_policy(merge_policy(policy, override), run), where=where)


def read_policy_file(path: str | Path) -> dict[str, Any]:
    """The policy keys of a TOML file for `corral run --policy FILE`: a [policy] table, or top-level keys."""
    import tomllib

    try:
        raw = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise PolicyError(f"policy file {path} not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(f"cannot read policy file {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"policy file {path} is not valid TOML: {exc}") from None
    table = raw.get("policy", raw) if set(raw) <= {"policy"} else raw
    if not isinstance(table, dict) or not table:
        raise PolicyError(f"policy file {path} has no policy keys (write them at the top level or under [policy])")
    return table
