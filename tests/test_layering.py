"""Layering (issue 14): the vocabulary and the actors import nothing from the `corral` CLI package,
and no actor imports another actor; the faces (corral/) sit on top."""

import ast
from pathlib import Path

from tests.conftest import ROOT

ACTOR_MODULES = {"approver", "spawner", "validator", "watchdog", "checkpointer"}


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def test_nothing_below_the_cli_imports_it() -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(name for name in _imports(path) if name.split(".")[0] == "corral")
        for package in ("actors", "events", "projections", "replay")
        for path in (ROOT / package).rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_no_actor_imports_another_actor() -> None:
    for name in ACTOR_MODULES:
        path = ROOT / "actors" / f"{name}.py"
        others = {
            imported
            for imported in _imports(path)
            if imported.startswith("actors.") and imported.split(".")[1] in ACTOR_MODULES - {name}
        }
        assert not others, f"actors/{name}.py imports {sorted(others)}"
