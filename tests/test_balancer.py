"""Weighted round-robin: each peer its weight's share in every cycle, spread out, O(log n)."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

import pytest

from registry.core.balancer import WeightedRoundRobin


@dataclass(frozen=True)
class Peer:
    id: str
    weight: int = 1


def picks(schedule: WeightedRoundRobin[Peer], n: int, **kw: object) -> list[str]:
    out = []
    for _ in range(n):
        peer = schedule.pick(**kw)  # type: ignore[arg-type]
        assert peer is not None
        out.append(peer.id)
    return out


def smooth_wrr(peers: list[Peer], n: int) -> list[str]:
    """nginx's smooth weighted round-robin (ngx_http_upstream_get_peer), the reference."""
    scores = dict.fromkeys((p.id for p in peers), 0)
    total = sum(p.weight for p in peers)
    out = []
    for _ in range(n):
        for p in peers:
            scores[p.id] += p.weight
        best = max(peers, key=lambda p: scores[p.id])
        scores[best.id] -= total
        out.append(best.id)
    return out


def test_equal_weights_rotate_evenly() -> None:
    seq = picks(WeightedRoundRobin([Peer("a"), Peer("b"), Peer("c")]), 30)
    assert seq[:3] == ["a", "b", "c"]
    assert all(seq[i] == seq[i % 3] for i in range(30))  # a strict rotation


def test_weights_5_1_1_give_each_its_share_in_every_cycle_of_seven() -> None:
    seq = picks(WeightedRoundRobin([Peer("a", 5), Peer("b", 1), Peer("c", 1)]), 70)
    for cycle in range(10):
        assert Counter(seq[cycle * 7 : cycle * 7 + 7]) == {"a": 5, "b": 1, "c": 1}
    assert seq[:2] == ["a", "a"]  # the heavy peer is not held back to the end of a cycle


@pytest.mark.parametrize("seed", range(20))
def test_same_shares_as_smooth_wrr_and_never_further_than_one_pick_from_them(seed: int) -> None:
    rng = random.Random(seed)
    peers = [Peer(f"p{i}", rng.randint(1, 100)) for i in range(rng.randint(1, 12))]
    total = sum(p.weight for p in peers)
    seq = picks(WeightedRoundRobin(peers), total * 2)
    assert Counter(seq) == Counter(smooth_wrr(peers, total * 2))  # per cycle: each its weight
    seen: Counter[str] = Counter()
    for t, peer_id in enumerate(seq, 1):
        seen[peer_id] += 1
        for p in peers:  # spread: every prefix within one pick of the exact share
            assert abs(seen[p.id] - t * p.weight / total) < 1


def test_exclude_skips_the_named_peers_and_they_keep_their_turn() -> None:
    schedule = WeightedRoundRobin([Peer("a", 5), Peer("b", 1), Peer("c", 1)])
    assert Counter(picks(schedule, 10, exclude=("a",))) == {"b": 5, "c": 5}
    assert picks(schedule, 5) == ["a"] * 5  # a, behind by ten picks, catches up


def test_excluding_every_peer_gives_none_and_no_peer_is_lost() -> None:
    schedule = WeightedRoundRobin([Peer("a"), Peer("b")])
    assert schedule.pick(exclude={"a", "b"}) is None
    assert sorted(picks(schedule, 2)) == ["a", "b"]


def test_no_peers_gives_none() -> None:
    assert WeightedRoundRobin([]).pick() is None


def test_a_single_peer_is_always_picked() -> None:
    assert picks(WeightedRoundRobin([Peer("only", 3)]), 5) == ["only"] * 5


def test_a_pick_among_ten_thousand_peers_touches_a_few_of_them() -> None:
    class Counting:
        reads = 0

        def __init__(self, peer_id: str) -> None:
            self._id = peer_id
            self.weight = 1 + int(peer_id) % 3

        @property
        def id(self) -> str:
            Counting.reads += 1
            return self._id

    schedule = WeightedRoundRobin([Counting(str(i)) for i in range(10_000)])
    Counting.reads = 0
    picks(schedule, 1000)
    assert Counting.reads == 2000  # a pick looks at one peer, picks() at what it got: no pass
