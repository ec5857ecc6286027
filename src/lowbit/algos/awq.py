"""Activation-aware weight scaling (Lin et al., 2024, "AWQ: Activation-aware Weight Quantization
for LLM Compression and Acceleration").

A few input channels carry much larger activations than the rest, and the weights they meet
matter most. Scaling such a channel's weights up by s (and its input down by 1/s, folded into the
operation that produces the input: a norm's weight, or the rows of the linear before) leaves the
float function unchanged but gives those weights a finer grid. Per group of layers that read the
same input (q/k/v after the attention norm, gate/up after the MLP norm, o_proj after v_proj,
down_proj after up_proj), the scales are

    s = a^alpha / w^(1 - alpha)     (AWQ's "duo" scaling; w^0 = 1 when duo is off)

with a the per-channel input magnitude and w the per-channel mean weight magnitude (each weight
relative to its group's largest), normalised to a geometric mean of one; alpha is searched on a
grid of [0, 1). The paper measures each candidate on the block output; here each candidate is
measured on the layers' own reconstruction loss, exactly, through their Hessians:

    sum over the group's layers of tr(dW H dW^T),   dW = W - Q(W diag(s)) diag(s)^-1

which needs no extra forward pass, and no scaling (s = 1) is always a candidate, so the search
never loses to the unscaled layers on that loss. `a` is the inputs' root mean square (from the
Hessian's diagonal) where the paper uses their mean magnitude. The layers' Hessians for what comes
next (GPTQ) are transformed exactly: H' = diag(s)^-1 H diag(s)^-1.

Only the grid interface is used (the candidates are rounded by the caller's quantizer), so AWQ
composes with every grid and with RTN or GPTQ.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn

from ..calib.hessian import pooled
from ..models import linear_weight
from .gptq import output_error

# A layer's quantize-dequantize for the search: (layer name, w: [out, in]) -> w_hat: [out, in].
QuantizeFn = Callable[[str, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class AWQConfig:
    grid: int = 20  # alpha in {0, 1/grid, ..., (grid-1)/grid}
    duo: bool = True  # divide by the weights' magnitude too (AutoAWQ's and llm-compressor's default)


@dataclass(frozen=True)
class ScaleGroup:
    """Layers that read one input, and the module that produces it (which absorbs 1/s)."""

    prev: str  # full module name: a norm, or a linear whose output rows are the input channels
    layers: tuple[str, ...]
    # an input channel of the layers is output channel c // ... of `prev`: the attention's o_proj
    # under grouped-query attention reads each v_proj channel once per query head of its group
    heads: tuple[int, int, int] | None = None  # (kv heads, query heads per kv head, head dim)

    @property
    def prev_is_linear(self) -> bool:
        return self.heads is not None or self.prev.endswith("_proj")


@dataclass
class GroupResult:
    group: ScaleGroup
    alpha: float | None  # None: no scaling kept (s = 1 was best)
    loss_before: float
    loss_after: float

    def summary(self) -> dict:
        return {"layers": list(self.group.layers), "folded_into": self.group.prev, "alpha": self.alpha,
                "loss_ratio": self.loss_after / self.loss_before if self.loss_before > 0 else 1.0}


@dataclass
class BlockResult:
    groups: list[GroupResult] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # group (its prev) -> why


class AWQError(ValueError):
    pass


def llama_scale_groups(block: nn.Module, prefix: str) -> list[ScaleGroup]:
    """The scaling groups of a Llama-style decoder block (Llama, Mistral, Qwen2/3, SmolLM, ...);
    empty for other blocks."""
    names = {n for n, _ in block.named_modules()}
    attn, mlp = "self_attn", "mlp"
    groups: list[ScaleGroup] = []
    qkv = tuple(f"{attn}.{p}_proj" for p in "qkv")
    if "input_layernorm" in names and all(n in names for n in qkv):
        groups.append(ScaleGroup(f"{prefix}.input_layernorm", tuple(f"{prefix}.{n}" for n in qkv)))
    if f"{attn}.v_proj" in names and f"{attn}.o_proj" in names:
        v = linear_weight(block.get_submodule(f"{attn}.v_proj"))
        o = linear_weight(block.get_submodule(f"{attn}.o_proj"))
        cfg = getattr(block.get_submodule(attn), "config", None)
        head_dim = getattr(block.get_submodule(attn), "head_dim", None) or (
            cfg.hidden_size // cfg.num_attention_heads if cfg is not None else None)
        if head_dim and v.shape[0] % head_dim == 0 and o.shape[1] % v.shape[0] == 0:
            kv_heads = v.shape[0] // head_dim
            groups.append(ScaleGroup(f"{prefix}.{attn}.v_proj", (f"{prefix}.{attn}.o_proj",),
                                     heads=(kv_heads, o.shape[1] // v.shape[0], head_dim)))
    gate_up = (f"{mlp}.gate_proj", f"{mlp}.up_proj")
    if "post_attention_layernorm" in names and all(n in names for n in gate_up):
        groups.append(ScaleGroup(f"{prefix}.post_attention_layernorm", tuple(f"{prefix}.{n}" for n in gate_up)))
    if f"{mlp}.up_proj" in names and f"{mlp}.down_proj" in names:
        groups.append(ScaleGroup(f"{prefix}.{mlp}.up_proj", (f"{prefix}.{mlp}.down_proj",)))
    return groups


def _expand(s: torch.Tensor, heads: tuple[int, int, int] | None) -> torch.Tensor:
    """Scales over the producing channels -> over the layers' input channels."""
    if heads is None:
        return s
    kv, per_kv, hd = heads
    return s.view(kv, 1, hd).expand(kv, per_kv, hd).reshape(-1)


