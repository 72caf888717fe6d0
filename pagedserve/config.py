"""Engine configuration: one validated object, built once."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

DType = Literal["auto", "float32", "bfloat16", "float16"]
Device = Literal["auto", "cpu", "cuda"]


class EngineConfig(BaseModel):
    """Settings of one engine (one replica). `model=None` means the embedded default model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str | None = None
    dtype: DType = "auto"
    device: Device = "auto"
    max_model_len: int | None = Field(default=None, ge=1)
    max_num_seqs: int = Field(default=256, ge=1)
    max_num_batched_tokens: int = Field(default=4096, ge=1)
    block_size: int = Field(default=16, ge=1, le=256)
    num_kvcache_blocks: int | None = Field(default=None, ge=1)
    cpu_kv_cache_gib: float = Field(default=2.0, gt=0)
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    enforce_eager: bool = False
    tensor_parallel_size: int = Field(default=1, ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _check_budget(self) -> EngineConfig:
        unchunked_too_small = (
            not self.enable_chunked_prefill
            and self.max_model_len is not None
            and self.max_num_batched_tokens < self.max_model_len
        )
        if unchunked_too_small:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_model_len "
                f"({self.max_model_len}) when enable_chunked_prefill is False"
            )
        return self


RouterPolicy = Literal["admission", "serve"]


class RouterConfig(BaseModel):
    """How the router actor admits requests to replicas.

    `policy: admission` (ours): every request waits in the router actor's queue until a
    replica has room, preferring the replica that holds its prefix. `policy: serve`: the
    ingress calls the replicas unpinned and Serve's default request router (power of two
    choices, bounded by `max_ongoing_requests`) picks one; the router actor then only
    watches the replicas (`/readyz`, `/metrics`) and counts no hot prefixes for new replicas
    to prefill. It exists to measure our router against.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    policy: RouterPolicy = "admission"
    max_queue_len: int = Field(default=1024, ge=1)  # beyond this, new requests get 503
    max_waiting_per_replica: int = Field(default=4, ge=0)  # engine backlog that blocks admission
    imbalance_bound: int = Field(default=8, ge=0)  # affinity yields if load > least load + this
    retry_after_s: int = Field(default=1, ge=1)
    report_interval_s: float = Field(default=0.05, gt=0)  # replica -> router capacity reports
    stale_after_s: float = Field(default=30.0, gt=0)  # a silent replica is dropped after this
    max_hashes_per_report: int = Field(default=8192, ge=0)


class AutoscaleConfig(BaseModel):
    """When the replica deployment grows and shrinks (see `pagedserve.autoscale.policy`).

    Scale-up is immediate once queued work would miss `ttft_target_s`; scale-down removes one
    replica at a time after the load stayed low for `scale_down_after_s` (the hysteresis).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_replicas: int = Field(default=1, ge=0)  # the warm minimum; 0 only when asked for
    max_replicas: int = Field(default=2, ge=1)
    ttft_target_s: float = Field(default=2.0, gt=0)
    queue_wait_fraction: float = Field(default=0.5, gt=0, le=1)  # of the target, spent queued
    kv_high_watermark: float = Field(default=0.9, gt=0, le=1)
    running_per_replica: int | None = Field(default=None, ge=1)  # default: engine max_num_seqs
    scale_down_utilization: float = Field(default=0.5, gt=0, lt=1)
    scale_down_after_s: float = Field(default=30.0, ge=0)
    look_back_period_s: float = Field(default=2.0, gt=0)  # Serve's averaging window of metrics
    # How often replicas and handles push metrics to Serve's controller. Ray 2.60 reads this
    # field (deprecated in favour of env vars that it does not read yet); its default is 10 s.
    metrics_interval_s: float = Field(default=0.5, gt=0)
    graceful_shutdown_timeout_s: float = Field(default=60.0, gt=0)  # streams finish within this
    membership_poll_s: float = Field(default=0.5, gt=0)  # router's check for stopping replicas

    @model_validator(mode="after")
    def _check_bounds(self) -> AutoscaleConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must be <= max_replicas "
                             f"({self.max_replicas})")
        if self.look_back_period_s <= self.metrics_interval_s:
            raise ValueError(f"look_back_period_s ({self.look_back_period_s}) must be > "
                             f"metrics_interval_s ({self.metrics_interval_s})")
        return self


