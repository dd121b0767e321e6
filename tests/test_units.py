"""Durations and sizes as users write them in routes.yaml and the registry API."""

from __future__ import annotations

import pytest

from registry.core.units import parse_duration, parse_size


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("1ms", 0.001),
        ("30s", 30.0),
        ("1s", 1.0),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("1.5s", 1.5),
        ("0s", 0.0),
        ("45", 45.0),
        ("2.5", 2.5),
        (30, 30.0),
        (0, 0.0),
        (2.5, 2.5),
    ],
)
def test_parse_duration_accepts_units_and_bare_seconds(text: object, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


def test_parse_duration_returns_float_for_int() -> None:
    assert isinstance(parse_duration(30), float)


@pytest.mark.parametrize(
    "bad",
    [
        "",
        " ",
        "abc",
        "s",
        "ms",
        "10d",
        "10 days",
        "-1s",
        "-5",
        "1h30m",
        "30S",
        "1,5s",
        -1,
        -0.5,
        float("nan"),
        float("inf"),
        pytest.param(10**400, id="int-too-large-for-float"),
        pytest.param("1" * 400 + "s", id="string-overflowing-to-inf"),
        True,
        False,
        None,
        [30],
        {"s": 30},
    ],
)
def test_parse_duration_refuses_bad_input(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("64KiB", 64 * 1024),
        ("10MiB", 10 * 1024 * 1024),
        ("1GiB", 1024**3),
        ("512", 512),
        ("0", 0),
        (512, 512),
        (0, 0),
    ],
)
def test_parse_size_accepts_binary_units_and_bare_bytes(text: object, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    "bad",
    ["", "abc", "64XiB", "KiB", "-1", "-1KiB", "ten MiB", -1, True, None, [64]],
)
def test_parse_size_refuses_bad_input(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_size(bad)
