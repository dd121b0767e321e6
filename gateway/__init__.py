"""The gateway: an API gateway with a built-in service registry."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path


def version() -> str:
    """The installed package's version ("unknown" when run from a bare checkout)."""
    try:
        return importlib.metadata.version("gateway")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def data_plane_build() -> str:
    """Which build of the hot path got imported: "compiled" (setup.py's mypyc build) or
    "pure Python" (no C compiler at install time, or GATEWAY_PURE_PYTHON=1)."""
    from gateway.dataplane import exchange

    return "pure Python" if exchange.__file__.endswith(".py") else "compiled"


def stale_extensions(root: Path | None = None) -> list[str]:
    """Sources edited after their compiled module was built (an editable install):
    Python imports the old compiled code, not the edit. Rebuild: pip install -e .
    The test suite refuses to start with any; ``gateway run`` warns of them."""
    root = root or Path(__file__).resolve().parent.parent
    stale = []
    for built in [*root.glob("gateway/**/*.so"), *root.glob("registry/**/*.so")]:
        source = built.with_name(built.name.split(".")[0] + ".py")
        if source.exists() and source.stat().st_mtime > built.stat().st_mtime:
            stale.append(str(source.relative_to(root)))
    return sorted(stale)
