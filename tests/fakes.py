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
