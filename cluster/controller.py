"""Controller: the named Ray actor (``baton-controller``) that owns the worker pools.

Lifecycle of a worker slot (one per worker the controller manages):

    STARTING ──placement group placed, actor ready (its gRPC server is up and it registered)──▶ READY
    STARTING ──placement group not placed in pools.placement_timeout_s──▶ DEAD (error says what Ray lacks)
    READY ──drain(worker_id) or scale down──▶ DRAINING
    DRAINING ──no running / waiting / held requests (or drain_timeout_s)──▶ STOPPED (deregistered, killed)
    STARTING | READY ──actor died or stopped answering──▶ DEAD ──restart_dead──▶ STARTING (same worker_id, new epoch)

A worker joins routing only when it is READY: the router reads the registry,
and the worker registers itself once its server is up. Removal never drops a
request: DRAINING → STOPPED is ``cluster.drain.Drainer``'s job (flag it
``draining`` in the registry, wait for requests already routed to land and for
its engine to go idle, only then shut it down and kill the actor).

The reconcile loop (every ``_TICK_S``) polls each worker's stats (a Ray call
with a timeout), replaces the dead (``pools.restart_dead``), re-asserts the
draining flags (a Redis that restarted empty forgets them) and keeps the last
stats for ``state()``.

Placement: every worker start gets its own Ray placement group, one bundle per
TP rank (``pools.prefill_tp`` ranks for a prefill worker, one otherwise; see
cluster/tp_launcher.py); the worker actor is created in bundle 0 and starts
the other ranks in the other bundles itself. The group is removed whenever the
worker is (stopped after a drain or scale-down, found dead, restarted — a
restart gets a new group — or at shutdown).

Workers are made by ``worker_factory(role)`` → a Ray actor class called with
one ``WorkerSpec`` (default: ``cluster.worker_actor.ManagedWorker``, a
``workers.WorkerHost`` that registers and heartbeats itself); it must offer
``ready() -> address``, ``stats() -> dict or object`` and ``shutdown()``.

The class is plain; ``controller_actor()`` wraps it with ``ray.remote``. Every
public method is a coroutine (an async actor: one event loop, no locks).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

from cluster.config import ROLES, ClusterConfig, check_role
from cluster.drain import Drainer
from cluster.ray_errors import reason
from cluster.tp_launcher import (create_placement_group, placement_error, remove_placement_group,
                                 worker_actor_options, worker_tp)
from cluster.types import WorkerSpec, WorkerState, as_dict

log = logging.getLogger(__name__)

CONTROLLER_NAME = "baton-controller"

_TICK_S = 1.0               # reconcile period
_STATS_TIMEOUT_S = 5.0      # a worker that misses this many seconds of stats polls in a row...
_MAX_MISSES = 3             # ...this many times is treated as dead
_READY_TIMEOUT_S = 600.0    # model load included
_REAP_EVERY = 10            # ticks between sweeps of dead registry entries


@dataclass
class _Slot:
    state: WorkerState
    actor: Any = None
    misses: int = 0
    ever_ready: bool = False
    ready_task: asyncio.Task | None = None
    drain_task: asyncio.Task | None = None
    placement_group: Any = None     # this start's Ray placement group (removed with the worker)
    placed: bool = False            # Ray has placed it (the actor can start)


def default_worker_factory(role: str):
    from cluster.worker_actor import worker_factory

    return worker_factory(role)


def _check_targets(targets: dict[str, int]) -> None:
    if sum(targets.values()) == 0:
        raise ValueError("cannot remove the last worker: the cluster would have none")
    if (targets["prefill"] == 0) != (targets["decode"] == 0) and targets["colocated"] == 0:
        raise ValueError("prefill and decode pools need each other (or colocated workers)")


class Controller:
    def __init__(self, config: ClusterConfig, store_url: str,
                 worker_factory: Callable[[str], Any] | None = None) -> None:
        self.config = config
        self.store_url = store_url
        self._factory = worker_factory or default_worker_factory
        self._targets = {role: config.pools.count(role) for role in ROLES}
        self._slots: dict[str, _Slot] = {}
        self._next_index = {role: 0 for role in ROLES}
        self._registry = None
        self._loop_task: asyncio.Task | None = None
        self._stopping = False
        self.events: list[str] = []     # recent notable events, newest last (status output)
        self._drainer = Drainer(config.pools, poll=self._poll, release=self._release,
                                registry_call=self._registry_call, event=self._event)

    # -- lifecycle --------------------------------------------------------
    async def start(self, wait_ready: bool = True, timeout_s: float = _READY_TIMEOUT_S) -> dict:
        """Create the pools (and the reconcile loop); optionally wait until every worker is READY."""
        from cluster.registry import Registry
        from cluster.store import connect

        self._registry = Registry(connect(self.store_url, asyncio=True), self.config.redis.namespace,
                                  self.config.redis.heartbeat_ttl_s)
        reaped = await self._registry_call("areap_dead")
        if reaped:
            self._event(f"cleared stale registry entries: {', '.join(reaped)}")
        for role in ROLES:
            for _ in range(self._targets[role]):
                self._spawn(role)
        if self._loop_task is None:
            self._loop_task = asyncio.get_running_loop().create_task(self._reconcile_loop())
        if wait_ready:
            await self.wait_ready(timeout_s)
        return await self.state()

    async def wait_ready(self, timeout_s: float = _READY_TIMEOUT_S) -> None:
        """Wait until every slot in the pools is READY; raise if one failed to start."""
        deadline = time.monotonic() + timeout_s
        while True:
            states = [s.state for s in self._slots.values() if s.state.status != "stopped"]
            self._raise_if_failed()
            counts = {role: sum(1 for s in states if s.role == role and s.status == "ready") for role in ROLES}
            if all(counts[r] >= self._targets[r] for r in ROLES):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"workers not ready after {timeout_s}s: "
                                   + ", ".join(f"{s.worker_id}={s.status}{' (' + s.error + ')' if s.error else ''}"
                                               for s in states))
            await asyncio.sleep(0.1)

    async def shutdown(self) -> None:
        """Stop every worker (gracefully: shutdown() then kill) and the reconcile loop."""
        self._stopping = True
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
            self._loop_task = None
        tasks = [t for s in self._slots.values() for t in (s.ready_task, s.drain_task) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(self._drainer.stop(s) for s in self._slots.values()
                               if s.actor is not None or s.placement_group is not None),
                             return_exceptions=True)

    # -- operations -------------------------------------------------------
    async def scale(self, role: str, n: int, wait: bool = False, timeout_s: float = _READY_TIMEOUT_S) -> dict:
        """Set ``role``'s pool size. New workers route once ready; removed ones drain first.
        ``wait=True`` returns when the pool has exactly ``n`` ready workers and nothing draining."""
        check_role(role)
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"pool size must be an integer >= 0, got {n!r}")
        _check_targets(dict(self._targets, **{role: n}))
        self._targets[role] = n
        active = [s for s in self._slots.values()
                  if s.state.role == role and s.state.status in ("starting", "ready", "dead")]
        if len(active) < n:
            for _ in range(n - len(active)):
                self._spawn(role)
        elif len(active) > n:
            order = {"dead": 0, "starting": 1, "ready": 2}
            victims = sorted(active, key=lambda s: (order[s.state.status], s.state.stats.get("num_running", 0),
                                                    -s.state.started_at))[:len(active) - n]
            for s in victims:
                self._drainer.begin(s)
        self._event(f"scale {role} → {n}")
        if wait:
            await self._wait_pool(role, n, timeout_s)
        return await self.state()

    async def drain(self, worker_id: str, wait: bool = False) -> dict:
        """Remove one worker without dropping requests (the pool shrinks by one)."""
        slot = self._slots.get(worker_id)
        if slot is None or slot.state.status in ("stopped", "draining"):
            raise ValueError(f"no active worker {worker_id!r}")
        role = slot.state.role
        _check_targets(dict(self._targets, **{role: max(0, self._targets[role] - 1)}))
        self._targets[role] = max(0, self._targets[role] - 1)
        self._drainer.begin(slot)
        self._event(f"drain {worker_id}")
        if wait and slot.drain_task is not None:
            await asyncio.shield(slot.drain_task)
        return await self.state()

    async def state(self) -> dict:
        workers = [dataclasses.asdict(s.state) for s in sorted(self._slots.values(), key=lambda s: s.state.worker_id)
                   if s.state.status != "stopped"]
        return {"model": self.config.engine.model, "store_url": self.store_url,
                "namespace": self.config.redis.namespace, "targets": dict(self._targets),
                "workers": workers, "events": self.events[-20:]}

    async def ping(self) -> bool:
        return True

    async def worker_actor(self, worker_id: str):
        """The Ray actor handle of an active worker (admin tools, tests)."""
        slot = self._slots.get(worker_id)
        if slot is None or slot.actor is None:
            raise ValueError(f"no active worker {worker_id!r}")
        return slot.actor

    # -- internals --------------------------------------------------------
    def _event(self, text: str) -> None:
        log.info(text)
        self.events.append(f"{time.strftime('%H:%M:%S')} {text}")
        del self.events[:-100]

    def _spec(self, worker_id: str, role: str, placement_group: Any) -> WorkerSpec:
        mode = "prefill" if role == "prefill" else "both"
        tp = worker_tp(self.config.pools, role)
        engine = dataclasses.replace(self.config.engine.to_engine_config(mode), tensor_parallel_size=tp)
        r = self.config.redis
        return WorkerSpec(worker_id=worker_id, role=role, engine=engine,
                          store_url=self.store_url, namespace=r.namespace,
                          heartbeat_interval_s=r.heartbeat_interval_s, heartbeat_ttl_s=r.heartbeat_ttl_s,
                          host="127.0.0.1" if self.config.ray.address is None else "0.0.0.0",
                          tp=tp, placement_group=placement_group,
                          kv_transport=self.config.pools.transport_for(engine.device))

    def _spawn(self, role: str, slot: _Slot | None = None) -> _Slot:
        if slot is None:
            worker_id = f"{role}-{self._next_index[role]}"
            self._next_index[role] += 1
            slot = self._slots[worker_id] = _Slot(WorkerState(worker_id=worker_id, role=role, status="starting"))
        else:
            slot.state.restarts += 1
            slot.state.status = "starting"
            slot.state.address = ""
            slot.state.error = ""
            slot.state.stats = {}
        slot.misses = 0
        slot.state.started_at = time.time()
        pools = self.config.pools
        pg = slot.placement_group = create_placement_group(pools, role)
        slot.placed = False
        slot.state.tp = worker_tp(pools, role)
        slot.state.placement_group = pg.id.hex()
        cls = self._factory(role)
        slot.actor = cls.options(**worker_actor_options(pools, role, pg)).remote(
            self._spec(slot.state.worker_id, role, pg))
        slot.ready_task = asyncio.get_running_loop().create_task(self._await_ready(slot))
        restart = f" (restart {slot.state.restarts})" if slot.state.restarts else ""
        self._event(f"start {slot.state.worker_id}{restart}")
        return slot

    async def _await_ready(self, slot: _Slot) -> None:
        actor, pg = slot.actor, slot.placement_group
        pools = self.config.pools
        try:
            await asyncio.wait_for(pg.ready(), pools.placement_timeout_s)
        except asyncio.CancelledError:
            raise
        except Exception as e:          # never placed: say so now, and free what it holds or waits for
            if self._fail_start(slot, actor, placement_error(pg, slot.state.worker_id, pools.placement_timeout_s,
                                                             pools.placement_strategy)
                                if isinstance(e, asyncio.TimeoutError) else reason(e)):
                self._release(slot)
            return
        slot.placed = True
        try:
            address = await asyncio.wait_for(actor.ready.remote(), _READY_TIMEOUT_S)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self._fail_start(slot, actor, reason(e))
            return
        if slot.actor is actor:
            slot.state.address = str(address)
            slot.ever_ready = True                  # registered: routers may use it from now on
            if slot.state.status == "starting":
                slot.state.status = "ready"
                self._event(f"{slot.state.worker_id} ready at {address}")

    def _fail_start(self, slot: _Slot, actor, error: str) -> bool:
        """Mark a slot still starting ``actor`` dead with ``error``; False if it moved on."""
        if slot.actor is not actor or slot.state.status != "starting":
            return False
        slot.state.status = "dead"
        slot.state.error = error
        self._event(f"{slot.state.worker_id} failed to start: {error}")
        return True

    def _release(self, slot: _Slot) -> None:
        """Kill the slot's actor and remove its placement group (ending its TP ranks too)."""
        import ray

        actor, slot.actor = slot.actor, None
        pg, slot.placement_group = slot.placement_group, None
        if actor is not None:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:
                pass
        if pg is not None:
            remove_placement_group(pg)
            slot.state.placement_group = ""

    async def _registry_call(self, name: str, *args) -> Any:
        if self._registry is None:
            return None
        try:
            return await asyncio.wait_for(getattr(self._registry, name)(*args), 5.0)
        except Exception as e:  # the store is down: the worker's own TTL still expires
            log.warning("registry %s(%s) failed: %s", name, args, e)
            return None

    async def _poll(self, slot: _Slot) -> dict | None:
        """The worker's stats, or None if it is dead (RayActorError or too many timeouts)."""
        import ray

        actor = slot.actor
        if actor is None:
            return None
        try:
            stats = as_dict(await asyncio.wait_for(actor.stats.remote(), _STATS_TIMEOUT_S))
        except asyncio.TimeoutError:
            slot.misses += 1
            return None if slot.misses >= _MAX_MISSES else slot.state.stats
        except ray.exceptions.RayActorError as e:
            slot.state.error = f"actor died: {reason(e)}"
            return None
        except Exception as e:  # stats raised inside a live worker: keep it, note the error
            slot.state.error = f"stats: {reason(e)}"
            return slot.state.stats
        slot.misses = 0
        slot.state.stats = stats
        return stats

    async def _reconcile_loop(self) -> None:
        tick = 0
        while not self._stopping:
            tick += 1
            try:
                await self._reconcile()
                if tick % _REAP_EVERY == 0:
                    # starting workers may not have registered yet: never reap a slot we manage
                    managed = {wid for wid, s in self._slots.items() if s.state.status != "stopped"}
                    await self._registry_call("areap_dead", managed)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("reconcile failed")
            await asyncio.sleep(_TICK_S)

    async def _reconcile(self) -> None:
        ready = [s for s in self._slots.values() if s.state.status == "ready"]   # draining ones: their task polls
        results = await asyncio.gather(*(self._poll(s) for s in ready))
        for slot, stats in zip(ready, results):
            if stats is None and slot.state.status == "ready":
                await self._on_dead(slot)
        now = time.time()
        for slot in list(self._slots.values()):
            st = slot.state
            if st.status == "dead" and self.config.pools.restart_dead and not self._stopping:
                if now - st.started_at >= min(2.0 ** st.restarts, 30.0):      # back off a crash loop
                    await self._on_dead(slot)
            elif st.status == "draining" and slot.drain_task is not None and not slot.drain_task.done():
                await self._registry_call("aset_draining", st.worker_id, True)

    async def _on_dead(self, slot: _Slot) -> None:
        wid = slot.state.worker_id
        if slot.state.status != "dead":
            slot.state.status = "dead"
            self._event(f"{wid} died: {slot.state.error or 'no answer'}")
        self._release(slot)
        await self._registry_call("aderegister", wid)
        if self.config.pools.restart_dead and not self._stopping:
            self._spawn(slot.state.role, slot)

    def _raise_if_failed(self, role: str | None = None) -> None:
        """Raise if a worker (of ``role``, or any) died without ever coming up: a config or model
        problem, restarting will not help."""
        failed = [s.state for s in self._slots.values()
                  if (role is None or s.state.role == role) and s.state.status == "dead" and not s.ever_ready]
        if failed:
            raise RuntimeError("workers failed to start: " +
                               "; ".join(f"{s.worker_id}: {s.error}" for s in failed))

    async def _wait_pool(self, role: str, n: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self._raise_if_failed(role)
            slots = [s.state for s in self._slots.values() if s.state.role == role]
            ready = sum(1 for s in slots if s.status == "ready")
            busy = sum(1 for s in slots if s.status in ("starting", "draining"))
            if ready == n and busy == 0:
                return
            await asyncio.sleep(0.1)
        raise TimeoutError(f"pool {role} did not reach {n} ready workers in {timeout_s}s")


def controller_actor():
    """``Controller`` as a Ray actor class (num_cpus=0: it only coordinates)."""
    import ray

    return ray.remote(num_cpus=0, max_restarts=0, max_concurrency=1000)(Controller)


def get_controller(namespace: str | None = None):
    """The running controller's handle (raises ValueError if there is none)."""
    import ray

    return ray.get_actor(CONTROLLER_NAME, namespace=namespace)
