"""What an engine reads from a model's directory before its weights, in one bundle.

An engine loads it at start; a standby engine process loads it ahead, so the replica that
adopts the standby skips the phase (about a second of tokenizer and config reading).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pagedserve.replicas.models.registry import eos_token_ids, load_tokenizer, resolve_model_dir
from pagedserve.replicas.models.spec import ModelSpec, load_model_spec


@dataclass(frozen=True)
class ModelFiles:
    """The model as configured (`model`), its directory, architecture, tokenizer and the
    token ids that end generation."""

    model: str | None
    model_dir: Path
    spec: ModelSpec
    tokenizer: object
    eos_token_ids: list[int]


def load_model_files(model: str | None, progress: bool = True) -> ModelFiles:
    """Resolve `model` (directory, .gguf or the default) and read its config and tokenizer."""
    model_dir = resolve_model_dir(model, progress=progress)
    tokenizer = load_tokenizer(model_dir)
    return ModelFiles(model, model_dir, load_model_spec(model_dir), tokenizer,
                      eos_token_ids(model_dir, tokenizer))
