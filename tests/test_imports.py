"""Guard rails on the package's shape: its import graph has no cycle (imports inside functions included: one
there only hides a cycle, it does not remove it), and no module imports another's private name.

`python -m pytest -s tests/test_imports.py` prints the graph. Violations known and being removed elsewhere are
listed below; each entry must still be a violation (a fixed one must leave the list), and nothing else may be.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "misalign"

# Known cycles, each by the one import that closes it (importer, imported): the graph without these edges must
# have no cycle, and each must still close one (an edge that no longer does must leave the list).
# None left: the last one (world.build -> evaluation: a `world:` name built the world on first use, and the build
# scored its models with the evaluation) went when entry points became the only builders (misalign.world_targets).
KNOWN_CYCLE_EDGES: dict[tuple[str, str], str] = {}

# Known imports of private names, as (importer, module, name): none left.
KNOWN_PRIVATE: set[tuple[str, str, str]] = set()


def module_name(path: Path) -> str:
    """misalign/world/build.py -> "world.build"; a package's __init__.py is the package."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts) or "misalign"


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _ours(dotted: str) -> str | None:
    """The module of ours that `misalign.X.Y` names (X.Y, or X when Y is a name in it), None if not ours."""
    if dotted != "misalign" and not dotted.startswith("misalign."):
        return None
    rel = dotted.removeprefix("misalign").removeprefix(".") or "misalign"
    while rel not in MODULES and "." in rel:
        rel = rel.rsplit(".", 1)[0]
    return rel if rel in MODULES else None


def imports_in(source: str, name: str, is_package: bool = False) -> list[tuple[str, str | None]]:
    """(module of ours, name imported from it or None for a module) of every import in a module's source, at
    any depth (module level, functions, classes, `if TYPE_CHECKING:`), relative ones included."""
    package = ["misalign", *([] if name == "misalign" else name.split("."))]
    if not is_package:
        package.pop()
    out: list[tuple[str, str | None]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(m, None) for a in node.names if (m := _ours(a.name))]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
            source_module = ".".join(p for p in (base, node.module or "") if p)
            for a in node.names:
                # `from misalign.world import build` names a submodule, or a name in the package
                sub = _ours(f"{source_module}.{a.name}")
                if sub is not None and sub != _ours(source_module):
                    out.append((sub, None))
                elif (m := _ours(source_module)) is not None:
                    out.append((m, a.name))
    return out


def imports(name: str) -> list[tuple[str, str | None]]:
    return imports_in(MODULES[name].read_text(), name, MODULES[name].name == "__init__.py")


def graph() -> dict[str, set[str]]:
    g = {name: {m for m, _ in imports(name) if m != name} for name in MODULES}
    # importing a submodule runs its package's __init__ first
    for name, deps in g.items():
        for dep in list(deps):
            parent = dep.rpartition(".")[0]
            if parent and parent != name and not name.startswith(parent + "."):
                deps.add(parent)
    return g


def cycles(g: dict[str, set[str]]) -> set[tuple[str, ...]]:
    """The strongly connected components with more than one module (Tarjan), each as its sorted modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: set[tuple[str, ...]] = set()

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(g[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.add(tuple(sorted(component)))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return found


def path(g: dict[str, set[str]], start: str, goal: str) -> list[str] | None:
    """A shortest import path start -> ... -> goal (breadth first), or None."""
    came: dict[str, str | None] = {start: None}
    todo = [start]
    while todo:
        v = todo.pop(0)
        if v == goal:
            trail = [v]
            while (prev := came[trail[-1]]) is not None:
                trail.append(prev)
            return trail[::-1]
        for w in sorted(g[v] - came.keys()):
            came[w] = v
            todo.append(w)
    return None


def a_cycle(g: dict[str, set[str]], component: tuple[str, ...]) -> list[str]:
    """One cycle through a strongly connected component's first module, to name in a failure."""
    start = component[0]
    step = min(g[start] & set(component))
    return [start, *(path(g, step, start) or [])]


def test_no_import_cycles() -> None:
    g = graph()
    width = max(map(len, g))
    print("\nimport graph of misalign (module -> the modules of ours it imports, functions included):")
    for name in sorted(g):
        print(f"  {name:<{width}} -> {', '.join(sorted(g[name])) or '-'}")
    print(f"cycles: {sorted(cycles(g)) or 'none'}")
    for (a, b), why in KNOWN_CYCLE_EDGES.items():
        loop = path(g, b, a) if b in g.get(a, set()) else None
        print(f"known, closed by {a} -> {b}: {' -> '.join([a, *loop]) if loop else 'GONE'} ({why})")
    cut = {name: deps - {b for a, b in KNOWN_CYCLE_EDGES if a == name} for name, deps in g.items()}
    new = [" -> ".join(a_cycle(cut, c)) for c in sorted(cycles(cut))]
    assert not new, f"import cycles: {new}; break each (move what both need into a module below them)"
    stale = [(a, b) for a, b in KNOWN_CYCLE_EDGES if b not in g.get(a, set()) or path(g, b, a) is None]
    assert not stale, f"KNOWN_CYCLE_EDGES lists imports that close no cycle any more: {stale}; remove them"


def test_no_private_imports() -> None:
    found = {(name, m, n) for name in MODULES for m, n in imports(name)
             if n is not None and n.startswith("_") and not n.startswith("__") and m != name}
    new = found - KNOWN_PRIVATE
    assert not new, (f"imports of another module's private names (importer, module, name): {sorted(new)}; make "
                     "the name public where it is defined, or move it")
    stale = KNOWN_PRIVATE - found
    assert not stale, f"KNOWN_PRIVATE lists imports that are gone: {sorted(stale)}; remove them from the list"


def test_the_parser_sees_every_kind_of_import() -> None:
    """The guard rail itself: imports inside functions and classes are edges (one there hides a cycle, it does
    not remove it), relative imports resolve, and a submodule is told from a name."""
    source = """
import torch
import misalign.storage
from misalign.config import StageConfig
from misalign import runtime
def f():
    from misalign.models import _private
class C:
    def g(self):
        from . import judges
        from .world import build, world_path
"""
    assert sorted(imports_in(source, "trial"), key=str) == sorted([
        ("storage", None), ("config", "StageConfig"), ("runtime", None), ("models", "_private"), ("judges", None),
        ("world.build", None), ("world", "world_path")], key=str)
    assert imports_in("from ..errors import InputError\nfrom . import content", "world.build") == [
        ("errors", "InputError"), ("world.content", None)]
    assert imports_in("from .build import build", "world", is_package=True) == [("world.build", "build")]
