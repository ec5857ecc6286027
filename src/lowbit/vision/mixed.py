"""ZeroQ's mixed precision for convolutional networks (Cai et al., 2020): each layer's sensitivity
to each bit width is the KL divergence of the network's output when that layer alone is quantized,

    Omega_i(k) = mean_x KL( M(theta; x) || M(theta with layer i at k bits; x) ),

measured on the calibration inputs (ZeroQ's distilled data, or images); the layers are assumed
independent, so a configuration's damage is the sum of its layers', and the least-damage choice under
a size budget is a multiple-choice knapsack (`mixed.allocate`, dynamic programming; ZeroQ's Pareto
frontier). Sizes count everything a layer stores (codes, scales, zero points; activation ranges are
the same for every choice and left out).
"""

from __future__ import annotations

import copy

import torch
from rich.progress import Progress
from torch import nn

from ..algos import GPTQConfig
from ..formats import GroupLayout
from ..mixed.allocate import Allocation, allocate
from ..mixed.sensitivity import LayerCost
from ..recipe import Override, Recipe
from .fold import fold_batchnorm
from .quantize import _quantize_layer, _rows, calibrate, check_recipe, find_layers

DEFAULT_BITS = (2, 3, 4, 6, 8)


def _kl(ref_logp: torch.Tensor, logits_q: torch.Tensor) -> float:
    return float((ref_logp.exp() * (ref_logp - logits_q.log_softmax(-1))).sum(-1).mean())


@torch.no_grad()
def sensitivities(model: nn.Module, recipe: Recipe, inputs: torch.Tensor, bits: tuple[int, ...] = DEFAULT_BITS,
                  batch_size: int = 16) -> dict[str, LayerCost]:
    """Per quantizable layer and per candidate `int{k}` (the recipe's method and group size): the
    stored bits and ZeroQ's Omega (output KL with that layer alone quantized). `model` is not changed."""
    check_recipe(recipe)
    base = copy.deepcopy(model).eval()
    fold_batchnorm(base)
    layers = {n: m for n, m in find_layers(base).items() if recipe.scheme_for(n) is not None}
    hessians = calibrate(base, layers, inputs, set(layers), {}, batch_size) if recipe.method == "gptq" else {}
    ref = torch.cat([base(inputs[i:i + batch_size]) for i in range(0, inputs.shape[0], batch_size)]).log_softmax(-1)
    cfg = GPTQConfig(recipe.gptq.damp, recipe.gptq.block_size, recipe.gptq.act_order, recipe.gptq.sweeps)
    costs: dict[str, LayerCost] = {}
    with Progress(transient=True) as bar:
        task = bar.add_task("layer sensitivities (ZeroQ)", total=len(layers) * len(bits))
        for name, layer in layers.items():
            cost = LayerCost(weights=_rows(layer).numel())
            for k in bits:
                scheme = recipe.scheme_for(name).model_copy(update={"format": f"int{k}", "format_options": {}})
                layout = GroupLayout(*_rows(layer).shape, scheme.group_size, recipe.ragged)
                entry = _quantize_layer(base, name, layer, scheme, layout, hessians.get(name), None, None, cfg)
                out = torch.cat([base(inputs[i:i + batch_size]) for i in range(0, inputs.shape[0], batch_size)])
                cost.bits[f"int{k}"] = entry["bpw"] * cost.weights
                cost.damage[f"int{k}"] = _kl(ref, out)
                base.set_submodule(name, layer)  # back to float for the next trial
                bar.advance(task)
            costs[name] = cost
    return costs


def mixed_recipe(recipe: Recipe, allocation: Allocation) -> Recipe:
    """The recipe with each layer's chosen grid as an exact-name override (the most chosen is the default)."""
    counts: dict[str, int] = {}
    for c in allocation.choice.values():
        counts[c] = counts.get(c, 0) + 1
    default = max(counts, key=lambda c: (counts[c], c))
    overrides = [Override(pattern="^" + name.replace(".", r"\.") + "$", format=c)
                 for name, c in allocation.choice.items() if c != default]
    return Recipe.from_dict({**recipe.to_dict(), "format": default, "format_options": {},
                             "overrides": [o.model_dump(mode="json", exclude_unset=True) for o in overrides]})


def allocate_bits(costs: dict[str, LayerCost], budget_bpw: float) -> Allocation:
    return allocate(costs, budget_bpw)
