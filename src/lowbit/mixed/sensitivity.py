"""How much each layer's quantization under each candidate costs the model (ZeroQ's sensitivity,
made loss-aware as in GuidedQuant): the table the allocation reads.

For layer l and candidate c the layer is quantized alone (the search's base method, GPTQ by
default, on the float model's inputs) and its damage is the second-order estimate of the loss
increase (nats per calibration token):

    damage(l, c) = sum_t ||g_t||^2 ||dW x_t||^2 / (2 out_l N) = tr(dW H dW^T) * sum_t ||g_t||^2 / (4 out_l N)

with dW = W - Q(W), g_t = dL/dy_t the loss gradient at the layer's output (one backward pass of the
float model, `calib.fisher`), H = 2 sum_t ||g_t||^2 x_t x_t^T / sum_t ||g_t||^2 the loss-weighted
Hessian GPTQ reads with `hessian: fisher`, and N the calibration tokens. It is the Fisher's
diagonal over output channels, each channel given the mean of the token's squared gradient. The
damages add up over layers (the allocation's premise); the measured KL of the searched model
checks the sum. The blocks are walked in float (no layer is replaced), so one pass over the
calibration windows serves every candidate; one block's Hessians are held at a time.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from ..calib.fisher import fisher_token_weights
from ..calib.hessian import pooled
from ..calib.walker import walk_blocks, whole_model_hessians
from ..models import find_blocks, find_linears, linear_weight
from ..quantize import QuantizeError, _quantize_layer, plan_layers
from ..recipe import GRID_WIDE_OPTIONS, Recipe, RecipeError
from .candidates import Candidate, CandidateError


@dataclass
class LayerCost:
    """One layer's row of the table: its weight count, and per candidate (by name) the bits it
    stores and its damage. A candidate that does not fit the layer (a width its vectors do not
    tile) is absent."""

    weights: int
    bits: dict[str, float] = field(default_factory=dict)
    damage: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"weights": self.weights, "bits": self.bits, "damage": self.damage}

    @classmethod
    def from_dict(cls, d: dict) -> "LayerCost":
        return cls(int(d["weights"]), {k: float(v) for k, v in d["bits"].items()}, {k: float(v) for k, v in d["damage"].items()})


def candidate_recipe(base: Recipe, c: Candidate) -> Recipe:
    """`base` with every layer on the candidate: its format and group size, the format options
    every grid takes (`mse_fit`) kept where the candidate's format takes them."""
    data = base.to_dict()
    data.update(format=c.format, group_size=c.group_size, overrides=[], ignore=[])
    kept = {k: v for k, v in base.format_options.items() if k in GRID_WIDE_OPTIONS}
    for options in ([kept, {}] if kept else [{}]):
        try:
            return Recipe.from_dict({**data, "format_options": options})
        except RecipeError as exc:
            error = exc
    raise CandidateError(f"candidate {c.name} does not combine with the base recipe: {error}")


def _layer_cost(name: str, module: nn.Module, hessian: torch.Tensor, mass: float, tokens: int,
                recipes: dict[str, Recipe], require_fit: bool) -> LayerCost:
    w = linear_weight(module).detach().float()  # [out, in]
    h = pooled(hessian).double()  # [in, in]
    per_unit = mass / (4.0 * w.shape[0] * tokens)
    cost = LayerCost(w.numel())
    for cname, recipe in recipes.items():
        holder = nn.Module()
        holder.layer = copy.deepcopy(module)
        try:
            plans, _ = plan_layers(holder, recipe)
        except QuantizeError:
            continue  # the candidate does not fit this layer's shape
        _quantize_layer(holder, "layer", plans["layer"], hessian, recipe)
        dw = (w - holder.layer.dequantize().float()).double()
        cost.damage[cname] = float(((dw @ h) * dw).sum()) * per_unit
        cost.bits[cname] = holder.layer.bits_per_weight() * w.numel()
    if not cost.damage and require_fit:
        raise CandidateError(f"{name}: none of the candidates fits this layer ({tuple(w.shape)}); add one that does")
    return cost


def measure_sensitivities(model: nn.Module, kind: str, base: Recipe, candidates: list[Candidate],
                          batches: list[torch.Tensor], show_progress: bool = True,
                          require_fit: bool = True) -> dict[str, LayerCost]:
    """The damage and stored bits of every layer the base recipe quantizes, under every candidate.
    `require_fit`: refuse a layer no candidate fits (off when these candidates add to a table
    measured before, which the caller checks as a whole)."""
    if kind != "causal-lm":
        raise CandidateError(f"the search weighs layers by next-token loss gradients and needs a causal LM, not a {kind} model")
    plans, _ = plan_layers(model, base)
    names = set(plans)
    recipes = {c.name: candidate_recipe(base, c) for c in candidates}
    weights = fisher_token_weights(model, batches, names, show_progress)
    tokens = sum(int(b.numel()) for b in batches)
    mass = {n: float(sum(float(w.double().sum()) for w in weights[n])) for n in names}
    costs: dict[str, LayerCost] = {}
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("{task.fields[layer]}"))
    with Progress(*columns, disable=not show_progress, transient=False) as progress:
        task = progress.add_task(f"sensitivity ({len(recipes)} candidates)", total=len(names), layer="")

        def measure(name: str, module: nn.Module, hessian: torch.Tensor) -> None:
            progress.update(task, layer=name)
            costs[name] = _layer_cost(name, module, hessian, mass[name], tokens, recipes, require_fit)
            progress.advance(task)

        found = find_blocks(model)
        inside: set[str] = set()
        if found is not None:
            blocks_name, blocks = found
            inside = {n for n in names if n.startswith(blocks_name + ".")}

            def on_block(_i: int, prefix: str, block: nn.Module, hessians: dict[str, torch.Tensor]) -> None:
                for name, module in find_linears(block, prefix).items():
                    if name in hessians:
                        measure(name, module, hessians.pop(name))

            with torch.inference_mode():
                walk_blocks(model, blocks_name, blocks, batches, kind, inside, on_block, token_weights=weights)
        outside = names - inside
        if outside:
            hessians = whole_model_hessians(model, batches, kind, outside, token_weights=weights)
            linears = find_linears(model)
            for name in sorted(outside):
                measure(name, linears[name], hessians.pop(name))
    return {n: costs[n] for n in sorted(costs)}
