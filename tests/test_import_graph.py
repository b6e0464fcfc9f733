"""The package's import graph: no circle, and no import that runs upward through the layers.

Every import statement counts, at any depth (inside functions too), since a deferred import is still a
dependency.
"""

import ast
import pathlib

import minimind_jax

PACKAGE_DIR = pathlib.Path(minimind_jax.__file__).parent
# Lowest first: a module may import its own room and the rooms listed before it, never those after.
LAYERS = ("errors", "runtime", "model", "data", "weights", "training", "inference", "rl", "bench", "cli")


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: pathlib.Path, modules: set[str]) -> set[str]:
    """The package's modules that `path` imports anywhere in its body. `from a.b import c` counts a.b.c when
    that is a module, else a.b."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in modules)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in modules:
            for alias in node.names:
                found.add(f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(path): path for path in PACKAGE_DIR.rglob("*.py")}
    return {name: imported_modules(path, set(paths)) - {name} for name, path in paths.items()}


def room(module: str) -> str:
    """The layer a module belongs to: its subpackage, or the top-level module's own name."""
    return module.split(".")[1] if "." in module else module


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of the graph as [a, b, ..., a], or None (depth-first search with an explicit stack)."""
    state = {}  # node -> "open" while on the current path, "done" after
    for start in sorted(graph):
        if start in state:
            continue
        path, stack = [], [(start, iter(sorted(graph[start])))]
        state[start] = "open"
        path.append(start)
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = "done"
                stack.pop()
                path.pop()
            elif state.get(child) == "open":
                return path[path.index(child) :] + [child]
            elif child not in state:
                state[child] = "open"
                path.append(child)
                stack.append((child, iter(sorted(graph[child]))))
    return None


def test_find_cycle_finds_a_circle_and_only_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_every_module_has_a_layer():
    rooms = {room(module) for module in import_graph() if module != "minimind_jax"}
    assert rooms <= set(LAYERS), rooms - set(LAYERS)


def test_no_module_imports_in_a_circle():
    assert find_cycle(import_graph()) is None


def test_no_room_imports_in_a_circle():
    graph = {}
    for module, imported in import_graph().items():
        graph.setdefault(room(module), set()).update(room(name) for name in imported)
    graph = {name: imported - {name} for name, imported in graph.items()}
    assert find_cycle(graph) is None


def test_no_import_runs_upward():
    """Nothing inside the package imports the package's own facade (minimind_jax/__init__.py), and each
    import goes to the module's own layer or a lower one."""
    upward = []
    for module, imported in import_graph().items():
        if module == "minimind_jax":
            continue
        for name in imported:
            if name == "minimind_jax" or LAYERS.index(room(name)) > LAYERS.index(room(module)):
                upward.append(f"{module} imports {name}")
    assert not upward, upward
