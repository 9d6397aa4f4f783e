#!/usr/bin/env sh
# Install the real agent CLIs that tests/test_adapters.py drives, inside the checkout (.agents/, gitignored).
# A CLI that cannot be installed makes its contract test skip with the reason (pytest -rs prints it),
# and this script still exits 0 -- unless CORRAL_REQUIRE_AGENTS=1 (set by .ci/run): then it exits 1
# when any CLI is missing afterwards, so CI fails instead of skipping.
# npm's download cache goes to a temporary directory under $TMPDIR, removed on exit; nothing but
# the installed CLIs stays in .agents/.
cd "$(dirname "$0")/.." || exit 1
PY="${PYTHON:-python3}"
AGENTS="$(pwd)/.agents"
NPM_PACKAGES="@anthropic-ai/claude-code@2.1.197 @openai/codex@0.169.0 @google/gemini-cli@0.61.0"
failed=""

# Earlier versions of this script kept npm's cache in .agents/npm-cache (~250 MB).
rm -rf "$AGENTS/npm-cache"

if command -v npm >/dev/null; then
  cache="$(mktemp -d "${TMPDIR:-/tmp}/corral-npm-cache.XXXXXX")" || exit 1
  trap 'rm -rf "$cache"' EXIT
  trap 'rm -rf "$cache"; exit 130' INT TERM
  # shellcheck disable=SC2086  # the package list is split on purpose
  if ! npm install --prefix "$AGENTS" --cache "$cache" --no-audit --no-fund --loglevel=error $NPM_PACKAGES; then
    echo "install-agents: npm install of the agent CLIs failed; their contract tests skip" >&2
  fi
  rm -rf "$cache"
else
  echo "install-agents: npm not found; the Claude Code, Codex and Gemini contract tests skip" >&2
fi
if [ ! -x "$AGENTS/aider-venv/bin/aider" ]; then
  { $PY -m venv "$AGENTS/aider-venv" && "$AGENTS/aider-venv/bin/pip" install --quiet --no-cache-dir aider-chat==0.86.2; } \
    || echo "install-agents: pip install aider-chat failed; the aider contract test skips" >&2
fi

# What is installed where: the version each CLI reports for itself.
echo "install-agents: agent CLIs in $AGENTS:"
for entry in claude:node_modules/.bin/claude codex:node_modules/.bin/codex \
  gemini:node_modules/.bin/gemini aider:aider-venv/bin/aider; do
  name="${entry%%:*}"
  program="$AGENTS/${entry#*:}"
  if [ -x "$program" ] && version="$("$program" --version 2>/dev/null | head -n 1)" && [ -n "$version" ]; then
    printf '  %-7s %s  (%s)\n' "$name" "$version" "$program"
  else
    printf '  %-7s NOT INSTALLED (%s)\n' "$name" "$program"
    failed="$failed $name"
  fi
done

if [ -n "$failed" ]; then
  if [ "${CORRAL_REQUIRE_AGENTS:-}" = "1" ]; then
    echo "install-agents: not installed:$failed (CORRAL_REQUIRE_AGENTS=1: failing)" >&2
    exit 1
  fi
  echo "install-agents: not installed:$failed; their contract tests skip" >&2
fi
exit 0
