"""Registrations that survive a restart: the ``registry.snapshot`` file (SPEC sections 3, 8).

The file is JSON::

    {"version": 1, "saved_at": <epoch seconds>,
     "services": {"<name>": [{<instance fields>}, ...]}}

Only leased instances (``ttl`` not None) are saved; static ones come from routes.yaml.
Times are absolute wall-clock seconds, so a lease keeps its expiry across a restart:
an instance whose lease ran out while the gateway was down is not restored.

Writing is atomic (temp file, fsync, rename, fsync of the folder): a crash leaves the
old file or the new one, never a torn one. A file that cannot be read back is moved
aside with one warning and the gateway starts empty; loading never raises for bad
content. No aiohttp here; the writer only needs a running asyncio loop for its timer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from registry.models import (
    REGISTRATION_FIELDS,
    Instance,
    InvalidField,
    validate_host,
    validate_id,
    validate_metadata,
    validate_port,
    validate_scheme,
    validate_service_name,
    validate_state,
    validate_weight,
)
from registry.store import Registry, UnknownInstance

log = logging.getLogger("registry.snapshot")

VERSION = 1
HEALTHS = ("healthy", "ejected", "failing")
_LATEST_TIME = 253402300799.0  # 9999-12-31T23:59:59Z, the last moment rfc3339() can print


class _Unreadable(ValueError):
    """The snapshot's content is not what this module writes; the message says where."""


# -- field checks: one per saved Instance field (every field but service and in_flight) --


