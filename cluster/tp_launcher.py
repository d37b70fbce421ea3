"""Workers in Ray placement groups, and the Ray launcher of tensor-parallel ranks.

Lifecycle of one worker start (controller → worker actor → rank actors):
  ``worker_bundles(pools, role)`` → the controller creates a placement group of
  ``tp`` bundles (``pools.prefill_tp`` for prefill workers, 1 for the others) and
  the worker actor in bundle 0 → it waits ``pools.placement_timeout_s`` for
  ``pg.ready()``; a group Ray cannot place fails the start with
  ``placement_error`` (what was asked, what Ray has), never a silent hang →
  the worker actor (rank 0) builds ``LLMEngine(config,
  tp_launcher=RayTPLauncher(pg))`` → ``TPExecutor.launch`` hosts the
  rendezvous store on ``launcher.host`` (rank 0's node IP) and calls the
  launcher → one ``TPRank`` actor per rank r in bundle r runs
  ``engine.tp_executor.run_rank(config, r, address, device)`` → … serving … →
  the worker's ``shutdown()`` closes the engine (Shutdown message, ranks
  joined, rank actors killed) → the controller kills the worker actor and
  removes the placement group (which ends anything still in it).

Decisions:
- Every worker gets a placement group, TP=1 ones too (one bundle): a single
  start path, and a pool asking for resources the cluster lacks (GPUs on a CPU
  cluster, more GPUs than a node has) fails with a clear error instead of a
  pending actor.
- A bundle is ``{"CPU": pools.num_cpus, "GPU": pools.num_gpus}``: each rank's
  process reserves what a TP=1 worker reserves. ``pools.resources[role]``
  (custom resources that pin a pool to a node group) go into bundle 0 only:
  they label the worker, not each rank; with the default ``STRICT_PACK`` the
  other ranks land on the same node anyway.
- ``pools.placement_strategy`` defaults to ``STRICT_PACK``: TP ranks
  all-reduce twice per layer, so they belong on one node (NVLink). ``PACK``
  or ``SPREAD`` let a group cross nodes; the rendezvous address is rank 0's
  node IP (never 127.0.0.1), so that works too, only slower.
- TP>1 is for prefill workers only (``pools.prefill_tp``, ``baton up
  --prefill-tp``): prefill is compute-bound, decode memory-bound; decode and
  colocated workers run TP=1 and receive a TP=k worker's KV as head shards that
  kvtransfer re-lays into their full-head cache.
- On GPU each bundle's process sees one GPU (Ray sets ``CUDA_VISIBLE_DEVICES``),
  so every rank uses ``cuda:0``; ``pools.num_gpus`` must then be a whole number
  (NCCL cannot put two ranks of a group on one GPU). On CPU ranks use gloo.
- Rank actors are owned by the worker actor: if it dies, Ray ends them with it.
- Each rank actor answers ``where()`` (``device_report``: pid, node, Ray's GPU ids,
  ``CUDA_VISIBLE_DEVICES``, the CUDA devices it sees) before it starts ``run``,
  so ``ManagedWorker.placement()`` can say where every rank ended up while the
  ranks serve (``run`` never returns before shutdown, and the actor runs one
  call at a time).
- ``check_prefill_tp`` reads the model's config (never its weights) and builds
  the sharded model on the ``meta`` device, so the engine's own sharding rules
  (heads, KV heads, MLP width divisible by TP) decide — before Ray starts.

Engine-side protocol (engine/tp_executor.py): a launcher is
``launcher(config, address, ranks) -> handle`` with ``handle.join(timeout)`` /
``handle.terminate()``, plus an optional ``host`` attribute (the interface the
rendezvous store is advertised on). engine/ never imports Ray; this module does.
"""

from __future__ import annotations

import functools
import logging

log = logging.getLogger(__name__)


# ---- placement groups (controller side) -------------------------------------------

def worker_tp(pools, role: str) -> int:
    """TP ranks of a ``role`` worker: ``pools.prefill_tp`` for prefill, 1 otherwise."""
    return pools.prefill_tp if role == "prefill" else 1


