"""oneDNN-packed linear layers on a CPU: same products as `F.linear`, plain weights released."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_hf_equivalence import random_prompts
from tiny_models import TINY_VOCAB

from pagedserve import LLM, SamplingParams
from pagedserve.kernels import cpu_linear
from pagedserve.replicas.models.loader import load_model
from pagedserve.replicas.models.spec import load_model_spec

pytestmark = pytest.mark.skipif(not cpu_linear.available(), reason="torch built without oneDNN")
TOL = dict(atol=1e-4, rtol=1e-5)


def _linear(bias: bool, pieces: int) -> cpu_linear.Linear:
    torch.manual_seed(pieces + bias)
    layer = cpu_linear.Linear(96, 64, bias=bias, pieces=pieces)
    if bias:
        with torch.no_grad():
            layer.bias.normal_()
    return layer


@pytest.mark.parametrize("rows", [1, 7, 300])
@pytest.mark.parametrize("pieces", [1, 2])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_products_match_f_linear(bias, pieces, rows):
    layer = _linear(bias, pieces)
    weight, b = layer.weight.detach().clone(), layer.bias
    x = torch.randn(rows, 96)
    with torch.inference_mode():
        plain = layer(x)
        layer.pack(release_plain=True)
        packed = layer(x)
        parts = layer.forward_pieces(x)
    expected = F.linear(x, weight, b)
    torch.testing.assert_close(plain, expected, **TOL)
    torch.testing.assert_close(packed, expected, **TOL)
    assert layer.weight.numel() == 0  # released: only the packed copy is held
    assert len(parts) == pieces and all(p.is_contiguous() for p in parts)
    torch.testing.assert_close(torch.cat(parts, dim=-1), expected, **TOL)


def test_row_product_leaves_the_bias_out():
    layer = _linear(True, 1)
    x = torch.randn(5, 96)
    with torch.inference_mode():
        layer.pack()
        torch.testing.assert_close(layer.product(x, None), F.linear(x, layer.weight), **TOL)


@pytest.mark.parametrize("name", ["llama-gqa-tied", "qwen2-gqa-bias", "qwen3-qknorm"])
def test_loaded_model_is_packed_and_keeps_shared_weights(tiny_model_factory, name):
    model_dir = tiny_model_factory(name)
    spec = load_model_spec(model_dir)
    model = load_model(spec, model_dir, torch.float32, torch.device("cpu"), progress=False)
    linears = [m for m in model.modules() if isinstance(m, cpu_linear.Linear)]
    assert linears and all(m.packed is not None for m in linears)
    assert model.model.layers[0].self_attn.qkv_proj.weight.numel() == 0
    head, embed = model.lm_head.weight, model.model.embed_tokens.weight
    if spec.tie_word_embeddings:  # the embedding still needs the plain copy
        assert head is embed and embed.numel() == spec.vocab_size * spec.hidden_size
    else:
        assert head.numel() == 0 and embed.numel() == spec.vocab_size * spec.hidden_size


def test_other_dtypes_are_not_packed(tiny_llama):
    spec = load_model_spec(tiny_llama)
    model = load_model(spec, tiny_llama, torch.bfloat16, torch.device("cpu"), progress=False)
    assert all(m.packed is None for m in model.modules() if isinstance(m, cpu_linear.Linear))
    assert cpu_linear.pack_model(model) == 0


def test_generation_is_the_same_packed_or_not(tiny_model_factory, monkeypatch):
    model_dir = tiny_model_factory("llama-mha-untied-rope-llama3")
    prompts = random_prompts([3, 30, 11], TINY_VOCAB, seed=5)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=0)

    def run():
        llm = LLM(str(model_dir), progress=False, device="cpu", num_kvcache_blocks=32)
        outs = llm.generate(prompts, params, use_tqdm=False)
        return [(o.outputs[0].token_ids, o.outputs[0].cumulative_logprob) for o in outs]

    packed = run()
    monkeypatch.setattr(cpu_linear, "available", lambda: False)
    plain = run()
    for (ids_p, lp_p), (ids_u, lp_u) in zip(packed, plain, strict=True):
        assert ids_p == ids_u
        assert lp_p == pytest.approx(lp_u, abs=1e-3)
