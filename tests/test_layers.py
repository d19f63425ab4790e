"""The package's import rules, checked by walking every module's AST (imports inside functions included).

* Layers: errors < core < {sdstream, local, io, maps} < interop < tools < cli. A module imports its own subpackage
  and lower layers only; sdstream, local, io and maps never import each other. ``tractfunc/__init__.py`` (the
  public re-export) is exempt, and no module imports it back.
* Nothing imports :mod:`tractfunc.cli`.
* No import cycle between modules (imports under ``if TYPE_CHECKING:`` do not count).
* No private name crosses a module boundary: ``from .a import _x`` and ``mod._x`` (dunders excepted).
* A name taken from a module of the package (``from .a import x``, ``a.x``) is one it defines.

Run ``python tests/test_layers.py`` to list every violation, allowlisted or not, as ``file:line: what``.
"""
from __future__ import annotations

import ast
import os
import sys
from typing import NamedTuple

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
PACKAGE = "tractfunc"

# Rank of each top-level part of the package; equal ranks are independent siblings.
LAYERS = {"errors": 0, "core": 1, "sdstream": 2, "local": 2, "io": 2, "maps": 2, "interop": 3, "tools": 4, "cli": 5}

# Known violations in files being edited elsewhere: "file: what" (as printed, without the line) -> why it is
# allowed for now. Each entry is temporary: fix the import, delete the entry. A stale entry fails the test.
ALLOWLIST = {
    # Each entry: "path: what" -> why it is temporary. Empty: the package follows every rule.
}


class Violation(NamedTuple):
    path: str    # relative to the repository root, "/" separators
    line: int
    what: str

    @property
    def key(self) -> str:
        """The line-free identity used by ALLOWLIST (lines move, the import does not)."""
        return f"{self.path}: {self.what}"

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.what}"


class Import(NamedTuple):
    target: str          # absolute dotted module name imported (a package's __init__ is the package name)
    names: tuple         # names taken from it by ``from target import ...``; () for ``import target``
    line: int
    type_only: bool      # under ``if TYPE_CHECKING:``


def module_files(root: str, package: str = PACKAGE) -> dict:
    """Dotted module name -> path relative to ``root`` for every ``.py`` file of ``package``."""
    out = {}
    for d, _, files in os.walk(os.path.join(root, package)):
        for f in sorted(files):
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/")
                parts = rel[:-3].split("/")
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                out[".".join(parts)] = rel
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _absolute(module: str, is_package: bool, level: int, name: str | None) -> str:
    """The absolute module named by ``from <level dots><name> import`` inside ``module``."""
    if level == 0:
        return name or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def imports_of(tree: ast.Module, module: str, is_package: bool, modules) -> list:
    """Every import statement in ``tree`` (any depth), resolved to modules of ``modules`` where it names one.

    ``from pkg import sub`` where ``pkg.sub`` is a module counts as importing ``pkg.sub``.
    """
    out = []

    def visit(node, type_only):
        for child in ast.iter_child_nodes(node):
            visit_one(child, type_only)

    def visit_one(node, type_only):
        if isinstance(node, ast.Import):
            for a in node.names:
                out.append(Import(a.name, (), node.lineno, type_only))
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, is_package, node.level, node.module)
            attrs = []
            for a in node.names:
                if f"{base}.{a.name}" in modules:
                    out.append(Import(f"{base}.{a.name}", (), node.lineno, type_only))
                else:
                    attrs.append(a.name)
            if attrs:
                out.append(Import(base, tuple(attrs), node.lineno, type_only))
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for sub in node.body:
                visit_one(sub, True)
            for sub in node.orelse:
                visit_one(sub, type_only)
        else:
            visit(node, type_only)

    visit(tree, False)
    return out


def module_aliases(tree: ast.Module, module: str, is_package: bool, modules) -> dict:
    """Local name -> package module it is bound to by any import in ``tree`` (any scope)."""
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in modules:
                    out[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, is_package, node.level, node.module)
            for a in node.names:
                if f"{base}.{a.name}" in modules:
                    out[a.asname or a.name] = f"{base}.{a.name}"
    return out


