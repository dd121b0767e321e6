"""How a service's instances are chosen. Pure.

Weighted round-robin in O(log n) a pick: earliest virtual deadline first.

Peer i's k-th pick (k = 0, 1, ...) has the deadline (k + 1/2) / weight_i; every pick
takes the earliest (ties: the peer listed first). Over each cycle of W = sum of the
weights picks, every peer gets exactly its weight; within it the picks are spread
out: after any number t of picks a peer's count differs from its share
t * weight / W by less than one. That is the distribution nginx's smooth weighted
round-robin gives (weights 5,1,1: five a, one b, one c in each seven, no run of
b or c), computed with a heap instead of a pass over every peer.

Session affinity: HashRing, consistent hashing of a request's key (a cookie, a header).

Load-aware choices (``Balancing``): least_request and peak_ewma draw two instances at
random and take the less loaded (power of two choices), slow start ramps a new
instance's weight; the store applies them (registry.core.store.Registry.pick).
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
import math
import random
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Final, Generic, Protocol, TypeVar


class Weighted(Protocol):
    @property
    def id(self) -> str: ...

    @property
    def weight(self) -> int: ...


P = TypeVar("P", bound=Weighted)


class WeightedRoundRobin(Generic[P]):
    """The schedule of one set of peers; build a new one when the set or a weight changes."""

    __slots__ = ("_heap",)

    def __init__(self, peers: Sequence[P], weights: Sequence[float] | None = None) -> None:
        """``weights``: each peer's, when not its own ``weight`` (a slow start's ramp)."""
        # (deadline, position, picks so far, weight, peer): positions are unique, so peers
        # never compare
        self._heap: list[tuple[float, int, int, float, P]] = [
            (0.5 / w, position, 0, w, peer)
            for position, (peer, w) in enumerate(
                zip(peers, weights or [float(p.weight) for p in peers], strict=True)
            )
        ]
        heapq.heapify(self._heap)

    def pick(self, exclude: Collection[str] = ()) -> P | None:
        heap = self._heap
        skipped: list[tuple[float, int, int, float, P]] = []
        chosen: P | None = None
        while heap:
            _, position, picked, weight, peer = heap[0]
            if peer.id in exclude:
                skipped.append(heapq.heappop(heap))
                continue
            picked += 1
            heapq.heapreplace(heap, ((picked + 0.5) / weight, position, picked, weight, peer))
            chosen = peer
            break
        for entry in skipped:  # a retry's exclusions keep their place in the schedule
            heapq.heappush(heap, entry)
        return chosen


ROUND_ROBIN: Final = "round_robin"
LEAST_REQUEST: Final = "least_request"
PEAK_EWMA: Final = "peak_ewma"
BALANCERS: Final = (ROUND_ROBIN, LEAST_REQUEST, PEAK_EWMA)
SLOW_START_FLOOR: Final = 0.1  # a starting instance's share of its weight, at first
DECAY: Final = 10.0  # seconds: peak EWMA's memory of latency (Finagle's and Linkerd's default)
PENALTY: Final = 1e6  # the load of an instance with requests out and no latency seen yet


@dataclass(frozen=True)
class Balancing:
    """How one service's instances are chosen: ``kind`` (one of BALANCERS) and
    ``slow_start``, the seconds over which a new or returning instance's weight ramps
    from SLOW_START_FLOOR of it to all of it (0: at once)."""

    kind: str = ROUND_ROBIN
    slow_start: float = 0.0


def ramp(since: float, now: float, window: float) -> float:
    """The share of its weight an instance routable since ``since`` has: linear from
    SLOW_START_FLOOR to 1 over ``window`` seconds."""
    if window <= 0.0 or now - since >= window:
        return 1.0
    return max(SLOW_START_FLOOR, (now - since) / window)


class PeakEwma:
    """An instance's latency cost as Finagle's and Linkerd's peak EWMA keeps it: a sample
    above the cost replaces it (peaks count at once), others are averaged in with a
    weight that decays over DECAY seconds, and so does the cost while no sample comes
    (an instance once slow is tried again)."""

    __slots__ = ("cost", "stamp")

    def __init__(self) -> None:
        self.cost = 0.0
        self.stamp = 0.0

    def observe(self, seconds: float, now: float) -> None:
        if seconds > self.cost:
            self.cost = seconds
        else:
            w = math.exp(-max(now - self.stamp, 0.0) / DECAY)
            self.cost = self.cost * w + seconds * (1.0 - w)
        self.stamp = now

    def load(self, outstanding: int, now: float) -> float:
        """Cost times requests out (plus one): what peak EWMA minimises."""
        self.observe(0.0, now)
        if self.cost == 0.0 and outstanding:
            return PENALTY + outstanding
        return self.cost * (outstanding + 1)


def two_choices(
    peers: Sequence[P],
    exclude: Collection[str],
    better: Callable[[P, P], bool],
    rng: random.Random,
) -> P | None:
    """Power of two choices: of two peers drawn at random (none of ``exclude``), the one
    ``better`` prefers. O(1) a pick unless exclusions are many."""
    count = len(peers)
    if count == 0:
        return None
    if exclude:
        if count <= 2 * len(exclude):  # drawing around many exclusions: filter once
            peers = [peer for peer in peers if peer.id not in exclude]
            count = len(peers)
            if count == 0:
                return None
        else:
            while True:
                first = peers[rng.randrange(count)]
                if first.id not in exclude:
                    break
            while True:
                second = peers[rng.randrange(count)]
                if second is not first and second.id not in exclude:
                    break
            return second if better(second, first) else first
    if count == 1:
        return peers[0]
    i = rng.randrange(count)
    j = rng.randrange(count - 1)
    if j >= i:
        j += 1
    first, second = peers[i], peers[j]
    return second if better(second, first) else first


VNODES: Final = 40  # points on the ring per unit of weight


def ring_hash(data: bytes) -> int:
    """64 bits of BLAKE2b: the same in every process (unlike hash()), well spread."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


class HashRing(Generic[P]):
    """Consistent hashing: each peer owns VNODES x weight points on a ring of 64-bit
    hashes, placed by its id alone; a key goes to the peer of the first point at or after
    its hash. A peer that joins or leaves moves only the keys of its own points: every
    other key keeps its peer. Build a new ring when the set or a weight changes."""

    __slots__ = ("_hashes", "_peers")

    def __init__(self, peers: Sequence[P]) -> None:
        points = sorted(
            (
                (ring_hash(b"%s#%d" % (peer.id.encode(), k)), position, peer)
                for position, peer in enumerate(peers)
                for k in range(VNODES * peer.weight)
            ),
            key=lambda point: (point[0], point[1]),
        )
        self._hashes = [point[0] for point in points]
        self._peers = [point[2] for point in points]

    def pick(self, key: bytes, exclude: Collection[str] = ()) -> P | None:
        """The key's peer; a retry (``exclude``) walks on to the next peer on the ring."""
        peers = self._peers
        count = len(peers)
        start = bisect.bisect_left(self._hashes, ring_hash(key))
        for step in range(count):
            peer = peers[(start + step) % count]
            if peer.id not in exclude:
                return peer
        return None
