"""The registry's state: instances, leases, drain, change index. Pure.

Time comes from an injected clock (wall-clock seconds), so leases keep their
absolute expiry across a restart and tests move time by hand. The I/O shell
(registry.api, the reaper task) listens to events and never holds state of its own.
"""

from __future__ import annotations

import heapq
import logging
import random
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any, Final

from registry.core.balancer import (
    LEAST_REQUEST,
    PEAK_EWMA,
    Balancing,
    HashRing,
    PeakEwma,
    WeightedRoundRobin,
    ramp,
    two_choices,
)
from registry.core.errors import InvalidField, UnknownInstance, UnknownService
from registry.core.models import (
    INSTANCE_STATES,
    Instance,
    format_address,
    instance_state,
    validate_host,
    validate_id,
    validate_metadata,
    validate_port,
    validate_scheme,
    validate_service_name,
    validate_state,
    validate_ttl,
    validate_weight,
)
from registry.core.policy import AddressPolicy

Clock = Callable[[], float]
RAMP_STEP: Final = 1.0  # seconds between two round-robin schedules of a slow start
# (event, service, instance); event is one of EVENTS ("preserved": a lease that ended was
# extended by self-preservation instead of evicted)
Listener = Callable[[str, str, Instance], None]
EVENTS: Final = ("registered", "updated", "heartbeat", "deregistered", "evicted", "preserved")
# A subset of a service's instances: the (key, value) pairs of metadata they all have,
# sorted by key (see selector()).
Selector = tuple[tuple[str, str], ...]
MATCHING_CACHE_SIZE: Final = 4096  # (service, selector) lists kept for pick_matching
# Fail static. Panic (Envoy's healthy_panic_threshold): while fewer than this share of a
# service's up instances are healthy, picks go over all of them. Self-preservation
# (Eureka's): when more than this share of a service's leased instances end in one sweep,
# they are kept for another ttl instead (services of PRESERVE_MIN leased instances or more).
# Both off unless configured: SPEC section 5 routes over healthy instances only (503
# no_healthy_instance otherwise) and section 4 ends a lease at its ttl.
PANIC_THRESHOLD: Final = 0.0
SELF_PRESERVATION: Final = 0.0
PRESERVE_MIN: Final = 2


log = logging.getLogger("registry")


def _rotate(
    members: list[Instance], turn: int, exclude: Collection[str]
) -> tuple[Instance | None, int]:
    """Plain round-robin from ``turn``: the first member a retry has not tried
    (``exclude``), and the turn after it."""
    count = len(members)
    for _ in range(count):
        instance = members[turn % count]
        turn += 1
        if instance.id not in exclude:
            return instance, turn
    return None, turn


class _Rotation:
    """Where round-robin keeps its place: a service's, or a canary subset's (_Matching).
    ``schedule``: the weighted one (None: built at the next pick), ``turn``: the plain
    rotation's next index, ``built_at``: when the schedule was built (rebuilt while a
    slow start ramps the weights)."""

    __slots__ = ("schedule", "turn", "built_at")

    def __init__(self) -> None:
        self.schedule: WeightedRoundRobin[Instance] | None = None
        self.turn = 0
        self.built_at = 0.0


