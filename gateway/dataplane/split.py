"""A route's canary split: which subset of its service's instances a request goes to. Pure.

A split lists subsets by instance metadata with weights (routes.yaml ``split:``); the
first is the canary. A request's subset is chosen once, when it is routed: by the
split header (``always``: the canary, ``never``: one of the others by their weights),
else by the weights, with the deterministic smooth weighted round-robin of the
registry's balancer, so 10/90 is exactly 10 in every 100 requests. The instance is
then picked among the subset's routable ones (Registry.pick_matching); the fallback
to the whole service when a subset has none is the exchange's.

A Split belongs to one RouteTable: a reload builds new ones with the new table, so
new weights apply, all at once, from the first request the new table routes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final, Protocol

from registry.core.balancer import WeightedRoundRobin

ALWAYS: Final = b"always"
NEVER: Final = b"never"


class SplitSpec(Protocol):
    """What a split needs of one configured subset (gateway.config.model.SplitConfig)."""

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]: ...
    @property
    def weight(self) -> int: ...
    @property
    def label(self) -> str: ...


class Subset:
    """One subset of a split: a peer of the round-robin over subsets."""

    __slots__ = ("id", "weight", "selector", "index")

    def __init__(self, index: int, selector: tuple[tuple[str, str], ...], weight: int) -> None:
        self.index = index  # its place in the split: 0 is the canary
        self.id = str(index)
        self.selector = selector  # a registry Selector: (key, value) pairs, sorted
        self.weight = weight


class Split:
    __slots__ = ("header", "subsets", "labels", "_by_weight", "_others")

    def __init__(self, specs: Sequence[SplitSpec], header: str) -> None:
        self.header = header.lower().encode()  # looked up in the request head
        self.subsets = tuple(Subset(i, spec.metadata, spec.weight) for i, spec in enumerate(specs))
        self.labels = tuple(spec.label for spec in specs)
        self._by_weight = WeightedRoundRobin([s for s in self.subsets if s.weight])
        others = self.subsets[1:]
        weighed = [s for s in others if s.weight]
        # never: the others by their weights; all of weight 0: each alike; none: no subset
        self._others: WeightedRoundRobin[Subset] | None = (
            WeightedRoundRobin(weighed)
            if weighed
            else WeightedRoundRobin(others, [1.0] * len(others))
            if others
            else None
        )

    def choose(self, override: bytes | None) -> Subset | None:
        """The subset of a request whose split header says ``override`` (None: absent).

        ``always`` and ``never`` (any case) choose as they say; any other value counts
        as absent. None: no subset (``never`` with only a canary listed), so any
        instance of the service.
        """
        if override is not None:
            value = override.lower()
            if value == ALWAYS:
                return self.subsets[0]
            if value == NEVER:
                return self._others.pick() if self._others is not None else None
        return self._by_weight.pick()
