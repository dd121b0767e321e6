"""Smooth weighted round-robin, compared with nginx's documented behaviour."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import pytest

from registry.balancer import SmoothWeightedRoundRobin


@dataclass(frozen=True)
class Peer:
    id: str
    weight: int = 1


def picks(balancer: SmoothWeightedRoundRobin, peers: list[Peer], n: int, **kw: object) -> list[str]:
    out = []
    for _ in range(n):
        peer = balancer.pick(peers, **kw)  # type: ignore[arg-type]
        assert peer is not None
        out.append(peer.id)
    return out


def test_equal_weights_rotate_evenly() -> None:
    peers = [Peer("a"), Peer("b"), Peer("c")]
    seq = picks(SmoothWeightedRoundRobin(), peers, 30)
    assert Counter(seq) == {"a": 10, "b": 10, "c": 10}
    assert set(seq[:3]) == {"a", "b", "c"}
    # a strict rotation: every window of three holds each peer once
    assert all(seq[i] == seq[i % 3] for i in range(30))


def test_weights_5_1_1_give_the_nginx_smooth_sequence() -> None:
    peers = [Peer("a", 5), Peer("b", 1), Peer("c", 1)]
    seq = picks(SmoothWeightedRoundRobin(), peers, 70)
    # nginx documents weights { 5, 1, 1 } as giving { a, a, b, a, c, a, a }
    assert seq[:7] == ["a", "a", "b", "a", "c", "a", "a"]
    assert all(seq[i] == seq[i % 7] for i in range(70))
    assert Counter(seq) == {"a": 50, "b": 10, "c": 10}


@pytest.mark.parametrize(
    ("weights", "rounds"),
    [
        ({"a": 3, "b": 2}, 10),
        ({"a": 1, "b": 2, "c": 3}, 6),
        ({"a": 100, "b": 1}, 3),
        ({"a": 7}, 4),
    ],
)
def test_each_peer_gets_its_weights_share(weights: dict[str, int], rounds: int) -> None:
    peers = [Peer(name, weight) for name, weight in weights.items()]
    total = sum(weights.values())
    seq = picks(SmoothWeightedRoundRobin(), peers, total * rounds)
    assert Counter(seq) == {name: weight * rounds for name, weight in weights.items()}


def test_exclude_skips_the_named_peers() -> None:
    balancer = SmoothWeightedRoundRobin()
    peers = [Peer("a"), Peer("b"), Peer("c")]
    seq = picks(balancer, peers, 20, exclude={"a"})
    assert Counter(seq) == {"b": 10, "c": 10}


def test_exclude_with_weights_spreads_over_the_rest() -> None:
    peers = [Peer("a", 5), Peer("b", 1), Peer("c", 1)]
    seq = picks(SmoothWeightedRoundRobin(), peers, 10, exclude=("a",))
    assert Counter(seq) == {"b": 5, "c": 5}


def test_excluding_every_peer_gives_none() -> None:
    peers = [Peer("a"), Peer("b")]
    assert SmoothWeightedRoundRobin().pick(peers, exclude={"a", "b"}) is None


@pytest.mark.parametrize("candidates", [[], ()])
def test_no_candidates_gives_none(candidates: list[Peer]) -> None:
    assert SmoothWeightedRoundRobin().pick(candidates) is None


def test_a_single_peer_is_always_picked() -> None:
    assert picks(SmoothWeightedRoundRobin(), [Peer("only", 3)], 5) == ["only"] * 5


def test_a_peer_leaving_leaves_an_even_rotation_of_the_rest() -> None:
    balancer = SmoothWeightedRoundRobin()
    peers = [Peer("a"), Peer("b"), Peer("c")]
    picks(balancer, peers, 4)
    balancer.forget("c")
    counts = Counter(picks(balancer, peers[:2], 100))
    assert set(counts) == {"a", "b"}
    assert abs(counts["a"] - counts["b"]) <= 2