def _reduce(x: torch.Tensor, heads: tuple[int, int, int] | None) -> torch.Tensor:
    """Per-input-channel statistic -> per producing channel (mean over the query heads of a kv head)."""
    if heads is None:
        return x
    kv, per_kv, hd = heads
    return x.view(kv, per_kv, hd).mean(dim=1).reshape(-1)


def search_scales(weights: dict[str, torch.Tensor], hessian: torch.Tensor | dict[str, torch.Tensor], quantize: QuantizeFn,
                  heads: tuple[int, int, int] | None = None, config: AWQConfig = AWQConfig(),
                  group_size: int | None = None) -> tuple[torch.Tensor, float | None, float, float]:
    """The scales of one group: `weights` {name: [out, in]} read the same input, whose Hessian is
    `hessian: [in, in]` (or one per layer, {name: [in, in]}, when the layers weigh the input's
    tokens differently: `hessian: fisher`). Returns (s over the producing channels, alpha or None
    for s = 1, the unscaled loss, the kept loss). `group_size`: the weights' groups, for AWQ's
    per-group weight magnitude (None: per row)."""
    per_layer = hessian if isinstance(hessian, dict) else {n: hessian for n in weights}
    diag = torch.stack([torch.diag(pooled(per_layer[n])) for n in weights]).mean(dim=0)
    act = _reduce(diag.clamp(min=0).sqrt(), heads)  # [channels] input RMS
    act = act.clamp(min=act.max() * 1e-5 + 1e-12)
    mag = torch.cat([_relative_magnitude(w, group_size) for w in weights.values()]).mean(dim=0)  # [in]
    mag = _reduce(mag, heads).clamp(min=1e-8)

    # candidates are only ranked: float32 products, summed in float64; one copy per distinct Hessian
    by_id: dict[int, torch.Tensor] = {}
    for h in per_layer.values():
        if id(h) not in by_id:
            by_id[id(h)] = h.float()
    h32 = {n: by_id[id(per_layer[n])] for n in weights}

    def loss(s: torch.Tensor) -> float:
        s_in = _expand(s, heads)
        return sum(output_error(w, quantize(n, w * s_in) / s_in, h32[n], torch.float32) for n, w in weights.items())

    ones = torch.ones_like(act)
    best_s, best_alpha, base = ones, None, loss(ones)
    best = base
    for k in range(config.grid):
        alpha = k / config.grid
        s = act.pow(alpha) / (mag.pow(1 - alpha) if config.duo else 1.0)
        s = s / (s.max() * s.min()).sqrt()  # centre the scales on one (AWQ's normalisation)
        cur = loss(s)
        if cur < best:
            best, best_s, best_alpha = cur, s, alpha
    return best_s, best_alpha, base, best


