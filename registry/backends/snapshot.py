"""Registrations that survive a restart: the ``registry.snapshot`` file (SPEC sections 3, 8).

The file is JSON::

    {"version": 1, "saved_at": <epoch seconds>,
     "services": {"<name>": [{<instance fields>}, ...]}}

Only leased instances (``ttl`` not None) are saved; static ones come from routes.yaml.
Upgrades keep it: a file written before a field existed loads with that field's default
(FIELDS), and a field this version does not know is ignored; tests/data/snapshot-v1.json
is a file of the first format, and must always load.
Times are absolute wall-clock seconds, so a lease keeps its expiry across a restart:
an instance whose lease ran out while the gateway was down is not restored.

Writing is atomic (temp file, fsync, rename, fsync of the folder): a crash leaves the
old file or the new one, never a torn one. It happens in a thread, at most every
``interval`` seconds, and a heartbeat reaches the file only once its lease moved by a
third of its ttl (SnapshotWriter). Any JSON of that shape loads, however it is spaced
(this writer puts one instance a line; earlier ones indented every field). A file that
cannot be read back is moved aside with one warning and the gateway starts empty;
loading never raises for bad content. No aiohttp here; the writer needs a running
asyncio loop for its timer and its thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

from registry.core.errors import InvalidField, UnknownInstance
from registry.core.models import (
    REGISTRATION_FIELDS,
    Instance,
    validate_host,
    validate_id,
    validate_metadata,
    validate_port,
    validate_scheme,
    validate_service_name,
    validate_state,
    validate_weight,
)
from registry.core.store import Registry

log = logging.getLogger("registry.snapshot")

VERSION = 1
HEALTHS = ("healthy", "ejected", "failing")
_LATEST_TIME = 253402300799.0  # 9999-12-31T23:59:59Z, the last moment rfc3339() can print


class Unreadable(ValueError):
    """The snapshot's content is not what this module writes; the message says where."""


# -- field checks: one per saved Instance field (every field but service and in_flight) --


