"""The lmgrad package's import graph, read from the source (nothing is imported): no cycles, and no
module reaching into another module's underscored names.

Every `import` counts, wherever it sits (module level, inside a function, under TYPE_CHECKING): an
import moved into a function to dodge a cycle is still a cycle in the design. An edge goes to the
module named, not to the packages above it (importing `lmgrad.store.errors` runs
`lmgrad/store/__init__.py` first, but Python handles a package whose submodule is being imported).
"""
from __future__ import annotations

import ast
import dataclasses
import pkgutil
from pathlib import Path

import lmgrad

ROOT = Path(lmgrad.__file__).resolve().parent


@dataclasses.dataclass(frozen=True)
class Module:
    name: str
    path: Path
    is_package: bool


def package_modules(root: Path = ROOT) -> dict[str, Module]:
    """Every module of the package at `root` by dotted name, found on disk (no imports)."""
    top = root.name
    out = {top: Module(top, root / "__init__.py", True)}

    def walk(directory: Path, prefix: str) -> None:
        for info in pkgutil.iter_modules([str(directory)]):
            name = f"{prefix}.{info.name}"
            if info.ispkg:
                out[name] = Module(name, directory / info.name / "__init__.py", True)
                walk(directory / info.name, name)
            else:
                out[name] = Module(name, directory / f"{info.name}.py", False)

    walk(root, top)
    return out


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


@dataclasses.dataclass
class Imports:
    edges: dict[str, set[str]]                 # importer -> imported modules of the package
    private: list[str]                         # "file:line: importer uses target._name"


def _resolve_from(mod: Module, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = mod.name if mod.is_package else mod.name.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def scan(modules: dict[str, Module]) -> Imports:
    """Intra-package import edges and cross-module private-name uses of every module."""
    top = next(iter(modules))
    edges: dict[str, set[str]] = {m: set() for m in modules}
    private: list[str] = []
    for mod in modules.values():
        tree = ast.parse(mod.path.read_text(encoding="utf-8"), str(mod.path))
        rel = mod.path.relative_to(modules[top].path.parent.parent)
        own_package = mod.name if mod.is_package else mod.name.rpartition(".")[0]
        aliases: dict[str, str] = {}   # local name -> package module it is bound to

        def flag(line: int, target: str, name: str) -> None:
            # Importing from one's own package __init__ is not reaching into another module.
            if target != own_package and target != mod.name:
                private.append(f"{rel}:{line}: {mod.name} uses {target}.{name}")

        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name == top or a.name.startswith(top + "."):
                        edges[mod.name].add(a.name)
                        if a.asname:
                            aliases[a.asname] = a.name
                        else:
                            aliases[a.name.partition(".")[0]] = a.name.partition(".")[0]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve_from(mod, node)
                if base != top and not base.startswith(top + "."):
                    continue
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    if sub in modules:      # `from lmgrad.x import module`
                        edges[mod.name].add(sub)
                        aliases[a.asname or a.name] = sub
                    else:                   # `from lmgrad.x import name`
                        edges[mod.name].add(base)
                        if _is_private(a.name):
                            flag(node.lineno, base, a.name)
        for node in ast.walk(tree):
            # `alias._name` or `lmgrad.x.y._name`, alias bound above to a package module.
            if not isinstance(node, ast.Attribute):
                continue
            chain, cur = [], node
            while isinstance(cur, ast.Attribute):
                chain.append(cur.attr)
                cur = cur.value
            if not isinstance(cur, ast.Name) or cur.id not in aliases:
                continue
            target = aliases[cur.id]
            for attr in reversed(chain):
                if f"{target}.{attr}" in modules:
                    target = f"{target}.{attr}"
                    continue
                if _is_private(attr):
                    flag(node.lineno, target, attr)
                break
    for targets in edges.values():
        targets.intersection_update(modules)
    return Imports(edges, sorted(set(private)))


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a closed path) per strongly connected component with more than one module,
    or a module importing itself (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    sccs: list[list[str]] = []
    counter = 0
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1 or v in edges[v]:
                    sccs.append(sorted(comp))
    return [_cycle_in(comp, edges) for comp in sccs]


def _cycle_in(comp: list[str], edges: dict[str, set[str]]) -> list[str]:
    # Shortest path back to the first module, staying inside the component (breadth first).
    members, start = set(comp), comp[0]
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(edges[v] & members):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return path[::-1] + [start]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return comp


def test_cycle_finder():
    # The checker itself, on a hand-made graph: a 3-cycle, a self-import and an acyclic tail.
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
    found = cycles(edges)
    assert ["a", "b", "c", "a"] in found and ["e", "e"] in found and len(found) == 2


def test_scanner_on_a_toy_package(tmp_path):
    pkg = tmp_path / "toy"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "from toy.a import f\n_shared = 1\n",
        "a.py": "import toy.b as bb\n\ndef f():\n    from toy import c\n    return bb._hidden + c.x\n",
        "b.py": "_hidden = 1\n",
        "c.py": "from toy.b import _hidden\nfrom . import a\nx = 2\n",
        "sub/__init__.py": "from toy import _shared\n",
        "sub/d.py": "from toy.sub import _z\nfrom .. import b\ny = b.__name__\n",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    modules = package_modules(pkg)
    assert set(modules) == {"toy", "toy.a", "toy.b", "toy.c", "toy.sub", "toy.sub.d"}
    imports = scan(modules)
    assert imports.edges["toy.a"] == {"toy.b", "toy.c"}          # function-level import counted
    assert imports.edges["toy.c"] == {"toy.b", "toy.a"}          # relative import resolved
    assert cycles(imports.edges) == [["toy.a", "toy.c", "toy.a"]]
    # toy.sub.d importing from its own package __init__ is fine; a dunder is not private.
    assert [p.split(": ", 1)[1] for p in imports.private] == [
        "toy.a uses toy.b._hidden", "toy.c uses toy.b._hidden", "toy.sub uses toy._shared"]


def test_no_import_cycles():
    found = cycles(scan(package_modules()).edges)
    assert not found, "import cycles in lmgrad:\n" + "\n".join(" -> ".join(c) for c in found)


def test_no_private_names_across_modules():
    private = scan(package_modules()).private
    assert not private, ("modules using another module's underscored names (make the name public "
                         "where it belongs, or move it):\n" + "\n".join(private))


def test_every_module_is_scanned():
    modules = package_modules()
    assert {"lmgrad.io", "lmgrad.store", "lmgrad.store.reader", "lmgrad.analysis.space"} <= set(modules)
    assert all(m.path.is_file() for m in modules.values())
