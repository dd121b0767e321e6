"""The etcd backend: several gateways share one registry (SPEC section 7).

Each instance is one key, ``<prefix><service>/<id>``, whose value is the registration
as JSON and which is attached to an etcd lease of the instance's ttl:

- register: a new lease, the key put with it (the old lease, if any, revoked);
- heartbeat: a keep-alive of the lease (a lease that is gone answers 404);
- PATCH, drain, deregister: writes of the key; the lease's end: etcd deletes the key.

Every gateway keeps its own copy in ``store`` and routes from it, never waiting on
etcd: a full read, then a watch from the revision after it. The watch resumes from
the last revision it applied when its stream drops; a compacted start revision or a
revision going backwards (etcd restored or wiped) means a full read again. A probe
reads etcd's revision every second: when etcd does not answer (down, or frozen) the
gateway is degraded (/readyz 503, one log line), writes answer 503
``registry_unavailable``, and routing goes on from the last copy: leases are etcd's,
nothing is evicted on the gateway's own clock. When etcd answers again the watch
starts over (on the next endpoint, if the last one is gone) and catches up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Coroutine, Mapping, Sequence
from typing import Any

from registry.backends.base import RegistryBackend
from registry.backends.etcd_client import EtcdClient, EtcdError, EtcdUnavailable, key_value
from registry.backends.leases import LeaseTimer
from registry.backends.snapshot import Unreadable, read_fields
from registry.core.errors import ApiError, UnknownInstance
from registry.core.models import Instance
from registry.core.store import Registry

log = logging.getLogger("registry.etcd")

PREFIX = "/gateway/registry/"
# What a key's value holds: the registration. Health, requests in flight and the lease's
# end are each gateway's own (the lease is etcd's: a key outlives no lease).
VALUE_FIELDS = (
    "id",
    "host",
    "port",
    "scheme",
    "weight",
    "state",
    "metadata",
    "registered_at",
    "ttl",
    "deregister_when_idle",
)
PROBE_INTERVAL = 1.0
MAX_RETRY_DELAY = 2.0
MAX_SPARE_TTLS = 16  # distinct ttls a spare lease is kept ready for


class _Resync(Exception):
    """The watch cannot go on from where it is: read everything again."""


def unavailable(reason: str) -> ApiError:
    return ApiError(
        503,
        "registry_unavailable",
        f"registry writes are refused ({reason}); routing goes on from the last copy",
        {"Retry-After": "1"},
    )


def parse_endpoints(backend: str) -> list[str]:
    """``etcd://H:P[,H:P...]`` (checked by the config loader) -> ``["H:P", ...]``."""
    return backend.partition("://")[2].split(",")


