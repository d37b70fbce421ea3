"""ClusterConfig: what `baton up` builds, one frozen dataclass per component.

Sources, later wins: the dataclass defaults, a YAML file (sections ``router``,
``pools``, ``engine``, ``redis``, ``ray``), then overrides (a dict of dotted
keys such as ``{"pools.decode": 2}``, or ``KEY=VALUE`` strings from ``--set``).
Everything is validated once; a bad value raises ``ValueError`` naming the key.

Decisions:
- ``redis.url=None`` means "embedded": `baton up` starts a private
  redis-server when the binary exists, else an in-process store
  (``cluster.memory_store``).
- ``pools.num_cpus`` defaults to 0.5 so a 2-core laptop fits a router, a
  prefill and a decode worker; on GPU set ``num_gpus`` (per TP rank).
- Tensor parallelism is per prefill worker (``pools.prefill_tp``, ``baton up
  --prefill-tp``); decode and colocated workers run TP=1. Every worker is a
  Ray placement group of one bundle per rank (cluster/tp_launcher.py). CPU
  TP (gloo) is allowed — it is how the tests run it. Whether the model can be
  sharded is checked by ``cluster.tp_launcher.check_prefill_tp`` at launch
  (it reads the model's config; this module does no I/O).
- ``engine.extra`` passes any other ``EngineConfig`` field through unchanged.
- ``engine.device`` on GPU is ``cuda`` (or ``cuda:0``): Ray gives each worker
  process (each TP rank) its own GPU and sets ``CUDA_VISIBLE_DEVICES`` to it,
  so every process sees exactly one device, ``cuda:0``; ``cuda:N`` is refused.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

ROLES = ("prefill", "decode", "colocated")
STRATEGIES = ("STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD")     # Ray placement-group strategies


@dataclass(frozen=True)
class RouterSection:
    host: str = "127.0.0.1"
    """Interface the OpenAI HTTP server and the gRPC API bind to."""
    port: int = 8000
    """OpenAI-compatible HTTP port."""
    grpc_port: int = 50051
    """Public gRPC API port (0: no gRPC server)."""
    options: dict = field(default_factory=dict, hash=False, compare=False)
    """Extra ``RouterConfig`` fields (policy weights and the like), passed through."""

    def __post_init__(self) -> None:
        _check_port("router.port", self.port, allow_zero=True)
        _check_port("router.grpc_port", self.grpc_port, allow_zero=True)
        if not self.host:
            raise ValueError("router.host must be non-empty")


KV_TRANSPORTS = ("auto", "nccl", "grpc")


@dataclass(frozen=True)
class PoolSection:
    prefill: int = 1
    """Prefill workers (disaggregated path)."""
    decode: int = 1
    """Decode workers (disaggregated path)."""
    colocated: int = 0
    """Workers that prefill and decode their own requests."""
    prefill_tp: int = 1
    """Tensor-parallel ranks per prefill worker (one process and one placement-group bundle each);
    decode and colocated workers run TP=1."""
    num_cpus: float = 0.5
    """Ray CPUs reserved per worker process (per TP rank; fractional is fine on CPU)."""
    num_gpus: float = 0.0
    """Ray GPUs per worker process, i.e. per TP rank (0 on CPU)."""
    placement_strategy: str = "STRICT_PACK"
    """Ray placement strategy of a worker's bundles: STRICT_PACK keeps a TP group on one node;
    PACK, SPREAD or STRICT_SPREAD let it span nodes."""
    placement_timeout_s: float = 120.0
    """Longest wait for Ray to place a worker's bundles; then the start fails, saying what is missing."""
    restart_dead: bool = True
    """Controller replaces workers whose actor died."""
    drain_timeout_s: float = 60.0
    """Longest wait for a draining worker to finish its requests before it is killed anyway."""
    drain_grace_s: float = 2.0
    """After flagging a worker draining, wait this long before checking it is idle (routers refresh
    their worker set every second; requests already routed must land first)."""
    resources: dict = field(default_factory=dict, hash=False, compare=False)
    """Extra Ray resources per role, e.g. ``{prefill: {baton_prefill: 1}}`` to pin pools to node groups."""
    kv_transport: str = "auto"
    """How decode workers pull KV from prefill workers: ``nccl`` (GPU to GPU; falls back to grpc
    where no NCCL path exists and says so in metrics), ``grpc``, or ``auto``: nccl when the
    engine runs on CUDA, else grpc."""

    def __post_init__(self) -> None:
        if self.kv_transport not in KV_TRANSPORTS:
            raise ValueError(f"pools.kv_transport must be one of {KV_TRANSPORTS}, got {self.kv_transport!r}")
        for role in ROLES:
            n = getattr(self, role)
            if not isinstance(n, int) or n < 0:
                raise ValueError(f"pools.{role} must be an integer >= 0, got {n!r}")
        if self.prefill + self.decode + self.colocated == 0:
            raise ValueError("pools: at least one worker is needed (prefill, decode or colocated)")
        if (self.prefill == 0) != (self.decode == 0):
            raise ValueError("pools: prefill and decode workers come together "
                             f"(got prefill={self.prefill}, decode={self.decode}); "
                             "use colocated workers for a single pool")
        if not isinstance(self.prefill_tp, int) or isinstance(self.prefill_tp, bool) or self.prefill_tp < 1:
            raise ValueError(f"pools.prefill_tp must be an integer >= 1, got {self.prefill_tp!r}")
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ValueError("pools.num_cpus and pools.num_gpus must be >= 0")
        if self.num_cpus == 0 and self.num_gpus == 0:
            raise ValueError("pools.num_cpus and pools.num_gpus are both 0: a worker's placement-group bundle "
                             "must reserve something")
        if self.placement_strategy not in STRATEGIES:
            raise ValueError(f"pools.placement_strategy must be one of {STRATEGIES}, got {self.placement_strategy!r}")
        if self.placement_timeout_s <= 0:
            raise ValueError("pools.placement_timeout_s must be > 0")
        if self.drain_timeout_s <= 0:
            raise ValueError("pools.drain_timeout_s must be > 0")
        if self.drain_grace_s < 0:
            raise ValueError("pools.drain_grace_s must be >= 0")
        for role, res in self.resources.items():
            if role not in ROLES or not isinstance(res, dict) or not all(
                    isinstance(k, str) and isinstance(v, (int, float)) and v >= 0 for k, v in res.items()):
                raise ValueError(f"pools.resources must map a role in {ROLES} to {{resource: amount >= 0}}, "
                                 f"got {role!r}: {res!r}")

    def count(self, role: str) -> int:
        return getattr(self, check_role(role))

    def transport_for(self, device: str) -> str:
        """The KV transport a worker on ``device`` serves and pulls with."""
        if self.kv_transport != "auto":
            return self.kv_transport
        return "nccl" if device.startswith("cuda") else "grpc"


