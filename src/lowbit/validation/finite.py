"""NaN and infinity refused where they enter: every tensor of a source model, before any work
(a NaN norm or embedding would otherwise give an artifact that evaluates to NaN, or a GPTQ
failure that blames its dampening), and the logits an evaluation compares."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import LowbitError


class NonFiniteError(LowbitError):
    pass


def check_finite_model(model: nn.Module, where: str) -> None:
    """Every floating parameter and buffer of `model` is finite; else name the first bad tensor."""
    seen: set[int] = set()
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if id(tensor) in seen or not tensor.is_floating_point():
            continue
        seen.add(id(tensor))
        if not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise NonFiniteError(
                f"{where}: tensor {name} holds {bad} NaN or infinite value(s); fix the checkpoint first (nothing was quantized)"
            )


def check_finite_logits(logits: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(logits).all()):
        raise NonFiniteError(
            f"the {what} model produced NaN or infinite logits; its weights or the text are broken (no metric is reported)"
        )
