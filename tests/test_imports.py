"""The package's imports run one way (cli -> optim -> tasks -> the rest) and form no cycle.

Read from the source with ``ast``, so an import inside a function counts too (the floors;
the cycle check is of module-level imports, those that run on import).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "cnn_mellin"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE

# package -> the packages above it, which it must never import
UPPER = {
    "cli": (),
    "optim": ("cli",),
    "tasks": ("optim", "cli"),
}
ABOVE_THE_REST = ("tasks", "optim", "cli")  # every other module sits below all three
SELF = ("__main__",)  # the entry point may import anything


def _modules() -> dict[str, Path]:
    """Dotted name -> file, for every module of the package."""
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = (PACKAGE, *path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def _imports(name: str, module_level: bool) -> set[str]:
    """The package's modules ``name`` imports (each ``from X import y`` gives ``X.y`` when
    that is a module, else ``X``); ``module_level``: only those run on import."""
    tree = ast.parse(MODULES[name].read_text(), str(MODULES[name]))
    package = name if _is_package(name) else name.rpartition(".")[0]
    targets: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if module_level and (
                isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
                or _type_checking(child)
            ):
                continue
            if isinstance(child, ast.Import):
                targets.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - (child.level - 1)]
                    base = ".".join([*anchor, *([base] if base else [])])
                for alias in child.names:
                    sub = f"{base}.{alias.name}"
                    targets.add(sub if sub in MODULES else base)
            visit(child)

    visit(tree)
    resolved = set()
    for target in targets:
        while target and target not in MODULES:  # `import cnn_mellin.x.y` names a module
            target = target.rpartition(".")[0]
        if target and target != name:
            resolved.add(target)
    return resolved


def _top(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_lower_floors_never_import_upper_ones():
    wrong = []
    for name in MODULES:
        top = _top(name)
        if top in SELF or name == PACKAGE:
            continue
        forbidden = UPPER.get(top, ABOVE_THE_REST)
        for target in sorted(_imports(name, module_level=False)):
            if _top(target) in forbidden:
                wrong.append(f"{name} imports {target}")
    assert not wrong, "imports that go up a floor:\n" + "\n".join(wrong)


def _cycles(graph: dict[str, set[str]]) -> list[str]:
    """Each cycle a depth-first walk of ``graph`` meets, as ``a -> b -> a``."""
    cycles, state = [], {}

    def walk(node: str, path: list[str]) -> None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join([*path[path.index(nxt):], nxt]))
            elif nxt not in state:
                walk(nxt, path)
        path.pop()
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            walk(name, [])
    return cycles


def test_no_import_cycle_at_module_level():
    graph = {name: _imports(name, module_level=True) for name in MODULES}
    for name, targets in graph.items():
        # importing a.b.c runs a/__init__ and a/b/__init__ first, unless name is inside them
        for target in list(targets):
            parent = target.rpartition(".")[0]
            while parent and parent != PACKAGE:
                if name != parent and not name.startswith(parent + "."):
                    targets.add(parent)
                parent = parent.rpartition(".")[0]
    cycles = _cycles(graph)
    assert not cycles, "module-level import cycles:\n" + "\n".join(cycles)


def test_the_checks_see_function_level_imports_and_cycles():
    assert "cnn_mellin.errors" in _imports("cnn_mellin.config", module_level=True)
    assert "cnn_mellin.params" in _imports("cnn_mellin.config", module_level=False)
    assert "cnn_mellin.params" not in _imports("cnn_mellin.config", module_level=True)
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a -> b -> c -> a"]
    assert _cycles({"a": {"b"}, "b": set()}) == []
