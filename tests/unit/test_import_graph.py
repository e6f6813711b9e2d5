"""batchd's import graph, read from the source: no cycle, and the layers of
docs/architecture.md import only downwards.

Every ``import`` and ``from ... import`` counts: at module level, inside functions, and under
``if TYPE_CHECKING:`` (a cycle hidden from the interpreter is still a cycle for a reader and
for whoever moves the code). An edge goes to the deepest module of ours the statement names:
``from batchd.engine import shard`` is an edge to ``batchd.engine.shard``,
``from batchd.models import Usage`` one to ``batchd.models``; and, as importing ``a.b.c``
runs ``a/__init__.py`` and ``a/b/__init__.py`` first, to each package above it
(``batchd.engine``, ``batchd``).
"""

from __future__ import annotations

import ast
from collections.abc import Mapping
from pathlib import Path

import pytest

ROOT = "batchd"
SRC = Path(__file__).resolve().parents[2] / "src"

# The layers (docs/architecture.md, "Imports"): what each may never import. A layer is the
# package (``batchd.api`` for ``batchd.api.routes``) or the top-level module. ``*`` is every
# module of ours other than the layer's own.
NOTHING_OF_OURS = frozenset({"*"})
FORBIDDEN: Mapping[str, frozenset[str]] = {
    # the domain: records, the exception tree, the error envelopes
    "models": NOTHING_OF_OURS,
    "errors": NOTHING_OF_OURS,
    "envelopes": NOTHING_OF_OURS,
    # api -> service -> store/blobs; the HTTP layers never reach the engine
    "api": frozenset({"engine", "backends", "cli"}),
    "ui": frozenset({"engine", "backends", "store", "blobs", "cli"}),
    "service": frozenset({"api", "ui", "engine", "backends", "cli"}),
    # engine -> service/store/backends; the engine knows no HTTP API
    "engine": frozenset({"api", "ui", "cli"}),
    # the result records, their reading and their renderers: used by the engine and services
    "results": frozenset({"api", "ui", "engine", "cli"}),
    # where a request runs: knows no batch, no store, no API
    "backends": frozenset({"api", "ui", "service", "engine", "store", "blobs", "cli"}),
}
# The bottom of the storage layers: what each may import besides itself, all else refused
# (a module added to batchd is outside them until the rule names it). The domain's records
# and errors; the store gets a URL and numbers, never the settings, and sets its SQLite
# file's mode (``filemodes``); the blobs read their backend's settings (``config``) and write
# private files. Neither builds an HTTP error body (``envelopes``).
ALLOWED: Mapping[str, frozenset[str]] = {
    "store": frozenset({"models", "errors", "filemodes"}),
    "blobs": frozenset({"models", "errors", "config", "filemodes"}),
}
# The api modules that reach the store themselves (everything else goes through a service):
# app.py wires it and reads the queue state for /metrics, readiness.py pings it for /readyz,
# routes.py reads the usage aggregate for /usage.
STORE_IN_API = frozenset({"batchd.api.app", "batchd.api.readiness", "batchd.api.routes"})
# Nothing of batchd's imports these (the entry point, the test upstream).
IMPORTED_BY_NONE = frozenset({"cli", "testing"})