def _dotted(node: ast.expr) -> list | None:
    """``a.b.c`` -> ["a", "b", "c"]; None for anything but a chain of names."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return [node.id] + parts[::-1]
    return None


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _part(module: str) -> str | None:
    """The top-level part (layer key) of a package module; None for the package root."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def layer_violations(module: str, path: str, imports, modules) -> list:
    """Layer and no-cli rules for one module's imports."""
    out = []
    mine = _part(module)
    if mine is None:                                # tractfunc/__init__.py: the public re-export
        return out
    for imp in imports:
        if imp.target != PACKAGE and not imp.target.startswith(PACKAGE + "."):
            continue
        theirs = _part(imp.target)
        if theirs == mine:
            continue
        if theirs is None and imp.names and all(n.startswith("__") for n in imp.names):
            continue                                # package metadata (__version__) is no re-export
        if theirs is None:
            out.append(Violation(path, imp.line, f"imports the public re-export {PACKAGE} (import the defining "
                                                 f"module)"))
        elif theirs == "cli":
            out.append(Violation(path, imp.line, f"imports {imp.target} (nothing imports the command line)"))
        elif theirs not in LAYERS or mine not in LAYERS:
            out.append(Violation(path, imp.line, f"{mine} imports {imp.target}: unknown layer"))
        elif LAYERS[theirs] >= LAYERS[mine]:
            why = "a sibling layer" if LAYERS[theirs] == LAYERS[mine] else "a higher layer"
            out.append(Violation(path, imp.line, f"{mine} imports {imp.target} ({why})"))
    return out


def top_level_names(tree: ast.Module) -> set | None:
    """The names a module defines at import time (defs, classes, assignments, imports, also inside top-level
    ``if`` / ``try`` / ``with``); None where the namespace is open (a module ``__getattr__`` or ``import *``)."""
    names = set()

    def bind(target):
        for n in ast.walk(target):
            if isinstance(n, ast.Name):
                names.add(n.id)

    def visit(body):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names.update((a.asname or a.name).split(".")[0] for a in node.names)
            elif isinstance(node, ast.Assign):
                for t in node.targets:
                    bind(t)
            elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
                bind(node.target)
            for field in ("body", "orelse", "finalbody", "handlers"):
                if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    visit(getattr(node, field, []))
    visit(tree.body)
    return None if "__getattr__" in names or "*" in names else names


def name_violations(tree: ast.Module, module: str, path: str, imports, modules, defined: dict) -> list:
    """``from m import _x`` and ``m._x`` where ``m`` is another module of the package (private names), and
    ``from m import x`` / ``m.x`` where ``m`` defines no ``x`` (an AttributeError waiting to happen).
    ``defined``: module -> :func:`top_level_names`."""
    def check_name(line, target, name, verb):
        if target == module or target not in modules:
            return []
        names = defined[target]
        missing = (names is not None and name not in names and f"{target}.{name}" not in modules
                   and not name.startswith("__"))
        what = f"{verb}{' private' if _private(name) else ''} {target}.{name}"
        if missing:
            return [Violation(path, line, f"{what}, which {target} does not define")]
        return [Violation(path, line, what)] if _private(name) else []

    out = []
    for imp in imports:
        for n in imp.names:
            out += check_name(imp.line, imp.target, n, "imports")
    aliases = module_aliases(tree, module, path.endswith("__init__.py"), modules)
    for node in ast.walk(tree):
        chain = _dotted(node.value) if isinstance(node, ast.Attribute) else None
        if chain and chain[0] in aliases:
            out += check_name(node.lineno, ".".join([aliases[chain[0]]] + chain[1:]), node.attr, "uses")
    return out


