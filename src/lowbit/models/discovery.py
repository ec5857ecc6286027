"""Find a model's parts: its quantizable linear layers and its list of transformer blocks."""

from __future__ import annotations

import torch
from torch import nn


def is_linear(module: nn.Module) -> bool:
    """nn.Linear, or transformers' Conv1D (GPT-2), which is a linear layer with a transposed weight."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The layer's weight as [out, in]."""
    w = module.weight
    return w.T if type(module).__name__ == "Conv1D" else w


def find_linears(root: nn.Module, prefix: str = "") -> dict[str, nn.Module]:
    return {
        (f"{prefix}.{name}" if prefix else name): m for name, m in root.named_modules() if is_linear(m)
    }


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The transformer's block list: the ModuleList of identical modules holding the most parameters
    (model.layers for Llama/Mistral/Qwen, transformer.h for GPT-2, encoder.layer for BERT, ...)."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(m) for m in module}) != 1 or not find_linears(module):
            continue
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > best[0]:
            best = (size, name, module)
    return (best[1], best[2]) if best else None


def tied_parameter_names(model: nn.Module) -> set[str]:
    """Names of modules whose weight is shared with another module (e.g. a tied lm_head)."""
    seen: dict[tuple, str] = {}
    tied: set[str] = set()
    for name, module in model.named_modules():
        w = getattr(module, "weight", None)
        if isinstance(w, torch.Tensor):
            # the same tensor object, or (real tensors) the same storage; meta tensors have no storage
            keys = [("id", id(w))] + ([] if w.is_meta else [("ptr", w.data_ptr())])
            if any(k in seen for k in keys):
                tied.add(name)
            else:
                seen.update({k: name for k in keys})
    return tied