def module_names(src: Path, root: str) -> dict[str, Path]:
    """Every module of package ``root`` under ``src``: dotted name -> file (a package's
    ``__init__.py`` under the package's name)."""
    found: dict[str, Path] = {}
    for path in sorted((src / root).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _ours(name: str, modules: Mapping[str, Path]) -> str | None:
    """The deepest module of ours that ``name`` is or is in, if any."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _with_packages(names: set[str | None], modules: Mapping[str, Path]) -> set[str]:
    """``names`` (None dropped) and every package of ours above each: importing ``a.b.c``
    runs ``a/__init__.py`` and ``a/b/__init__.py`` first."""
    found = set()
    for name in names:
        while name:
            if name in modules:
                found.add(name)
            name = name.rpartition(".")[0]
    return found


def _targets(
    node: ast.Import | ast.ImportFrom, package: str, modules: Mapping[str, Path]
) -> set[str]:
    """The modules of ours an import statement loads, the packages above them included;
    relative ones are resolved against ``package`` (the package the importing module is
    in)."""
    if isinstance(node, ast.Import):
        return _with_packages({_ours(alias.name, modules) for alias in node.names}, modules)
    if node.level:
        base = package.split(".")
        base = base[: len(base) - (node.level - 1)]
        module = ".".join([*base, node.module] if node.module else base)
    else:
        module = node.module or ""
    # ``from a import b``: a.b when it is a module; a itself for a name defined in a
    found: set[str | None] = set()
    for alias in node.names:
        name = f"{module}.{alias.name}"
        found.add(name if name in modules else _ours(module, modules))
    return _with_packages(found, modules)


def import_graph(src: Path, root: str) -> dict[str, set[str]]:
    """Module -> the modules of ours it imports, anywhere in its source."""
    modules = module_names(src, root)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import | ast.ImportFrom):
                graph[name] |= _targets(node, package, modules) - {name}
    return graph


def _components(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """The strongly connected components (Tarjan), iteratively."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph.get(nxt, ())))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        comp.append(member)
                        if member == node:
                            break
                    found.append(sorted(comp))
    return found


def _shortest_cycle(graph: Mapping[str, set[str]], members: list[str]) -> list[str]:
    """A shortest cycle through the first of ``members`` (one strongly connected component),
    as ``[a, b, ..., a]``."""
    inside = set(members)
    start = members[0]
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph[node] & inside):
                if nxt == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    return [start, *reversed(path[:-1]), start] if len(path) > 1 else [start, start]
                if nxt not in came_from:
                    came_from[nxt] = node
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"no cycle through {start}")


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """One shortest cycle for each group of modules that import each other."""
    return [
        _shortest_cycle(graph, comp)
        for comp in _components(graph)
        if len(comp) > 1 or comp[0] in graph[comp[0]]
    ]


def layer(module: str) -> str:
    """``batchd.api.routes`` -> ``api``; ``batchd.models`` -> ``models``."""
    return module.split(".")[1] if "." in module else module


def layer_violations(graph: Mapping[str, set[str]]) -> list[str]:
    """Every edge that breaks :data:`FORBIDDEN`, :data:`ALLOWED`, :data:`STORE_IN_API` or
    :data:`IMPORTED_BY_NONE`."""
    bad = []
    for module, targets in sorted(graph.items()):
        own = layer(module)
        forbidden = FORBIDDEN.get(own, frozenset())
        for target in sorted(targets):
            other = layer(target)
            if other == own or target == ROOT:
                continue
            if (
                "*" in forbidden
                or other in forbidden
                or other in IMPORTED_BY_NONE
                or (own in ALLOWED and other not in ALLOWED[own])
                or (own == "api" and other == "store" and module not in STORE_IN_API)
            ):
                bad.append(f"{module} -> {target}")
    return bad


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(SRC, ROOT)


def test_no_import_cycles(graph: dict[str, set[str]]) -> None:
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join("  " + " -> ".join(c) for c in found)


def test_layers_import_only_downwards(graph: dict[str, set[str]]) -> None:
    bad = layer_violations(graph)
    assert not bad, "imports that break docs/architecture.md's rules:\n  " + "\n  ".join(bad)


def test_every_layer_in_the_rules_exists(graph: dict[str, set[str]]) -> None:
    layers = {layer(m) for m in graph}
    assert set(FORBIDDEN) | IMPORTED_BY_NONE | set(ALLOWED) <= layers
    assert set().union(*ALLOWED.values()) <= layers
    assert STORE_IN_API <= set(graph)


def test_the_api_modules_allowed_the_store_use_it(graph: dict[str, set[str]]) -> None:
    """The allow-list is no wider than the truth: each module on it imports the store."""
    assert {
        m
        for m, targets in graph.items()
        if layer(m) == "api" and any(layer(t) == "store" for t in targets)
    } == STORE_IN_API


# -- the reader itself, on a package written for the test -----------------------------------


