"""Unquantized layers kept in the precision the artifact stores them in (bf16 or fp16).

An artifact's dense tensors (the embedding, an output layer tied to it, layers a recipe skipped)
are stored in the source model's half precision. Widening them to fp32 at load would make them
the largest thing in memory: SmolLM2-135M's tied embedding is 57 MB in bf16 and 113 MB in fp32,
twice its int4 decoder. These modules hold the stored tensor as it is and compute in fp32: an
embedding widens only the rows it looks up; a linear layer runs the C product kernel on few rows
(decode) and widens its weight a slice at a time on many. The values are those of the widened
weight exactly (bf16/fp16 to fp32 is exact); only the order of the fp32 sums differs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import MAX_BATCH, library

HALF = (torch.bfloat16, torch.float16)
SLICE_ROWS = 4096  # output rows widened at a time on many-row inputs (a 4096 x 576 slice is 9 MB)


class HalfEmbedding(nn.Module):
    """nn.Embedding whose table [vocab, dim] stays bf16/fp16; lookups return fp32."""

    def __init__(self, weight: torch.Tensor, padding_idx: int | None) -> None:
        super().__init__()
        self.register_buffer("weight", weight)  # a buffer: no gradient, and model.dtype stays fp32
        self.padding_idx = padding_idx
        self.num_embeddings, self.embedding_dim = weight.shape

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight, self.padding_idx).float()

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, dtype={self.weight.dtype}"


class HalfLinear(nn.Module):
    """nn.Linear whose weight [out, in] stays bf16/fp16 (the bias, if any, is fp32)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", None if bias is None else bias.float())
        self.out_features, self.in_features = weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype != torch.float32 or x2.device.type != "cpu" or (torch.is_grad_enabled() and x2.requires_grad):
            return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        x2 = x2.contiguous()
        lib = library()
        if x2.shape[0] <= MAX_BATCH and lib is not None and self.weight.is_contiguous():
            y = torch.empty(x2.shape[0], self.out_features)
            lib.lowbit_gemv_half(self.weight.data_ptr(), int(self.weight.dtype == torch.bfloat16), x2.data_ptr(), y.data_ptr(),
                                 x2.shape[0], self.out_features, self.in_features)
        else:
            y = torch.empty(x2.shape[0], self.out_features)
            for i in range(0, self.out_features, SLICE_ROWS):  # written in place: no second [rows, out] copy
                y[:, i:i + SLICE_ROWS] = x2 @ self.weight[i:i + SLICE_ROWS].float().T
        if self.bias is not None:
            y += self.bias
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, dtype={self.weight.dtype}"


def keep_half_precision(model: nn.Module, tensors: dict[str, torch.Tensor]) -> set[str]:
    """Swap every plain nn.Embedding / nn.Linear of `model` whose stored weight in `tensors` is
    bf16/fp16 for its half-precision module above, holding that tensor (tied weights stay one
    tensor). Subclasses (Gemma's scaled embedding, say) are left alone: their forward may do more.
    Returns the keys of `tensors` the new modules hold; the caller loads the rest."""
    used: set[str] = set()
    for name, module in list(model.named_modules()):
        key = f"{name}.weight" if name else "weight"
        w = tensors.get(key)
        if w is None or w.dtype not in HALF or w.dim() != 2:
            continue
        if type(module) is nn.Embedding:
            if module.max_norm is not None or module.scale_grad_by_freq or module.sparse:
                continue
            new: nn.Module = HalfEmbedding(w, module.padding_idx)
        elif type(module) is nn.Linear:
            bias = tensors.get(f"{name}.bias") if module.bias is not None else None
            if module.bias is not None and bias is None:
                continue
            new = HalfLinear(w, bias)
            if bias is not None:
                used.add(f"{name}.bias")
        else:
            continue
        model.set_submodule(name, new)
        used.add(key)
    return used