class EtcdBackend(RegistryBackend):
    def __init__(
        self,
        store: Registry,
        endpoints: Sequence[str],
        *,
        prefix: str = PREFIX,
        timeout: float = 2.0,
        probe_interval: float = PROBE_INTERVAL,
    ) -> None:
        self.store = store
        self.client = EtcdClient(endpoints, timeout)
        self.prefix = prefix
        self.probe_interval = probe_interval
        self.revision = 0  # the last revision the copy has applied
        self._known: dict[tuple[str, str], int] = {}  # instances from etcd -> their lease
        # The revision of the newest write of each key the copy has applied: a watch
        # event older than a write this gateway made (and applied) is not applied again.
        self._revisions: dict[tuple[str, str], int] = {}
        self._problem: str | None = "etcd not reached yet"
        self._stale = True  # a full read is due before the watch
        self._long_polls = LeaseTimer(store)  # no lease times here: it wakes long polls
        self._watch: asyncio.Task[None] | None = None
        self._probe: asyncio.Task[None] | None = None
        self._watching_on = ""
        self._background: set[asyncio.Task[Any]] = set()
        # One lease granted ahead for each ttl in use, with when it was granted: a
        # registration then waits for one etcd write (the put; a keep-alive after it
        # brings the lease back to its full ttl) instead of two (grant, then put).
        self._spares: dict[int, tuple[int, float]] = {}
        store.subscribe(self._on_store_event)

    # -- life ------------------------------------------------------------------------

    async def start(self) -> None:
        self._long_polls.start()
        try:
            await self._resync()
            self._up()
        except EtcdError as exc:
            self._down(str(exc))  # start anyway: static routes work, /readyz says why
        self._restart_watch()
        self._probe = asyncio.get_running_loop().create_task(self._probing())

    async def stop(self) -> None:
        for task in [self._watch, self._probe, *self._background]:
            if task is not None:
                task.cancel()
        for task in [self._watch, self._probe, *self._background]:
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._watch = self._probe = None
        self._long_polls.stop()
        spares, self._spares = list(self._spares.values()), {}
        with contextlib.suppress(EtcdError, TimeoutError):  # else they end with their ttl
            async with asyncio.timeout(1.0):
                await asyncio.gather(*(self.client.revoke(lease) for lease, _ in spares))
        await self.client.close()

    def problem(self) -> str | None:
        return self._problem

    # -- writes ----------------------------------------------------------------------

    async def register(self, service: str, body: Mapping[str, Any]) -> tuple[Instance, bool]:
        valid = self.store.validate_registration(service, body)
        instance_id = valid["id"]
        existing = self._local(service, instance_id)
        if existing is None:
            self.store.check_room(service, instance_id)
        now = self.store.clock()
        fields = {
            **valid,
            "state": "up",
            "registered_at": existing.registered_at if existing is not None else now,
            "deregister_when_idle": False,
        }
        old = self._known.get((service, instance_id))  # before the watch brings the new one
        async with self._writing():
            lease, revision = await self._put_on_new_lease(
                self._key(service, instance_id), _encode(fields), valid["ttl"]
            )
        self._known[(service, instance_id)] = lease
        self._revisions[(service, instance_id)] = revision
        if old is not None and old != lease:
            try:  # the key is on the new lease already: the old one would only linger
                await self.client.revoke(old)
            except EtcdError as exc:
                log.warning("etcd: the old lease of %s/%s stays until its ttl: %s",
                            service, instance_id, exc)  # fmt: skip
        instance = self.store.mirror(
            service, {**fields, "last_heartbeat": now, "expires_at": None}, event="registered"
        )
        return instance, existing is None

    async def _put_on_new_lease(self, key: str, value: bytes, ttl: float) -> tuple[int, int]:
        """Put ``key`` on a lease of its own: a spare one (renewed to the full ttl right
        after the put), else one granted now. Returns the lease and the put's revision."""
        seconds = max(1, round(ttl))
        spare = self._spares.pop(seconds, None)
        try:
            if spare is not None and time.monotonic() - spare[1] < seconds / 2:
                lease = spare[0]
                try:
                    revision = await self.client.put(key, value, lease)
                    self._spawn(self.client.keep_alive(lease))  # back to the full ttl
                    return lease, revision
                except EtcdUnavailable:
                    raise
                except EtcdError:
                    pass  # the spare is gone (etcd wiped?): a lease of its own, then
            lease = await self.client.grant(seconds)
            return lease, await self.client.put(key, value, lease)
        finally:
            # After the put, not beside it: etcd writes one after the other (each waits
            # for its fsync), and the next registration's spare must not delay this one.
            if len(self._spares) < MAX_SPARE_TTLS:
                self._spawn(self._grant_spare(seconds))

    async def _grant_spare(self, seconds: int) -> None:
        lease = await self.client.grant(seconds)
        self._spares[seconds] = (lease, time.monotonic())

    async def renew(self, service: str, instance_id: str) -> Instance:
        async with self._writing():
            lease = await self._lease_of(service, instance_id)
            ttl = await self.client.keep_alive(lease)
        if ttl <= 0:  # the lease ended: etcd deletes (or deleted) the key
            raise UnknownInstance(f"no instance {instance_id!r} in service {service!r}")
        return self.store.touch(service, instance_id)

    async def update(self, service: str, instance_id: str, body: Mapping[str, Any]) -> Instance:
        async with self._writing():
            lease = await self._lease_of(service, instance_id)
            instance = self.store.get(service, instance_id)
            valid = self.store.validate_update(instance, body)
            fields = {**_registration(instance), **valid}
            try:
                revision = await self.client.put(
                    self._key(service, instance_id), _encode(fields), lease
                )
            except EtcdUnavailable:
                raise
            except EtcdError as exc:  # the lease ended in between
                raise UnknownInstance(
                    f"no instance {instance_id!r} in service {service!r}"
                ) from exc
        self._revisions[(service, instance_id)] = max(
            revision, self._revisions.get((service, instance_id), 0)
        )
        instance = self.store.mirror(service, {"id": instance_id, **valid}, event="updated")
        if instance.deregister_when_idle and instance.idle:
            await self.deregister(service, instance_id)
        return instance

    async def deregister(self, service: str, instance_id: str) -> None:
        key = self._key(service, instance_id)
        async with self._writing():
            deleted, revision, lease = await self.client.delete(key)
        self._revisions[(service, instance_id)] = revision
        lease = self._known.pop((service, instance_id), 0) or lease
        if lease:
            self._spawn(self.client.revoke(lease))
        here = self.store.unmirror(service, instance_id)
        if not deleted and not here:
            raise UnknownInstance(f"no instance {instance_id!r} in service {service!r}")

    async def wait_for_change(self, service: str, index: int, timeout: float) -> None:
        await self._long_polls.wait_for_change(service, index, timeout)

    # -- the copy ----------------------------------------------------------------------

    async def _resync(self) -> None:
        """Read every key: the copy becomes exactly what etcd holds, at its revision."""
        revision, kvs = await self.client.range_prefix(self.prefix)
        self._revisions.clear()  # what etcd holds now is the truth, whatever came before
        seen = set()
        for key, value, mod_revision, lease in kvs:
            name = self._parse_key(key)
            if name is not None and self._apply_put(name, value, lease, mod_revision):
                seen.add(name)
        for name in set(self._known) - seen:
            self._apply_delete(name, revision)
        self.revision = revision
        self._stale = False

    def _restart_watch(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        self._watch = asyncio.get_running_loop().create_task(self._watching())

    async def _watching(self) -> None:
        """Follow etcd. A broken stream goes on at once from the next member; only when
        none of them answers is the gateway degraded (then retries back off to 2 s)."""
        delay = 0.05
        failures = 0
        while True:
            try:
                if self._stale:
                    await self._resync()
                self._watching_on = self.client.endpoint
                async for result in self.client.watch(self.prefix, self.revision + 1):
                    self._on_watch(result)
                    if self._problem is not None:
                        self._up()
                    delay, failures = 0.05, 0
                # The stream ended (the member closed it): go on from where it was.
                await asyncio.sleep(delay)
            except _Resync as exc:
                log.warning("etcd watch: %s; reading the whole registry again", exc)
                self._stale = True
            except EtcdError as exc:
                self.client.failover()
                failures += 1
                if failures >= len(self.client.endpoints):
                    self._down(str(exc))
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, MAX_RETRY_DELAY)

    def _on_watch(self, result: dict[str, Any]) -> None:
        header = result.get("header", {})
        revision = int(header.get("revision", 0))
        if result.get("canceled"):
            compacted = int(result.get("compact_revision", 0))
            if compacted:
                raise _Resync(f"revision {self.revision + 1} was compacted (now {compacted})")
            raise _Resync(f"watch canceled: {result.get('cancel_reason', 'no reason given')}")
        if revision and revision < self.revision:
            raise _Resync(f"etcd's revision went back from {self.revision} to {revision}")
        events = result.get("events")
        if events:
            for event in events:
                key, value, mod_revision, lease = key_value(event["kv"])
                name = self._parse_key(key)
                if name is not None:
                    if event.get("type") == "DELETE":
                        self._apply_delete(name, mod_revision)
                    else:
                        self._apply_put(name, value, lease, mod_revision)
                self.revision = max(self.revision, mod_revision)
        elif not result.get("created") and revision:
            self.revision = max(self.revision, revision)  # a progress notification

    def _apply_put(self, name: tuple[str, str], value: bytes, lease: int, revision: int) -> bool:
        """The copy takes a key's value; False if it is unreadable or older than the copy."""
        if revision < self._revisions.get(name, 0):
            return name in self._known
        service, instance_id = name
        try:
            fields = read_fields(
                json.loads(value), f"etcd key {service}/{instance_id}", VALUE_FIELDS
            )
        except (ValueError, Unreadable) as exc:
            log.warning("ignoring etcd key %s%s/%s: %s", self.prefix, service, instance_id, exc)
            return False
        if fields["id"] != instance_id:
            log.warning("ignoring etcd key %s%s/%s: its id is %r", self.prefix, service,
                        instance_id, fields["id"])  # fmt: skip
            return False
        existing = self._local(service, instance_id)
        fields["last_heartbeat"] = (
            existing.last_heartbeat if existing is not None else fields["registered_at"]
        )
        # deregister_when_idle is acted on by the gateway that took the PATCH (it counts
        # its own requests in flight); the others only stop sending new ones.
        fields["deregister_when_idle"] = existing is not None and existing.deregister_when_idle
        fields["expires_at"] = None  # the lease is etcd's: never ended by this clock
        self._known[name] = lease
        self._revisions[name] = revision
        self.store.mirror(service, fields, event="mirrored")
        return True

    def _apply_delete(self, name: tuple[str, str], revision: int) -> None:
        if revision < self._revisions.get(name, 0):
            return  # written again since
        self._revisions.pop(name, None)  # nothing older can come after a delete
        if self._known.pop(name, None) is not None:
            service, instance_id = name
            if self.store.unmirror(service, instance_id):
                log.info("%s/%s left the registry (deregistered, or its lease ended)",
                         service, instance_id)  # fmt: skip

    # -- health of the connection to etcd ------------------------------------------------

    async def _probing(self) -> None:
        """Once a second: etcd's revision. No answer: degraded, and the watch starts over.
        The watch is started over too when it is on another member than the one that
        answers, or when keys of the prefix changed after what the copy has applied, at
        two probes in a row (a stream that stopped delivering)."""
        behind = False
        while True:
            await asyncio.sleep(self.probe_interval)
            # What the copy had applied when the probe left: etcd held all of it already,
            # so an answer below it means etcd lost history. (The watch may apply newer
            # events while the probe is out: comparing with those would be a race.)
            applied = self.revision
            try:
                revision = await self.client.revision()
                # Other keys of a shared etcd move its revision too: only ours count.
                missed = revision > applied and await self.client.count_newer(self.prefix, applied)
            except EtcdError as exc:
                self._down(str(exc))
                self._restart_watch()
                continue
            if revision < applied:
                self._stale = True
                log.warning("etcd's revision went back from %d to %d; reading the whole "
                            "registry again", applied, revision)  # fmt: skip
                self._restart_watch()
            elif self.client.endpoint != self._watching_on or (behind and missed):
                self._restart_watch()  # on a member that stopped answering, or stuck
            behind = bool(missed)

    def _up(self) -> None:
        if self._problem is not None:
            was = self._problem
            self._problem = None
            if was != "etcd not reached yet":
                log.warning("etcd reachable again at %s: following from revision %d",
                            self.client.endpoint, self.revision)  # fmt: skip

    def _down(self, reason: str) -> None:
        if self._problem is None or self._problem == "etcd not reached yet":
            log.warning("etcd unreachable: %s; routing from the last copy, registry writes "
                        "refused", reason)  # fmt: skip
        self._problem = f"etcd unreachable: {reason}"

    # -- helpers -------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _writing(self) -> Any:
        """Around etcd calls of a write: etcd gone is a 503 registry_unavailable, at once
        while the probe or the watch says so."""
        if self._problem is not None:
            raise unavailable(self._problem)
        try:
            yield
        except EtcdUnavailable as exc:
            self._down(str(exc))
            raise unavailable(f"etcd unreachable: {exc}") from None
        except EtcdError as exc:
            raise unavailable(f"etcd refused: {exc}") from None

    async def _lease_of(self, service: str, instance_id: str) -> int:
        """The instance's lease, from the copy or (just registered elsewhere) from etcd."""
        lease = self._known.get((service, instance_id))
        if lease is None:
            found = await self.client.get(self._key(service, instance_id))
            if found is None or not self._apply_put(
                (service, instance_id), found[1], found[3], found[2]
            ):
                raise UnknownInstance(f"no instance {instance_id!r} in service {service!r}")
            lease = found[3]
        return lease

    def _local(self, service: str, instance_id: str) -> Instance | None:
        try:
            return self.store.get(service, instance_id)
        except UnknownInstance:
            return None

    def _key(self, service: str, instance_id: str) -> str:
        return f"{self.prefix}{service}/{instance_id}"

    def _parse_key(self, key: str) -> tuple[str, str] | None:
        service, slash, instance_id = key[len(self.prefix) :].partition("/")
        return (service, instance_id) if key.startswith(self.prefix) and slash else None

    def _on_store_event(self, event: str, service: str, instance: Instance) -> None:
        """A draining instance marked deregister_when_idle left the copy when its last
        request here ended: it leaves etcd too."""
        name = (service, instance.id)
        if event == "deregistered" and name in self._known:
            lease = self._known.pop(name)
            self._spawn(self._forget(self._key(service, instance.id), lease))

    async def _forget(self, key: str, lease: int) -> None:
        await self.client.delete(key)
        await self.client.revoke(lease)

    def _spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("etcd: %s", task.exception())


def _registration(instance: Instance) -> dict[str, Any]:
    return {name: getattr(instance, name) for name in VALUE_FIELDS}


def _encode(fields: Mapping[str, Any]) -> bytes:
    return json.dumps({name: fields[name] for name in VALUE_FIELDS}).encode()
