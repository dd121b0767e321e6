"""The registry snapshot: registrations survive a restart (SPEC sections 3 and 8)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import re
import threading
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from registry.backends import snapshot
from registry.backends.snapshot import FIELDS, SnapshotWriter, load_snapshot
from registry.core.models import REGISTRATION_FIELDS as _FIELDS
from registry.core.store import Registry
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
    assert set(FIELDS) == set(_FIELDS)
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


FIXTURE = Path(__file__).parent / "data" / "snapshot-v1.json"


def test_a_file_of_todays_format_still_loads(path: Path) -> None:
    """tests/data/snapshot-v1.json was written by this version (populate(), 5 s in). It
    is kept as it is: whatever this module becomes, such a file must keep its instances
    (else an upgrade moves every snapshot aside and loses all registrations)."""
    clock = FakeClock(1_700_000_010.0)  # 5 s after it was saved
    path.parent.mkdir(parents=True)
    path.write_bytes(FIXTURE.read_bytes())
    restored = fresh(clock)
    assert load_snapshot(restored, path) == 3
    listed = everything(restored)
    assert sorted(listed) == [
        ("orders", "orders-a"),
        ("users", "10.0.0.5:9000"),
        ("users", "10.0.0.6:9000"),
    ]
    orders = listed[("orders", "orders-a")]
    assert (orders["host"], orders["port"], orders["scheme"], orders["ttl"]) == (
        "::1",
        9443,
        "https",
        600.0,
    )
    assert orders["expires_at_raw"] == 1_700_000_600.0
    assert orders["health"] == "healthy"  # health starts afresh
    drained = listed[("users", "10.0.0.6:9000")]
    assert (drained["state"], drained["weight"], drained["metadata"]) == ("draining", 7, {"v": "2"})


def test_an_older_file_without_the_later_fields_loads_with_their_defaults(
    clock: FakeClock, path: Path
) -> None:
    document = good_document(clock)
    entry = document["services"]["users"][0]
    optional = [name for name, field in FIELDS.items() if field.default is not None]
    assert optional == ["scheme", "weight", "state", "health", "metadata", "deregister_when_idle"]
    for name in optional:
        del entry[name]
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(document))
    restored = fresh(clock)
    assert load_snapshot(restored, path) == 1
    instance = restored.get("users", "10.0.0.5:9000")
    assert (instance.scheme, instance.weight, instance.state, instance.metadata) == (
        "http",
        1,
        "up",
        {},
    )
    assert instance.deregister_when_idle is False and instance.expires_at == entry["expires_at"]


def test_a_field_of_a_newer_version_is_ignored(clock: FakeClock, path: Path) -> None:
    path.parent.mkdir(parents=True)
    path.write_text(with_entry(clock, zone="eu-west-1", in_flight=3))
    restored = fresh(clock)
    assert load_snapshot(restored, path) == 1
    instance = restored.get("users", "10.0.0.5:9000")
    assert instance.in_flight == 0 and not hasattr(instance, "zone")
    assert path.exists()  # not moved aside


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


@dataclass
class Write:
    """One call of registry.snapshot._write_atomically."""

    thread: threading.Thread
    document: dict[str, Any]


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> list[Write]:
    """The snapshot's file writes (they still write), in order."""
    calls: list[Write] = []
    original = snapshot._write_atomically

    def counting(path: Path, chunks: Iterable[bytes]) -> None:
        data = b"".join(chunks)
        calls.append(Write(threading.current_thread(), json.loads(data)))
        original(path, [data])

    monkeypatch.setattr(snapshot, "_write_atomically", counting)
    return calls


class Gate:
    """Holds each file write, in its thread, until the test releases it."""

    def __init__(self, write: Any) -> None:
        self.write = write
        self.loop = asyncio.get_running_loop()
        self.entered = asyncio.Event()
        self.release = threading.Event()
        self.inside = 0

    def __call__(self, path: Path, chunks: Iterable[bytes]) -> None:
        self.inside += 1
        self.loop.call_soon_threadsafe(self.entered.set)
        assert self.release.wait(10), "the test never released the write"
        self.inside -= 1
        self.write(path, chunks)


@pytest.fixture
async def gate(writes: list[Write], monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Gate]:
    held = Gate(snapshot._write_atomically)
    monkeypatch.setattr(snapshot, "_write_atomically", held)
    yield held
    held.release.set()  # a failing test must not leave a thread waiting


def eager(registry: Registry, path: Path) -> SnapshotWriter:
    """A started writer without pacing: each change is written as soon as the loop runs."""
    writer = SnapshotWriter(registry, path, delay=0.0, interval=0.0)
    writer.start()
    return writer


