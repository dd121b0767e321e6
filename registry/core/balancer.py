"""Weighted round-robin in O(log n) a pick: earliest virtual deadline first. Pure.

Peer i's k-th pick (k = 0, 1, ...) has the deadline (k + 1/2) / weight_i; every pick
takes the earliest (ties: the peer listed first). Over each cycle of W = sum of the
weights picks, every peer gets exactly its weight; within it the picks are spread
out: after any number t of picks a peer's count differs from its share
t * weight / W by less than one. That is the distribution nginx's smooth weighted
round-robin gives (weights 5,1,1: five a, one b, one c in each seven, no run of
b or c), computed with a heap instead of a pass over every peer.
"""

from __future__ import annotations

import heapq
from collections.abc import Collection, Sequence
from typing import Generic, Protocol, TypeVar


class Weighted(Protocol):
    @property
    def id(self) -> str: ...

    @property
    def weight(self) -> int: ...


P = TypeVar("P", bound=Weighted)


class WeightedRoundRobin(Generic[P]):
    """The schedule of one set of peers; build a new one when the set or a weight changes."""

    __slots__ = ("_heap",)

    def __init__(self, peers: Sequence[P]) -> None:
        # (deadline, position, picks so far, peer): positions are unique, so peers never compare
        self._heap: list[tuple[float, int, int, P]] = [
            (0.5 / peer.weight, position, 0, peer) for position, peer in enumerate(peers)
        ]
        heapq.heapify(self._heap)

    def pick(self, exclude: Collection[str] = ()) -> P | None:
        heap = self._heap
        skipped: list[tuple[float, int, int, P]] = []
        chosen: P | None = None
        while heap:
            _, position, picked, peer = heap[0]
            if peer.id in exclude:
                skipped.append(heapq.heappop(heap))
                continue
            picked += 1
            heapq.heapreplace(heap, ((picked + 0.5) / peer.weight, position, picked, peer))
            chosen = peer
            break
        for entry in skipped:  # a retry's exclusions keep their place in the schedule
            heapq.heappush(heap, entry)
        return chosen