def _write(root: Path, files: Mapping[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_reader_sees_every_kind_of_import(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/a.py": "import os\nfrom pkg import b\n",
            "pkg/b.py": "def f():\n    from .sub.c import thing\n    return thing\n",
            "pkg/sub/__init__.py": "from . import d\n",
            "pkg/sub/c.py": (
                "from typing import TYPE_CHECKING\n"
                "if TYPE_CHECKING:\n    from ..a import x\n"
                "import pkg.sub.d as alias\n"
            ),
            "pkg/sub/d.py": "from pkg.e import Name\nfrom pkg import missing\n",
            "pkg/e.py": "",
        },
    )
    assert import_graph(tmp_path, "pkg") == {
        "pkg": set(),
        "pkg.a": {"pkg.b", "pkg"},
        "pkg.b": {"pkg.sub.c", "pkg.sub", "pkg"},
        "pkg.sub": {"pkg.sub.d", "pkg"},
        "pkg.sub.c": {"pkg.a", "pkg.sub.d", "pkg.sub", "pkg"},
        "pkg.sub.d": {"pkg.e", "pkg"},
        "pkg.e": set(),
    }


def test_importing_a_module_imports_the_packages_above_it(tmp_path: Path) -> None:
    """``import a.b.c`` runs ``a/__init__.py`` and ``a/b/__init__.py``: a package whose
    ``__init__`` imports back is a cycle, though no module names it."""
    _write(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/low/__init__.py": "from pkg.high import api\n",
            "pkg/low/deep/__init__.py": "",
            "pkg/low/deep/leaf.py": "",
            "pkg/high/__init__.py": "",
            "pkg/high/api.py": "def f():\n    import pkg.low.deep.leaf\n",
        },
    )
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.high.api"] == {"pkg.low.deep.leaf", "pkg.low.deep", "pkg.low", "pkg"}
    assert cycles(graph) == [["pkg.high.api", "pkg.low", "pkg.high.api"]]


def test_a_cycle_is_found_and_named(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/a.py": "from pkg import b\n",
            "pkg/b.py": "def f():\n    from pkg import c\n",
            "pkg/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.a\n",
            "pkg/d.py": "from pkg import a\n",
        },
    )
    graph = import_graph(tmp_path, "pkg")
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"]]


def test_two_modules_importing_each_other_are_a_cycle() -> None:
    graph = {"x.a": {"x.b"}, "x.b": {"x.a"}, "x.c": set()}
    assert cycles(graph) == [["x.a", "x.b", "x.a"]]


def test_layer_rules_catch_an_upward_import() -> None:
    graph = {
        "batchd.service.files": {"batchd.api.routes", "batchd.store.sql"},
        "batchd.models": {"batchd.errors"},
        "batchd.engine.worker": {"batchd.service.files", "batchd.testing.fake_upstream"},
    }
    assert layer_violations(graph) == [
        "batchd.engine.worker -> batchd.testing.fake_upstream",
        "batchd.models -> batchd.errors",
        "batchd.service.files -> batchd.api.routes",
    ]


def test_store_and_blobs_import_only_what_their_allow_list_names() -> None:
    graph = {
        "batchd.store.queue": {"batchd.store.rows", "batchd.models", "batchd.errors"},
        "batchd.store.connect": {"batchd.filemodes", "batchd.config", "batchd"},
        "batchd.store.codec": {"batchd.tokens", "batchd.envelopes"},
        "batchd.blobs.s3": {"batchd.config", "batchd.errors", "batchd.blobs.base"},
        "batchd.blobs.local": {"batchd.store.files"},
    }
    assert layer_violations(graph) == [
        "batchd.blobs.local -> batchd.store.files",
        "batchd.store.codec -> batchd.envelopes",
        "batchd.store.codec -> batchd.tokens",
        "batchd.store.connect -> batchd.config",
    ]


def test_only_the_named_api_modules_reach_the_store() -> None:
    graph = {
        "batchd.api.app": {"batchd.store.protocols", "batchd.store"},
        "batchd.api.readiness": {"batchd.store.protocols"},
        "batchd.api.messages": {"batchd.service.message_batches", "batchd.store"},
        "batchd.api.upload": {"batchd.store.memory"},
    }
    assert layer_violations(graph) == [
        "batchd.api.messages -> batchd.store",
        "batchd.api.upload -> batchd.store.memory",
    ]