def strongly_connected(graph: dict) -> list:
    """Tarjan's strongly connected components of ``graph`` (node -> set of nodes), as sorted lists."""
    index, low, on, stack, comps = {}, {}, set(), [], []

    def connect(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return comps


def _shortest_cycle(graph: dict, start: str, within: set) -> list:
    """The shortest path start -> ... -> start inside ``within`` (breadth first)."""
    prev, frontier = {}, [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph.get(v, ())):
                if w not in within:
                    continue
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [start] + path[::-1][1:] + [start] if len(path) > 1 else [start, start]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return [start]


def cycle_violations(edges: dict, modules) -> list:
    """One violation per import cycle (strongly connected group of modules), at the first module's import."""
    graph = {}
    for (a, b) in edges:
        graph.setdefault(a, set()).add(b)
    out = []
    for comp in strongly_connected(graph):
        if len(comp) == 1 and comp[0] not in graph.get(comp[0], ()):
            continue
        cycle = _shortest_cycle(graph, comp[0], set(comp))
        line = edges[(cycle[0], cycle[1])]
        out.append(Violation(modules[comp[0]], line, "import cycle: " + " -> ".join(cycle)
                             + (f" (group: {', '.join(comp)})" if len(comp) > len(cycle) - 1 else "")))
    return out


def check(root: str = ROOT, package: str = PACKAGE) -> list:
    """Every violation of the import rules in ``root/package``, sorted by file and line."""
    modules = module_files(root, package)
    trees = {}
    for module, path in modules.items():
        with open(os.path.join(root, path), encoding="utf-8") as fh:
            trees[module] = ast.parse(fh.read(), path)
    defined = {module: top_level_names(tree) for module, tree in trees.items()}
    out, edges = [], {}
    for module, path in sorted(modules.items()):
        tree = trees[module]
        imports = imports_of(tree, module, path.endswith("__init__.py"), modules)
        out += layer_violations(module, path, imports, modules)
        out += name_violations(tree, module, path, imports, modules, defined)
        for imp in imports:
            if imp.target in modules and imp.target != module and not imp.type_only:
                edges.setdefault((module, imp.target), imp.line)
    out += cycle_violations(edges, modules)
    return sorted(set(out), key=lambda v: (v.path, v.line, v.what))


def _write(root, files: dict):
    for rel, text in files.items():
        p = os.path.join(root, rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "w") as fh:
            fh.write(text)


def test_checker_finds_each_kind_of_violation(tmp_path):
    """A small fake package with one violation of each rule: each is reported at its file and line."""
    _write(tmp_path, {
        "tractfunc/__init__.py": "from .cli import main\n",
        "tractfunc/errors.py": "_secret = 1\n",
        "tractfunc/core/__init__.py": "",
        "tractfunc/core/a.py": "from . import b\n_hidden = _k = 1\n",
        "tractfunc/core/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import c\n"
                               "from .a import _hidden, __version__\n",
        "tractfunc/core/c.py": "from . import b\nfrom .. import errors\ny = errors._secret + errors.__name__\n"
                               "def f():\n    from ..io import x\n",
        "tractfunc/io/__init__.py": "",
        "tractfunc/io/x.py": "import tractfunc.local.y as yy\nfrom ..cli import main\nfrom .. import core\n",
        "tractfunc/local/__init__.py": "",
        "tractfunc/local/y.py": "from ..core import a\nz = a._k\nw = a.missing + a.__file__ + a.b\n",
        "tractfunc/cli/__init__.py": "from .. import tools\ndef main():\n    pass\n",
        "tractfunc/tools/__init__.py": "",
        "tractfunc/interop/__init__.py": "import tractfunc\n",
    })
    got = {str(v) for v in check(str(tmp_path))}
    assert got == {
        "tractfunc/core/c.py:5: core imports tractfunc.io.x (a higher layer)",
        "tractfunc/core/a.py:1: import cycle: tractfunc.core.a -> tractfunc.core.b -> tractfunc.core.a",
        "tractfunc/core/b.py:4: imports private tractfunc.core.a._hidden",
        "tractfunc/core/c.py:3: uses private tractfunc.errors._secret",
        "tractfunc/io/x.py:1: io imports tractfunc.local.y (a sibling layer)",
        "tractfunc/io/x.py:2: imports tractfunc.cli (nothing imports the command line)",
        "tractfunc/local/y.py:2: uses private tractfunc.core.a._k",
        "tractfunc/local/y.py:3: uses tractfunc.core.a.missing, which tractfunc.core.a does not define",
        "tractfunc/interop/__init__.py:1: imports the public re-export tractfunc (import the defining module)",
    }, "\n".join(sorted(got))


def test_import_rules():
    """The package obeys the import rules, apart from the allowlisted, commented, temporary exceptions."""
    found = check()
    new = [str(v) for v in found if v.key not in ALLOWLIST]
    stale = sorted(set(ALLOWLIST) - {v.key for v in found})
    for line in new:
        print(line)
    assert not new, f"{len(new)} import-rule violation(s):\n" + "\n".join(new)
    assert not stale, "allowlisted violations that are gone (delete the entries):\n" + "\n".join(stale)


if __name__ == "__main__":
    found = check()
    for v in found:
        print(f"{v}{'   [allowlisted]' if v.key in ALLOWLIST else ''}")
    print(f"{len(found)} violation(s), {sum(v.key in ALLOWLIST for v in found)} allowlisted", file=sys.stderr)
    sys.exit(1 if found else 0)