def saved(path: Path) -> dict[str, dict[str, dict[str, Any]]]:
    """The file's instances by service and id."""
    if not path.exists():
        return {}
    services = json.loads(path.read_text())["services"]
    return {name: {i["id"]: i for i in entries} for name, entries in services.items()}


def saved_ids(path: Path) -> dict[str, list[str]]:
    return {name: list(entries) for name, entries in saved(path).items()}


async def test_heartbeats_within_a_third_of_the_ttl_write_nothing(
    registry: Registry, clock: FakeClock, path: Path, writes: list[Write]
) -> None:
    writer = eager(registry, path)
    registry.register("users", {"host": "10.0.0.5", "port": 9000, "ttl": 30})
    await writer.settled()
    assert len(writes) == 1
    for _ in range(1000):
        clock.advance(0.0099)  # 9.9 s in all: less than ttl/3
        registry.renew("users", "10.0.0.5:9000")
        assert not writer.pending and writer.scheduled_at is None
    await writer.settled()
    assert len(writes) == 1


async def test_a_heartbeat_a_third_of_the_ttl_later_is_written(
    registry: Registry, clock: FakeClock, path: Path, writes: list[Write]
) -> None:
    writer = eager(registry, path)
    registry.register("users", {"host": "10.0.0.5", "port": 9000, "ttl": 30})
    await writer.settled()
    clock.advance(9.99)
    registry.renew("users", "10.0.0.5:9000")
    assert not writer.pending
    clock.advance(0.01)  # the lease is now 10 s (ttl/3) past the saved one
    registry.renew("users", "10.0.0.5:9000")
    assert writer.pending
    await writer.settled()
    assert len(writes) == 2
    entry = saved(path)["users"]["10.0.0.5:9000"]
    assert (entry["expires_at"], entry["last_heartbeat"]) == (clock() + 30, clock())
    clock.advance(1)
    registry.renew("users", "10.0.0.5:9000")  # measured from the new save: within ttl/3
    assert not writer.pending
    await writer.stop()


