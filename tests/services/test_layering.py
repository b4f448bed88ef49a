"""The package's import structure as docs/architecture.md draws it: imports point downward only,
there are no import cycles, and the client is importable without torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT

PACKAGE = ROOT / "services"

# Layer of each part of the package (higher may import lower, never the reverse): a top-level
# module or package, or a module of a package listed by its dotted name ("cli.jobs"), which then
# has a layer of its own. Parts at the same layer never import each other: the three services share
# datasets, factor sets, indexes and results through the catalog, never through a sibling.
LAYERS = {
    "services": 0,  # the package's __init__
    "errors": 0,
    "wire": 0,
    "gen": 0,
    "options": 1,  # every job setting once: default, range, help (CLI, engine configs, servicers)
    "enums": 2,
    "logs": 2,
    "engine": 2,
    "storage": 3,
    "jobs": 3,
    "catalog": 4,  # the resources the services share: names, infos, publish/read/list/delete
    "system": 4,
    "rpc": 4,
    "gradient_svc": 5,
    "factor_svc": 5,
    "query_svc": 5,
    "assembly": 6,
    "client": 7,  # a package: channel, transfers, connection, resources
    "toy": 7,
    "embedded": 8,
    "launcher": 8,  # Kubernetes Jobs of workers for one operation (reads it through the client)
    # the `influence` command (services/cli/): building blocks, then the command groups, then the table
    "cli.flags": 7,
    "cli.progress": 7,
    "cli.running": 9,
    "cli.inputs": 9,
    "cli.demo": 9,
    "cli.jobs": 10,
    "cli.index": 10,
    "cli.operations": 10,
    "cli.servers": 10,
    "cli": 11,  # the command table, build_parser and main (services/cli/__init__.py, __main__.py)
}
SERVICES = ("factor_svc", "gradient_svc", "query_svc")
# the client stays light: no torch, no server-side modules
CLIENT_MAY_IMPORT = {"errors", "wire", "options", "enums", "gen", "engine.records"}


def module_name(path: Path) -> str:
    relative = path.relative_to(ROOT).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Absolute names of the services.* modules `path` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text())
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("services"):
                for alias in node.names:  # `from . import layout` imports a module
                    candidate = f"{target}.{alias.name}"
                    found.add(candidate if (ROOT / candidate.replace(".", "/")).with_suffix(".py").exists() else target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("services"))
    return found


def part_of(module: str) -> str:
    """The LAYERS key of `module`: its dotted name within the package, if listed, else its top-level part."""
    parts = module.split(".")[1:] or ["services"]
    return ".".join(parts[:2]) if ".".join(parts[:2]) in LAYERS else parts[0]


SOURCES = sorted(path for path in PACKAGE.rglob("*.py") if "gen" not in path.relative_to(PACKAGE).parts)
GRAPH = {module_name(path): {m for m in imports_of(path) if m != module_name(path)} for path in SOURCES}


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_point_downward(module):
    here = part_of(module)
    assert here in LAYERS, f"{module}: add its part to LAYERS (and to docs/architecture.md)"
    for target in GRAPH[module]:
        there = part_of(target)
        if there == here:
            continue
        assert LAYERS[there] < LAYERS[here], f"{module} imports {target}: {here} (layer {LAYERS[here]}) -> {there}"


def test_services_import_the_catalog_never_each_other():
    for module, targets in GRAPH.items():
        here = part_of(module)
        if here in SERVICES:
            siblings = sorted(t for t in targets if part_of(t) in SERVICES and part_of(t) != here)
            assert not siblings, f"{module} imports {siblings}: share it through services/catalog instead"


def test_there_are_no_import_cycles():
    graph = {module: {t for t in targets if t in GRAPH} for module, targets in GRAPH.items()}
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycle = [*path[path.index(target) :], target] if target in path else [module, target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_the_client_imports_neither_torch_nor_server_modules():
    allowed = {f"services.{name}" for name in [*CLIENT_MAY_IMPORT, "client"]}
    client = {module: targets for module, targets in GRAPH.items() if part_of(module) == "client"}
    assert len(client) > 1, "the client package's modules"
    for module, targets in client.items():
        assert all(any(t == a or t.startswith(a + ".") for a in allowed) for t in targets), (module, targets)
    code = "import sys, services.client; assert 'torch' not in sys.modules, 'torch imported'; print('ok')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.stdout.strip() == "ok", result.stderr
