"""What a CLI command loads before it runs (issue 20 §5: `corral ps` during floods, where every
module the command imports costs it twice the time on a busy machine)."""

import ast
import subprocess
import sys

from tests.conftest import ROOT

# the feature modules (corral.cli.features): each adds commands of its own
FEATURE_MODULES = (
    "corral.approvals",
    "corral.changes",
    "corral.fanout",
    "corral.history",
    "corral.mcp_server",
    "corral.notify",
    "corral.pipelines",
    "corral.schedules",
    "corral.tickets",
    "corral.tokens",
    "corral.worktrees",
)


def _loaded_after(words: list[str]) -> tuple[list[str], str]:
    """The feature modules loaded once `corral WORDS` parsed its arguments (--help ends it there),
    and what it printed."""
    script = (
        "import sys\n"
        "from corral.cli import main\n"
        "try:\n"
        f"    main({words!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        f"print('LOADED', sorted(m for m in {FEATURE_MODULES!r} if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    printed, _, loaded = done.stdout.rpartition("LOADED ")
    return ast.literal_eval(loaded.strip()), printed


def test_a_core_command_loads_no_feature_module_and_a_feature_command_still_works() -> None:
    loaded, printed = _loaded_after(["ps", "--help"])
    assert loaded == []
    assert "--all" in printed  # ps's own options are there
    loaded, printed = _loaded_after(["tickets", "--help"])  # a feature module's command
    assert "corral.tickets" in loaded and "tickets" in printed
    loaded, printed = _loaded_after(["--help"])  # the whole list, by topic
    assert loaded == sorted(FEATURE_MODULES)
    assert "orchestration:" in printed and "pipelines" in printed
