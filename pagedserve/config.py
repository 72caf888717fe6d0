"""Engine configuration: one validated object, built once."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

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


class RouterConfig(BaseModel):
    """How the router actor admits requests to replicas."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_queue_len: int = Field(default=1024, ge=1)  # beyond this, new requests get 503
    max_waiting_per_replica: int = Field(default=4, ge=0)  # engine backlog that blocks admission
    imbalance_bound: int = Field(default=8, ge=0)  # affinity yields if load > least load + this
    retry_after_s: int = Field(default=1, ge=1)
    report_interval_s: float = Field(default=0.05, gt=0)  # replica -> router capacity reports
    stale_after_s: float = Field(default=30.0, gt=0)  # a silent replica is dropped after this
    max_hashes_per_report: int = Field(default=8192, ge=0)


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
    torch_threads: int | None = Field(default=None, ge=1)  # CPU threads per replica
    router: RouterConfig = Field(default_factory=RouterConfig)
    max_request_bytes: int = Field(default=1 << 20, ge=1024)
    max_tokens_limit: int | None = Field(default=None, ge=1)  # cap on a request's max_tokens
    warmup: bool = True  # one real generation before a replica reports ready
