"""Who imports whom, read from the source: no import cycles in the daemon, handlers that see no more of it than
their context, a client that needs only the protocol, and a protocol that needs only itself.

`import_graph` reads every module of a package with `ast` (nothing is imported or run) and lists what each one
imports: at the top, inside functions (lazy imports) and under `if TYPE_CHECKING:`, or, with
`when_imported=True`, only what runs when the module itself is imported (what an import cycle is made of).
"""

from __future__ import annotations

import ast
import sys
from collections import deque
from collections.abc import Iterable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: The packages of this repository; an import of anything else is a third-party or standard module.
FIRST_PARTY = ("numerusd", "numerusctl")
#: All the client may use besides the protocol and the standard library.
CLIENT_PACKAGES = ("nats", "click", "msgspec")
#: The one client module that may import textual: `numerusctl top`'s view (imported by that command alone).
TERMINAL_UI = "numerusctl.top"
#: What the protocol must not touch: it is types and pure functions, shared by both programs.
NOT_IN_PROTOCOL = ("nats", "asyncio", "aiosqlite", "sqlite3", "subprocess", "socket", "uvloop")


def modules_of(package: str, root: Path = ROOT) -> dict[str, Path]:
    """Module name -> file, for every module of the package at `root/package` (a package by its `__init__`)."""
    found: dict[str, Path] = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class _Imports(ast.NodeVisitor):
    """Collects the absolute names a module imports."""

    def __init__(self, module: str, is_package: bool, known: set[str], when_imported: bool) -> None:
        self.package = module if is_package else module.rpartition(".")[0]
        self.known = known
        self.when_imported = when_imported
        self.names: set[str] = set()

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> None:
        if not self.when_imported:  # a function's imports run when it is called, not when its module is imported
            self.generic_visit(node)

    visit_AsyncFunctionDef = visit_FunctionDef
    visit_Lambda = visit_FunctionDef

    def visit_If(self, node: ast.If) -> None:
        if self.when_imported and _is_type_checking(node.test):
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        self.names.update(alias.name for alias in node.names)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            parts = self.package.split(".")
            base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        for alias in node.names:
            # `from a import b` imports the module a.b when there is one, else a name defined in a.
            self.names.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in self.known else base)


def import_graph(
    package: str, *, when_imported: bool = False, root: Path = ROOT, first_party: Iterable[str] = FIRST_PARTY
) -> dict[str, set[str]]:
    """Module -> the modules it imports (absolute names, third-party ones too), for every module of `package`.

    With `when_imported`, only the imports that run when the module is imported: neither those inside
    functions nor those under `if TYPE_CHECKING:`.
    """
    known = {name for top in {package, *first_party} for name in modules_of(top, root)}
    graph: dict[str, set[str]] = {}
    for module, path in modules_of(package, root).items():
        visitor = _Imports(module, path.name == "__init__.py", known, when_imported)
        visitor.visit(ast.parse(path.read_text(), filename=str(path)))
        graph[module] = visitor.names
    return graph


def reachable(graph: dict[str, set[str]], start: str) -> dict[str, list[str]]:
    """Every module of `graph` that importing `start` can run, each with a shortest chain of imports leading to it.

    Importing `a.b.c` runs `a` and `a.b` first: a module's parent packages count as imported with it.
    """
    chains: dict[str, list[str]] = {}
    todo: deque[tuple[str, list[str]]] = deque([(start, [])])
    while todo:
        name, via = todo.popleft()
        parts = name.split(".")
        for depth in range(1, len(parts) + 1):
            target = ".".join(parts[:depth])
            if target in graph and target not in chains:
                chains[target] = [*via, target]
                todo.extend((imported, chains[target]) for imported in sorted(graph[target]))
    return chains


def _in_protocol(module: str) -> bool:
    return module == "numerusd.protocol" or module.startswith("numerusd.protocol.")


def test_numerusctl_imports_nothing_of_numerusd_but_the_protocol():
    graph = import_graph("numerusctl") | import_graph("numerusd")
    leaks = []
    for module in (name for name in graph if name.split(".")[0] == "numerusctl"):
        for target, chain in reachable(graph, module).items():
            # The package `numerusd` itself runs on the way to its protocol: it must stay empty of imports.
            if target.split(".")[0] == "numerusd" and target != "numerusd" and not _in_protocol(target):
                leaks.append(" -> ".join(chain))
    assert sorted(leaks) == []
    assert graph["numerusd"] == set()


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of `graph` among its own modules: each strongly connected set of two or more, sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in sorted(graph[module] & graph.keys()):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return sorted(found)


