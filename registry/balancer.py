"""Smooth weighted round-robin, as nginx does it (ngx_http_upstream_get_peer). Pure."""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Protocol, TypeVar


class Weighted(Protocol):
    @property
    def id(self) -> str: ...

    @property
    def weight(self) -> int: ...


P = TypeVar("P", bound=Weighted)


class SmoothWeightedRoundRobin:
    """Picks peers so that each gets its weight's share, spread out evenly.

    Every pick adds each candidate's weight to its running score, takes the
    highest, and subtracts the total from the winner. Equal weights give a plain
    rotation; weights 5,1,1 give a a b a c a a rather than a a a a a b c.
    Scores are kept per peer id, so a peer leaving and returning keeps its place.
    """

    __slots__ = ("_scores",)

    def __init__(self) -> None:
        self._scores: dict[str, int] = {}

    def pick(self, candidates: Iterable[P], exclude: Collection[str] = ()) -> P | None:
        scores = self._scores
        best: P | None = None
        best_score = 0
        total = 0
        for peer in candidates:
            if peer.id in exclude:
                continue
            weight = peer.weight
            score = scores.get(peer.id, 0) + weight
            scores[peer.id] = score
            total += weight
            if best is None or score > best_score:
                best = peer
                best_score = score
        if best is not None:
            scores[best.id] = best_score - total
        return best

    def forget(self, peer_id: str) -> None:
        self._scores.pop(peer_id, None)
