"""Rotary inverse frequencies read from `config.json`'s own fields, without transformers.

The kinds the supported checkpoints use (default, linear, llama3) are computed here, in the
same float32 operations as transformers' `modeling_rope_utils`; other kinds go to transformers
(which needs its config object, so `spec.load_model_spec` loads one for them).
"""

from __future__ import annotations

import math

import torch

NATIVE_ROPE_TYPES = ("default", "linear", "llama3")


def rope_parameters(raw: dict) -> dict | None:
    """The standard rotary parameters of a raw `config.json` (`rope_parameters`, or the older
    `rope_scaling` plus `rope_theta`), or None when the file leaves the base to the class
    default or uses nested (per layer type) parameters."""
    params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    if any(isinstance(v, dict) for v in params.values()):
        return None
    params["rope_type"] = params.get("rope_type", params.pop("type", "default"))
    if "rope_theta" not in params:
        if "rope_theta" not in raw:
            return None
        params["rope_theta"] = raw["rope_theta"]
    if params["rope_type"] == "llama3":
        params.setdefault("original_max_position_embeddings", raw["max_position_embeddings"])
    return params


def inverse_frequencies(params: dict, head_dim: int) -> tuple[torch.Tensor, float]:
    """(inverse frequencies, attention scaling) for a `rope_parameters` dict of a native type."""
    base = params["rope_theta"]
    dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim
    inv_freq = 1.0 / (base**exponents)
    kind = params["rope_type"]
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / params["factor"], 1.0
    if kind == "llama3":
        return _llama3(inv_freq, params), 1.0
    raise ValueError(f"rotary type {kind!r} is not computed here; use transformers")


def _llama3(inv_freq: torch.Tensor, params: dict) -> torch.Tensor:
    factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
    old_context = params["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)
