"""Fused small ops of the decoder layer: residual add + RMSNorm, rotary, SiLU * up.

Each op has a torch version (used on CPU, and the oracle) and a Triton version for CUDA tensors.
The Triton versions round to the tensor's dtype at the same points as the torch code does, so a
16-bit model gives the same values whichever path runs; they exist because unfused, these ops
are ~25 tiny kernels per layer, which at decode batch sizes cost about as much as the matmuls.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs may lack triton; the torch versions then always run
    triton = None


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`residual = x + residual` (rounded to x's dtype), then RMSNorm of it; returns (normed, residual).

    With `residual=None` the input itself is the new residual.
    """
    if x.is_cuda and triton is not None:
        return _add_rms_norm_triton(x, residual, weight, eps)
    if residual is not None:
        x = x + residual
    return rms_norm_ref(x, weight, eps), x


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in float32, cast back, then scaled: the reference implementation's order."""
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up` for `gate_up = [gate | up]` along the last dimension."""
    if gate_up.is_cuda and triton is not None:
        return _silu_and_mul_triton(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def rotary_inplace(qk: torch.Tensor, cos_sin: torch.Tensor, positions: torch.Tensor) -> None:
    """Rotate-half rotary embedding of `qk` `[T, heads, head_dim]` in place.

    `cos_sin` is the float32 table `[2, max_positions, head_dim]`; cos and sin are rounded to
    qk's dtype first, then every product and sum is rounded as `x * cos + rotate_half(x) * sin`
    is in that dtype. `qk` may be a strided view (rows of a fused QKV output).
    """
    assert qk.is_cuda and triton is not None, "rotary_inplace is the CUDA path"
    _rotary_triton(qk, cos_sin, positions)


def _rotary_triton(qk: torch.Tensor, cos_sin: torch.Tensor, positions: torch.Tensor) -> None:
    assert qk.stride(2) == 1 and qk.shape[2] % 2 == 0
    tokens, heads, head_dim = qk.shape
    if tokens == 0:
        return
    half = head_dim // 2
    _rotary_kernel[(tokens,)](
        qk, cos_sin, positions, qk.stride(0), qk.stride(1), cos_sin.stride(0), cos_sin.stride(1),
        heads, HALF=half, BLOCK_H=triton.next_power_of_2(heads),
        BLOCK_D=triton.next_power_of_2(half), ROUND=_rounding(qk.dtype),
    )


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _add_rms_norm_triton(x, residual, weight, eps):
    shape, hidden = x.shape, x.shape[-1]
    x2 = _rows(x)
    assert x2.stride(-1) == 1
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    if residual is None:
        new_residual = x
        res2, res_out = x2, x2  # unused as an input; the kernel only writes when HAS_RESIDUAL
    else:
        res2 = _rows(residual)
        assert res2.stride(-1) == 1
        res_out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
        new_residual = res_out.view(shape)
    rows = x2.shape[0]
    if rows:
        _add_rms_norm_kernel[(rows,)](
            x2, res2, res_out, weight, out, x2.stride(0), res2.stride(0), hidden, eps,
            HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(hidden),
            ROUND=_rounding(x.dtype),
        )
    return out.view(shape), new_residual


def _silu_and_mul_triton(gate_up: torch.Tensor) -> torch.Tensor:
    width = gate_up.shape[-1] // 2
    x = _rows(gate_up)
    assert x.stride(-1) == 1
    out = torch.empty(x.shape[0], width, dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    if x.shape[0]:
        _silu_mul_kernel[(x.shape[0], triton.cdiv(width, block))](
            x, out, x.stride(0), out.stride(0), width, BLOCK=block, ROUND=_rounding(x.dtype),
        )
    return out.view(*gate_up.shape[:-1], width)


def _rounding(dtype: torch.dtype) -> int:
    """How a kernel rounds float32 values to `dtype`'s precision (see `_round`)."""
    return {torch.bfloat16: 1, torch.float16: 2}.get(dtype, 0)


if triton is not None:

    @triton.jit
    def _round(x, ROUND: tl.constexpr):
        """Round float32 `x` to the storage dtype's precision, kept as float32.

        A plain `.to(bf16).to(f32)` round trip can be folded away by the compiler, so bf16
        rounding (to nearest, ties to even) is done on the bits.
        """
        if ROUND == 1:
            bits = x.to(tl.uint32, bitcast=True)
            bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
            return bits.to(tl.float32, bitcast=True)
        elif ROUND == 2:
            return x.to(tl.float16).to(tl.float32)
        else:
            return x

    @triton.jit
    def _add_rms_norm_kernel(x_ptr, res_ptr, res_out_ptr, w_ptr, out_ptr, x_stride, res_stride,
                             hidden, eps, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
                             ROUND: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < hidden
        x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
        dtype = x.dtype
        x32 = x.to(tl.float32)
        if HAS_RESIDUAL:
            r = tl.load(res_ptr + row * res_stride + cols, mask=mask, other=0.0)
            x32 = _round(x32 + r.to(tl.float32), ROUND)  # rounded as torch's add
            tl.store(res_out_ptr + row * hidden + cols, x32.to(dtype), mask=mask)
        rstd = 1.0 / tl.sqrt(tl.sum(x32 * x32, axis=0) / hidden + eps)
        normed = _round(x32 * rstd, ROUND)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * hidden + cols, (normed * w).to(dtype), mask=mask)

    @triton.jit
    def _silu_mul_kernel(x_ptr, out_ptr, x_stride, out_stride, width, BLOCK: tl.constexpr,
                         ROUND: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < width
        gate = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
        up = tl.load(x_ptr + row * x_stride + width + cols, mask=mask, other=0.0)
        g32 = gate.to(tl.float32)
        act = _round(g32 / (1.0 + tl.exp(-g32)), ROUND)
        tl.store(out_ptr + row * out_stride + cols, (act * up.to(tl.float32)).to(gate.dtype),
                 mask=mask)

    # The positions are a view into the step's one uploaded int64 tensor, right after the token
    # ids, so their address is 16-byte aligned only for an even token count: not specialized on
    # it, or each step of the other parity would need its own compiled variant.
    @triton.jit(do_not_specialize=["pos_ptr"])
    def _rotary_kernel(qk_ptr, cs_ptr, pos_ptr, t_stride, h_stride, cs_stride0, cs_stride1,
                       heads, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
                       ROUND: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        pos = tl.load(pos_ptr + t).to(tl.int64)
        h = tl.arange(0, BLOCK_H)[:, None]
        d = tl.arange(0, BLOCK_D)[None, :]
        mask = (h < heads) & (d < HALF)
        base = qk_ptr + t * t_stride + h * h_stride + d
        x1 = tl.load(base, mask=mask, other=0.0)
        x2 = tl.load(base + HALF, mask=mask, other=0.0)
        dtype = x1.dtype
        cos = tl.load(cs_ptr + pos * cs_stride1 + d, mask=d < HALF, other=0.0)
        sin = tl.load(cs_ptr + cs_stride0 + pos * cs_stride1 + d, mask=d < HALF, other=0.0)
        cos = _round(cos, ROUND)
        sin = _round(sin, ROUND)
        a1 = x1.to(tl.float32)
        a2 = x2.to(tl.float32)
        # Each product rounded before the sum, as separate torch ops in a 16-bit dtype would be.
        c1 = _round(a1 * cos, ROUND)
        s2 = _round(a2 * sin, ROUND)
        c2 = _round(a2 * cos, ROUND)
        s1 = _round(a1 * sin, ROUND)
        tl.store(base, (c1 - s2).to(dtype), mask=mask)
        tl.store(base + HALF, (c2 + s1).to(dtype), mask=mask)
