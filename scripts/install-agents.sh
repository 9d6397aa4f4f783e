#!/usr/bin/env sh
# Install the real agent CLIs that tests/test_adapters.py drives, inside the checkout (.agents/, gitignored).
# A CLI that cannot be installed makes its contract test skip with the reason (pytest -rs prints it).
cd "$(dirname "$0")/.." || exit 1
PY="${PYTHON:-python3}"
if command -v npm >/dev/null; then
  npm install --prefix .agents --cache .agents/npm-cache --no-audit --no-fund --loglevel=error \
    @anthropic-ai/claude-code@2.1.197 @openai/codex@0.169.0 @google/gemini-cli@0.61.0 \
    || echo "install-agents: npm install of the agent CLIs failed; their contract tests skip" >&2
else
  echo "install-agents: npm not found; the Claude Code, Codex and Gemini contract tests skip" >&2
fi
if [ ! -x .agents/aider-venv/bin/aider ]; then
  { $PY -m venv .agents/aider-venv && .agents/aider-venv/bin/pip install --quiet --no-cache-dir aider-chat==0.86.2; } \
    || echo "install-agents: pip install aider-chat failed; the aider contract test skips" >&2
fi
exit 0
