"""protocol/ and sync/ stay sans-I/O (docs/architecture.md §1): checked statically over the source.

Every module under those packages is parsed with `ast`; its imports are followed through every
`chefia_rt` module they reach (package `__init__`s included, since importing `a.b` runs `a`),
and no module on the way may import an I/O or concurrency library.
"""

from __future__ import annotations

import ast
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "chefia_rt"
PURE_PACKAGES = ("chefia_rt.protocol", "chefia_rt.sync")
FORBIDDEN = frozenset(
    {
        "asyncio",
        "websockets",
        "asyncpg",
        "redis",
        "sqlite3",
        "socket",
        "uvloop",
        "aiosqlite",
        "prometheus_client",
        "threading",
        "subprocess",
    }
)

# module name -> (source, is_package), or None if there is no such chefia_rt module
Loader = Callable[[str], "tuple[str, bool] | None"]


def load_from_disk(module: str) -> tuple[str, bool] | None:
    base = ROOT.joinpath(*module.split("."))
    if (base / "__init__.py").is_file():
        return (base / "__init__.py").read_text(encoding="utf-8"), True
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py").read_text(encoding="utf-8"), False
    return None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_nodes(node: ast.AST) -> Iterator[ast.AST]:
    """Every node that can run, skipping `if TYPE_CHECKING:` bodies (never executed)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for other in child.orelse:
                yield other
                yield from _runtime_nodes(other)
            continue
        yield child
        yield from _runtime_nodes(child)


def imported_names(source: str, module: str, is_package: bool) -> set[str]:
    """Absolute names of everything `module` may import, at top level or inside functions.

    `from a import b` yields both `a` and `a.b` (b may be a submodule); relative imports are
    resolved against `module`; `importlib.import_module("x")` and `__import__("x")` with a
    literal name count too.
    """
    tree = ast.parse(source, filename=module)
    package = module if is_package else module.rpartition(".")[0]
    names: set[str] = set()
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base_parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join([*base_parts, node.module] if node.module else base_parts)
            else:
                base = node.module or ""
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            first = node.args[0]
            if (
                called in ("import_module", "__import__")
                and isinstance(first, ast.Constant)
                and isinstance(first.value, str)
            ):
                names.add(first.value)
    return names


def _with_parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def forbidden_imports(start: list[str], load: Loader) -> list[str]:
    """Chains like `chefia_rt.sync.engine -> chefia_rt.domain -> asyncio`, one per violation."""
    chains: dict[str, list[str]] = {}
    queue: list[str] = []
    for module in start:
        for name in _with_parents(module):
            if name not in chains:
                chains[name] = [name] if name == module else [module, name]
                queue.append(name)
    violations: list[str] = []
    seen: set[str] = set()
    while queue:
        module = queue.pop(0)
        if module in seen:
            continue
        seen.add(module)
        found = load(module)
        if found is None:
            continue  # `from pkg import function`: not a module
        source, is_package = found
        for name in sorted(imported_names(source, module, is_package)):
            top = name.partition(".")[0]
            if top in FORBIDDEN:
                violations.append(" -> ".join([*chains[module], name]))
            elif top == PACKAGE:
                for step in _with_parents(name):
                    if step not in chains:
                        chains[step] = [*chains[module], step]
                        queue.append(step)
    return violations


def pure_modules() -> list[str]:
    modules = []
    for package in PURE_PACKAGES:
        directory = ROOT.joinpath(*package.split("."))
        for path in sorted(directory.rglob("*.py")):
            relative = path.relative_to(ROOT).with_suffix("")
            parts = relative.parts[:-1] if relative.name == "__init__" else relative.parts
            modules.append(".".join(parts))
    return modules


# ---- the rule ------------------------------------------------------------------------------


def test_pure_packages_are_found() -> None:
    modules = pure_modules()
    assert "chefia_rt.protocol.codec" in modules
    assert "chefia_rt.protocol.messages" in modules
    assert "chefia_rt.sync" in modules


@pytest.mark.parametrize("module", pure_modules())
def test_protocol_and_sync_import_no_io(module: str) -> None:
    violations = forbidden_imports([module], load_from_disk)
    assert not violations, "sans-I/O module imports I/O:\n" + "\n".join(violations)


# The terminal client's rules (docs/clients.md). Their package re-exports the asyncio Client, so
# its __init__ is not followed: what is held is that these modules, and all they import, do no I/O.
CLIENT_RULES = ("chefia_rt.client.core", "chefia_rt.client.stream", "chefia_rt.client.model")


@pytest.mark.parametrize("module", CLIENT_RULES)
def test_the_clients_rules_import_no_io(module: str) -> None:
    def load(name: str) -> tuple[str, bool] | None:
        return ("", True) if name == "chefia_rt.client" else load_from_disk(name)

    assert load_from_disk(module) is not None
    violations = forbidden_imports([module], load)
    assert not violations, "sans-I/O module imports I/O:\n" + "\n".join(violations)


def test_transitive_walk_reaches_shared_modules() -> None:
    # The walk really follows chefia_rt imports: codec pulls in chefia_rt.errors.
    source, is_package = load_from_disk("chefia_rt.protocol.codec") or ("", False)
    assert "chefia_rt.errors" in imported_names(source, "chefia_rt.protocol.codec", is_package)


# ---- the checker can fail ------------------------------------------------------------------


def fake_tree(modules: dict[str, str]) -> Loader:
    packages = {name.rpartition(".")[0] for name in modules} | {PACKAGE}

    def load(module: str) -> tuple[str, bool] | None:
        if module in modules:
            return modules[module], module in packages
        if module in packages:
            return "", True
        return None

    return load


@pytest.mark.parametrize(
    "source",
    [
        "import asyncio",
        "import asyncio.subprocess",
        "import os, socket as s",
        "from redis.asyncio import Redis",
        "from websockets.asyncio.server import serve",
        "from concurrent import futures\nimport threading",
        "def later():\n    import sqlite3\n",
        "try:\n    import uvloop\nexcept ImportError:\n    pass\n",
        "import importlib\nmod = importlib.import_module('asyncpg')",
        "prom = __import__('prometheus_client')",
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    pass\nelse:\n"
        "    import aiosqlite",
    ],
)
def test_checker_detects_a_direct_forbidden_import(source: str) -> None:
    load = fake_tree({"chefia_rt.protocol.bad": source})
    assert forbidden_imports(["chefia_rt.protocol.bad"], load)


@pytest.mark.parametrize(
    ("modules", "chain"),
    [
        (
            {
                "chefia_rt.sync.engine": "from chefia_rt.domain import Entity",
                "chefia_rt.domain": "import chefia_rt.clock",
                "chefia_rt.clock": "import asyncio",
            },
            "chefia_rt.sync.engine -> chefia_rt.domain -> chefia_rt.clock -> asyncio",
        ),
        (
            {
                "chefia_rt.sync.engine": "from . import locks",
                "chefia_rt.sync.locks": "from ..bus import memory",
                "chefia_rt.bus.memory": "import threading",
            },
            "chefia_rt.sync.engine -> chefia_rt.sync.locks -> chefia_rt.bus.memory -> threading",
        ),
        (
            {
                "chefia_rt.sync.engine": "from chefia_rt.store.base import Store",
                "chefia_rt.store": "from chefia_rt.store.sqlite import SqliteStore",
                "chefia_rt.store.sqlite": "import sqlite3",
            },
            "chefia_rt.store -> chefia_rt.store.sqlite -> sqlite3",
        ),
        (
            {
                "chefia_rt.sync.engine": "import json",
                "chefia_rt": "from chefia_rt import server",
                "chefia_rt.server": "import websockets",
            },
            "chefia_rt -> chefia_rt.server -> websockets",  # the parent package runs first
        ),
    ],
)
def test_checker_follows_chefia_imports_transitively(modules: dict[str, str], chain: str) -> None:
    violations = forbidden_imports(["chefia_rt.sync.engine"], fake_tree(modules))
    assert any(chain in violation for violation in violations), violations


@pytest.mark.parametrize(
    "source",
    [
        "import json, math, re\nfrom dataclasses import dataclass",
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import asyncio",
        "import typing\nif typing.TYPE_CHECKING:\n    from redis import Redis",
        "import asyncio_helpers_that_are_not_asyncio\nimport sockets_like",
        "# import asyncio\ntext = 'import socket'",
        "import msgpack, lz4.frame, pydantic",
    ],
)
def test_checker_passes_clean_code(source: str) -> None:
    load = fake_tree({"chefia_rt.protocol.ok": source})
    assert forbidden_imports(["chefia_rt.protocol.ok"], load) == []


def test_checker_survives_import_cycles() -> None:
    load = fake_tree(
        {
            "chefia_rt.sync.a": "from chefia_rt.sync import b",
            "chefia_rt.sync.b": "from chefia_rt.sync import a\nimport subprocess",
        }
    )
    assert forbidden_imports(["chefia_rt.sync.a"], load) == [
        "chefia_rt.sync.a -> chefia_rt.sync.b -> subprocess"
    ]
