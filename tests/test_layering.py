"""The pure core never imports the I/O stack (STYLE: pure core, thin I/O shell)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PURE_MODULES = [
    "registry.units",
    "registry.models",
    "registry.balancer",
    "registry.store",
    "gateway.routing",
    "gateway.headers",
]

PROBE = """
import importlib, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
print(" ".join(sorted(m for m in sys.modules if m.split(".")[0] in ("aiohttp", "asyncio"))))
"""


def imported_io_modules(*modules: str) -> list[str]:
    result = subprocess.run(
        [sys.executable, "-c", PROBE, *modules],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_a_bare_interpreter_has_neither() -> None:
    assert imported_io_modules() == []


@pytest.mark.parametrize("module", PURE_MODULES)
def test_pure_module_does_not_import_aiohttp_or_asyncio(module: str) -> None:
    assert imported_io_modules(module) == []


def test_all_pure_modules_together() -> None:
    assert imported_io_modules(*PURE_MODULES) == []