def _number(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Unreadable(f"{where} must be a number")
    number = float(value)
    if not math.isfinite(number):
        raise Unreadable(f"{where} must be a finite number")
    return number


def _time(value: object, where: str) -> float:
    moment = _number(value, where)
    if not 0.0 <= moment <= _LATEST_TIME:
        raise Unreadable(f"{where} is not a time between 1970 and 9999")
    return moment


def _ttl(value: object, where: str) -> float:
    ttl = _number(value, where)
    if ttl < 1.0:
        raise Unreadable(f"{where} must be at least 1 second")
    return ttl


def _bool(value: object, where: str) -> bool:
    if not isinstance(value, bool):
        raise Unreadable(f"{where} must be true or false")
    return value


def _health(value: object, where: str) -> str:
    if value not in HEALTHS:
        raise Unreadable(f"{where} must be one of {', '.join(HEALTHS)}")
    return str(value)


def _model(check: Callable[[object], Any]) -> Callable[[object, str], Any]:
    """A registry.core.models validator, its message prefixed with where the value is."""

    def checked(value: object, where: str) -> Any:
        try:
            return check(value)
        except InvalidField as exc:
            raise Unreadable(f"{where}: {exc.message}") from None

    return checked


class Field(NamedTuple):
    """How a saved Instance field is read back: its check, and what stands for it in a
    file written before the field existed (None: required, such a file is unreadable)."""

    check: Callable[[object, str], Any]
    default: Callable[[], Any] | None = None


# One entry per saved Instance field (every field but service and the in-flight counts).
# Schema evolution: a new field comes with a default here, and older files load with it;
# a field this version does not know (written by a newer one) is ignored. VERSION moves
# only for a change an older reader would misread; it then moves such a file aside.
FIELDS: dict[str, Field] = {
    "id": Field(_model(validate_id)),
    "host": Field(_model(validate_host)),
    "port": Field(_model(validate_port)),
    "scheme": Field(_model(validate_scheme), lambda: "http"),
    "weight": Field(_model(validate_weight), lambda: 1),
    "state": Field(_model(validate_state), lambda: "up"),
    "health": Field(_health, lambda: "healthy"),
    "metadata": Field(_model(validate_metadata), dict),
    "registered_at": Field(_time),
    "last_heartbeat": Field(_time),
    "ttl": Field(_ttl),
    "expires_at": Field(_time),
    "deregister_when_idle": Field(_bool, lambda: False),
}


def read_fields(raw: object, where: str, names: Iterable[str] = FIELDS) -> dict[str, Any]:
    """The ``names`` of FIELDS read from a saved instance (a JSON object): checked, a
    missing one with its default. Unreadable when one is wrong or required and missing.
    Also how the etcd backend reads an instance's key."""
    if not isinstance(raw, dict):
        raise Unreadable(f"{where} must be an object")
    wanted = {name: FIELDS[name] for name in names}
    missing = [name for name, f in wanted.items() if name not in raw and f.default is None]
    if missing:
        raise Unreadable(f"{where} lacks {', '.join(missing)}")
    fields: dict[str, Any] = {}
    for name, f in wanted.items():  # a key of a newer version's field is left unread
        if name in raw:
            fields[name] = f.check(raw[name], f"{where}.{name}")
        elif f.default is not None:
            fields[name] = f.default()
    return fields


def _instance_fields(raw: object, where: str, saved_at: float) -> dict[str, Any]:
    fields = read_fields(raw, where)
    if fields["registered_at"] > fields["last_heartbeat"]:
        raise Unreadable(f"{where}: registered_at is after last_heartbeat")
    # A lease ends a ttl after its last renewal at the latest: a heartbeat, or a
    # self-preservation (store.Registry._preserve) before the file was saved.
    if fields["expires_at"] > max(fields["last_heartbeat"], saved_at) + fields["ttl"] + 1e-3:
        raise Unreadable(f"{where}: expires_at is later than saved_at + ttl")
    if fields["deregister_when_idle"] and fields["state"] != "draining":
        raise Unreadable(f"{where}: deregister_when_idle is only for a draining instance")
    return fields


def _no_constants(name: str) -> Any:
    raise Unreadable(f"{name} is not a number")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise Unreadable(f"key {key!r} appears twice")
        result[key] = value
    return result


def _parse(data: bytes) -> dict[str, list[dict[str, Any]]]:
    """Validated instance fields by service; raises Unreadable."""
    try:
        document = json.loads(data, parse_constant=_no_constants, object_pairs_hook=_no_duplicates)
    except RecursionError:
        raise Unreadable("nested too deeply") from None
    except Unreadable:
        raise
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, too many digits
        raise Unreadable(f"invalid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise Unreadable(f"expected a JSON object, found {type(document).__name__}")
    if document.get("version") != VERSION or isinstance(document.get("version"), bool):
        raise Unreadable(f"version must be {VERSION}, found {document.get('version')!r}")
    saved_at = _time(document.get("saved_at"), "saved_at")
    services = document.get("services")
    if not isinstance(services, dict):
        raise Unreadable("services must be an object of service name to list of instances")
    result: dict[str, list[dict[str, Any]]] = {}
    for name, entries in services.items():
        try:
            validate_service_name(name)
        except InvalidField as exc:
            raise Unreadable(f"services.{name}: {exc.message}") from None
        if not isinstance(entries, list):
            raise Unreadable(f"services.{name} must be a list of instances")
        seen: set[str] = set()
        fields_list = []
        for position, raw in enumerate(entries):
            fields = _instance_fields(raw, f"services.{name}[{position}]", saved_at)
            if fields["id"] in seen:
                raise Unreadable(f"services.{name}[{position}]: id {fields['id']!r} twice")
            seen.add(fields["id"])
            fields_list.append(fields)
        result[name] = fields_list
    return result


# -- loading ---------------------------------------------------------------------------


def _utc_stamp(moment: float) -> str:
    return datetime.fromtimestamp(moment, tz=UTC).strftime("%Y%m%dT%H%M%SZ")


def _move_aside(registry: Registry, path: Path, reason: str) -> None:
    stamp = _utc_stamp(registry.clock())
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    counter = 1
    while target.exists():  # two bad files within one second: keep both
        counter += 1
        target = path.with_name(f"{path.name}.corrupt-{stamp}-{counter}")
    try:
        os.replace(path, target)
    except OSError as exc:
        log.warning(
            "registry snapshot %s is unreadable (%s); could not move it aside (%s), starting empty",
            path,
            reason,
            exc.strerror or exc,
        )
        return
    log.warning(
        "registry snapshot %s is unreadable (%s); moved aside to %s, starting empty",
        path,
        reason,
        target,
    )


def _present(registry: Registry, name: str, instance_id: str) -> bool:
    try:
        registry.get(name, instance_id)
    except UnknownInstance:
        return False
    return True


def load_snapshot(registry: Registry, path: Path) -> int:
    """Restore the instances saved in ``path`` into ``registry``; returns how many.

    Dropped: leases that ended (``expires_at <= registry.clock()``), draining instances
    marked ``deregister_when_idle`` (nothing is in flight after a restart, so they would
    have been removed at once), and ids the registry already holds (a static instance
    from routes.yaml, or a registration that arrived first, wins over the file). A lease
    longer than the registry's ``max_ttl`` (lowered since it was saved) is shortened to it.

    A missing file restores nothing. A file that cannot be read or parsed is moved aside
    to ``<path>.corrupt-<UTC YYYYmmddTHHMMSSZ>`` with one warning; then 0 is returned.
    Never raises for bad content. Emits no registry events (``Registry.mirror``), so call
    it before the lease reaper (LeaseTimer.start) so it sees the restored leases.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return 0
    except OSError as exc:
        _move_aside(registry, path, f"cannot read it: {exc.strerror or exc}")
        return 0
    try:
        services = _parse(data)
    except Unreadable as exc:
        _move_aside(registry, path, str(exc))
        return 0
    now = registry.clock()
    restored = dropped = 0
    for name, entries in services.items():
        for fields in entries:
            if fields["expires_at"] <= now or fields["deregister_when_idle"]:
                dropped += 1
                continue
            if _present(registry, name, fields["id"]):
                dropped += 1
                continue
            if fields["ttl"] > registry.max_ttl:
                fields["ttl"] = registry.max_ttl
                fields["expires_at"] = min(fields["expires_at"], now + registry.max_ttl)
            # Health is a verdict of checks and traffic since start: none yet.
            registry.mirror(name, {**fields, "health": "healthy"})
            restored += 1
    log.info(
        "registry snapshot %s: restored %d instance(s), dropped %d (lease ended or superseded)",
        path,
        restored,
        dropped,
    )
    return restored


# -- writing ---------------------------------------------------------------------------


def _fragment(instance: Instance) -> bytes:
    """One instance's entry of the file, encoded once when it changes."""
    fields = {f: getattr(instance, f) for f in REGISTRATION_FIELDS}
    return json.dumps(fields, allow_nan=False).encode()


class _Saved:
    """What the next write saves of one leased instance. Never changed once made."""

    __slots__ = ("instance", "expires_at", "fragment")

    def __init__(self, instance: Instance) -> None:
        self.instance = instance
        self.expires_at = instance.expires_at
        self.fragment = _fragment(instance)


# (saved_at, [(service name, its instances' entries in registry order)]): taken on the
# loop, read in the thread (safe: a change makes a new _Saved, never edits one).
_Document = tuple[float, list[tuple[str, list[_Saved]]]]
_BATCH = 256  # entries a chunk of the file: ~90 kB, joined in well under a millisecond


def _chunks(document: _Document) -> Iterator[bytes]:
    """The file's bytes (the JSON the module docstring shows, one instance a line) in
    chunks: no single step holds the GIL for long, so the loop thread gets it promptly."""
    saved_at, services = document
    yield b'{"version": %d, "saved_at": %s, "services": {' % (VERSION, repr(saved_at).encode())
    for position, (name, entries) in enumerate(services):
        yield b"%s\n%s: [\n " % (b"," if position else b"", json.dumps(name).encode())
        for start in range(0, len(entries), _BATCH):
            fragments = [saved.fragment for saved in entries[start : start + _BATCH]]
            yield (b",\n " if start else b"") + b",\n ".join(fragments)
        yield b"\n]"
    yield b"\n}}\n"


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomically(path: Path, chunks: Iterable[bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(temp, "wb") as file:
            for chunk in chunks:
                file.write(chunk)  # a chunk larger than the buffer: written without the GIL
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
    _fsync_folder(path.parent)


class SnapshotWriter:
    """Keeps ``path`` up to date with the registry's leased instances, off the event loop.

    Each instance's entry is encoded (one small json.dumps) on the loop when a registry
    event changes it; a write takes the list of entries on the loop (a shallow copy) and
    joins, writes and fsyncs it in a thread. Nothing holds the GIL, and so stalls the
    loop, for as long as a json.dumps of the whole document would. A heartbeat changes
    the entry only once the lease has moved by ttl/3 or more since the entry was
    encoded: once written, the file's expiry of a lease is less than ttl/3 behind the
    real one, and renewals between do not rewrite it.

    Pacing: the first change after a quiet spell is written ``delay`` seconds later; a
    write starts at least ``interval`` seconds after the previous one started; one write
    is in flight at a time, and changes that arrive meanwhile cause one more write after
    it. A failed write is logged and retried at the next change (and at stop); it never
    raises into the event loop.

    Instances the registry holds when the writer is made (restored by load_snapshot,
    which emits no events) are taken then; later ones come from the registry's events.
    """

    def __init__(
        self, registry: Registry, path: Path, delay: float = 0.1, interval: float = 0.5
    ) -> None:
        self.registry = registry
        self.path = path
        self.delay = delay
        self.interval = interval
        self._saved: dict[str, dict[str, _Saved]] = {}  # service -> id -> entry, registry order
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._writing: asyncio.Task[None] | None = None
        self._settled = asyncio.Event()
        self._settled.set()
        self._last_start = -math.inf  # loop time the last write started
        self._dirty = False
        self._failing: str | None = None  # the reason of the last failed write, if it failed
        self._lock = threading.Lock()  # one file write at a time, in order
        self._taken = self._written = 0  # generations: documents taken, the newest written
        for name in registry.service_names():
            for instance in registry.instances(name):
                if instance.ttl is not None:
                    self._saved.setdefault(name, {})[instance.id] = _Saved(instance)
        registry.subscribe(self._on_event)

    @property
    def pending(self) -> bool:
        """A change has not reached the file yet (none taken, or its write is in flight)."""
        return self._dirty or self._writing is not None

    @property
    def scheduled_at(self) -> float | None:
        """The loop time the next write is due, or None when none is scheduled."""
        return self._timer.when() if self._timer is not None else None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self._dirty and self._timer is None and self._writing is None:
            self._schedule()

    async def stop(self) -> None:
        """Wait for a write in flight, then write what changed since, exact expiries too."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._loop = None
        if self._writing is not None:
            await asyncio.shield(self._writing)
        self._refresh()
        if self._dirty:
            await self._write(self._take())
        self._settled.set()

    async def settled(self) -> None:
        """Return once no write is scheduled or in flight."""
        while self._timer is not None or self._writing is not None:
            await self._settled.wait()

    def write_now(self) -> None:
        """Write every leased instance, exact expiries included, now, on this thread.

        Logs (never raises) an OSError. A write in flight in the thread finishes first.
        """
        self._refresh()
        try:
            self._write_file(*self._take())
        except OSError as exc:
            self._failed(exc)
        else:
            self._succeeded()

    # -- internals -----------------------------------------------------------

    def _on_event(self, event: str, service: str, instance: Instance) -> None:
        entries = self._saved.get(service)
        saved = entries.get(instance.id) if entries is not None else None
        if saved is not None and saved.instance is not instance:
            saved = None  # an older instance of the same id: its removal came first
        if event in ("deregistered", "evicted") or instance.ttl is None:
            if saved is not None and entries is not None:
                del entries[instance.id]
                if not entries:
                    del self._saved[service]
                self._mark()
            return
        if event == "heartbeat" and saved is not None and not self._moved(saved):
            return
        if entries is None:
            entries = self._saved[service] = {}
        elif saved is None:
            entries.pop(instance.id, None)  # a new object goes last, as in the registry
        entries[instance.id] = _Saved(instance)
        self._mark()

    @staticmethod
    def _moved(saved: _Saved) -> bool:
        """The lease has moved by ttl/3 or more from what the entry says."""
        ttl, now, then = saved.instance.ttl, saved.instance.expires_at, saved.expires_at
        if ttl is None or now is None or then is None:
            return now != then
        return abs(now - then) >= ttl / 3

    def _refresh(self) -> None:
        """Encode again every entry whose lease moved at all (for a stop: exact expiries)."""
        for entries in self._saved.values():
            for instance_id, saved in entries.items():
                if saved.instance.expires_at != saved.expires_at:
                    entries[instance_id] = _Saved(saved.instance)
                    self._dirty = True

    def _mark(self) -> None:
        self._dirty = True
        if self._loop is not None and self._timer is None and self._writing is None:
            self._schedule()

    def _schedule(self) -> None:
        assert self._loop is not None
        when = max(self._loop.time() + self.delay, self._last_start + self.interval)
        self._timer = self._loop.call_at(when, self._fire)
        self._settled.clear()

    def _fire(self) -> None:
        assert self._loop is not None
        self._timer = None
        self._last_start = self._loop.time()
        self._writing = self._loop.create_task(self._write_in_background(self._take()))

    def _take(self) -> tuple[int, _Document]:
        """The document as of now: a shallow copy of the entries, cheap, on the loop."""
        self._dirty = False
        self._taken += 1
        services = [(name, list(self._saved[name].values())) for name in sorted(self._saved)]
        return self._taken, (self.registry.clock(), services)

    async def _write_in_background(self, taken: tuple[int, _Document]) -> None:
        again = False
        try:
            again = await self._write(taken)
        finally:
            self._writing = None
            if again and self._loop is not None:
                self._schedule()
            else:
                self._settled.set()

    async def _write(self, taken: tuple[int, _Document]) -> bool:
        """Write ``taken`` in a thread; returns whether changes came meanwhile."""
        try:
            await asyncio.to_thread(self._write_file, *taken)
        except Exception as exc:
            changed = self._dirty
            self._failed(exc)
            return changed
        self._succeeded()
        return self._dirty

    def _write_file(self, generation: int, document: _Document) -> None:
        """In a thread (on the caller's for write_now): write, in order of taking."""
        with self._lock:
            if generation > self._written:  # else a newer document is in the file already
                _write_atomically(self.path, _chunks(document))
                self._written = generation

    def _failed(self, exc: Exception) -> None:
        self._dirty = True  # retried at the next change, and at stop
        if not isinstance(exc, OSError):  # a bug, not the disk: say so, keep running
            log.error("writing registry snapshot %s failed", self.path, exc_info=exc)
            return
        reason = str(exc.strerror or exc)
        if reason != self._failing:
            log.warning(
                "cannot write registry snapshot %s (%s); registrations are kept in "
                "memory and the write is retried at the next change",
                self.path,
                reason,
            )
        else:
            log.debug("registry snapshot %s still not writable (%s)", self.path, reason)
        self._failing = reason

    def _succeeded(self) -> None:
        if self._failing is not None:
            log.info("registry snapshot %s written again", self.path)
            self._failing = None
