"""The gateway: an API gateway with a built-in service registry."""


def data_plane_build() -> str:
    """ "compiled" when setup.py's mypyc build of the hot path is what got imported,
    else "pure Python" (no C compiler at install time, or GATEWAY_PURE_PYTHON=1)."""
    from gateway import exchange

    return "pure Python" if exchange.__file__.endswith(".py") else "compiled"
