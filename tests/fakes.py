"""Test doubles shared by the unit tests of the pure core."""

from __future__ import annotations


class FakeClock:
    """A wall clock that only moves when a test says so.

    Pass it wherever the code takes a clock (a callable returning seconds).
    """

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


class FakeTransport:
    """An asyncio transport without a socket, for the data plane's Protocols.

    What is written is kept in ``out``; ``reading`` says whether the protocol has
    paused it; ``closed``/``aborted`` record close() and abort(). Nothing is called
    back: a test calls the protocol's connection_lost itself, as asyncio would.
    benchmarks/requestpath.py drives the request path with it too.
    """

    def __init__(self, peer: tuple[str, int] = ("127.0.0.1", 5555)) -> None:
        self.out: list[bytes] = []
        self.peer = peer
        self.reading = True
        self.closed = False
        self.aborted = False
        self.buffered = 0  # what get_write_buffer_size answers

    def written(self) -> bytes:
        """Everything written since the last call."""
        data = b"".join(self.out)
        self.out.clear()
        return data

    def write(self, data: bytes) -> None:
        self.out.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: object = None) -> object:
        return self.peer if name == "peername" else default

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = self.aborted = True
