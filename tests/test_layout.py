"""The package's shape, checked: imports go one way (no cycle), a request's path never reaches back
to the client, and no module, class or function grows past the size at which it holds two ideas.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "shardcache"
MAX_MODULE_LINES = 600
MAX_CLASS_LINES = 420  # "about 400"
MAX_FUNCTION_LINES = 60


def _modules() -> dict[str, ast.Module]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = ast.parse(path.read_text(encoding="utf-8"), str(path))
    return found


def _imports(tree: ast.Module, known: set[str]) -> set[str]:
    """Package modules imported at run time (not under ``if TYPE_CHECKING:``)."""
    deps: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("shardcache"):
            deps.add(node.module)
            deps.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            deps.update(alias.name for alias in node.names)
    return {dep for dep in deps if dep in known and dep != "shardcache"}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(tree, known) - {name} for name, tree in modules.items()}


def _reaches(graph: dict[str, set[str]], start: str, goal: str) -> bool:
    seen, todo = set(), [start]
    while todo:
        current = todo.pop()
        if current == goal:
            return True
        if current not in seen:
            seen.add(current)
            todo.extend(graph.get(current, ()))
    return False


def test_the_import_graph_has_no_cycle() -> None:
    graph = _graph()
    cycles = [(a, b) for a, deps in graph.items() for b in deps if _reaches(graph, b, a)]
    assert cycles == []


def test_a_request_path_never_imports_the_layer_above_it() -> None:
    graph = _graph()
    below = {
        "shardcache._protocol": ["shardcache._router", "shardcache._executor", "shardcache.client"],
        "shardcache._router": ["shardcache._executor", "shardcache._commands", "shardcache.client"],
        "shardcache._executor": ["shardcache._commands", "shardcache.client", "shardcache.recipes"],
        "shardcache._commands": ["shardcache.client", "shardcache.recipes"],
        "shardcache.recipes": ["shardcache.client"],
    }
    wrong = [(low, high) for low, highs in below.items() for high in highs if _reaches(graph, low, high)]
    assert wrong == []


def test_no_module_class_or_function_is_too_big() -> None:
    too_big = []
    for name, tree in _modules().items():
        lines = max((getattr(node, "end_lineno", 0) or 0) for node in ast.walk(tree))
        if lines > MAX_MODULE_LINES:
            too_big.append(f"module {name}: {lines} lines")
        for node in ast.walk(tree):
            span = (node.end_lineno or node.lineno) - node.lineno + 1 if hasattr(node, "lineno") else 0
            if isinstance(node, ast.ClassDef) and span > MAX_CLASS_LINES:
                too_big.append(f"class {name}.{node.name}: {span} lines")
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and span > MAX_FUNCTION_LINES:
                too_big.append(f"function {name}.{node.name}: {span} lines")
    assert too_big == []


def test_test_modules_have_distinct_names_across_tests_and_integration() -> None:
    # pytest imports both folders' files as top-level modules (no __init__.py): two files of the
    # same name make `pytest tests integration` fail at collection.
    root = Path(__file__).resolve().parent.parent
    unit = {path.name for path in (root / "tests").glob("test_*.py")}
    live = {path.name for path in (root / "integration").glob("test_*.py")}
    assert unit & live == set()
