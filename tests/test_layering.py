"""The layers of the tree, enforced (README "Layout"; STYLE: pure core, thin I/O shell).

- registry never imports gateway: it is usable (and testable) without the proxy;
- gateway/dataplane never imports aiohttp, yaml or prometheus_client: the hot path is
  asyncio, httptools and plain integers; the control plane does the rest;
- the pure core (registry/core, the data plane's routing, wire and stats, the config
  model) imports no asyncio: it is logic, driven by the shells around it;
- inside the data plane, runtime imports go one way (listener -> exchange -> context
  -> pool ...); the way back is for type checking only.

Each rule is checked twice: on the source (every import statement, also those inside
functions) and in a fresh interpreter (what importing the modules really loads).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def modules_under(folder: str) -> list[str]:
    return sorted(
        ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for path in (ROOT / folder).rglob("*.py")
    )


REGISTRY = modules_under("registry")
DATAPLANE = modules_under("gateway/dataplane")
PURE = [
    *modules_under("registry/core"),
    "gateway.dataplane.routing",
    "gateway.dataplane.split",
    "gateway.dataplane.wire",
    "gateway.dataplane.stats",
    "gateway.config.model",
]


def imports_of(module: str, *, runtime_only: bool = False) -> set[str]:
    """Every module an import statement of ``module`` names (relative ones resolved).
    With ``runtime_only``: module-level statements outside ``if TYPE_CHECKING``."""
    path = ROOT / Path(*module.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    tree = ast.parse(path.read_text())
    nodes = list(ast.walk(tree))
    if runtime_only:
        nodes = [
            node
            for top in tree.body
            if not (isinstance(top, ast.If) and "TYPE_CHECKING" in ast.unparse(top.test))
            for node in ast.walk(top)
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        ]
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


PROBE = """
import importlib, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
print(" ".join(sorted({m.split(".")[0] for m in sys.modules})))
"""


def loaded_by(*modules: str) -> set[str]:
    """The top-level packages a fresh interpreter has loaded after importing ``modules``."""
    result = subprocess.run(
        [sys.executable, "-c", PROBE, *modules],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return set(result.stdout.split())


def _top(names: set[str]) -> set[str]:
    return {name.split(".")[0] for name in names}


def test_the_probe_sees_what_is_imported() -> None:
    assert "asyncio" not in loaded_by()
    assert "asyncio" in loaded_by("asyncio")


@pytest.mark.parametrize("module", REGISTRY)
def test_registry_never_imports_gateway(module: str) -> None:
    assert "gateway" not in _top(imports_of(module))


def test_importing_all_of_registry_loads_no_gateway() -> None:
    assert "gateway" not in loaded_by(*REGISTRY)


FORBIDDEN_IN_DATAPLANE = {"aiohttp", "yaml", "prometheus_client"}


@pytest.mark.parametrize("module", DATAPLANE)
def test_dataplane_never_imports_aiohttp_yaml_or_prometheus(module: str) -> None:
    assert not _top(imports_of(module)) & FORBIDDEN_IN_DATAPLANE


def test_importing_the_whole_dataplane_loads_none_of_them() -> None:
    assert not loaded_by(*DATAPLANE) & FORBIDDEN_IN_DATAPLANE


@pytest.mark.parametrize("module", PURE)
def test_pure_core_imports_no_io(module: str) -> None:
    assert not _top(imports_of(module)) & {"asyncio", "aiohttp", "socket", "yaml"}


def test_importing_the_whole_pure_core_loads_no_asyncio() -> None:
    assert not loaded_by(*PURE) & {"asyncio", "aiohttp", "yaml"}


def test_dataplane_runtime_imports_have_no_cycle() -> None:
    graph = {
        module: {name for name in imports_of(module, runtime_only=True) if name in DATAPLANE}
        for module in DATAPLANE
    }
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, " -> ".join([*path, module])
        if module in done:
            return
        for imported in graph[module]:
            visit(imported, (*path, module))
        done.add(module)

    for module in DATAPLANE:
        visit(module, ())