def test_no_module_of_numerusd_imports_one_that_imports_it_back():
    """Lazy and TYPE_CHECKING imports count: a module that needs a type of the one importing it is a cycle too."""
    assert cycles(import_graph("numerusd")) == []


def test_handlers_see_the_daemon_only_through_their_context():
    graph = import_graph("numerusd")
    forbidden = {"numerusd.daemon", "numerusd.runner", "numerusd.pipeline", "numerusd.supervisor"}
    leaks = [
        " -> ".join(chain)
        for module in graph
        if module.startswith("numerusd.handlers") or module == "numerusd.service"
        for target, chain in reachable(graph, module).items()
        if target in forbidden
    ]
    assert leaks == []


def test_numerusctl_needs_nothing_but_nats_click_msgspec_and_the_standard_library():
    graph = import_graph("numerusctl") | import_graph("numerusd")
    used = {
        name.split(".")[0]: module
        for start in graph
        if start.split(".")[0] == "numerusctl"
        for module in reachable(graph, start)
        for name in graph[module]
    }
    others = set(used) - set(FIRST_PARTY) - set(CLIENT_PACKAGES) - sys.stdlib_module_names
    assert {name: used[name] for name in others} == {"textual": TERMINAL_UI}
    assert sorted(module for module in graph if "textual" in {name.split(".")[0] for name in graph[module]}) == [
        TERMINAL_UI
    ]


def test_the_protocol_imports_nothing_of_the_daemon_and_does_no_io():
    graph = import_graph("numerusd")
    protocol = [name for name in graph if _in_protocol(name)]
    assert "numerusd.protocol.subjects" in protocol and "numerusd.protocol.exit_codes" in protocol
    outside = {
        module: sorted(name for name in graph[module] if name.split(".")[0] in FIRST_PARTY and not _in_protocol(name))
        for module in protocol
    }
    assert {module: names for module, names in outside.items() if names} == {}
    machinery = {
        module: sorted(name for name in graph[module] if name.split(".")[0] in NOT_IN_PROTOCOL) for module in protocol
    }
    assert {module: names for module, names in machinery.items() if names} == {}


@pytest.fixture
def toy(tmp_path: Path) -> Path:
    """A package exercising every kind of import the graph must see."""
    pkg = tmp_path / "toy"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from . import leaf\n")
    (pkg / "sub" / "leaf.py").write_text("from ..base import thing\n")
    (pkg / "base.py").write_text("thing = 1\n")
    (pkg / "user.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "import toy.base\n"
        "if TYPE_CHECKING:\n    from toy.sub import leaf\n"
        "def later():\n    from toy.sub.leaf import thing\n    import json\n    return thing, json\n"
        "class Holder:\n    from toy import base\n"
    )
    return tmp_path


def test_the_graph_sees_relative_lazy_and_type_checking_imports(toy: Path):
    graph = import_graph("toy", root=toy, first_party=())
    assert graph == {
        "toy": set(),
        "toy.base": set(),
        "toy.sub": {"toy.sub.leaf"},
        "toy.sub.leaf": {"toy.base"},
        "toy.user": {"typing", "toy.base", "toy.sub.leaf", "json"},
    }
    assert import_graph("toy", root=toy, first_party=(), when_imported=True)["toy.user"] == {"typing", "toy.base"}
    assert reachable(graph, "toy.user")["toy.base"] == ["toy.user", "toy.base"]
    assert reachable(graph, "toy.sub.leaf") == {
        "toy": ["toy"],
        "toy.sub": ["toy.sub"],
        "toy.sub.leaf": ["toy.sub.leaf"],
        "toy.base": ["toy.sub.leaf", "toy.base"],
    }


def test_a_cycle_is_found_however_it_is_imported(toy: Path):
    (toy / "toy" / "base.py").write_text("thing = 1\ndef back():\n    from toy import user\n    return user\n")
    assert cycles(import_graph("toy", root=toy, first_party=())) == [["toy.base", "toy.sub.leaf", "toy.user"]]
    assert cycles(import_graph("toy", root=toy, first_party=(), when_imported=True)) == []