def worker_bundles(pools, role: str) -> list[dict]:
    """One bundle per TP rank of a ``role`` worker (bundle 0 also carries the role's extra resources)."""
    rank = {"CPU": float(pools.num_cpus)} if pools.num_cpus else {}
    if pools.num_gpus:
        rank["GPU"] = float(pools.num_gpus)
    bundles = [dict(rank) for _ in range(worker_tp(pools, role))]
    bundles[0].update({k: float(v) for k, v in (pools.resources.get(role) or {}).items() if v})
    return bundles


def create_placement_group(pools, role: str):
    import ray

    return ray.util.placement_group(worker_bundles(pools, role), strategy=pools.placement_strategy)


def in_bundle(pg, index: int) -> dict:
    """Actor options that schedule it in bundle ``index`` of ``pg``."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return {"scheduling_strategy": PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=index)}


def worker_actor_options(pools, role: str, pg) -> dict:
    """Ray options of a ``role`` worker's actor (rank 0): bundle 0's resources, in bundle 0."""
    options: dict = {"num_cpus": pools.num_cpus, "max_restarts": 0, **in_bundle(pg, 0)}
    if pools.num_gpus:
        options["num_gpus"] = pools.num_gpus
    if pools.resources.get(role):
        options["resources"] = dict(pools.resources[role])
    return options


def remove_placement_group(pg) -> None:
    """Remove ``pg`` (and end every actor still in it); already removed is fine."""
    import ray

    try:
        ray.util.remove_placement_group(pg)
    except Exception as e:
        log.debug("remove placement group %s: %s", pg.id.hex(), e)


def placement_error(pg, worker_id: str, timeout_s: float, strategy: str) -> str:
    """Why ``pg`` is still pending: what it asks for and what Ray has, with the knobs to turn."""
    import ray

    try:
        available, total = ray.available_resources(), ray.cluster_resources()
    except Exception:               # the GCS is unreachable: say what we know
        available, total = {}, {}
    show = lambda res: {k: round(v, 2) for k, v in sorted(res.items()) if "node:" not in k and "memory" not in k}
    return (f"placement group of {worker_id} not placed after {timeout_s:g}s: it needs {len(pg.bundle_specs)} "
            f"bundle(s) {pg.bundle_specs[0]} ({strategy}) but Ray has {show(available)} free of {show(total)}; "
            "add nodes or lower pools.prefill_tp / pools.num_gpus / pools.num_cpus "
            "(pools.placement_strategy=PACK lets TP ranks span nodes)")


# ---- the Ray launcher of TP ranks (worker actor side) -----------------------------

def device_report() -> dict:
    """Where this process runs, as it sees it: pid, node IP, the GPU ids Ray gave it,
    ``CUDA_VISIBLE_DEVICES`` and the CUDA devices torch sees (none on CPU)."""
    import os

    import ray
    import torch

    out = {"pid": os.getpid(), "node_ip": ray.util.get_node_ip_address(),
           "ray_gpu_ids": [str(g) for g in ray.get_gpu_ids()],
           "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "cuda_devices": []}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            out["cuda_devices"].append({"index": i, "name": p.name, "uuid": str(getattr(p, "uuid", "")),
                                        "pci_bus_id": getattr(p, "pci_bus_id", None),
                                        "total_memory_gib": round(p.total_memory / 2**30, 1)})
    return out


class TPRank:
    """One tensor-parallel rank r >= 1 of a worker: a process in bundle r of the worker's group."""

    def where(self, rank: int) -> dict:
        return {"rank": rank, **device_report()}

    def run(self, config, rank: int, address: str, device: str) -> None:
        from engine.tp_executor import run_rank

        run_rank(config, rank, address, device=device)


@functools.lru_cache(maxsize=None)
def tp_rank_actor():
    import ray

    return ray.remote(max_restarts=0, max_concurrency=1)(TPRank)