@dataclass(frozen=True)
class EngineSection:
    model: str = "smollm2-135m"
    """Preset name, HF folder, .gguf file or ``dummy:<preset>``."""
    block_size: int = 16
    num_kv_blocks: int | None = None
    """None sizes the pool from memory."""
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    dtype: str = "float32"
    device: str = "cpu"
    extra: dict = field(default_factory=dict, hash=False, compare=False)
    """Any other ``EngineConfig`` field (e.g. ``hf_overrides``, ``seed``)."""

    def __post_init__(self) -> None:
        # EngineConfig does the field checks; build one now so errors show at load time.
        self.to_engine_config()

    def to_engine_config(self, mode: str = "both"):
        from engine.config import EngineConfig

        known = {f.name for f in dataclasses.fields(EngineConfig)}
        unknown = sorted(set(self.extra) - known)
        if unknown:
            raise ValueError(f"engine.extra: unknown EngineConfig fields {unknown}")
        kwargs = dict(self.extra)
        kwargs.update(model=self.model, block_size=self.block_size, num_kv_blocks=self.num_kv_blocks,
                      max_num_seqs=self.max_num_seqs, max_num_batched_tokens=self.max_num_batched_tokens,
                      max_model_len=self.max_model_len, dtype=self.dtype, device=self.device, mode=mode)
        try:
            return EngineConfig(**kwargs)
        except ValueError as e:
            raise ValueError(f"engine: {e}") from None


@dataclass(frozen=True)
class RedisSection:
    url: str | None = None
    """``redis://host:port/db``, ``memory://NAME`` (in-process store), or None: embedded."""
    namespace: str = "baton"
    """Key prefix (cluster/keys.py)."""
    embedded_server: bool = True
    """With no url: start a private redis-server if the binary exists (else the in-process store)."""
    heartbeat_interval_s: float = 1.0
    heartbeat_ttl_s: float = 5.0
    """A worker whose last heartbeat is older than this is dead."""

    def __post_init__(self) -> None:
        if self.url is not None and not self.url.startswith(("redis://", "rediss://", "unix://", "memory://")):
            raise ValueError(f"redis.url must start with redis://, rediss://, unix:// or memory://, got {self.url!r}")
        if not self.namespace or ":" in self.namespace:
            raise ValueError(f"redis.namespace must be non-empty without ':', got {self.namespace!r}")
        if self.heartbeat_interval_s <= 0 or self.heartbeat_ttl_s <= self.heartbeat_interval_s:
            raise ValueError("redis: need 0 < heartbeat_interval_s < heartbeat_ttl_s")


@dataclass(frozen=True)
class RaySection:
    address: str | None = None
    """None: start a local Ray; else an address for ``ray.init`` (``auto``, ``ray://...``, ``host:port``)."""
    namespace: str = "baton"
    """Ray namespace of the named actors (controller, in-process store)."""
    num_cpus: int | None = None
    """CPUs of a local Ray (None: all)."""
    temp_dir: str | None = None
    """Ray's session folder for a local Ray (None: Ray's default)."""
    detached: bool = False
    """Controller outlives the driver (for `--address` clusters managed by `baton scale/down`)."""

    def __post_init__(self) -> None:
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ValueError("ray.num_cpus must be >= 1")
        if not self.namespace:
            raise ValueError("ray.namespace must be non-empty")


