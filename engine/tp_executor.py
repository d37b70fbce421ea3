"""Tensor-parallel execution of one engine: rank 0 schedules, every rank runs
the forward on its shard. One process per rank.

Lifecycle (rank 0 = the process holding the ``LLMEngine``):
  ``TPExecutor.launch(config, launcher)``: host the rendezvous ``TCPStore``,
  start ranks 1..k-1 through ``launcher`` (each runs ``run_rank``), join the
  ``TPGroup`` → every rank loads its shard of the weights → [GPU, no
  ``num_kv_blocks``: ``Profile`` — every rank profiles the same forward, the
  smallest block count wins] → ``make_runner``: ``Setup`` — every rank builds
  its KV cache (its KV heads only) and a ``ModelRunner`` → per engine step
  the ``TPModelRunner`` broadcasts ``RunStep(sched, rows)`` and runs it too
  (forwards and collectives in lockstep; rank 0 alone samples) → KV moves:
  ``ExportKV`` (every rank's head shard, stacked on rank 0),
  ``ImportKV`` (full heads from rank 0, each rank keeps its slice) →
  ``close()``: ``Shutdown``, ranks joined, groups shut down.

Other ranks (``run_rank``): connect, load the shard, then obey messages in
order until ``Shutdown``; an error there ends the rank (rank 0's next
collective then fails instead of hanging on a half-run step).

Messages are plain dataclasses pickled over the group's gloo control backend
(``TPGroup.broadcast_object``); the runner's inputs are the scheduler's own
``SchedulerOutput``, so a step costs one small pickle per step.

Launchers: ``launcher(config, address, ranks)`` starts ranks ``ranks`` (each
runs ``run_rank(config, r, address, ...)``) and returns a handle with
``join(timeout)``/``terminate()``; an optional ``host`` attribute names the
interface the rendezvous store is advertised on (default 127.0.0.1; an explicit
``TPExecutor.launch(..., host=...)`` wins). ``spawn_local`` (default) starts
ranks as local processes, rank r on ``cuda:N+r`` (one process sees every GPU).
In a Ray cluster (cluster/tp_launcher.py, ``RayTPLauncher``) a TP prefill
worker is one placement group with one bundle per rank: the worker actor (rank
0, bundle 0) serves gRPC and builds ``LLMEngine(config, tp_launcher=...)``; the
launcher starts one actor per rank r in bundle r calling ``run_rank(config, r,
address, device="cuda:0")`` (each bundle sees one GPU; ``cpu`` on CPU), and its
``host`` is rank 0's node IP.

Decision: CUDA graphs are off at TP>1 (the engine runs eagerly): capture
would have to happen in lockstep on every rank with NCCL inside the graph.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
from dataclasses import dataclass, field
from typing import Callable

import torch

from engine.config import EngineConfig
from engine.distributed import TPGroup, kv_head_start, make_store, rank_device
from engine.kv_cache import KVCache, KVCacheSpec
from engine.model_runner import ModelRunner
from engine.outputs import SchedulerOutput

log = logging.getLogger(__name__)

# ---- messages (rank 0 → every rank) ----------------------------------------------

@dataclass
class Profile:
    num_tokens: int


@dataclass
class Setup:
    num_blocks: int
    max_model_len: int


@dataclass
class RunStep:
    sched: SchedulerOutput
    rows: list[int] = field(default_factory=list)


@dataclass
class ExportKV:
    block_ids: list[int]


@dataclass
class ImportKV:
    block_ids: list[int]
    shape: tuple[int, ...]      # full-head data; rank 0 broadcasts it right after


@dataclass
class Shutdown:
    pass


# ---- launchers ----------------------------------------------------------------------

class LocalRanks:
    """Handle on ranks started as local processes."""

    def __init__(self, procs: list):
        self.procs = procs

    def join(self, timeout: float) -> None:
        for p in self.procs:
            p.join(timeout)

    def terminate(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.terminate()
                p.join(5)


def spawn_local(config: EngineConfig, address: str, ranks: list[int]) -> LocalRanks:
    ctx = mp.get_context("spawn")
    procs = []
    for r in ranks:
        p = ctx.Process(target=run_rank, args=(config, r, address), name=f"tp-rank-{r}", daemon=True)
        p.start()
        procs.append(p)
    return LocalRanks(procs)


# ---- rank 0 ---------------------------------------------------------------------------

class TPExecutor:
    def __init__(self, tp: TPGroup, ranks):
        self.tp = tp
        self.ranks = ranks
        self._closed = False

    @classmethod
    def launch(cls, config: EngineConfig, launcher: Callable | None = None,
               host: str | None = None) -> "TPExecutor":
        size = config.tensor_parallel_size
        launcher = launcher or spawn_local
        host = host or getattr(launcher, "host", None) or "127.0.0.1"
        store = make_store(f"{host}:0", 0, size)
        address = f"{host}:{store.port}"
        ranks = launcher(config, address, list(range(1, size)))
        try:
            tp = TPGroup.connect(address, 0, size, rank_device(config.device, 0), store=store)
        except BaseException:
            ranks.terminate()
            raise
        return cls(tp, ranks)

    def send(self, msg) -> None:
        self.tp.broadcast_object(msg)

    def profile(self, num_tokens: int) -> None:
        self.send(Profile(num_tokens))

    def make_runner(self, model, kv_cache: KVCache, backend, max_model_len: int) -> "TPModelRunner":
        self.send(Setup(kv_cache.num_blocks, max_model_len))
        return TPModelRunner(self, model, kv_cache, backend, self.tp.device, max_model_len)

    def close(self, timeout: float = 30.0) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.send(Shutdown())
        except Exception as e:       # a rank already died: the group is broken
            log.warning("TP shutdown broadcast failed: %s", e)
        self.ranks.join(timeout)
        self.ranks.terminate()
        self.tp.close()


class TPModelRunner(ModelRunner):
    """Rank 0's runner: every forward and KV move is announced to the other ranks
    first, then done here too (sampling stays here)."""

    def __init__(self, executor: TPExecutor, *args):
        super().__init__(*args)
        self.executor = executor

    def run(self, sched: SchedulerOutput, rows: list[int]):
        if not sched.is_empty:
            self.executor.send(RunStep(sched, rows))
        return super().run(sched, rows)

    def export_kv(self, block_ids: list[int]) -> torch.Tensor:
        self.executor.send(ExportKV(list(block_ids)))
        return self.executor.tp.gather_stack(self.kv_cache.export_blocks(block_ids))

    def import_kv(self, block_ids: list[int], data: torch.Tensor) -> None:
        full = data.to(self.device, self.kv_cache.spec.dtype).contiguous()
        self.executor.send(ImportKV(list(block_ids), tuple(full.shape)))
        _import_slice(self.kv_cache, self.executor.tp, block_ids, self.executor.tp.broadcast(full))


def _import_slice(kv_cache: KVCache, tp: TPGroup, block_ids: list[int], full: torch.Tensor) -> None:
    """Keep this rank's KV heads of full-head data ``[L, 2, n, bs, KH, D]``."""
    total = full.shape[4]
    if total == kv_cache.spec.num_kv_heads:      # already a shard (or TP heads replicated)
        kv_cache.import_blocks(block_ids, full)
        return
    start = kv_head_start(tp.rank, total, tp.size)
    kv_cache.import_blocks(block_ids, full.narrow(4, start, kv_cache.spec.num_kv_heads))


