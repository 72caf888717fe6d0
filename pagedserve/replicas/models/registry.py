"""Find a model on disk (directory, .gguf file or the embedded default) and its tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

from pagedserve.replicas.models.default_model import default_model_dir, resolve_gguf


def resolve_model_dir(model: str | None, progress: bool = True) -> Path:
    """The Hugging Face-style directory to load: a local directory, a converted .gguf, or the default.

    Nothing is fetched from a model hub: a path that does not exist is an error.
    """
    if model is None:
        return default_model_dir(progress=progress)
    path = Path(model).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"model path {model!r} does not exist (pagedserve loads local model directories and "
            ".gguf files; nothing is downloaded)"
        )
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"model file {path} is not a .gguf file; pass a model directory instead")
        return resolve_gguf(path, progress=progress)
    return path


# Tokenizer classes that are the generic `tokenizer.json` backend: loaded as that class,
# without `AutoTokenizer`, which reads the model's config through transformers' model-specific
# modules (about a second of every engine start). Other classes go through AutoTokenizer.
GENERIC_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def load_tokenizer(model_dir: str | Path):
    """The checkpoint's own tokenizer (with its chat template), loaded offline."""
    try:
        if _is_generic_tokenizer(Path(model_dir)):
            from transformers import PreTrainedTokenizerFast

            return PreTrainedTokenizerFast.from_pretrained(str(model_dir), local_files_only=True)
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"model directory {model_dir} has no usable tokenizer: {err}") from err


def _is_generic_tokenizer(model_dir: Path) -> bool:
    config = model_dir / "tokenizer_config.json"
    if not (model_dir / "tokenizer.json").is_file() or not config.is_file():
        return False
    try:
        name = json.loads(config.read_text()).get("tokenizer_class")
    except (json.JSONDecodeError, AttributeError):
        return False
    return name in GENERIC_TOKENIZER_CLASSES


def eos_token_ids(model_dir: str | Path, tokenizer) -> list[int]:
    """Every token id that ends generation: the tokenizer's EOS plus generation_config's."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    gen_path = Path(model_dir) / "generation_config.json"
    if gen_path.is_file():
        value = json.loads(gen_path.read_text()).get("eos_token_id")
        ids += value if isinstance(value, list) else [value] if value is not None else []
    return sorted(set(ids))