def _number(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Unreadable(f"{where} must be a number")
    number = float(value)
    if not math.isfinite(number):
        raise _Unreadable(f"{where} must be a finite number")
    return number


def _time(value: object, where: str) -> float:
    moment = _number(value, where)
    if not 0.0 <= moment <= _LATEST_TIME:
        raise _Unreadable(f"{where} is not a time between 1970 and 9999")
    return moment


def _ttl(value: object, where: str) -> float:
    ttl = _number(value, where)
    if ttl < 1.0:
        raise _Unreadable(f"{where} must be at least 1 second")
    return ttl


def _bool(value: object, where: str) -> bool:
    if not isinstance(value, bool):
        raise _Unreadable(f"{where} must be true or false")
    return value


def _health(value: object, where: str) -> str:
    if value not in HEALTHS:
        raise _Unreadable(f"{where} must be one of {', '.join(HEALTHS)}")
    return str(value)


def _model(check: Callable[[object], Any]) -> Callable[[object, str], Any]:
    """A registry.models validator, its message prefixed with where the value is."""

    def checked(value: object, where: str) -> Any:
        try:
            return check(value)
        except InvalidField as exc:
            raise _Unreadable(f"{where}: {exc.message}") from None

    return checked


FIELD_CHECKS: dict[str, Callable[[object, str], Any]] = {
    "id": _model(validate_id),
    "host": _model(validate_host),
    "port": _model(validate_port),
    "scheme": _model(validate_scheme),
    "weight": _model(validate_weight),
    "state": _model(validate_state),
    "health": _health,
    "metadata": _model(validate_metadata),
    "registered_at": _time,
    "last_heartbeat": _time,
    "ttl": _ttl,
    "expires_at": _time,
    "deregister_when_idle": _bool,
}


def _instance_fields(raw: object, where: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise _Unreadable(f"{where} must be an object")
    missing = [name for name in REGISTRATION_FIELDS if name not in raw]
    if missing:
        raise _Unreadable(f"{where} lacks {', '.join(missing)}")
    unknown = sorted(str(key) for key in raw if key not in REGISTRATION_FIELDS)
    if unknown:
        raise _Unreadable(f"{where} has unknown field(s) {', '.join(unknown)}")
    fields = {
        name: FIELD_CHECKS[name](raw[name], f"{where}.{name}") for name in REGISTRATION_FIELDS
    }
    if fields["registered_at"] > fields["last_heartbeat"]:
        raise _Unreadable(f"{where}: registered_at is after last_heartbeat")
    if fields["expires_at"] > fields["last_heartbeat"] + fields["ttl"] + 1e-3:
        raise _Unreadable(f"{where}: expires_at is later than last_heartbeat + ttl")
    if fields["deregister_when_idle"] and fields["state"] != "draining":
        raise _Unreadable(f"{where}: deregister_when_idle is only for a draining instance")
    return fields


def _no_constants(name: str) -> Any:
    raise _Unreadable(f"{name} is not a number")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _Unreadable(f"key {key!r} appears twice")
        result[key] = value
    return result


def _parse(data: bytes) -> dict[str, list[dict[str, Any]]]:
    """Validated instance fields by service; raises _Unreadable."""
    try:
        document = json.loads(data, parse_constant=_no_constants, object_pairs_hook=_no_duplicates)
    except RecursionError:
        raise _Unreadable("nested too deeply") from None
    except _Unreadable:
        raise
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, too many digits
        raise _Unreadable(f"invalid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise _Unreadable(f"expected a JSON object, found {type(document).__name__}")
    if document.get("version") != VERSION or isinstance(document.get("version"), bool):
        raise _Unreadable(f"version must be {VERSION}, found {document.get('version')!r}")
    _time(document.get("saved_at"), "saved_at")
    services = document.get("services")
    if not isinstance(services, dict):
        raise _Unreadable("services must be an object of service name to list of instances")
    result: dict[str, list[dict[str, Any]]] = {}
    for name, entries in services.items():
        try:
            validate_service_name(name)
        except InvalidField as exc:
            raise _Unreadable(f"services.{name}: {exc.message}") from None
        if not isinstance(entries, list):
            raise _Unreadable(f"services.{name} must be a list of instances")
        seen: set[str] = set()
        fields_list = []
        for position, raw in enumerate(entries):
            fields = _instance_fields(raw, f"services.{name}[{position}]")
            if fields["id"] in seen:
                raise _Unreadable(f"services.{name}[{position}]: id {fields['id']!r} twice")
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
    it before the lease reaper (RegistryRuntime.start) so it sees the restored leases.
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
    except _Unreadable as exc:
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


def _document(registry: Registry) -> dict[str, Any]:
    services: dict[str, list[dict[str, Any]]] = {}
    for name in registry.service_names():
        # In registry order, so a restored service round-robins in the same order.
        leased = [i for i in registry.instances(name) if i.ttl is not None]
        if leased:
            services[name] = [{f: getattr(i, f) for f in REGISTRATION_FIELDS} for i in leased]
    return {"version": VERSION, "saved_at": registry.clock(), "services": services}


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


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(temp, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
    _fsync_folder(path.parent)


class SnapshotWriter:
    """Writes the registry to ``path`` at most ``delay`` seconds after any change.

    Every registry event (heartbeats too: they move a lease's expiry) marks the state
    dirty and, once started, schedules one write ``delay`` seconds later unless one is
    already pending, so a burst of changes costs one write. A failed write is logged and
    retried at the next change (and at stop); it never raises into the event loop.
    """

    def __init__(self, registry: Registry, path: Path, delay: float = 0.1) -> None:
        self.registry = registry
        self.path = path
        self.delay = delay
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._dirty = False
        self._failing: str | None = None  # the reason of the last failed write, if it failed
        registry.subscribe(self._on_event)

    @property
    def pending(self) -> bool:
        """A change has not reached the file yet."""
        return self._dirty

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self._dirty:
            self._schedule()

    async def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._loop = None
        if self._dirty:
            self._write_logged()

    def write_now(self) -> None:
        """Write the registry to the file now, atomically. Logs (never raises) an OSError."""
        document = _document(self.registry)  # may evict ended leases, which marks us dirty
        if self._timer is not None:  # what that would write is in this write already
            self._timer.cancel()
            self._timer = None
        self._dirty = False
        try:
            data = json.dumps(document, indent=1, allow_nan=False).encode() + b"\n"
            _write_atomically(self.path, data)
        except OSError as exc:
            self._dirty = True
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
            return
        if self._failing is not None:
            log.info("registry snapshot %s written again", self.path)
            self._failing = None

    # -- internals -----------------------------------------------------------

    def _on_event(self, event: str, service: str, instance: Instance) -> None:
        self._dirty = True
        if self._loop is not None and self._timer is None:
            self._schedule()

    def _schedule(self) -> None:
        assert self._loop is not None
        if self._timer is None:
            self._timer = self._loop.call_later(self.delay, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._write_logged()

    def _write_logged(self) -> None:
        try:
            self.write_now()
        except Exception:  # a bug, not the disk: say so, keep the gateway running
            log.exception("writing registry snapshot %s failed", self.path)
