"""Loss-aware token weights for the layer Hessians (`hessian: fisher`).

GPTQ's layer objective ||(W - Q) X||^2 (H = 2 X^T X / n) counts every calibration token alike. The
model's loss does not: perturbing a layer's output y_t = W x_t changes the loss by about g_t . dy_t,
with g_t = dL/dy_t, so the second-order (Fisher) cost of a weight change dW is
sum_t (g_t^T dW x_t)^2. Keeping its diagonal over output channels gives one Hessian per output row,
H_i = sum_t g_ti^2 x_t x_t^T; GuidedQuant (Kim et al., 2025, "GuidedQuant: Large Language Model
Quantization via Exploiting End Loss Guidance") groups rows to share it, and with one group it is
H = sum_t ||g_t||^2 x_t x_t^T: each token weighted by how much the loss reacts to the layer's output
there. That keeps GPTQ's algorithm and cost unchanged; only the statistics it reads change. (YAQA,
Tseng et al., 2025, keeps a Kronecker factor on the output side too, which GPTQ's row-separable
solve cannot use.)

The gradients come from one backward pass per calibration window of the original float model, on
its next-token cross-entropy over the calibration text (the empirical Fisher). Only the squared
gradient norm per token and layer is kept: `[batch, seq]` per calibration batch and layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from ..models import find_linears
from .hessian import row_groups

TokenWeights = dict[str, list[torch.Tensor]]  # layer name -> per calibration batch, [batch, seq] (or [batch, seq, groups])


class FisherError(ValueError):
    pass


def fisher_token_weights(model: nn.Module, batches: list[torch.Tensor], names: set[str],
                         show_progress: bool = False, groups: int = 1) -> TokenWeights:
    """||dL/dy_t||^2 for every token t of every calibration batch (`[batch, seq]` token ids each)
    at the output y of each linear in `names`, L the model's summed next-token cross-entropy.
    With `groups` > 1, the squared gradient summed over each of GuidedQuant's output-channel groups
    (`hessian.row_groups`) instead: `[batch, seq, groups]`. The model's parameters are left as they
    were (no parameter gradients are formed)."""
    linears = {n: m for n, m in find_linears(model).items() if n in names}
    if not linears:
        raise FisherError("hessian: fisher found none of the layers to quantize in the model")
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embed is None:
        raise FisherError("hessian: fisher needs a causal LM with an input embedding (get_input_embeddings)")
    weights: TokenWeights = {n: [] for n in linears}
    rows: dict[str, list[torch.Tensor]] = {}

    def squared(g: torch.Tensor) -> torch.Tensor:  # g: [1, seq, out] -> [1, seq] or [1, seq, groups]
        g2 = g.detach().float().pow(2)
        if groups == 1:
            return g2.sum(-1)
        return torch.stack([g2[..., rows_k].sum(-1) for rows_k in row_groups(g2.shape[-1], groups)], dim=-1)

    def keep_grad(name: str):
        def hook(_m: nn.Module, _args, out: torch.Tensor) -> None:
            out.register_hook(lambda g: rows[name].append(squared(g)))
        return hook

    leaf: list[torch.Tensor] = []

    def embedding_leaf(_m: nn.Module, _args, out: torch.Tensor) -> torch.Tensor:
        # the embeddings as the leaf the gradient is taken for: the backward pass reaches every layer
        # and forms no parameter gradient
        leaf.append(out.detach().requires_grad_(True))
        return leaf[-1]

    handles = [m.register_forward_hook(keep_grad(n)) for n, m in linears.items()]
    handles.append(embed.register_forward_hook(embedding_leaf))
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(False), torch.enable_grad(), Progress(
                TextColumn("[bold]loss gradients (hessian: fisher)"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), transient=True, disable=not show_progress) as bar:
            task = bar.add_task("fisher", total=sum(ids.shape[0] for ids in batches))
            for ids in batches:
                rows = {n: [] for n in linears}
                for window in ids.split(1):  # one window at a time: the activations of one backward pass
                    logits = model(input_ids=window, use_cache=False).logits
                    loss = F.cross_entropy(logits[0, :-1].float(), window[0, 1:], reduction="sum")
                    torch.autograd.grad(loss, leaf.pop())
                    bar.advance(task)
                for n in linears:
                    if len(rows[n]) != ids.shape[0]:
                        raise FisherError(f"{n}: no gradient reached its output (is it used by the forward pass?)")
                    weights[n].append(torch.cat(rows[n]))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return weights
