"""EngineLoop: the one thread that owns an engine (the engine is not thread-safe).

Lifecycle:
  ``await start()`` — the thread builds the engine (model load off the event
  loop) and signals ready →
  loop: run every posted command (``await call(fn, ...)`` from asyncio; fn gets
  the engine) → if requests are schedulable: ``engine.step()`` → outputs are
  routed to the asyncio queue of their request (``subscribe``) → block events
  go to the forwarder thread (``on_block_events`` hooks, so a slow Redis never
  stalls a step) → ``after_step`` hooks run with the step's outputs (e.g. the
  prefill worker staging the KV of newly held requests) → every ``expire_interval_s``: ``expire_held()`` → idle: block
  on the command queue →
  ``stop()`` — the thread exits after the current iteration.

Invariants: outputs, command results and failures reach the event loop
through ``call_soon_threadsafe`` in the order they happened, so a subscriber
sees a command's outputs before the command's result. A step that raises
fails every subscribed request (their handlers abort them) and the loop goes
on. Requests waiting for KV are not schedulable: the loop sleeps on the
command queue instead of spinning.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from typing import Any, Callable

log = logging.getLogger(__name__)

# Engines that share a process (in-process tests, several workers in one process)
# step one at a time: each forward already uses every core torch gives it, so
# interleaving them only thrashes. Uncontended (free) with one engine per process.
FORWARD_LOCK = threading.Lock()

_IDLE_WAIT_S = 0.05       # idle: wake at least this often (expiry, stop)
_BLOCKED_WAIT_S = 0.002   # waiting requests exist but a step made no progress


class EngineFailure(RuntimeError):
    """The engine raised while stepping; the request cannot go on."""


class Aborted:
    """Queue marker: the request was aborted (Abort rpc or shutdown)."""


ABORTED = Aborted()


class EventForwarder:
    """Thread that hands block events to hooks, merging what piled up into one call."""

    def __init__(self, hooks: list[Callable[[list], Any]]):
        self.hooks = hooks
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="block-events", daemon=True)
        self._thread.start()

    def put(self, events: list) -> None:
        self._q.put(events)

    def _run(self) -> None:
        while True:
            events = self._q.get()
            if events is None:
                return
            while True:              # coalesce a backlog into one write
                try:
                    more = self._q.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._q.put(None)
                    break
                events = events + more
            for hook in self.hooks:
                try:
                    hook(events)
                except Exception:
                    log.exception("block event hook %r failed", hook)

    def stop(self) -> None:
        self._q.put(None)
        self._thread.join(timeout=5)


class EngineLoop:
    def __init__(self, make_engine: Callable[[], Any], *,
                 on_block_events: list[Callable[[list], Any]] | None = None,
                 on_expired: Callable[[list[str]], Any] | None = None,
                 expire_interval_s: float = 1.0):
        self._make_engine = make_engine
        self.after_step: list[Callable[[Any, list], None]] = []   # (engine, outputs) on the engine thread
        self.engine: Any = None        # touch only from the engine thread (via call)
        self._hooks = list(on_block_events or [])
        self._on_expired = on_expired
        self._expire_interval_s = expire_interval_s
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._subs: dict[str, asyncio.Queue] = {}   # event-loop thread only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._forwarder: EventForwarder | None = None
        self._stopping = False
        self.last_stats: Any = None    # engine.stats() after the latest iteration (read-only snapshot)
        self._outputs: list = []       # the latest step's outputs, for the after-step hooks
        self.num_steps = 0

    # ---- asyncio side -------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        ready: asyncio.Future = self._loop.create_future()
        self._forwarder = EventForwarder(self._hooks)
        self._thread = threading.Thread(target=self._run, args=(ready,), name="engine-loop", daemon=True)
        self._thread.start()
        await ready

    def add_block_event_hook(self, hook: Callable[[list], Any]) -> None:
        self._hooks.append(hook)

    async def call(self, fn: Callable[..., Any], *args) -> Any:
        """Run ``fn(engine, *args)`` on the engine thread between steps; its result or exception."""
        if self._stopping:
            raise RuntimeError("worker is shutting down")
        fut = self._loop.create_future()
        self._commands.put((fn, args, fut))
        return await fut

    def post(self, fn: Callable[..., Any], *args) -> None:
        """Fire and forget (errors are logged)."""
        self._commands.put((fn, args, None))

    def subscribe(self, request_id: str) -> asyncio.Queue:
        if request_id in self._subs:
            raise ValueError(f"request id {request_id!r} is already in use on this worker")
        q = self._subs[request_id] = asyncio.Queue()
        return q

    def unsubscribe(self, request_id: str) -> None:
        self._subs.pop(request_id, None)

    def notify(self, request_id: str, item: Any) -> None:
        q = self._subs.get(request_id)
        if q is not None:
            q.put_nowait(item)

    def _dispatch(self, outputs: list) -> None:
        for out in outputs:
            self.notify(out.request_id, out)

    def _fail_all(self, error: BaseException) -> None:
        for q in self._subs.values():
            q.put_nowait(EngineFailure(f"engine step failed: {error!r}"))

    def stop(self) -> None:
        self._stopping = True
        self._commands.put(None)
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._forwarder is not None:
            self._forwarder.stop()

    # ---- engine thread ------------------------------------------------------
    def _to_loop(self, fn, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:      # event loop closed: nobody is listening any more
            pass

    def _run(self, ready: asyncio.Future) -> None:
        try:
            self.engine = self._make_engine()
            self.last_stats = self.engine.stats()
        except BaseException as e:
            self._to_loop(_settle, ready, None, e)
            return
        self._to_loop(_settle, ready, None, None)
        next_expiry = time.monotonic() + self._expire_interval_s
        wait_s = 0.0
        while True:
            if not self._run_commands(wait_s):
                return
            progressed = self._step() if self._schedulable() else False
            self._after_step()
            self._forward_events()
            if time.monotonic() >= next_expiry:
                self._expire()
                next_expiry = time.monotonic() + self._expire_interval_s
            self.last_stats = self.engine.stats()
            if progressed:
                wait_s = 0.0
            else:
                wait_s = _BLOCKED_WAIT_S if self._schedulable() else _IDLE_WAIT_S

    def _run_commands(self, wait_s: float) -> bool:
        """Run queued commands (waiting up to ``wait_s`` for the first). False on stop."""
        try:
            item = self._commands.get(timeout=wait_s) if wait_s > 0 else self._commands.get_nowait()
        except queue.Empty:
            return True
        while True:
            if item is None:
                return False
            fn, args, fut = item
            try:
                res, err = fn(self.engine, *args), None
            except Exception as e:
                res, err = None, e
                if fut is None:
                    log.exception("engine command %r failed", fn)
            if fut is not None:
                self._to_loop(_settle, fut, res, err)
            try:
                item = self._commands.get_nowait()
            except queue.Empty:
                return True

    def _schedulable(self) -> bool:
        return self.engine.has_schedulable()

    def _step(self) -> bool:
        self.num_steps += 1
        try:
            with FORWARD_LOCK:
                outputs = self.engine.step()
        except Exception as e:
            log.exception("engine step failed; failing every live request")
            self._to_loop(self._fail_all, e)
            return False
        self._outputs = outputs
        if outputs:
            self._to_loop(self._dispatch, outputs)
        # running requests always advance; waiting-only means none could be admitted
        return bool(outputs or self.engine.num_running)

    def _after_step(self) -> None:
        """Every iteration (outputs empty when no step ran): the after-step hooks."""
        outputs, self._outputs = self._outputs, []
        for hook in self.after_step:
            try:
                hook(self.engine, outputs)
            except Exception:
                log.exception("after-step hook %r failed", hook)

    def _forward_events(self) -> None:
        if self._hooks:
            events = self.engine.drain_block_events()
            if events:
                self._forwarder.put(events)
        else:
            self.engine.drain_block_events()   # nobody listens: do not let them pile up

    def _expire(self) -> None:
        if not self.last_stats.num_held:
            return
        expired = self.engine.expire_held()
        if expired:
            log.info("hold TTL expired for %d request(s): %s", len(expired), expired[:8])
            if self._on_expired is not None:
                self._to_loop(self._on_expired, expired)


def _settle(fut: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if fut.done():          # the awaiting handler was cancelled
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)