class _Service(_Rotation):
    """One service's instances and what is kept counted of them as they change.

    ``track`` runs after every change of an instance and ``untrack`` at its removal, so
    the routable list (up and healthy; leases are checked at the pick), the counts by
    state and the weights in use never need a pass over the instances.
    """

    __slots__ = (
        "name",
        "instances",
        "index",
        "routable",
        "positions",
        "weights",
        "states",
        "counted",
        "balancing",
        "since",
        "ramp_until",
        "clock",
        "ring",
        # fail static (panic)
        "live_up",
        "up_positions",
        "panic_threshold",
        "panic_turn",
    )

    def __init__(self, name: str, clock: Clock) -> None:
        super().__init__()
        self.name = name
        self.clock = clock
        self.instances: dict[str, Instance] = {}
        self.index = 0
        self.routable: list[Instance] = []
        self.positions: dict[str, int] = {}  # id -> its place in routable
        self.weights: dict[int, int] = {}  # weight -> routable instances that have it
        self.states: dict[str, int] = dict.fromkeys(INSTANCE_STATES, 0)
        self.counted: dict[str, tuple[str, int]] = {}  # id -> (state, weight if routable else 0)
        self.balancing: Balancing | None = None  # None: round-robin without slow start
        self.since: dict[str, float] = {}  # id -> when it last became routable (slow start)
        self.ramp_until = 0.0  # till then some instance is in its slow start
        self.ring: HashRing[Instance] | None = None  # session affinity's, built when asked
        # Instances up (not draining) whatever their health, leases checked at the pick:
        # what a pick goes over in panic.
        self.live_up: list[Instance] = []
        self.up_positions: dict[str, int] = {}  # id -> its place in live_up
        self.panic_threshold = PANIC_THRESHOLD  # 0: never in panic
        self.panic_turn = 0

    def track(self, instance: Instance) -> None:
        self.track_up(instance)
        state = instance_state(instance)
        now = (state, instance.weight if state == "up" else 0)
        before = self.counted.get(instance.id)
        if before == now:
            return
        if before is not None:
            self._uncount(instance.id, before)
        self.counted[instance.id] = now
        self.states[state] += 1
        weight = now[1]
        if weight and (before is None or not before[1]):  # new or back: its slow start
            start = self.since[instance.id] = self.clock()
            if self.balancing is not None and self.balancing.slow_start:
                self.ramp_until = max(self.ramp_until, start + self.balancing.slow_start)
        if weight:
            self.positions[instance.id] = len(self.routable)
            self.routable.append(instance)
            self.weights[weight] = self.weights.get(weight, 0) + 1
        self.schedule = self.ring = None

    def untrack(self, instance_id: str) -> None:
        self.untrack_up(instance_id)
        before = self.counted.pop(instance_id, None)
        self.since.pop(instance_id, None)
        if before is not None:
            self._uncount(instance_id, before)
            self.schedule = self.ring = None

    def _uncount(self, instance_id: str, counted: tuple[str, int]) -> None:
        state, weight = counted
        self.states[state] -= 1
        if not weight:
            return
        position = self.positions.pop(instance_id)
        last = self.routable.pop()
        if last.id != instance_id:  # the last one takes the leaving one's place
            self.routable[position] = last
            self.positions[last.id] = position
        left = self.weights[weight] - 1
        if left:
            self.weights[weight] = left
        else:
            del self.weights[weight]

    def track_up(self, instance: Instance) -> None:
        """Keep live_up in step with the instance's state (up or draining)."""
        if instance.state == "up":
            if instance.id not in self.up_positions:
                self.up_positions[instance.id] = len(self.live_up)
                self.live_up.append(instance)
        else:
            self.untrack_up(instance.id)

    def untrack_up(self, instance_id: str) -> None:
        position = self.up_positions.pop(instance_id, None)
        if position is None:
            return
        last = self.live_up.pop()
        if last.id != instance_id:  # the last one takes the leaving one's place
            self.live_up[position] = last
            self.up_positions[last.id] = position

    def in_panic(self) -> bool:
        """Fewer routable (healthy) instances than panic_threshold of the up ones."""
        return len(self.routable) < self.panic_threshold * len(self.live_up)


class _Matching(_Rotation):
    """The routable instances of one service that match one selector, as of the
    service's change ``index``: rebuilt at the first pick after any change."""

    __slots__ = ("index", "members", "equal")

    def __init__(self, index: int, members: list[Instance]) -> None:
        super().__init__()
        self.index = index
        self.members = members
        # equal weights: a plain rotation is the same order as the weighted schedule
        self.equal = len({instance.weight for instance in members}) <= 1