class WeightStoreConfig(BaseModel):
    """The per-node actor that keeps the model's tensors once, in a shared-memory file it owns.

    Not in Ray's object store: the processes that read the weights (a replica's engine process,
    a standby engine) are not Ray workers. They map the store's file and copy each tensor to
    their device from there.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    max_gib: float = Field(default=16.0, gt=0)  # the store refuses a model larger than this


StandbyMode = Literal["imported", "host", "device"]


class StandbyConfig(BaseModel):
    """Capacity kept ready ahead of demand.

    `parked`: Serve replicas beyond the serving ones, RUNNING and warm, that the router admits
    nothing to until it needs them (un-parking is a router decision: instant). They hold their
    Ray resources. `per_node`: engine processes each node keeps ready for the next replica
    placed there (imports done; per `mode`, weights also in host memory or on a GPU). Standby
    processes hold no Ray resources. `warm_workers`: idle Ray workers each node keeps for the
    next replica's actor (no Ray resources; see `replicas.node.warm_workers`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    parked: int = Field(default=0, ge=0)
    per_node: int = Field(default=0, ge=0)
    mode: StandbyMode = "imported"
    warm_workers: int = Field(default=1, ge=0)


class WarmPrefixConfig(BaseModel):
    """The cluster's hottest prompt prefixes, prefilled by a new replica before it is ready."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    top_k: int = Field(default=4, ge=0)  # 0: off
    max_tokens: int = Field(default=512, ge=1)  # longest prefix kept and prefilled
    half_life_s: float = Field(default=300.0, gt=0)  # how fast old hits stop counting


class RolloutConfig(BaseModel):
    """A new model version rolled in beside the current one (see `cluster/rollout.py`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    engine: EngineConfig  # the new version: other weights or settings
    num_replicas: int = Field(default=1, ge=1)
    canary_share: float = Field(default=0.05, gt=0, lt=1)  # of new requests, while judged
    max_error_rate: float = Field(default=0.03, ge=0, lt=1)  # above it: rolled back
    window_s: float = Field(default=300.0, gt=0)  # judged this long, then promoted
    min_requests: int = Field(default=20, ge=1)  # canary requests needed for a decision
    # At the window's end: rolled back if its median TTFT is above the old version's times
    # this and by more than `ttft_tolerance_s` (None: TTFT is not judged).
    max_ttft_ratio: float | None = Field(default=1.5, ge=1)
    ttft_tolerance_s: float = Field(default=0.05, ge=0)


CacheScope = Literal["key", "global"]


class CacheConfig(BaseModel):
    """The response cache of the ingress (see `pagedserve.cluster.response_cache`).

    Deterministic requests only (temperature 0 or a fixed seed). L1 is each ingress replica's
    in-memory LRU; L2 is Redis at `redis_url`, shared by every ingress. `scope: key` keeps each
    API key's entries apart; `global` shares them between keys.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = False
    max_entries: int = Field(default=10_000, ge=1)  # L1 entries per ingress replica
    max_entry_bytes: int = Field(default=1 << 20, ge=1024)  # larger responses are not cached
    ttl_s: float = Field(default=1800.0, gt=0)
    redis_url: str | None = None
    redis_timeout_s: float = Field(default=0.05, gt=0)  # a slower Redis answer is a miss
    scope: CacheScope = "key"


class RateLimitConfig(BaseModel):
    """Token buckets of one API key: requests and tokens (prompt + max_tokens) per minute."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    requests_per_min: float | None = Field(default=None, gt=0)  # None: unlimited
    tokens_per_min: float | None = Field(default=None, gt=0)


class ApiKeyConfig(BaseModel):
    """One API key: `name` shows in metrics and logs, `key` never does."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    key: SecretStr = Field(min_length=8)
    rate_limit: RateLimitConfig | None = None  # None: the auth section's default


class AuthConfig(BaseModel):
    """API keys on every HTTP route but the probes, and per-key rate limits.

    Keys come from `api_keys` and from the environment variable named by `api_keys_env`
    (`name:key,name:key`). With `redis_url` the buckets live in Redis, shared by every ingress.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    api_keys: list[ApiKeyConfig] = Field(default_factory=list)
    api_keys_env: str | None = None
    rate_limit: RateLimitConfig = Field(default_factory=RateLimitConfig)
    redis_url: str | None = None
    redis_timeout_s: float = Field(default=0.1, gt=0)  # then the ingress's own bucket decides

    @model_validator(mode="after")
    def _check_keys(self) -> AuthConfig:
        names = [k.name for k in self.api_keys]
        if len(set(names)) != len(names):
            raise ValueError(f"api_keys names must be unique, got {names}")
        if not self.api_keys and self.api_keys_env is None:
            raise ValueError("auth needs api_keys or api_keys_env")
        return self


class ClusterConfig(BaseModel):
    """Settings of the Serve application: engine, replicas, router and HTTP limits.

    Built once from the `args` of a serve config file; unknown keys are an error.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    engine: EngineConfig = Field(default_factory=EngineConfig)
    served_model_name: str | None = None  # the `model` clients send; default: the model's name
    num_replicas: int = Field(default=1, ge=1)
    num_ingress_replicas: int = Field(default=1, ge=1)  # HTTP/SSE work spreads over these
    # Per replica; with tensor parallelism per rank (one placement-group bundle each).
    replica_num_cpus: float = Field(default=1.0, ge=0)
    replica_num_gpus: float = Field(default=0.0, ge=0)
    # Ray resources the router and the ingress each request (they need no CPU of their own),
    # to keep them off the nodes whose loss is likely: `{"node:__internal_head__": 0.001}`
    # places them on the head node. Empty: anywhere.
    control_resources: dict[str, float] = Field(default_factory=dict)
    torch_threads: int | None = Field(default=None, ge=1)  # CPU threads per replica
    router: RouterConfig = Field(default_factory=RouterConfig)
    max_request_bytes: int = Field(default=1 << 20, ge=1024)
    max_tokens_limit: int | None = Field(default=None, ge=1)  # cap on a request's max_tokens
    warmup: bool = True  # one real generation before a replica reports ready
    # Deltas per second one replica sends over all its streams (None: one per engine step per
    # stream). Each delta costs fixed work at every hop to the client; many concurrent streams
    # then get fewer, larger deltas instead of saturating the replica, ingress and proxy.
    max_deltas_per_s: float | None = Field(default=2000.0, gt=0)
    autoscaling: AutoscaleConfig | None = None  # None: a fixed `num_replicas`
    weight_store: WeightStoreConfig | None = None  # None: replicas load weights from disk
    standby: StandbyConfig = Field(default_factory=StandbyConfig)
    warm_prefixes: WarmPrefixConfig = Field(default_factory=WarmPrefixConfig)
    rollout: RolloutConfig | None = None  # None: one model version
    cache: CacheConfig = Field(default_factory=CacheConfig)
    auth: AuthConfig | None = None  # None: no API keys (every route open)

    @field_validator("control_resources")
    @classmethod
    def _check_control_resources(cls, value: dict[str, float]) -> dict[str, float]:
        bad = {name: amount for name, amount in value.items() if not amount > 0}
        if bad:
            raise ValueError(f"control_resources amounts must be positive, got {bad}")
        if any(name in ("CPU", "GPU") for name in value):
            raise ValueError("control_resources takes custom resources only (the router and "
                             "the ingress run without a CPU or GPU of their own)")
        return value

    @model_validator(mode="after")
    def _check_replica_count(self) -> ClusterConfig:
        # (`num_replicas` is compared with its default: the config is re-read from its dump.)
        if self.autoscaling is not None and self.num_replicas != 1:
            raise ValueError("set either num_replicas or autoscaling, not both")
        return self

    @model_validator(mode="after")
    def _check_router_policy(self) -> ClusterConfig:
        """What only our router's admission provides cannot run under Serve's router."""
        if self.router.policy == "admission":
            return self
        needs_admission = {"autoscaling": self.autoscaling is not None,
                           "rollout": self.rollout is not None,
                           "standby.parked": self.standby.parked > 0}
        used = [name for name, on in needs_admission.items() if on]
        if used:
            raise ValueError(f"router.policy 'serve' leaves admission to Serve's request "
                             f"router, but {', '.join(used)} needs our router's admission: "
                             f"use router.policy 'admission' or remove {', '.join(used)}")
        return self


_DTYPE_NAMES = ("float32", "bfloat16", "float16")


def resolve_device(name: str):
    """The torch device an `EngineConfig.device` names ("auto": CUDA when there is one).
    (torch is imported here, not at the top: the ingress and router read configs without it.)"""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was requested but no CUDA GPU is available")
    return torch.device(name)


def resolve_dtype(name: str, device):
    """The torch dtype an `EngineConfig.dtype` names ("auto": bfloat16 on CUDA, float32 on CPU)."""
    import torch

    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in _DTYPE_NAMES:
        raise ValueError(f"dtype must be one of auto, {', '.join(_DTYPE_NAMES)}; got {name!r}")
    return getattr(torch, name)
