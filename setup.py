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
from setuptools.command.build_ext import build_ext


class BuildExt(build_ext):
    """Marks every compiled module as built now, recompiled or not: the tests' check
    for a module edited after its build (gateway.stale_extensions) compares times, and
    mypyc rightly skips recompiling a source whose edit changed no code."""

    def run(self) -> None:
        super().run()
        for ext in self.extensions:
            path = self.get_ext_fullpath(ext.name)  # in the source tree when in place
            if os.path.exists(path):
                os.utime(path)


COMPILED = [
    "gateway/dataplane/affinity.py",
    "gateway/dataplane/context.py",
    "gateway/dataplane/exchange.py",
    "gateway/dataplane/listener.py",
    "gateway/dataplane/outliers.py",
    "gateway/dataplane/pool.py",
    "gateway/dataplane/ratelimit.py",
    "gateway/dataplane/routing.py",
    "gateway/dataplane/split.py",
    "gateway/dataplane/stats.py",
    "gateway/dataplane/wire.py",
    "registry/core/balancer.py",
    "registry/core/errors.py",
    "registry/core/models.py",
    "registry/core/policy.py",
    "registry/core/store.py",
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


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt})