class RayRanks:
    """Handle on ranks 1..k-1 running as ``TPRank`` actors (what ``TPExecutor`` joins and terminates)."""

    def __init__(self, actors: list, runs: list, reports: list | None = None):
        self.actors, self.runs = actors, runs
        self.reports = reports or []    # each rank's ``where()``, asked before its ``run``

    def join(self, timeout: float) -> None:
        """Wait for the ranks to return (a rank's error is in its own log; the group is closing anyway)."""
        import ray

        ray.wait(self.runs, num_returns=len(self.runs), timeout=timeout)

    def terminate(self) -> None:
        import ray

        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:
                pass


class RayTPLauncher:
    """``tp_launcher`` for an engine that is rank 0 of a worker in placement group ``pg`` (bundle 0)."""

    def __init__(self, pg):
        self.pg = pg
        self.ranks: RayRanks | None = None      # the last launch's ranks (ManagedWorker.placement)

    @property
    def host(self) -> str:
        """Where the other ranks reach rank 0's rendezvous store: this node's IP."""
        import ray

        return ray.util.get_node_ip_address()

    def __call__(self, config, address: str, ranks: list[int]) -> RayRanks:
        import torch

        specs = self.pg.bundle_specs
        if max(ranks, default=0) >= len(specs):
            raise ValueError(f"TP={config.tensor_parallel_size} needs {max(ranks) + 1} bundles, "
                             f"the placement group has {len(specs)}")
        device = "cuda:0" if torch.device(config.device).type == "cuda" else "cpu"    # a bundle sees one GPU
        actors, runs, reports = [], [], []
        for r in ranks:
            options = dict(num_cpus=specs[r].get("CPU", 0.0), num_gpus=specs[r].get("GPU", 0.0),
                           **in_bundle(self.pg, r))
            actor = tp_rank_actor().options(**options).remote()
            actors.append(actor)
            reports.append(actor.where.remote(r))       # runs first: the actor takes one call at a time
            runs.append(actor.run.remote(config, r, address, device))
        self.ranks = RayRanks(actors, runs, reports)
        return self.ranks


# ---- validation (before Ray starts) ------------------------------------------------

def check_prefill_tp(config) -> None:
    """Raise ``ValueError`` if ``pools.prefill_tp`` cannot shard ``engine.model`` (reads its config only)."""
    tp = config.pools.prefill_tp
    if tp == 1:
        return
    import torch

    from engine.distributed import TPGroup
    from engine.models.llama import LlamaForCausalLM

    name = config.engine.model
    mc = model_config(name, config.engine.to_engine_config().hf_overrides)
    try:
        with torch.device("meta"):
            LlamaForCausalLM(mc, TPGroup(0, tp))       # the engine's own sharding checks
    except ValueError as e:
        raise ValueError(f"pools.prefill_tp={tp} cannot shard {name}: {e} (num_attention_heads="
                         f"{mc.num_attention_heads}, num_key_value_heads={mc.num_key_value_heads}, "
                         f"intermediate_size={mc.intermediate_size})") from None


def model_config(name: str, overrides: dict | None = None):
    """The ``ModelConfig`` of a model name as ``engine.models.loader.load_model`` accepts it, without weights."""
    import json
    from pathlib import Path

    from engine.models.llama import ModelConfig
    from engine.models.presets import get_preset
    from engine.tokenizer import EMBEDDED_MODEL, embedded_gguf_path

    overrides = overrides or {}
    if name.startswith("dummy:"):
        return ModelConfig.from_hf_dict(get_preset(name[len("dummy:"):], overrides))
    path = embedded_gguf_path() if name == EMBEDDED_MODEL else Path(name).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return ModelConfig.from_hf_dict({**json.loads((path / "config.json").read_text()), **overrides})
    if path.is_file() and path.suffix == ".gguf":
        from gguf import GGUFReader

        from engine.models.loader import gguf_hf_config
        return ModelConfig.from_hf_dict({**gguf_hf_config(GGUFReader(str(path))), **overrides})
    raise ValueError(f"unknown model {name!r} (engine.model)")