def selector(metadata: Mapping[str, str]) -> Selector:
    """The Selector of instances whose metadata has all of ``metadata``'s pairs."""
    return tuple(sorted(metadata.items()))


class Registry:
    def __init__(
        self,
        clock: Clock,
        *,
        default_ttl: float = 30.0,
        max_ttl: float = 3600.0,
    ) -> None:
        self.clock = clock
        self.default_ttl = default_ttl
        self.max_ttl = max_ttl
        self.index = 0
        self._services: dict[str, _Service] = {}
        self._listeners: list[Listener] = []
        # Lease ends, earliest first: (expires_at, entry, service, id). A heartbeat moves no
        # entry: when one comes due for a lease renewed since, it goes back in at the new end.
        self._leases: list[tuple[float, int, str, str]] = []
        self._lease_entry: dict[tuple[str, str], tuple[float, int]] = {}  # its one valid entry
        self._entries = 0
        self._remote: set[tuple[str, str]] = set()  # instances other processes have requests on
        self.count = 0  # instances held, static ones included
        self.rng = random.Random()  # the load-aware balancers' draws (tests seed it)
        # Addresses registrations may name, and the caps (set by the gateway; None: any).
        self.policy: AddressPolicy | None = None
        self._matching: dict[tuple[str, Selector], _Matching] = {}  # pick_matching
        # The share of a service's leased instances that may end in one sweep and be
        # evicted; more are kept (registry.self_preservation; 0: off).
        self.self_preservation = SELF_PRESERVATION

    # -- observation -------------------------------------------------------

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def _emit(self, event: str, instance: Instance) -> None:
        for listener in self._listeners:
            listener(event, instance.service, instance)

    def _changed(self, service: _Service) -> None:
        self.index += 1
        service.index = self.index

    # -- configuration -------------------------------------------------------

    def declare(self, name: str) -> None:
        """Make a service known (named in routes.yaml) so a GET of it is 200, not 404."""
        self._service(name)

    def set_static(self, name: str, addresses: Iterable[tuple[str, int]]) -> None:
        """Replace the static (never-expiring) instances of a service."""
        service = self._service(name)
        wanted = {format_address(host, port): (host, port) for host, port in addresses}
        now = self.clock()
        for instance in list(service.instances.values()):
            if instance.static and instance.id not in wanted:
                self._remove(service, instance, "deregistered")
        for instance_id, (host, port) in wanted.items():
            existing = service.instances.get(instance_id)
            if existing is not None:
                # Configured instances never expire, even if one also registered itself.
                existing.ttl = existing.expires_at = None
                continue
            instance = Instance(
                service=name,
                id=instance_id,
                host=host,
                port=port,
                registered_at=now,
                last_heartbeat=now,
            )
            service.instances[instance_id] = instance
            self.count += 1
            service.track(instance)
            self._changed(service)
            self._emit("registered", instance)

    # -- the registry API -----------------------------------------------------

    def validate_registration(self, name: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """A register body (SPEC section 4) checked, with its defaults: id, host, port, ttl,
        weight, scheme, metadata. InvalidField for the first field that breaks a rule."""
        validate_service_name(name)
        host = validate_host(body.get("host"))
        port = validate_port(body.get("port"))
        if self.policy is not None:
            self.policy.check(host, port)
        return {
            "id": validate_id(body["id"]) if "id" in body else format_address(host, port),
            "host": host,
            "port": port,
            "ttl": validate_ttl(body["ttl"], self.max_ttl) if "ttl" in body else self.default_ttl,
            "weight": validate_weight(body["weight"]) if "weight" in body else 1,
            "scheme": validate_scheme(body["scheme"]) if "scheme" in body else "http",
            "metadata": validate_metadata(body["metadata"]) if "metadata" in body else {},
        }

    def register(self, name: str, body: Mapping[str, Any]) -> tuple[Instance, bool]:
        """Register or re-register an instance; returns it and whether it is new."""
        valid = self.validate_registration(name, body)
        instance_id: str = valid["id"]
        host: str = valid["host"]
        port: int = valid["port"]
        ttl: float = valid["ttl"]
        weight: int = valid["weight"]
        scheme: str = valid["scheme"]
        metadata: dict[str, str] = valid["metadata"]
        now = self.clock()
        service = self._service(name)
        existing = service.instances.get(instance_id)
        if existing is not None and not existing.live(now):
            self._remove(service, existing, "evicted")
            existing = None
        if existing is None:
            self.check_room(name, instance_id)
            instance = Instance(
                service=name, id=instance_id, host=host, port=port, registered_at=now
            )
            service.instances[instance_id] = instance
            self.count += 1
        else:
            # Updated in place: requests in flight hold this object and count on it.
            instance = existing
            instance.host, instance.port = host, port
            instance.state, instance.deregister_when_idle = "up", False
        instance.scheme, instance.weight, instance.metadata = scheme, weight, metadata
        instance.readdress()
        instance.last_heartbeat = now
        if existing is None or not existing.static:
            instance.ttl, instance.expires_at = ttl, now + ttl
            self._watch_lease(instance)
        service.track(instance)
        self._changed(service)
        self._emit("registered", instance)
        return instance, existing is None

    def check_room(self, name: str, instance_id: str) -> None:
        """Before ``instance_id`` joins ``name``: the policy's caps (TooManyInstances,
        RegistryFull). An instance already there takes no more room."""
        service = self._services.get(name)
        if self.policy is None or (service is not None and instance_id in service.instances):
            return
        self.policy.check_room(len(service.instances) if service is not None else 0, self.count)

    def renew(self, name: str, instance_id: str) -> Instance:
        instance = self.get(name, instance_id)
        if instance.ttl is not None:
            now = self.clock()
            instance.last_heartbeat = now
            instance.expires_at = now + instance.ttl
        self._emit("heartbeat", instance)
        return instance

    def touch(self, name: str, instance_id: str) -> Instance:
        """A heartbeat whose lease is kept elsewhere (etcd): noted, no expiry moved."""
        instance = self.get(name, instance_id)
        instance.last_heartbeat = self.clock()
        self._emit("heartbeat", instance)
        return instance

    @staticmethod
    def validate_update(instance: Instance, body: Mapping[str, Any]) -> dict[str, Any]:
        """A PATCH body checked against ``instance``: its state, weight, metadata and
        deregister_when_idle after the change. InvalidField."""
        state = validate_state(body["state"]) if "state" in body else instance.state
        weight = validate_weight(body["weight"]) if "weight" in body else instance.weight
        metadata = validate_metadata(body["metadata"]) if "metadata" in body else instance.metadata
        when_idle = body.get("deregister_when_idle", False)
        if not isinstance(when_idle, bool):
            raise InvalidField("deregister_when_idle", "deregister_when_idle must be true or false")
        return {
            "state": state,
            "weight": weight,
            "metadata": metadata,
            "deregister_when_idle": when_idle and state == "draining",
        }

    def update(self, name: str, instance_id: str, body: Mapping[str, Any]) -> Instance:
        instance = self.get(name, instance_id)
        valid = self.validate_update(instance, body)
        instance.state, instance.weight = valid["state"], valid["weight"]
        instance.metadata = valid["metadata"]
        instance.deregister_when_idle = valid["deregister_when_idle"]
        service = self._services[name]
        service.track(instance)
        self._changed(service)
        self._emit("updated", instance)
        if instance.deregister_when_idle and instance.idle:
            self._remove(service, instance, "deregistered")
        return instance

    def set_health(
        self, name: str, instance_id: str, health: str, reason: str = "", until: float | None = None
    ) -> Instance:
        """Record a health verdict (healthy, ejected, failing) of a check or of traffic,
        with why and (an ejection) until when, for the status page."""
        instance = self.get(name, instance_id)
        instance.health_reason, instance.health_until = reason, until
        if instance.health != health:
            instance.health = health
            service = self._services[name]
            service.track(instance)
            self._changed(service)
            self._emit("updated", instance)
        return instance

    def mirror(self, name: str, fields: Mapping[str, Any], event: str | None = None) -> Instance:
        """Take an instance as another registry holds it (a worker following the primary,
        a gateway following etcd); ``event``, if given, is emitted for it."""
        service = self._service(name)
        instance = service.instances.get(fields["id"])
        if instance is None:
            instance = service.instances[fields["id"]] = Instance(service=name, **fields)
            self.count += 1
        else:
            for key, value in fields.items():
                setattr(instance, key, value)  # in place: requests in flight hold it
            instance.readdress()
        self._watch_lease(instance)
        service.track(instance)
        self._changed(service)
        if event is not None:
            self._emit(event, instance)
        return instance

    def unmirror(self, name: str, instance_id: str, event: str = "deregistered") -> bool:
        """Remove an instance another registry no longer holds; False if it was not here."""
        service = self._services.get(name)
        instance = service.instances.get(instance_id) if service else None
        if service is None or instance is None:
            return False
        self._remove(service, instance, event)
        return True

    def deregister(self, name: str, instance_id: str) -> Instance:
        instance = self.get(name, instance_id)
        self._remove(self._services[name], instance, "deregistered")
        return instance

    def has(self, name: str, instance_id: str) -> bool:
        """Whether the instance is held (its lease may have ended since: no eviction here)."""
        service = self._services.get(name)
        return service is not None and instance_id in service.instances

    def get(self, name: str, instance_id: str) -> Instance:
        """The live instance, or UnknownInstance (an expired lease counts as gone)."""
        service = self._services.get(name)
        instance = service.instances.get(instance_id) if service else None
        if service is None or instance is None:
            raise UnknownInstance(f"no instance {instance_id!r} in service {name!r}")
        if not instance.live(self.clock()):
            self.expire()  # its lease ended: evicted, unless self-preservation keeps it
            if not instance.live(self.clock()):
                self._remove(service, instance, "evicted")
                raise UnknownInstance(f"no instance {instance_id!r} in service {name!r}")
        return instance

    def instances(self, name: str) -> list[Instance]:
        """Live instances of a service, or UnknownService if it was never seen."""
        service = self._services.get(name)
        if service is None:
            raise UnknownService(f"no service {name!r}")
        self.expire()
        return list(service.instances.values())

    def counts(self, name: str) -> tuple[int, int]:
        """(instances, routable ones) of a service; (0, 0) for one never seen."""
        service = self._services.get(name)
        if service is None:
            return 0, 0
        self.expire()
        return len(service.instances), len(service.routable)

    def state_counts(self, name: str) -> dict[str, int]:
        """A service's instances by state (INSTANCE_STATES), or UnknownService."""
        service = self._services.get(name)
        if service is None:
            raise UnknownService(f"no service {name!r}")
        self.expire()
        return dict(service.states)

    def service_index(self, name: str) -> int:
        service = self._services.get(name)
        if service is None:
            raise UnknownService(f"no service {name!r}")
        return service.index

    def poll_waits(self, name: str, index: int) -> bool:
        """Whether a long poll of a service at ``index`` waits for its next change.

        It answers at once for index 0, for an index below the service's (it changed since),
        and for one ahead of the whole registry (remembered from before a restart): waiting
        for the counter to pass that would miss the changes in between.
        """
        return 0 < index <= self.index and index >= self.service_index(name)

    def service_names(self) -> list[str]:
        return sorted(self._services)

    # -- leases --------------------------------------------------------------

    def expire(self) -> list[Instance]:
        """Remove every instance whose lease has ended; returns them.

        Costs the leases that came due, not the registry's size: call it freely. The
        leases of a service that end in one call are evicted together, or, when they are
        more than self_preservation of its leased instances, all kept (_preserve).
        """
        now = self.clock()
        leases = self._leases
        gone = []
        ended: dict[str, list[Instance]] = {}
        while leases and leases[0][0] <= now:
            _, entry, name, instance_id = heapq.heappop(leases)
            key = (name, instance_id)
            if self._lease_entry.get(key, (0.0, -1))[1] != entry:
                continue  # superseded by an earlier end pushed since
            del self._lease_entry[key]
            service = self._services.get(name)
            instance = service.instances.get(instance_id) if service is not None else None
            if service is None or instance is None or instance.expires_at is None:
                continue  # gone, or static now
            if instance.expires_at > now:
                self._watch_lease(instance)  # renewed since it went in
            else:
                ended.setdefault(name, []).append(instance)
        for name, instances in ended.items():
            service = self._services[name]
            leased = self._preserving(service, len(instances))
            if leased:
                self._preserve(service, instances, leased, now)
                continue
            for instance in instances:
                self._remove(service, instance, "evicted")
                gone.append(instance)
        return gone

    def _preserving(self, service: _Service, ending: int) -> int:
        """How many leased instances the service has when ``ending`` leases ending at
        once are more than self_preservation of them (PRESERVE_MIN at least); else 0."""
        share = self.self_preservation
        # It has max(PRESERVE_MIN, ending) leased instances at least: a lone lease ending
        # (the usual case) is decided without counting them.
        if share <= 0.0 or ending <= share * max(PRESERVE_MIN, ending):
            return 0
        leased = 0
        for instance in service.instances.values():
            if instance.ttl is not None:
                leased += 1
        return leased if leased >= PRESERVE_MIN and ending > share * leased else 0

    def _preserve(
        self, service: _Service, instances: list[Instance], leased: int, now: float
    ) -> None:
        """Fail static: keep instances whose leases ended, each for another ttl (a
        heartbeat renews it as usual, a deregistration removes it)."""
        for instance in instances:
            instance.expires_at = now + (instance.ttl or 0.0)
            self._watch_lease(instance)
            self._emit("preserved", instance)
        log.warning(
            "self-preservation: the leases of %d of the %d leased instances of %s ended in"
            " one sweep, more than %g%%; kept them for another ttl instead of evicting them"
            " (registry.self_preservation)",
            len(instances),
            leased,
            service.name,
            self.self_preservation * 100,
        )

    def next_expiry(self) -> float | None:
        """When expire() next has something to do (it may find the lease renewed)."""
        return self._leases[0][0] if self._leases else None

    def _watch_lease(self, instance: Instance) -> None:
        """Make sure a heap entry comes due no later than the instance's lease end."""
        expires_at = instance.expires_at
        if expires_at is None:
            return
        key = (instance.service, instance.id)
        current = self._lease_entry.get(key)
        if current is not None and current[0] <= expires_at:
            return
        self._entries += 1
        self._lease_entry[key] = (expires_at, self._entries)
        heapq.heappush(self._leases, (expires_at, self._entries, instance.service, instance.id))

    # -- the request path -------------------------------------------------------

    def pick(self, name: str, exclude: Collection[str] = ()) -> Instance | None:
        """Next instance by weighted round-robin among routable ones.

        A lease is checked here, at the moment of the pick: an instance whose lease
        ended gets no traffic even if no sweep has removed it yet (it is removed now).
        """
        service = self._services.get(name)
        if service is None:
            return None
        routable = service.routable
        count = len(routable)
        if count < len(service.live_up) and service.in_panic():  # an int test first: cheap
            return self._panic_pick(service, exclude)
        if count == 0:
            return None
        # equal weights: a plain rotation is the same order as the weighted schedule
        chosen = self._pick_among(service, routable, service, len(service.weights) == 1, exclude)
        if chosen is not None and self._ended(service, chosen):
            return self.pick(name, exclude)
        return chosen

    def _pick_among(
        self,
        service: _Service,
        members: list[Instance],
        rotation: _Rotation,
        equal: bool,
        exclude: Collection[str],
    ) -> Instance | None:
        """The pick among ``members`` (not empty: the service's routable instances, or a
        canary subset of them, whose round-robin place is ``rotation``): by the service's
        Balancing if it has one, else plain rotation when the weights are ``equal``,
        else smooth weighted round-robin."""
        if service.balancing is not None:
            return self._balanced(service, service.balancing, exclude, members, rotation)
        if equal:
            chosen, rotation.turn = _rotate(members, rotation.turn, exclude)
            return chosen
        schedule = rotation.schedule
        if schedule is None:
            schedule = rotation.schedule = WeightedRoundRobin(members)
        return schedule.pick(exclude)

    def _ended(self, service: _Service, chosen: Instance) -> bool:
        """The check every pick makes: whether the lease of the instance it chose has
        ended (then it is evicted, unless self-preservation keeps it: pick again)."""
        expires_at = chosen.expires_at
        if expires_at is None or expires_at > self.clock():
            return False
        self.expire()
        self._remove_ended(service, chosen)
        return True

    def pick_by_key(self, name: str, key: bytes, exclude: Collection[str] = ()) -> Instance | None:
        """Session affinity: the routable instance ``key`` hashes to on the service's ring
        (consistent hashing: instances that stay keep their keys when others come and go);
        a retry walks on to the next instance. Leases are checked as ``pick`` does."""
        service = self._services.get(name)
        if service is None or not service.routable:
            return None
        ring = service.ring
        if ring is None:
            ring = service.ring = HashRing(service.routable)
        chosen = ring.pick(key, exclude)
        if chosen is not None and self._ended(service, chosen):
            return self.pick_by_key(name, key, exclude)
        return chosen

    def _panic_pick(self, service: _Service, exclude: Collection[str]) -> Instance | None:
        """In panic: plain round-robin over the up instances, whatever their health
        (never a draining one); a lease is checked as in pick."""
        instance, service.panic_turn = _rotate(service.live_up, service.panic_turn, exclude)
        if instance is not None and self._ended(service, instance):
            return self.pick(service.name, exclude)
        return instance

    def _remove_ended(self, service: _Service, instance: Instance) -> None:
        """After expire(): an instance whose lease still reads as ended goes (expire()
        keeps or evicts every lease it watches; this one is not left to loop on)."""
        if not instance.live(self.clock()):
            self._remove(service, instance, "evicted")

    def in_panic(self, name: str) -> bool:
        """Whether the service's picks are in panic now (see PANIC_THRESHOLD)."""
        service = self._services.get(name)
        return service is not None and service.in_panic()

    def set_panic_thresholds(self, thresholds: Mapping[str, float]) -> None:
        """Each service's panic threshold (services.NAME.panic_threshold); services not
        named: PANIC_THRESHOLD."""
        for name, service in self._services.items():
            if name not in thresholds:
                service.panic_threshold = PANIC_THRESHOLD
        for name, threshold in thresholds.items():
            self._service(name).panic_threshold = threshold

    def _balanced(
        self,
        service: _Service,
        balancing: Balancing,
        exclude: Collection[str],
        members: list[Instance],
        rotation: _Rotation,
    ) -> Instance | None:
        """A pick among ``members`` (the service's routable instances, or a canary subset
        of them, whose round-robin place is ``rotation``) by the service's Balancing: its
        balancer, weights ramped by slow start."""
        now = self.clock()
        window = balancing.slow_start
        ramping = now < service.ramp_until
        since = service.since

        def weight(instance: Instance) -> float:
            if not ramping:
                return float(instance.weight)
            return instance.weight * ramp(since.get(instance.id, 0.0), now, window)

        kind = balancing.kind
        if kind == LEAST_REQUEST:
            return two_choices(
                members,
                exclude,
                lambda a, b: weight(a) * (b.in_flight + 1) > weight(b) * (a.in_flight + 1),
                self.rng,
            )
        if kind == PEAK_EWMA:

            def cost(instance: Instance) -> float:
                latency = instance.latency
                if latency is None:
                    latency = instance.latency = PeakEwma()
                return latency.load(instance.in_flight, now) / weight(instance)

            return two_choices(members, exclude, lambda a, b: cost(a) < cost(b), self.rng)
        # Round-robin: while weights ramp, the schedule is rebuilt every RAMP_STEP (and
        # once more when the ramp is over).
        schedule = rotation.schedule
        if schedule is None or (
            rotation.built_at < service.ramp_until and now - rotation.built_at >= RAMP_STEP
        ):
            schedule = rotation.schedule = WeightedRoundRobin(members, [weight(i) for i in members])
            rotation.built_at = now
        return schedule.pick(exclude)

    def pick_matching(
        self, name: str, metadata: Selector, exclude: Collection[str] = ()
    ) -> Instance | None:
        """Next instance among the routable ones whose metadata has every (key, value) of
        ``metadata`` (a Selector), by the service's balancer and slow start when it has
        them, else by weighted round-robin; None when none is left.

        The matching list is kept per (service, selector) and rebuilt at the first pick
        after any change of the service (its index moves with every registration,
        update, metadata PATCH, health verdict and removal), so a pick costs no pass
        over the instances unless the service changed since the last one.
        """
        service = self._services.get(name)
        if service is None:
            return None
        key = (name, metadata)
        matching = self._matching.get(key)
        if matching is None or matching.index != service.index:
            if len(self._matching) >= MATCHING_CACHE_SIZE:
                self._matching.clear()
            members = [i for i in service.routable if _has_all(i.metadata, metadata)]
            matching = self._matching[key] = _Matching(service.index, members)
        members = matching.members
        if not members:
            return None
        chosen = self._pick_among(service, members, matching, matching.equal, exclude)
        if chosen is not None and self._ended(service, chosen):  # the list is rebuilt
            return self.pick_matching(name, metadata, exclude)
        return chosen

    def set_balancing(self, balancings: Mapping[str, Balancing]) -> None:
        """Each service's Balancing (from routes.yaml); services not named: round-robin."""
        for name in balancings.keys() | {n for n, s in self._services.items() if s.balancing}:
            balancing = balancings.get(name)
            service = self._service(name)
            if balancing == Balancing():
                balancing = None
            if service.balancing != balancing:
                service.balancing = balancing
                service.schedule = None
                self._matching.clear()  # subsets' schedules followed the old balancing
                service.ramp_until = 0.0

    def set_remote_in_flight(self, counts: Mapping[tuple[str, str], int]) -> None:
        """Requests other processes have in flight, by (service, id), all of them at once.

        An instance drained with deregister_when_idle goes once every process is idle.
        """
        touched = self._remote | counts.keys()
        self._remote = {key for key, n in counts.items() if n}
        for name, instance_id in touched:
            service = self._services.get(name)
            instance = service.instances.get(instance_id) if service is not None else None
            if service is None or instance is None:
                continue
            instance.remote_in_flight = counts.get((name, instance_id), 0)
            if instance.deregister_when_idle and instance.idle:
                self._remove(service, instance, "deregistered")

    def request_started(self, instance: Instance) -> None:
        instance.in_flight += 1

    def request_finished(self, instance: Instance) -> None:
        instance.in_flight -= 1
        if instance.deregister_when_idle and instance.idle:
            service = self._services.get(instance.service)
            if service is not None and service.instances.get(instance.id) is instance:
                self._remove(service, instance, "deregistered")

    # -- internals -----------------------------------------------------------

    def _service(self, name: str) -> _Service:
        service = self._services.get(name)
        if service is None:
            service = self._services[name] = _Service(name, self.clock)
        return service

    def _remove(self, service: _Service, instance: Instance, event: str) -> None:
        if service.instances.get(instance.id) is not instance:
            return
        del service.instances[instance.id]
        self.count -= 1
        service.untrack(instance.id)
        self._changed(service)
        self._emit(event, instance)


def _has_all(metadata: Mapping[str, str], wanted: Selector) -> bool:
    return all(metadata.get(key) == value for key, value in wanted)
