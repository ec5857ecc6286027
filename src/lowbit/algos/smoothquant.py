"""Outlier migration for quantized activations (Xiao et al., 2023, "SmoothQuant: Accurate and
Efficient Post-Training Quantization for Large Language Models").

A few input channels of a layer carry activations one or two orders of magnitude larger than the
rest, in every token; quantizing a token's activations on one scale then leaves the other channels
a handful of levels. Dividing channel c of the input by s_c (folded into the norm or linear that
produces it) and multiplying the weights' column c by s_c leaves the float function unchanged and
moves the difficulty from the activations to the weights, which int8 per output row absorbs
easily:

    s_c = a_c^alpha / w_c^(1 - alpha)

with a_c the channel's activation magnitude and w_c the largest weight magnitude in column c over
the layers that read the input; alpha = 0.5 is the paper's default for most models. The paper's
a_c is the channel's calibrated maximum; here it is its root mean square, read from the diagonal
of the Hessian the walk already gathers (no extra pass; outlier channels are large in most tokens,
so both rank them alike). The groups and the folding are AWQ's (`algos.awq`): q/k/v after the
attention norm, o_proj after v_proj, gate/up after the MLP norm, down_proj after up_proj.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..calib.hessian import pooled
from .awq import _reduce, fold_and_rescale, ready_groups


@dataclass
class SmoothResult:
    groups: list[dict] = field(default_factory=list)  # per group: the producer, the layers, the scales' spread
    skipped: dict[str, str] = field(default_factory=dict)


def smooth_scales(weights: dict[str, torch.Tensor], hessian: torch.Tensor | dict[str, torch.Tensor], alpha: float,
                  heads: tuple[int, int, int] | None = None) -> torch.Tensor:
    """s over the producing channels for layers `weights` {name: [out, in]} reading one input whose
    Hessian is `hessian` [in, in] (or one per layer). Centred on one (geometric mean of the extremes):
    a common factor changes nothing for per-token activations and per-row weights."""
    per_layer = hessian if isinstance(hessian, dict) else {n: hessian for n in weights}
    diag = torch.stack([torch.diag(pooled(per_layer[n])).float() for n in weights]).mean(dim=0)
    act = _reduce(diag.clamp(min=0).sqrt(), heads)
    act = act.clamp(min=act.max() * 1e-5 + 1e-12)
    wmax = torch.stack([w.abs().amax(dim=0) for w in weights.values()]).amax(dim=0)  # [in]
    wmax = _reduce(wmax, heads).clamp(min=wmax.max() * 1e-5 + 1e-12)
    s = act.pow(alpha) / wmax.pow(1 - alpha)
    return s / (s.max() * s.min()).sqrt()


def smooth_block(model: nn.Module, block: nn.Module, prefix: str, hessians: dict[str, torch.Tensor], planned: set[str],
                 dense_dtype: torch.dtype, alpha: float) -> tuple[dict[str, torch.Tensor], SmoothResult]:
    """Fold SmoothQuant's scales into every scaling group of `block`; returns the layers' Hessians
    for their scaled inputs (H' = diag(s)^-1 H diag(s)^-1, exact) and what was done."""
    result = SmoothResult()
    out = dict(hessians)
    for g, hs, weights in ready_groups(model, block, prefix, hessians, planned, "smooth", result.skipped):
        s, scaled = fold_and_rescale(model, g, smooth_scales(weights, hs, alpha, g.heads), hs, dense_dtype)
        out.update(scaled)
        result.groups.append({"prev": g.prev, "layers": list(g.layers), "spread": float(s.max() / s.min())})
    return out, result
