"""config.json and the tokenizer are read without transformers' model-specific modules, and
give what AutoConfig and AutoTokenizer give."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import TINY_CONFIGS, write_tiny_model
from transformers import AutoConfig, AutoTokenizer
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from pagedserve.replicas.models import spec as spec_module
from pagedserve.replicas.models.layers import _rope_inverse_frequencies
from pagedserve.replicas.models.registry import load_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[2]
LLAMA3_LEGACY = {  # the older layout: rope_scaling beside a top-level rope_theta
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 512,
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "rms_norm_eps": 1e-5,
    "max_position_embeddings": 4096, "rope_theta": 500000.0, "tie_word_embeddings": True,
    "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 1024},
}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("model-files")
    dirs = {name: write_tiny_model(root / name, name) for name in TINY_CONFIGS}
    legacy = root / "llama3-legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text(json.dumps(LLAMA3_LEGACY))
    dirs["llama3-legacy"] = legacy
    return dirs


def fields(spec) -> dict:
    return {k: v for k, v in dataclasses.asdict(spec).items() if k != "hf_config"}


def auto_spec(model_dir: Path, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(spec_module, "_plain_config", lambda raw, architecture: None)
        return spec_module.load_model_spec(model_dir)


@pytest.mark.parametrize("name", [*TINY_CONFIGS, "llama3-legacy"])
def test_config_json_read_directly_equals_auto_config(name, model_dirs, monkeypatch):
    model_dir = model_dirs[name]
    spec = spec_module.load_model_spec(model_dir)
    assert not hasattr(spec.hf_config, "to_dict"), "read through AutoConfig, not directly"
    reference = auto_spec(model_dir, monkeypatch)
    assert fields(spec) == fields(reference)
    ours, ours_scaling = _rope_inverse_frequencies(spec.hf_config, spec.head_dim)
    hf = AutoConfig.from_pretrained(str(model_dir))
    kind = hf.rope_parameters["rope_type"]
    if kind == "default":
        expected, scaling = ROPE_INIT_FUNCTIONS.get("default", _default)(hf, torch.device("cpu"))
    else:
        expected, scaling = ROPE_INIT_FUNCTIONS[kind](hf, torch.device("cpu"))
    assert torch.equal(ours, expected) and ours_scaling == scaling


def _default(config, device):
    base = config.rope_parameters["rope_theta"]
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    return 1.0 / (base**exponents), 1.0


def test_a_field_left_to_the_class_default_goes_through_auto_config(model_dirs, tmp_path):
    raw = json.loads((model_dirs["qwen3-qknorm"] / "config.json").read_text())
    del raw["head_dim"]  # Qwen3's class default is not hidden_size / heads
    (tmp_path / "config.json").write_text(json.dumps(raw))
    spec = spec_module.load_model_spec(tmp_path)
    assert hasattr(spec.hf_config, "to_dict")
    assert spec.head_dim == AutoConfig.from_pretrained(str(tmp_path)).head_dim
    assert spec.head_dim != raw["hidden_size"] // raw["num_attention_heads"]


def test_generic_tokenizer_loads_without_auto_tokenizer(default_model_dir):
    ours = load_tokenizer(default_model_dir)
    reference = AutoTokenizer.from_pretrained(str(default_model_dir), local_files_only=True)
    assert type(ours) is type(reference)
    texts = ["Hello world", "  spaces\tand\nnew lines ", "émoji 🤖 and 漢字", ""]
    assert [ours.encode(t) for t in texts] == [reference.encode(t) for t in texts]
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert (ours.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            == reference.apply_chat_template(chat, tokenize=False, add_generation_prompt=True))
    assert ours.eos_token_id == reference.eos_token_id


def test_engine_model_files_import_no_model_specific_transformers_modules(default_model_dir):
    code = (
        "import sys\n"
        "from pagedserve.replicas.models.registry import load_tokenizer\n"
        "from pagedserve.replicas.models.spec import load_model_spec\n"
        f"load_model_spec({str(default_model_dir)!r}); load_tokenizer({str(default_model_dir)!r})\n"
        "print(sorted(m for m in sys.modules if m.startswith('transformers.models')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=REPO_ROOT, timeout=120)
    assert out.stdout.strip() == "[]"