CHANGES: dict[str, Any] = {
    "registered": lambda r, c: r.register("users", {"host": "10.0.0.7", "port": 9000}),
    "re-registered": lambda r, c: r.register(
        "users", {"host": "10.0.0.5", "port": 9000, "weight": 3}
    ),
    "updated": lambda r, c: r.update("users", "10.0.0.5:9000", {"state": "draining"}),
    "health": lambda r, c: r.set_health("users", "10.0.0.5:9000", "failing"),
    "deregistered": lambda r, c: r.deregister("users", "10.0.0.5:9000"),
    "evicted": lambda r, c: (c.advance(30), r.expire()),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
async def test_a_membership_or_state_change_is_written_at_once(
    change: str, registry: Registry, clock: FakeClock, path: Path, writes: list[Write]
) -> None:
    writer = eager(registry, path)
    registry.register("users", {"host": "10.0.0.5", "port": 9000, "ttl": 30})
    await writer.settled()
    before = saved(path)
    CHANGES[change](registry, clock)
    assert writer.pending
    await writer.settled()
    assert len(writes) == 2
    after = saved(path)
    assert after != before
    expected = {name: [i.id for i in registry.instances(name)] for name in ["users"]}
    assert saved_ids(path) == {k: v for k, v in expected.items() if v}
    if change != "evicted" and after.get("users"):
        instance = registry.instances("users")[0]
        assert after["users"][instance.id] == {f: getattr(instance, f) for f in _FIELDS}
    await writer.stop()


async def test_a_burst_of_registrations_is_at_most_two_writes(
    registry: Registry, path: Path, writes: list[Write]
) -> None:
    writer = SnapshotWriter(registry, path)  # the default pacing
    writer.start()
    for n in range(100):
        registry.register("users", {"host": f"10.0.1.{n}", "port": 9000})
        await asyncio.sleep(0)  # the loop runs between them: timers, the write's thread
    await writer.settled()
    assert 1 <= len(writes) <= 2
    assert len(saved_ids(path)["users"]) == 100
    await writer.stop()
    assert len(writes) <= 2


async def test_the_first_change_after_a_quiet_spell_waits_the_delay_then_the_interval(
    registry: Registry, path: Path, writes: list[Write]
) -> None:
    loop = asyncio.get_running_loop()
    writer = SnapshotWriter(registry, path, delay=0.1, interval=0.5)
    writer.start()
    assert writer.scheduled_at is None
    changed = loop.time()
    registry.register("users", {"host": "10.0.0.5", "port": 9000})
    due = writer.scheduled_at
    assert due is not None and changed + 0.1 <= due <= loop.time() + 0.1
    registry.register("users", {"host": "10.0.0.6", "port": 9000})
    assert writer.scheduled_at == due  # one write for both
    await writer.settled()
    assert len(writes) == 1
    # The next change, right after that write: it waits for the interval, not the delay.
    registry.register("users", {"host": "10.0.0.7", "port": 9000})
    following = writer.scheduled_at
    assert following is not None
    assert due + 0.5 <= following <= loop.time() + 0.5
    await writer.stop()  # stop does not wait for the timer: it writes at once
    assert len(writes) == 2
    assert saved_ids(path) == {"users": ["10.0.0.5:9000", "10.0.0.6:9000", "10.0.0.7:9000"]}


async def test_the_file_is_written_in_a_thread_while_the_loop_runs(
    registry: Registry, path: Path, writes: list[Write], gate: Gate
) -> None:
    writer = eager(registry, path)
    registry.register("users", {"host": "10.0.0.5", "port": 9000})
    await gate.entered.wait()  # the write has begun and is held in its thread
    ticks = 0
    for _ in range(20):
        await asyncio.sleep(0)  # the loop keeps running meanwhile
        ticks += 1
    assert ticks == 20 and gate.inside == 1 and writer.pending
    # Changes during the write: no second write in flight, one more after it.
    for n in range(5):
        registry.register("users", {"host": f"10.0.1.{n}", "port": 9000})
        await asyncio.sleep(0)
    assert gate.inside == 1 and writer.scheduled_at is None
    gate.release.set()
    await writer.settled()
    assert len(writes) == 2
    assert all(w.thread is not threading.main_thread() for w in writes)
    assert len(saved_ids(path)["users"]) == 6
    await writer.stop()
    assert len(writes) == 2


async def test_stop_waits_for_the_write_in_flight_then_writes_the_last_changes(
    registry: Registry, path: Path, writes: list[Write], gate: Gate
) -> None:
    writer = eager(registry, path)
    registry.register("users", {"host": "10.0.0.5", "port": 9000})
    await gate.entered.wait()
    registry.register("users", {"host": "10.0.0.6", "port": 9000})
    stopping = asyncio.create_task(writer.stop())
    for _ in range(5):
        await asyncio.sleep(0)
    assert not stopping.done() and gate.inside == 1
    gate.release.set()
    await stopping
    assert [len(w.document["services"]["users"]) for w in writes] == [1, 2]
    assert not writer.pending
    assert saved_ids(path) == {"users": ["10.0.0.5:9000", "10.0.0.6:9000"]}


async def test_stop_writes_a_pending_change_and_exact_expiries(
    registry: Registry, clock: FakeClock, path: Path, writes: list[Write]
) -> None:
    writer = SnapshotWriter(registry, path, delay=60.0)
    writer.start()
    registry.register("users", {"host": "10.0.0.5", "port": 9000, "ttl": 30})
    clock.advance(2)
    registry.renew("users", "10.0.0.5:9000")  # within ttl/3: on its own it waits
    assert writes == [] and writer.pending
    await writer.stop()
    assert len(writes) == 1
    assert saved(path)["users"]["10.0.0.5:9000"]["expires_at"] == clock() + 30

    registry.register("users", {"host": "10.0.0.6", "port": 9000})  # after stop: no timer
    assert writer.scheduled_at is None
    await writer.settled()
    assert len(writes) == 1


async def test_stop_with_nothing_pending_writes_nothing(
    registry: Registry, path: Path, writes: list[Write]
) -> None:
    writer = eager(registry, path)
    registry.register("users", {"host": "10.0.0.5", "port": 9000})
    await writer.settled()
    await writer.stop()
    assert len(writes) == 1


async def test_after_a_restart_each_lease_is_within_a_third_of_its_ttl(
    registry: Registry, clock: FakeClock, path: Path, writes: list[Write]
) -> None:
    writer = eager(registry, path)
    rng = random.Random(7)
    ttls = {f"10.0.0.{n}:9000": float(rng.choice([3, 10, 30, 90])) for n in range(20)}
    due: dict[str, float] = {}
    for instance_id, ttl in ttls.items():
        registry.register("users", {"host": instance_id.split(":")[0], "port": 9000, "ttl": ttl})
        due[instance_id] = clock() + rng.uniform(0, ttl / 3)
    heartbeats = 0
    for _ in range(200):
        clock.advance(rng.uniform(0, 0.5))
        for instance_id, ttl in ttls.items():
            if due[instance_id] <= clock():  # like the sidecar: every ttl/3, give or take
                registry.renew("users", instance_id)
                heartbeats += 1
                due[instance_id] = clock() + ttl / 3 * rng.uniform(0.5, 1.1)
        await writer.settled()
        # The gateway dies now: what the file holds is what a restart gets.
        restored = fresh(clock)
        assert load_snapshot(restored, path) == len(ttls)
        for instance in restored.instances("users"):
            real = registry.get("users", instance.id).expires_at
            assert real is not None and instance.expires_at is not None
            assert 0 <= real - instance.expires_at < ttls[instance.id] / 3
    saves = {(i["id"], i["expires_at"]) for w in writes for i in w.document["services"]["users"]}
    assert heartbeats > 500 and len(saves) < heartbeats * 0.8
    await writer.stop()


async def test_an_instance_restored_before_the_writer_is_kept_in_the_file(
    registry: Registry, clock: FakeClock, path: Path, writes: list[Write]
) -> None:
    registry.register("users", {"host": "10.0.0.5", "port": 9000, "ttl": 30})
    save(registry, path)
    restored = fresh(clock)
    assert load_snapshot(restored, path) == 1  # no registry events for these
    writer = eager(restored, path)
    restored.register("users", {"host": "10.0.0.6", "port": 9000})
    await writer.settled()
    assert saved_ids(path) == {"users": ["10.0.0.5:9000", "10.0.0.6:9000"]}
    await writer.stop()


async def test_a_lease_that_became_static_leaves_the_file_at_its_next_event(
    registry: Registry, path: Path, writes: list[Write]
) -> None:
    writer = eager(registry, path)
    registry.register("web", {"host": "127.0.0.1", "port": 9001})
    await writer.settled()
    registry.set_static("web", [("127.0.0.1", 9001)])  # now in routes.yaml (no event)
    registry.renew("web", "127.0.0.1:9001")
    await writer.settled()
    assert saved_ids(path) == {}
    await writer.stop()


def test_a_file_in_the_previous_writers_layout_loads_the_same(
    registry: Registry, clock: FakeClock, path: Path
) -> None:
    populate(registry, clock)
    for n in range(600):  # more than one chunk of the file
        registry.register("bulk", {"host": f"10.1.{n // 256}.{n % 256}", "port": 80, "ttl": 60})
    services = {
        name: [{f: getattr(i, f) for f in _FIELDS} for i in registry.instances(name)]
        for name in registry.service_names()
    }
    previous = {"version": 1, "saved_at": clock(), "services": services}
    save(registry, path)
    assert json.loads(path.read_text()) == previous  # the same document, spaced otherwise
    from_new = fresh(clock)
    assert load_snapshot(from_new, path) == 603
    path.write_text(json.dumps(previous, indent=1) + "\n")  # as the previous writer wrote it
    from_previous = fresh(clock)
    assert load_snapshot(from_previous, path) == 603
    assert everything(from_previous) == everything(from_new)


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
    caplog.set_level(logging.INFO, logger=LOGGER)
    writer = eager(registry, path)
    registry.register("users", {"host": "10.0.0.5", "port": 9000})
    await writer.settled()
    old = path.read_bytes()
    assert leftovers(path) == []

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise OSError(28, "No space left on device")

    if failing == "open":
        monkeypatch.setattr("builtins.open", broken)
    else:
        monkeypatch.setattr(os, failing, broken)
    registry.register("users", {"host": "10.0.0.6", "port": 9000})
    await writer.settled()  # its write failed
    assert writer.pending and writer.scheduled_at is None  # retried at the next change
    for weight in (2, 3, 4):
        registry.update("users", "10.0.0.6:9000", {"weight": weight})
        await writer.settled()  # failed again
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
    assert saved(path)["users"]["10.0.0.6:9000"]["weight"] == 4
    assert leftovers(path) == []
    assert records(caplog, logging.INFO)[-1].getMessage() == (
        f"registry snapshot {path} written again"
    )


async def test_a_bug_in_a_write_is_logged_and_the_writer_goes_on(
    registry: Registry,
    path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    writer = eager(registry, path)

    def buggy(path: Path, chunks: Iterable[bytes]) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(snapshot, "_write_atomically", buggy)
    registry.register("users", {"host": "10.0.0.5", "port": 9000})
    await writer.settled()
    assert [r.getMessage() for r in records(caplog, logging.ERROR)] == [
        f"writing registry snapshot {path} failed"
    ]
    monkeypatch.undo()
    await writer.stop()
    assert saved_ids(path) == {"users": ["10.0.0.5:9000"]}


def test_write_now_on_a_read_only_target_logs_and_returns(
    registry: Registry, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    registry.register("users", {"host": "10.0.0.5", "port": 9000})
    SnapshotWriter(registry, blocker / "registry.json").write_now()  # parent is a file
    assert len(records(caplog, logging.WARNING)) == 1
