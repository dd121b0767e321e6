"""The registry snapshot: registrations survive a restart (SPEC sections 3 and 8)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import pytest

from registry.models import REGISTRATION_FIELDS as _FIELDS
from registry.snapshot import FIELD_CHECKS, SnapshotWriter, load_snapshot
from registry.store import Registry
from tests.fakes import FakeClock

LOGGER = "registry.snapshot"


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "registry.json"


def fresh(clock: FakeClock) -> Registry:
    return Registry(clock, default_ttl=30.0, max_ttl=3600.0)


def everything(registry: Registry) -> dict[tuple[str, str], dict[str, Any]]:
    """Every instance as listed, plus the fields to_dict() leaves out."""
    return {
        (name, i.id): {
            **i.to_dict(),
            "ttl": i.ttl,
            "expires_at_raw": i.expires_at,
            "deregister_when_idle": i.deregister_when_idle,
        }
        for name in registry.service_names()
        for i in registry.instances(name)
    }


def save(registry: Registry, path: Path) -> None:
    SnapshotWriter(registry, path).write_now()


def populate(registry: Registry, clock: FakeClock) -> None:
    registry.register("users", {"host": "10.0.0.5", "port": 9000, "ttl": "30s"})
    registry.register(
        "users", {"host": "10.0.0.6", "port": 9000, "ttl": 120, "metadata": {"v": "1.4"}}
    )
    registry.register(
        "orders",
        {"host": "::1", "port": 9443, "id": "orders-a", "ttl": "10m", "scheme": "https"},
    )
    clock.advance(5)
    registry.renew("users", "10.0.0.5:9000")  # a heartbeat moves the expiry
    registry.update(
        "users", "10.0.0.6:9000", {"state": "draining", "weight": 7, "metadata": {"v": "2"}}
    )
    registry.set_health("orders", "orders-a", "failing")


def records(caplog: pytest.LogCaptureFixture, level: int) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER and r.levelno == level]


# -- round trip ------------------------------------------------------------------------


def test_every_saved_field_is_checked_on_load() -> None:
    assert set(FIELD_CHECKS) == set(_FIELDS)
    assert "service" not in _FIELDS and "in_flight" not in _FIELDS


def test_round_trip_keeps_every_field_and_the_absolute_expiry(
    registry: Registry, clock: FakeClock, path: Path
) -> None:
    populate(registry, clock)
    before = everything(registry)
    assert len(before) == 3
    save(registry, path)
    assert path.is_file()  # the folder was created

    clock.advance(4)  # the gateway was down for 4 s
    restored = fresh(clock)
    assert load_snapshot(restored, path) == 3
    # Everything comes back but health: a verdict of checks and traffic, started afresh.
    before[("orders", "orders-a")]["health"] = "healthy"
    assert everything(restored) == before
    a = restored.get("users", "10.0.0.5:9000")
    assert a.expires_at == before[("users", "10.0.0.5:9000")]["expires_at_raw"]
    assert a.ttl is not None and a.expires_at is not None
    assert a.expires_at - clock() == pytest.approx(a.ttl - 4)
    drained = restored.get("users", "10.0.0.6:9000")
    assert (drained.state, drained.weight, drained.metadata) == ("draining", 7, {"v": "2"})
    # The restored registry routes like the old one: only the up, healthy instance.
    picked = restored.pick("users")
    assert picked is not None and picked.id == "10.0.0.5:9000"
    assert restored.pick("orders") is not None  # was failing: checked again after restart


def test_the_file_is_the_documented_json(registry: Registry, clock: FakeClock, path: Path) -> None:
    populate(registry, clock)
    save(registry, path)
    document = json.loads(path.read_text())
    assert document["version"] == 1
    assert document["saved_at"] == clock()
    assert sorted(document["services"]) == ["orders", "users"]
    entry = document["services"]["orders"][0]
    assert set(entry) == set(_FIELDS)
    assert (entry["id"], entry["host"], entry["port"], entry["ttl"]) == (
        "orders-a",
        "::1",
        9443,
        600,
    )


def test_ended_leases_are_dropped_and_static_instances_never_saved(
    registry: Registry, clock: FakeClock, path: Path
) -> None:
    registry.set_static("web", [("127.0.0.1", 9001)])
    registry.register("users", {"host": "10.0.0.5", "port": 9000, "ttl": 10})
    registry.register("users", {"host": "10.0.0.6", "port": 9000, "ttl": 60})
    save(registry, path)
    assert "web" not in json.loads(path.read_text())["services"]

    clock.advance(10)  # exactly at the first lease's end: it is over
    restored = fresh(clock)
    assert load_snapshot(restored, path) == 1
    assert [i.id for i in restored.instances("users")] == ["10.0.0.6:9000"]
    assert "web" not in restored.service_names()

    clock.advance(100)
    assert load_snapshot(fresh(clock), path) == 0


def test_a_draining_instance_waiting_to_go_idle_is_not_restored(
    registry: Registry, clock: FakeClock, path: Path
) -> None:
    registry.register("users", {"host": "10.0.0.5", "port": 9000})
    instance, _ = registry.register("users", {"host": "10.0.0.6", "port": 9000})
    registry.request_started(instance)  # busy, so it stays until the request ends
    registry.update("users", "10.0.0.6:9000", {"state": "draining", "deregister_when_idle": True})
    save(registry, path)
    restored = fresh(clock)
    # Nothing is in flight after a restart: it would have been removed at once.
    assert load_snapshot(restored, path) == 1
    assert [i.id for i in restored.instances("users")] == ["10.0.0.5:9000"]


def test_instances_already_in_the_registry_win_over_the_file(
    registry: Registry, clock: FakeClock, path: Path
) -> None:
    registry.register("web", {"host": "127.0.0.1", "port": 9001, "ttl": 10})
    save(registry, path)
    restored = fresh(clock)
    restored.set_static("web", [("127.0.0.1", 9001)])  # now configured in routes.yaml
    assert load_snapshot(restored, path) == 0
    static = restored.get("web", "127.0.0.1:9001")
    assert static.ttl is None and static.expires_at is None
    clock.advance(3600)
    assert [i.id for i in restored.instances("web")] == ["127.0.0.1:9001"]


def test_a_lease_longer_than_a_lowered_max_ttl_is_shortened(
    registry: Registry, clock: FakeClock, path: Path
) -> None:
    registry.register("users", {"host": "10.0.0.5", "port": 9000, "ttl": "1h"})
    save(registry, path)
    restored = Registry(clock, default_ttl=30.0, max_ttl=60.0)
    assert load_snapshot(restored, path) == 1
    instance = restored.get("users", "10.0.0.5:9000")
    assert instance.ttl == 60.0 and instance.expires_at == clock() + 60.0


# -- bad files ---------------------------------------------------------------------------


def good_document(clock: FakeClock) -> dict[str, Any]:
    registry = fresh(clock)
    registry.register("users", {"host": "10.0.0.5", "port": 9000, "ttl": 30})
    return {
        "version": 1,
        "saved_at": clock(),
        "services": {"users": [{f: getattr(registry.instances("users")[0], f) for f in _FIELDS}]},
    }


def with_entry(clock: FakeClock, **changes: Any) -> str:
    document = good_document(clock)
    document["services"]["users"][0].update(changes)
    return json.dumps(document)


def without(clock: FakeClock, field: str) -> str:
    document = good_document(clock)
    del document["services"]["users"][0][field]
    return json.dumps(document)


BAD_FILES: dict[str, Any] = {
    "truncated JSON": lambda c: json.dumps(good_document(c))[:-7],
    "empty file": lambda c: "",
    "not UTF-8": lambda c: b"\xff\xfe\x00garbage",
    "a list": lambda c: json.dumps([good_document(c)]),
    "wrong version": lambda c: json.dumps({**good_document(c), "version": 2}),
    "services a list": lambda c: json.dumps({**good_document(c), "services": []}),
    "bad service name": lambda c: json.dumps(
        {**good_document(c), "services": {"Bad Name": good_document(c)["services"]["users"]}}
    ),
    "entry not an object": lambda c: json.dumps({**good_document(c), "services": {"u": [1]}}),
    "bad port": lambda c: with_entry(c, port=70000),
    "port as string": lambda c: with_entry(c, port="9000"),
    "port as bool": lambda c: with_entry(c, port=True),
    "bad host": lambda c: with_entry(c, host="http://evil/"),
    "unspecified host": lambda c: with_entry(c, host="0.0.0.0"),
    "bad id": lambda c: with_entry(c, id="a b"),
    "bad weight": lambda c: with_entry(c, weight=0),
    "bad state": lambda c: with_entry(c, state="gone"),
    "bad health": lambda c: with_entry(c, health="fine"),
    "bad metadata": lambda c: with_entry(c, metadata={"k": 1}),
    "static in file": lambda c: with_entry(c, ttl=None),
    "NaN expiry": lambda c: with_entry(c, expires_at=float("nan")),
    "huge expiry": lambda c: with_entry(c, expires_at=1e300),
    "expiry beyond its ttl": lambda c: with_entry(c, expires_at=c() + 86400),
    "missing field": lambda c: without(c, "expires_at"),
    "unknown field": lambda c: with_entry(c, in_flight=3),
    "duplicate id": lambda c: json.dumps(
        {
            **good_document(c),
            "services": {"users": good_document(c)["services"]["users"] * 2},
        }
    ),
    "deeply nested": lambda c: "[" * 100_000 + "]" * 100_000,
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_an_unreadable_file_is_moved_aside_with_one_warning(
    case: str, clock: FakeClock, path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    content = BAD_FILES[case](clock)
    path.parent.mkdir(parents=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    registry = fresh(clock)
    caplog.set_level(logging.DEBUG, logger=LOGGER)

    assert load_snapshot(registry, path) == 0

    assert registry.service_names() == []
    assert not path.exists()
    moved = list(path.parent.iterdir())
    assert [m.name for m in moved] == ["registry.json.corrupt-20231114T221320Z"]
    assert re.fullmatch(r"registry\.json\.corrupt-\d{8}T\d{6}Z", moved[0].name)
    warnings = records(caplog, logging.WARNING)
    assert len(warnings) == 1
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == warnings
    message = warnings[0].getMessage()
    assert message.startswith(f"registry snapshot {path} is unreadable (")
    assert message.endswith(f"); moved aside to {moved[0]}, starting empty")


def test_the_good_document_of_the_bad_file_cases_loads(clock: FakeClock, path: Path) -> None:
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(good_document(clock)))
    assert load_snapshot(fresh(clock), path) == 1


def test_a_second_bad_file_in_the_same_second_keeps_the_first(
    clock: FakeClock, path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path.parent.mkdir(parents=True)
    for text in ("{", "["):
        path.write_text(text)
        assert load_snapshot(fresh(clock), path) == 0
    names = sorted(p.name for p in path.parent.iterdir())
    assert names == [
        "registry.json.corrupt-20231114T221320Z",
        "registry.json.corrupt-20231114T221320Z-2",
    ]
    assert len(records(caplog, logging.WARNING)) == 2


def test_a_missing_file_restores_nothing_quietly(
    clock: FakeClock, path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    assert load_snapshot(fresh(clock), path) == 0
    assert [r for r in caplog.records if r.name == LOGGER] == []
    assert not path.parent.exists()


# -- the writer ----------------------------------------------------------------------------


async def eventually(condition: Any, timeout: float = 2.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met within 2 s"
        await asyncio.sleep(0.02)


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Times of SnapshotWriter.write_now calls (which still write)."""
    calls: list[float] = []
    original = SnapshotWriter.write_now

    def counting(self: SnapshotWriter) -> None:
        calls.append(asyncio.get_running_loop().time())
        original(self)

    monkeypatch.setattr(SnapshotWriter, "write_now", counting)
    return calls


