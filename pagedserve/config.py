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
