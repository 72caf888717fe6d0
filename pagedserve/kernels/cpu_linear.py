"""Linear layers that a CPU multiplies through oneDNN with their weights packed once, after loading.

For float32 on a CPU, `F.linear` calls MKL's sgemm on the weight's plain layout at every call.
oneDNN with the weight reordered once into its blocked layout (`mkldnn._reorder_linear_weight`,
the op torch.compile's CPU weight prepacking uses) computes the same products about 1.2x faster
for prefill-sized inputs and 1.6x faster for decode batches (AVX-512 EPYC, 2 cores; see
benchmarks/results/README.md). Packing happens once the weights are loaded; a layer's plain
weight is then released, except where another module shares it (a tied LM head's embedding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def available() -> bool:
    """True where this torch build has oneDNN and its packed-linear ops."""
    ops = torch.ops.mkldnn
    return (torch.backends.mkldnn.is_available() and hasattr(ops, "_reorder_linear_weight")
            and hasattr(ops, "_linear_pointwise"))


def pack_model(model: nn.Module) -> int:
    """Pack every `Linear` of a float32 CPU model; returns how many were packed (0 if unavailable)."""
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    usable = all(m.weight.device.type == "cpu" and m.weight.dtype == torch.float32
                 for m in linears)
    if not (linears and usable and available()):
        return 0
    uses: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        uses[id(param)] = uses.get(id(param), 0) + 1
    for module in linears:
        module.pack(release_plain=uses[id(module.weight)] == 1)
    return len(linears)


class Linear(nn.Linear):
    """`nn.Linear` that, once packed, runs through oneDNN.

    `pieces` > 1 packs that many equal slices of the output rows separately (a merged gate/up
    projection): `forward_pieces` then returns each slice's output as its own contiguous tensor.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 pieces: int = 1) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.pieces = pieces
        self.packed: list[torch.Tensor] | None = None

    def pack(self, release_plain: bool = False) -> None:
        """Pack the weight for oneDNN; `release_plain` frees the plain copy (no one else uses it)."""
        rows = self.weight.detach().chunk(self.pieces)
        self.packed = [torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), None) for w in rows]
        if release_plain:
            self.weight = nn.Parameter(self.weight.new_empty(0), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and self.pieces > 1:
            return torch.cat(self.forward_pieces(x), dim=-1)
        return self.product(x, self.bias)

    def product(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """`x @ weight.T (+ bias)` (row parallelism adds its bias after the all-reduce)."""
        if self.packed is None:
            return F.linear(x, self.weight, bias)
        return _packed_linear(x, self.packed[0], bias)

    def forward_pieces(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each of the `pieces` slices of the output, contiguous."""
        biases = self.bias.chunk(self.pieces) if self.bias is not None else [None] * self.pieces
        if self.packed is None:
            weights = self.weight.chunk(self.pieces)
            return [F.linear(x, w, b) for w, b in zip(weights, biases, strict=True)]
        return [_packed_linear(x, w, b) for w, b in zip(self.packed, biases, strict=True)]


def _packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
