"""Build: the data plane's hot-path modules are compiled with mypyc when possible.

mypyc turns these (fully typed) modules into C extensions: the same source, about
half the instructions a proxied request (see benchmarks/README.md). When mypyc or a
C compiler is missing, or GATEWAY_PURE_PYTHON=1 is set, the package installs as
plain Python and behaves the same, only slower.
"""

from __future__ import annotations

import os
import sys

from setuptools import setup

COMPILED = [
    "gateway/exchange.py",
    "gateway/headers.py",
    "gateway/listener.py",
    "gateway/metrics.py",
    "gateway/outliers.py",
    "gateway/pool.py",
    "gateway/proxy.py",
    "gateway/routing.py",
    "registry/balancer.py",
    "registry/models.py",
    "registry/store.py",
]


def extensions() -> list[object]:
    if os.environ.get("GATEWAY_PURE_PYTHON") == "1":
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        print("mypyc is not available: installing the pure Python build", file=sys.stderr)
        return []
    try:
        modules = mypycify(COMPILED, opt_level="3")
    except (Exception, SystemExit) as exc:  # mypyc reports a type error by exiting
        print(f"mypyc failed ({exc}): installing the pure Python build", file=sys.stderr)
        return []
    for module in modules:
        module.optional = True  # no C compiler: fall back to the pure Python modules
    return modules


setup(ext_modules=extensions())
