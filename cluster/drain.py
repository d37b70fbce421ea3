"""Drain: how a worker slot leaves the pools without dropping a request (DRAINING → STOPPED).

The controller calls ``Drainer.begin(slot)`` when ``drain(worker_id)`` or a
scale-down picks a slot. The slot is DRAINING at once, and one task per slot
(``slot.drain_task``) takes it to STOPPED along a path chosen by the status it
had:

    DEAD ─────────────────────────────────────────────────────────────────▶ stop
    STARTING, not placed yet (nothing can have been routed to it) ────────▶ stop
    STARTING, placed ──its start ends──▶ registered? ──yes──▶ drain ──────▶ stop
                                                     └──no────────────────▶ stop
    READY ──────────────────────────────────────────────────▶ drain ──────▶ stop

drain, in order:
1. flag it ``draining`` in the registry: routers stop sending it new requests
   within their refresh interval (the controller's reconcile loop re-asserts
   the flag while the task runs, for a Redis that restarted empty);
2. wait ``pools.drain_grace_s`` for requests already routed to it to arrive;
3. poll its stats every ``_POLL_S`` until ``_IDLE_POLLS`` polls in a row find
   it idle (nothing running, waiting, or held for a decode worker), it dies,
   or ``pools.drain_timeout_s`` passes (an event says it was stopped busy).

stop, in order:
4. cancel its start if still in flight;
5. ``shutdown()`` the actor (if it was ever placed — an unplaced actor never
   ran), kill it and remove its placement group, deregister it;
6. status STOPPED.

Step 5 alone (``Drainer.stop``) is also how ``Controller.shutdown`` ends
every worker.

The drainer keeps nothing per slot: the slot (``cluster.controller._Slot``)
carries it. What it needs from the controller — polling a worker's stats,
releasing its actor and placement group, registry calls, events — it is given
as callables.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from cluster.config import PoolSection

if TYPE_CHECKING:
    from cluster.controller import _Slot

_POLL_S = 0.25              # stats poll period while waiting for a draining worker to go idle
_IDLE_POLLS = 2             # idle polls in a row that count as idle
_SHUTDOWN_TIMEOUT_S = 10.0  # a worker's graceful shutdown(), before it is killed anyway


def is_idle(stats: dict) -> bool:
    """Nothing running, waiting, or held (a decode worker's finished prefills awaiting pickup)."""
    return not (stats.get("num_running", 0) or stats.get("num_waiting", 0) or stats.get("num_held", 0))


class Drainer:
    def __init__(self, pools: PoolSection, *,
                 poll: Callable[[_Slot], Awaitable[dict | None]],
                 release: Callable[[_Slot], None],
                 registry_call: Callable[..., Awaitable[Any]],
                 event: Callable[[str], None]) -> None:
        self.pools = pools
        self._poll = poll                       # the worker's stats, or None if it is dead
        self._release = release                 # kill the actor, remove its placement group
        self._registry_call = registry_call     # (name, *args): a Registry coroutine, errors logged
        self._event = event

    def begin(self, slot: _Slot) -> None:
        """Mark ``slot`` DRAINING and start the task that takes it to STOPPED."""
        status, slot.state.status = slot.state.status, "draining"
        loop = asyncio.get_running_loop()
        if status == "dead":            # gone already: nothing to drain
            slot.drain_task = loop.create_task(self._finish(slot))
        elif status == "starting":      # it may register any moment: let it, then drain it like any other
            slot.drain_task = loop.create_task(self._drain_once_started(slot))
        else:
            slot.drain_task = loop.create_task(self._drain(slot))

    async def stop(self, slot: _Slot) -> None:
        """Shut the worker down (gracefully if it ever ran), kill it, free its group, deregister it."""
        actor = slot.actor
        if actor is not None and slot.placed:       # an unplaced actor never ran: nothing to shut down
            try:
                await asyncio.wait_for(actor.shutdown.remote(), _SHUTDOWN_TIMEOUT_S)
            except Exception:
                pass
        self._release(slot)
        await self._registry_call("aderegister", slot.state.worker_id)

    async def _drain_once_started(self, slot: _Slot) -> None:
        if not slot.placed:             # still waiting for resources: nothing can have been routed to it
            await self._finish(slot)
            return
        if slot.ready_task is not None:
            await asyncio.gather(asyncio.shield(slot.ready_task), return_exceptions=True)
        if slot.ever_ready and slot.actor is not None:
            await self._drain(slot)
        else:
            await self._finish(slot)

    async def _drain(self, slot: _Slot) -> None:
        wid = slot.state.worker_id
        await self._registry_call("aset_draining", wid, True)
        await asyncio.sleep(self.pools.drain_grace_s)
        deadline = time.monotonic() + self.pools.drain_timeout_s
        idle_polls = 0
        while time.monotonic() < deadline:
            stats = await self._poll(slot)
            if stats is None:               # died while draining: nothing left to wait for
                break
            idle_polls = idle_polls + 1 if is_idle(stats) else 0
            if idle_polls >= _IDLE_POLLS:
                break
            await asyncio.sleep(_POLL_S)
        else:
            self._event(f"{wid} still busy after {self.pools.drain_timeout_s}s of draining; stopping it")
        await self._finish(slot)

    async def _finish(self, slot: _Slot) -> None:
        if slot.ready_task is not None and not slot.ready_task.done():
            slot.ready_task.cancel()
        await self.stop(slot)
        slot.state.status = "stopped"
        self._event(f"{slot.state.worker_id} stopped")