_SECTIONS = {"router": RouterSection, "pools": PoolSection, "engine": EngineSection,
             "redis": RedisSection, "ray": RaySection}


@dataclass(frozen=True)
class ClusterConfig:
    router: RouterSection = field(default_factory=RouterSection)
    pools: PoolSection = field(default_factory=PoolSection)
    engine: EngineSection = field(default_factory=EngineSection)
    redis: RedisSection = field(default_factory=RedisSection)
    ray: RaySection = field(default_factory=RaySection)

    def __post_init__(self) -> None:
        on_gpu = self.engine.device.startswith("cuda")
        if on_gpu and self.engine.device not in ("cuda", "cuda:0"):
            raise ValueError(f"engine.device={self.engine.device}: Ray gives each worker process its own GPU "
                             "(CUDA_VISIBLE_DEVICES), which it sees as cuda:0; use engine.device=cuda")
        if on_gpu and self.pools.num_gpus <= 0:
            raise ValueError("engine.device is cuda but pools.num_gpus is 0: Ray would give the workers no GPU "
                             "(set pools.num_gpus, e.g. 1)")
        if on_gpu and self.pools.prefill_tp > 1 and (self.pools.num_gpus < 1 or self.pools.num_gpus % 1):
            raise ValueError(f"pools.prefill_tp={self.pools.prefill_tp} on cuda needs a whole pools.num_gpus >= 1 "
                             f"(one GPU per rank: NCCL cannot run two ranks on one GPU), got {self.pools.num_gpus}")
        if "tensor_parallel_size" in self.engine.extra:
            raise ValueError("engine.extra.tensor_parallel_size: set pools.prefill_tp (baton up --prefill-tp) "
                             "instead; decode and colocated workers run TP=1")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "ClusterConfig":
        data = dict(data or {})
        unknown = sorted(set(data) - set(_SECTIONS))
        if unknown:
            raise ValueError(f"unknown config sections {unknown}; valid: {sorted(_SECTIONS)}")
        return cls(**{name: _build_section(name, data.get(name) or {}) for name in _SECTIONS})

    def replace(self, overrides: Mapping[str, Any] | list[str] | None) -> "ClusterConfig":
        """A copy with dotted-key overrides applied (``{"pools.decode": 2}`` or ``["pools.decode=2"]``)."""
        data = self.to_dict()
        for key, value in _parse_overrides(overrides).items():
            section, _, name = key.partition(".")
            if section not in _SECTIONS or not name:
                raise ValueError(f"override {key!r}: expected SECTION.FIELD with SECTION in {sorted(_SECTIONS)}")
            data[section][name] = value
        return ClusterConfig.from_dict(data)


def load_config(path: str | Path | None = None,
                overrides: Mapping[str, Any] | list[str] | None = None) -> ClusterConfig:
    """Defaults ← YAML file ← overrides. Overrides whose value is None are skipped (unset CLI flags)."""
    data: dict = {}
    if path is not None:
        import yaml

        p = Path(path)
        if not p.is_file():
            raise ValueError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"config file {p}: invalid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"config file {p}: top level must be a mapping of sections")
    return ClusterConfig.from_dict(data).replace(overrides)


def _parse_overrides(overrides) -> dict[str, Any]:
    if overrides is None:
        return {}
    if isinstance(overrides, Mapping):
        return {k: v for k, v in overrides.items() if v is not None}
    out: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = str(item).partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {item!r}: expected KEY=VALUE")
        import yaml

        out[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
    return out


def _build_section(name: str, values: Mapping[str, Any]):
    cls = _SECTIONS[name]
    if not isinstance(values, Mapping):
        raise ValueError(f"config section {name!r} must be a mapping, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"unknown keys in {name!r}: {unknown}; valid: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {k: _coerce(f"{name}.{k}", v, hints[k]) for k, v in values.items()}
    return cls(**kwargs)


def _coerce(key: str, value: Any, hint) -> Any:
    """Check ``value`` against a field's annotation; ints widen to float, nothing else converts."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if value is None:
        if type(None) in options:
            return None
        raise ValueError(f"{key} must not be null")
    for t in options:
        if t is type(None):
            continue
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t is bool and isinstance(value, bool):
            return value
        if t is str and isinstance(value, str):
            return value
        if t is dict and isinstance(value, dict):
            return value
    names = " or ".join("null" if t is type(None) else t.__name__ for t in options)
    raise ValueError(f"{key} must be {names}, got {value!r}")


def check_role(role: str) -> str:
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    return role


def _check_port(key: str, port: int, allow_zero: bool = False) -> None:
    lo = 0 if allow_zero else 1
    if not isinstance(port, int) or not lo <= port <= 65535:
        raise ValueError(f"{key} must be a port number, got {port!r}")
