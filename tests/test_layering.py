"""Layering (issue 14, issue 16 §1): the vocabulary and the actors import nothing from the `corral` CLI
package, no actor imports another actor, no module imports itself back through others (counting
imports inside functions), and the operations (corral/ops/) sit below the client and the faces."""

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


# --- no import circles (issue 16 §1) ---------------------------------------------------------------

PACKAGES = ("corral", "actors", "events", "projections", "replay")

# Circles allowed: none. (This list only shrinks: a circle not in it fails the test, and so does an
# entry that is no longer a circle.)
KNOWN_CIRCLES: set[frozenset[str]] = set()

# What corral/ops may import from corral/: the lower modules (never the client, the CLI, rendering,
# the HTTP/MCP servers or the console).
OPS_MAY_IMPORT = {
    "corral.attention",
    "corral.config",
    "corral.errors",
    "corral.forge",
    "corral.home",
    "corral.rows",
    "corral.system",
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for package in PACKAGES for path in (ROOT / package).rglob("*.py")}


def import_graph() -> dict[str, set[str]]:
    """{module: the project's modules it imports}, every Import/ImportFrom anywhere in it (inside
    functions and `if TYPE_CHECKING:` too); `from package import module` counts the module."""
    modules = _modules()

    def known(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found |= {m for alias in node.names if (m := known(alias.name))}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
                for alias in node.names:
                    target = known(f"{base}.{alias.name}") if base else None
                    if target and target != known(base):
                        found.add(target)  # a submodule: `from corral.ops import followup`
                    elif known(base):
                        found.add(str(known(base)))
        graph[name] = found - {name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each as one cycle path."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_path(graph, component) for component in found]


def _cycle_path(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """One cycle through the component, as `a -> b -> ... -> a` names (the first found)."""
    start = min(component)
    path, seen = [start], {start}
    while True:
        nxt = sorted(graph[path[-1]] & component)
        back = [n for n in nxt if n in seen]
        if back:
            return [*path[path.index(back[0]) :], back[0]]
        path.append(nxt[0])
        seen.add(nxt[0])


def test_no_import_circles() -> None:
    graph = import_graph()
    assert "corral.ops.base" in graph and "corral.client" in graph  # the walk found the modules
    found = circles(graph)
    new = [" -> ".join(c) for c in found if frozenset(_component(graph, c)) not in KNOWN_CIRCLES]
    assert not new, "import circles (every import counts, inside functions too):\n" + "\n".join(new)
    gone = KNOWN_CIRCLES - {frozenset(_component(graph, c)) for c in found}
    assert not gone, f"no longer circles: take them out of KNOWN_CIRCLES: {sorted(map(sorted, gone))}"


def _component(graph: dict[str, set[str]], cycle: list[str]) -> set[str]:
    """Every module on a circle with the cycle's first module."""
    return {m for m in graph if m in _reach(graph, cycle[0]) and cycle[0] in _reach(graph, m)}


def _reach(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = {start}, [start]
    while todo:
        for n in graph[todo.pop()] - seen:
            seen.add(n)
            todo.append(n)
    return seen


def test_circles_are_found() -> None:
    """The check can fail: a made-up graph with a circle through a function-level import."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert circles(graph) == [["a", "b", "c", "a"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_ops_import_no_face() -> None:
    """corral/ops (the operations' implementations) imports only lower modules: no client, CLI,
    rendering, HTTP, MCP or console module, even inside a function."""
    graph = import_graph()
    ops = {name: deps for name, deps in graph.items() if name == "corral.ops" or name.startswith("corral.ops.")}
    assert len(ops) >= 8
    offenders = {
        name: sorted(
            d for d in deps if d.startswith("corral") and not d.startswith("corral.ops") and d not in OPS_MAY_IMPORT
        )
        for name, deps in ops.items()
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_client_imports_its_operations_at_the_top() -> None:
    """corral/client.py imports corral/ops at module level (no implementation is imported lazily)."""
    tree = ast.parse((ROOT / "corral" / "client.py").read_text())
    top = {n.module for n in tree.body if isinstance(n, ast.ImportFrom) and n.module}
    assert {"corral.ops.base", "corral.ops.control", "corral.ops.changes", "corral.ops.history"} <= top
    inner = {
        n.module
        for f in ast.walk(tree)
        if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)
        for n in ast.walk(f)
        if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("corral")
    }
    assert inner == set(), f"corral/client.py imports {sorted(inner)} inside functions"
    faces = {"corral.cli", "corral.render", "corral.http", "corral.mcp_server", "corral.followup"}
    faces |= {f"corral.{name}" for name in ("commands", "control", "changes", "approvals", "history", "worktrees")}
    imported = import_graph()["corral.client"]
    assert not imported & faces and not any(m.startswith("corral.web") for m in imported), sorted(imported)


# The commands whose handlers parse, call the client and render (issue 16 §1). `run` and the follow of
# `replay`/`fork` without --detach stream an execution on the client's system (docs/sdk.md says why).
THROUGH_THE_CLIENT = [
    "ps",
    "status",
    "input",
    "pause",
    "resume",
    "cancel",
    "extend",
    "priority",
    "health",
    "approvals",
    "approve",
    "reject",
    "checkpoint",
    "checkpoints",
    "changes",
    "diff",
    "commit",
    "rollback",
    "pr",
    "worktrees",
    "search",
    "compare",
    "replay",
    "fork",
    "logs",
    "tap",
    "sql",
]
# What a handler may still take from corral/ops: printing, argument checks said before connecting, and
# starting a background `corral up` for --detach (the system's life, not an operation on it).
HANDLER_MAY_USE = {"info", "parse_since", "DURATION", "check_input_size", "start_background_system"}


def test_the_cli_commands_go_through_the_client() -> None:
    """Each handler of THROUGH_THE_CLIENT, with the functions of its module it calls (nested ones too),
    uses no name its module imports from corral/ops or corral/system (open_system, System) beyond
    HANDLER_MAY_USE, and uses the client."""
    from corral import cli

    cli.build_parser()  # the feature modules add their handlers to cli.COMMANDS
    problems = {}
    for command in THROUGH_THE_CLIENT:
        handler = cli.COMMANDS[command]
        tree = ast.parse(Path(handler.__code__.co_filename).read_text())
        below = {
            alias.asname or alias.name
            for node in tree.body
            if isinstance(node, ast.ImportFrom)
            and node.module
            and (node.module.startswith("corral.ops") or node.module == "corral.system")
            for alias in node.names
        }
        functions = {n.name: n for n in tree.body if isinstance(n, ast.AsyncFunctionDef | ast.FunctionDef)}
        todo, seen, used = [handler.__name__], set(), set()
        while todo:  # the handler and the module's functions it reaches
            name = todo.pop()
            if name in seen:
                continue
            seen.add(name)
            names = {n.id for n in ast.walk(functions[name]) if isinstance(n, ast.Name)}
            used |= names
            todo += [n for n in names if n in functions]
        wrong = sorted(used & below - HANDLER_MAY_USE)
        if wrong or "Client" not in used:
            problems[command] = wrong or "no Client"
    assert problems == {}