def _relative_magnitude(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """|w| relative to the largest of its group (AWQ's weight statistic); w: [out, in] -> [out, in]."""
    a = w.abs()
    if not group_size or group_size <= 0 or w.shape[1] % group_size:
        return a / a.amax(dim=1, keepdim=True).clamp(min=1e-12)
    g = a.view(w.shape[0], -1, group_size)
    return (g / g.amax(dim=2, keepdim=True).clamp(min=1e-12)).view_as(w)


@torch.no_grad()
def fold_scales(model: nn.Module, group: ScaleGroup, s: torch.Tensor, dense_dtype: torch.dtype) -> torch.Tensor:
    """Divide the input channels of `group` by s, in the module that produces them, and multiply the
    layers' weights by s. A norm's weight is stored in `dense_dtype`: it is rounded to it here, and
    the scales actually applied to the layers are the ones that rounding implies, so the function
    is unchanged up to float32 rounding. Returns the applied scales over the producing channels."""
    prev = model.get_submodule(group.prev)
    if group.prev_is_linear:
        wp = linear_weight(prev)  # [channels, in]: output channel c is input channel c of the group
        wp.div_(s.to(wp.dtype).unsqueeze(1))
        if getattr(prev, "bias", None) is not None:
            prev.bias.div_(s.to(prev.bias.dtype))
        applied = s
    else:
        weight = getattr(prev, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.shape != s.shape:
            raise AWQError(f"{group.prev}: not a norm with a per-channel weight of {s.numel()}; cannot fold AWQ scales into it")
        _check_multiplicative_norm(prev, group.prev)
        old = weight.detach().float().clone()
        new = (old / s).to(dense_dtype).float()
        nonzero = new != 0
        applied = torch.where(nonzero, old / torch.where(nonzero, new, 1.0), 1.0)
        weight.copy_(torch.where(nonzero, new, old).to(weight.dtype))
        if getattr(prev, "bias", None) is not None:  # LayerNorm: its bias is an input channel's offset too
            prev.bias.div_(applied.to(prev.bias.dtype))
    s_in = _expand(applied, group.heads)
    for name in group.layers:
        w = linear_weight(model.get_submodule(name))
        w.mul_(s_in.to(w.dtype))
    return applied


def _check_multiplicative_norm(norm: nn.Module, name: str) -> None:
    """Folding divides the norm's weight; that is right only if the output is weight * f(x) (+ bias),
    not (1 + weight) * f(x) as in Gemma's RMSNorm. Probed on a random input."""
    weight = norm.weight
    x = torch.randn(4, weight.shape[0], generator=torch.Generator().manual_seed(0)).to(weight.dtype)
    saved = weight.detach().clone()
    bias = getattr(norm, "bias", None)
    saved_bias = None if bias is None else bias.detach().clone()
    try:
        y1 = norm(x)
        weight.mul_(2)
        if bias is not None:
            bias.mul_(2)
        y2 = norm(x)
    finally:
        weight.copy_(saved)
        if bias is not None:
            bias.copy_(saved_bias)
    if not torch.allclose(y2, 2 * y1, rtol=1e-3, atol=1e-5):
        raise AWQError(f"{name}: its output does not scale with its weight (a (1 + weight) norm?); AWQ cannot fold into it")


def awq_block(model: nn.Module, block: nn.Module, prefix: str, hessians: dict[str, torch.Tensor], quantize: QuantizeFn,
              planned: set[str], dense_dtype: torch.dtype, config: AWQConfig = AWQConfig(),
              group_size: int | None = None) -> tuple[dict[str, torch.Tensor], BlockResult]:
    """Search and fold the scales of every scaling group of `block`, in order. A later group may
    rescale the rows of a layer an earlier one scaled the columns of (v_proj, up_proj): a row scale
    leaves that layer's group-wise rounding unchanged, so the earlier search stays valid. Returns
    the layers' Hessians for their scaled inputs and what was done. A group whose layers are not
    all quantized is left alone."""
    result = BlockResult()
    out = dict(hessians)
    for g, hs, weights in ready_groups(model, block, prefix, hessians, planned, "awq", result.skipped):
        s, alpha, before, after = search_scales(weights, hs, quantize, g.heads, config, group_size)
        if alpha is not None:
            _, scaled = fold_and_rescale(model, g, s, hs, dense_dtype)
            out.update(scaled)
        result.groups.append(GroupResult(g, alpha, before, after))
    return out, result


def ready_groups(model: nn.Module, block: nn.Module, prefix: str, hessians: dict[str, torch.Tensor], planned: set[str],
                 scaling: str, skipped: dict[str, str]) -> Iterator[tuple[ScaleGroup, dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
    """The scaling groups of `block` whose layers are all quantized, each with its layers' Hessians
    (one shared tensor unless `hessian: fisher`) and float32 weights; the others are recorded in
    `skipped`. A block that is not Llama-style is refused, naming `scaling: <scaling>`."""
    groups = llama_scale_groups(block, prefix)
    if not groups:
        what = "AWQ scaling" if scaling == "awq" else "smoothing"
        raise AWQError(f"{what} knows Llama-style decoder blocks (q/k/v/o_proj, gate/up/down_proj after "
                       f"input_layernorm / post_attention_layernorm), not {type(block).__name__}; drop `scaling: {scaling}`")
    for g in groups:
        missing = [n for n in g.layers if n not in planned or n not in hessians]
        if missing:
            skipped[g.prev] = f"{missing[0]} is not quantized"
            continue
        yield (g, {n: hessians[n] for n in g.layers},
               {n: linear_weight(model.get_submodule(n)).detach().float() for n in g.layers})


def fold_and_rescale(model: nn.Module, group: ScaleGroup, s: torch.Tensor, hessians: dict[str, torch.Tensor],
                     dense_dtype: torch.dtype) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Fold s into `group` (`fold_scales`) and give its layers' Hessians for their scaled inputs,
    H' = diag(s)^-1 H diag(s)^-1 (exact; a Hessian the layers share stays shared). Returns (the
    applied scales, {layer: H'})."""
    s = fold_scales(model, group, s, dense_dtype)
    s_in = _expand(s, group.heads).float()
    outer = s_in.unsqueeze(0) * s_in.unsqueeze(1)
    scaled: dict[int, torch.Tensor] = {}
    for n in group.layers:
        if id(hessians[n]) not in scaled:
            scaled[id(hessians[n])] = hessians[n] / outer
    return s, {n: scaled[id(hessians[n])] for n in group.layers}