def saved_ids(path: Path) -> dict[str, list[str]]:
    if not path.exists():
        return {}
    services = json.loads(path.read_text())["services"]
    return {name: [i["id"] for i in entries] for name, entries in services.items()}


async def test_a_change_is_written_within_the_delay(
    registry: Registry, clock: FakeClock, path: Path, writes: list[float]
) -> None:
    writer = SnapshotWriter(registry, path)
    writer.start()
    started = asyncio.get_running_loop().time()
    registry.register("users", {"host": "10.0.0.5", "port": 9000})
    await eventually(lambda: saved_ids(path) == {"users": ["10.0.0.5:9000"]})
    assert writes and writes[0] - started < 0.5
    assert not writer.pending

    registry.deregister("users", "10.0.0.5:9000")
    await eventually(lambda: saved_ids(path) == {})
    await writer.stop()
    assert len(writes) == 2


async def test_a_burst_of_heartbeats_is_one_write_and_saves_the_new_expiry(
    registry: Registry, clock: FakeClock, path: Path, writes: list[float]
) -> None:
    writer = SnapshotWriter(registry, path)
    registry.register("users", {"host": "10.0.0.5", "port": 9000, "ttl": 30})
    await asyncio.sleep(0.15)
    assert writes == []  # not started: nothing scheduled yet
    writer.start()  # a change from before start is written once started
    await eventually(lambda: len(writes) == 1)

    for _ in range(50):
        clock.advance(0.1)
        registry.renew("users", "10.0.0.5:9000")
    await eventually(lambda: len(writes) == 2)
    await asyncio.sleep(0.3)
    assert len(writes) == 2
    saved = json.loads(path.read_text())["services"]["users"][0]
    assert saved["expires_at"] == clock() + 30
    assert saved["last_heartbeat"] == clock()
    await writer.stop()
    assert len(writes) == 2  # nothing pending: stop writes nothing


