"""Greedy tokens of the engine on a GPU against transformers' greedy `generate` on the GPU."""

from __future__ import annotations

import pytest
import torch
import transformers
from gpu_models import write_gpu_model
from tiny_models import TINY_VOCAB

from pagedserve import LLM, SamplingParams

pytestmark = pytest.mark.gpu

LENGTHS = [1, 5, 17, 40, 3, 64, 100, 16, 33]
MAX_TOKENS = 24


def prompts(seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, TINY_VOCAB, (n,), generator=g).tolist() for n in LENGTHS]


def hf_greedy(model, prompt: list[int]) -> list[int]:
    ids = torch.tensor([prompt], device="cuda")
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS,
                         min_new_tokens=MAX_TOKENS, do_sample=False, eos_token_id=None,
                         pad_token_id=0)
    return out[0, len(prompt):].tolist()


def agreement(ref: list[int], ours: list[int]) -> int:
    """How many leading tokens agree."""
    return next((i for i, (a, b) in enumerate(zip(ref, ours, strict=True)) if a != b), len(ref))


@pytest.mark.parametrize("name", ["llama-gqa-hd64", "llama-mha-hd64-untied"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_greedy_tokens_track_transformers_on_gpu(tmp_path, name, dtype):
    model_dir = write_gpu_model(tmp_path / name, name)
    torch_dtype = getattr(torch, dtype)
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype)
    hf = hf.to("cuda").eval()
    llm = LLM(str(model_dir), device="cuda", dtype=dtype, progress=False, num_kvcache_blocks=256)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outs = llm.generate(prompts(), params, use_tqdm=False)
    agreed = [agreement(hf_greedy(hf, p), o.outputs[0].token_ids)
              for p, o in zip(prompts(), outs, strict=True)]
    print(f"{name} {dtype}: leading tokens agreeing with transformers: {agreed} of {MAX_TOKENS}")
    assert min(agreed) >= 1  # the first token (from prefill) always agrees
    if dtype == "float32":  # tf32 is off by default, so only summation order differs
        assert sum(agreed) >= 0.9 * MAX_TOKENS * len(agreed)
    else:
        assert sum(agreed) >= 0.6 * MAX_TOKENS * len(agreed)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_ops_match_torch_ops(dtype):
    from pagedserve.kernels import fused_ops
    from pagedserve.replicas.models.layers import apply_rotary

    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    x, r = torch.randn(37, 2048, device="cuda").to(dt), torch.randn(37, 2048, device="cuda").to(dt)
    w = (torch.rand(2048, device="cuda") + 0.5).to(dt)
    normed, res = fused_ops.add_rms_norm(x, r, w, 1e-5)
    ref_res = x + r
    torch.testing.assert_close(res, ref_res, rtol=0, atol=0)
    torch.testing.assert_close(normed, fused_ops.rms_norm_ref(ref_res, w, 1e-5),
                               rtol=1e-2 if dtype == "bfloat16" else 1e-5, atol=1e-5)
    gu = torch.randn(37, 2 * 8192, device="cuda").to(dt)
    gate, up = gu.chunk(2, dim=-1)
    torch.testing.assert_close(fused_ops.silu_and_mul(gu), torch.nn.functional.silu(gate) * up,
                               rtol=1e-2 if dtype == "bfloat16" else 1e-5, atol=1e-5)
    qkv = torch.randn(37, (32 + 16) * 64, device="cuda").to(dt)
    qk = qkv[:, : 40 * 64].view(37, 40, 64)
    table = torch.randn(2, 300, 64, device="cuda")
    pos = torch.randint(0, 300, (37,), device="cuda")
    ref = apply_rotary(qk.clone(), table[0, :, :32][pos].unsqueeze(1).to(dt),
                       table[1, :, :32][pos].unsqueeze(1).to(dt))
    untouched = qkv[:, 40 * 64:].clone()
    fused_ops.rotary_inplace(qk, table, pos)
    if dtype == "bfloat16":  # same roundings in the same order; float32 may contract to FMAs
        torch.testing.assert_close(qk, ref, rtol=0, atol=0)
    else:
        torch.testing.assert_close(qk, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(qkv[:, 40 * 64:], untouched)