# ---- ranks 1..k-1 ---------------------------------------------------------------------

def run_rank(config: EngineConfig, rank: int, address: str, device: str | None = None) -> None:
    """Body of a non-zero rank: join, load the shard, obey rank 0 until Shutdown."""
    dev = torch.device(device) if device else rank_device(config.device, rank)
    tp = TPGroup.connect(address, rank, config.tensor_parallel_size, dev)
    try:
        _RankWorker(config, tp).serve()
    except Exception:
        log.exception("TP rank %d failed", rank)
        raise
    finally:
        tp.close()


class _RankWorker:
    def __init__(self, config: EngineConfig, tp: TPGroup):
        from engine.attention import get_backend
        from engine.models.loader import load_model

        self.config, self.tp = config, tp
        loaded = load_model(config.model, config.torch_dtype, tp.device, seed=config.seed,
                            hf_overrides=config.hf_overrides, tp=tp, load_tokenizer=False)
        self.model = loaded.model
        self.spec = KVCacheSpec.for_model(loaded.config, tp.size, config.block_size, config.torch_dtype)
        self.backend = get_backend(config.attention_backend, tp.device)
        self.runner: ModelRunner | None = None

    def serve(self) -> None:
        while True:
            msg = self.tp.broadcast_object()
            if isinstance(msg, Shutdown):
                return
            self.handle(msg)

    @torch.inference_mode()
    def handle(self, msg) -> None:
        if isinstance(msg, RunStep):
            self.runner.run(msg.sched, msg.rows)
        elif isinstance(msg, ExportKV):
            self.tp.gather_stack(self.runner.kv_cache.export_blocks(msg.block_ids))
        elif isinstance(msg, ImportKV):
            full = torch.empty(msg.shape, dtype=self.spec.dtype, device=self.tp.device)
            _import_slice(self.runner.kv_cache, self.tp, msg.block_ids, self.tp.broadcast(full))
        elif isinstance(msg, Setup):
            cache = KVCache(self.spec, msg.num_blocks, self.tp.device)
            self.runner = ModelRunner(self.model, cache, self.backend, self.tp.device, msg.max_model_len)
        elif isinstance(msg, Profile):
            from engine.llm_engine import gpu_kv_blocks
            num = gpu_kv_blocks(self.model, self.spec, self.backend, self.tp.device, msg.num_tokens,
                                self.config.gpu_memory_utilization)
            self.tp.min_int(num)
        else:
            raise TypeError(f"unknown TP message {type(msg).__name__}")