async def test_stop_writes_a_pending_change(
    registry: Registry, path: Path, writes: list[float]
) -> None:
    writer = SnapshotWriter(registry, path, delay=60.0)
    writer.start()
    registry.register("users", {"host": "10.0.0.5", "port": 9000})
    await asyncio.sleep(0.05)
    assert writes == [] and writer.pending
    await writer.stop()
    assert len(writes) == 1
    assert saved_ids(path) == {"users": ["10.0.0.5:9000"]}

    registry.register("users", {"host": "10.0.0.6", "port": 9000})  # after stop: no timer
    await asyncio.sleep(0.05)
    assert len(writes) == 1


async def test_an_eviction_is_a_change(
    registry: Registry, clock: FakeClock, path: Path, writes: list[float]
) -> None:
    writer = SnapshotWriter(registry, path)
    writer.start()
    registry.register("users", {"host": "10.0.0.5", "port": 9000, "ttl": 10})
    await eventually(lambda: saved_ids(path) == {"users": ["10.0.0.5:9000"]})
    clock.advance(10)
    registry.expire()
    await eventually(lambda: saved_ids(path) == {})
    await writer.stop()


# -- crash safety ------------------------------------------------------------------------


def leftovers(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name != path.name)


@pytest.mark.parametrize("failing", ["replace", "fsync", "open"])
async def test_a_failed_write_keeps_the_old_file_and_the_gateway_running(
    failing: str,
    registry: Registry,
    clock: FakeClock,
    path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    writer = SnapshotWriter(registry, path, delay=0.01)
    writer.start()
    registry.register("users", {"host": "10.0.0.5", "port": 9000})
    await eventually(lambda: not writer.pending)
    old = path.read_bytes()
    assert leftovers(path) == []

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise OSError(28, "No space left on device")

    if failing == "open":
        monkeypatch.setattr("builtins.open", broken)
    else:
        monkeypatch.setattr(os, failing, broken)
    registry.register("users", {"host": "10.0.0.6", "port": 9000})
    await asyncio.sleep(0.1)  # the timer fired and its write failed
    for _ in range(3):
        registry.renew("users", "10.0.0.6:9000")
        await asyncio.sleep(0.05)
    monkeypatch.undo()

    assert writer.pending
    assert path.read_bytes() == old
    assert leftovers(path) == []
    restored = fresh(clock)
    assert load_snapshot(restored, path) == 1
    warnings = records(caplog, logging.WARNING)
    assert len(warnings) == 1  # the same failure again is not repeated at WARNING
    assert "No space left on device" in warnings[0].getMessage()
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []

    await writer.stop()  # the change still pending is written now
    assert saved_ids(path) == {"users": ["10.0.0.5:9000", "10.0.0.6:9000"]}
    assert leftovers(path) == []


def test_write_now_on_a_read_only_target_logs_and_returns(
    registry: Registry, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    registry.register("users", {"host": "10.0.0.5", "port": 9000})
    SnapshotWriter(registry, blocker / "registry.json").write_now()  # parent is a file
    assert len(records(caplog, logging.WARNING)) == 1
