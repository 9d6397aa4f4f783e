#!/usr/bin/env sh
# Install what Corral needs from the system besides Python and git: bubblewrap (`bwrap`), the
# sandbox every execution runs in (docs/sandbox.md).
# As root with apt-get, a missing bwrap is installed (apt-get install -y bubblewrap); otherwise this
# prints what to do. Then it checks that bwrap can make a sandbox here (a read-only host, new pid
# and network namespaces), as Corral's spawner does before it runs an agent.
# CORRAL_BWRAP names another binary to check (Corral itself reads [sandbox] bwrap of corral.toml).
# Exits 0 either way (Corral then refuses sandboxed runs with the same advice) -- unless
# CORRAL_REQUIRE_SANDBOX=1 (set by .ci/run): then it exits 1 when no sandbox can be made.
BWRAP="${CORRAL_BWRAP:-bwrap}"

# chromium: the headless browser the web console's tests drive through Playwright (tests/test_web.py,
# bench/console.py; Playwright itself comes with the dev extra). Installed as root with apt-get when
# missing; CORRAL_REQUIRE_BROWSER=1 (set by .ci/run) makes a missing browser an error.
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "install-system: installing chromium (apt-get install -y chromium) for the console's browser tests"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q chromium >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; } \
      || echo "install-system: apt-get install chromium failed; the browser tests will skip" >&2
  else
    echo "install-system: no chromium (as root: apt-get install chromium); the browser tests will skip" >&2
  fi
  if [ "${CORRAL_REQUIRE_BROWSER:-0}" = 1 ] && ! command -v chromium >/dev/null 2>&1; then exit 1; fi
fi

missing() {
  echo "install-system: $1" >&2
  echo "install-system: without it, corral run refuses to start agents: install bubblewrap" \
    "(as root: apt-get install bubblewrap; Fedora: dnf install bubblewrap), or set [sandbox] mode = \"off\"" \
    "in corral.toml (or corral run --sandbox off) to run agents unconfined" >&2
  [ "${CORRAL_REQUIRE_SANDBOX:-0}" = 1 ] && exit 1
  exit 0
}

if ! command -v "$BWRAP" >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "install-system: installing bubblewrap (apt-get install -y bubblewrap)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q bubblewrap >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q bubblewrap >/dev/null 2>&1; } \
      || missing "apt-get install bubblewrap failed"
  elif [ "$(id -u)" != 0 ]; then
    missing "bubblewrap ($BWRAP) is not installed, and installing it needs root"
  else
    missing "bubblewrap ($BWRAP) is not installed, and there is no apt-get here to install it"
  fi
fi

path="$(command -v "$BWRAP")" || missing "bubblewrap ($BWRAP) is still not found on PATH"
if ! why="$("$path" --ro-bind / / --dev /dev --proc /proc --tmpfs /tmp --unshare-pid --unshare-ipc \
  --unshare-net --cap-drop ALL -- true 2>&1)"; then
  missing "$path cannot make a sandbox here ($why); a container may need unprivileged user namespaces or CAP_SYS_ADMIN"
fi
echo "install-system: $("$path" --version 2>/dev/null | head -n 1) at $path makes sandboxes here"
