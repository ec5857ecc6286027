"""Learned rounding, block by block: SignRound (Cheng et al., 2023, "Optimize Weight Rounding via
Signed Gradient Descent for the Quantization of LLMs"; Intel's AutoRound).

Each quantized layer of a transformer block gets one offset per weight, v in [-limit, limit] (in
units of the grid's level spacing at that weight). The codes are the grid's rounding of
`base + v * spacing`, where `base` is what the block's method rounded: the float weight for RTN
(SignRound proper: v starts at 0, nearest rounding), the error-fed values GPTQ rounded for GPTQ
(v = 0 is GPTQ's answer; starting from GPTQ's dequantized grid points instead, every weight sits
half a level from a boundary and the first signed steps flip codes wholesale: on SmolLM2's first two
blocks, int3, that lost to GPTQ in both). All offsets of a block train together by
signed gradient descent (v -= lr * sign(grad), the learning rate decaying linearly to 0), with the
straight-through estimator through the rounding, on the block's output error: the mean squared
difference between the block with the candidate codes run on the inputs the already quantized
blocks produce, and the original float block run on the original model's hidden states (so a
block also corrects what the blocks before it got wrong). The grid parameters (scales, zero
points) stay those the method fitted; `tune` trains them afterwards, end to end.

The offsets are kept only if the error over all calibration windows went down, so the result
never loses to its starting point on the calibration data. The grid is used only through its
interface (`encode` / `decode` of a GroupLayout), so any scalar grid takes part; the level spacing
is measured from the grid's own decoded levels.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils._pytree import tree_map

from ..calib.walker import BlockInputs, hidden_of
from ..qtensor import QuantizedWeight


@dataclass(frozen=True)
class RoundConfig:
    steps: int = 50
    lr: float | None = None  # None: 1 / steps (AutoRound's default)
    batch_size: int = 4  # calibration windows per step
    seed: int = 0  # which windows each step sees
    amp: bool = True  # the training steps' matmuls in bfloat16 (autocast); the before/after losses in float32


@dataclass
class BlockRound:
    """What learning the offsets of one block did."""

    loss_before: float  # mean squared block output error over all windows, offsets at 0
    loss_after: float  # the same with the learned offsets
    kept: bool  # the learned codes replaced the method's (the error went down)
    changed: int  # codes that differ from the method's, if kept
    n_weights: int
    seconds: float

    def summary(self) -> dict[str, Any]:
        """For the artifact's header: no timings, so the same inputs give the same bytes."""
        return {"loss_before": self.loss_before, "loss_after": self.loss_after, "kept": self.kept,
                "changed_fraction": round(self.changed / max(self.n_weights, 1), 6)}


def level_spacing(qw: QuantizedWeight) -> torch.Tensor:
    """Mean distance between neighbouring levels of each weight's group: (largest decoded level -
    smallest) / (levels - 1), [out, in]; the scale itself for an integer grid."""
    lo = hi = None
    for code in range(2**qw.grid.bits):
        level = qw.layout.decode(qw.grid, torch.full_like(qw.codes, code), qw.params)
        lo = level if lo is None else torch.minimum(lo, level)
        hi = level if hi is None else torch.maximum(hi, level)
    return ((hi - lo) / (2**qw.grid.bits - 1)).clamp(min=1e-12)


def _fake_quant(qw: QuantizedWeight, params: dict[str, torch.Tensor], base: torch.Tensor, v: torch.Tensor,
                spacing: torch.Tensor) -> torch.Tensor:
    """The weight the codes of `base + v * spacing` decode to, with the straight-through gradient
    (d weight / d v = spacing). `params`: qw's parameters expanded per column (`layout.expand`)."""
    x = base + v * spacing
    q = qw.grid.decode(qw.grid.encode(x.detach(), params), params)
    return x + (q - x).detach()


def _take(x: Any, idx: torch.Tensor, batch: int) -> Any:
    """Rows `idx` of a per-batch tensor (2-d or more, first dimension the batch); other values as they are."""
    if isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[0] == batch and batch > 1:
        return x[idx]
    return x


def _detached(x: Any) -> Any:
    """A plain (non-inference) copy of every tensor, usable by autograd."""
    return tree_map(lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t, x)


def _hidden(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def learn_block_rounding(
    block: nn.Module,
    layers: dict[str, tuple[torch.Tensor, QuantizedWeight]],
    inputs: BlockInputs,
    targets: list[torch.Tensor],
    limit: float,
    config: RoundConfig = RoundConfig(),
) -> tuple[dict[str, QuantizedWeight], BlockRound]:
    """Learn the offsets of `layers` {name relative to `block`: (base [out, in], the method's
    quantized weight)} on the block's output error. `block`: a float copy of the block (its layers
    plain nn.Linear; only run, never changed). `inputs`: the block's calls on the quantized model's
    hidden states, one per calibration batch; `targets`: the original block's outputs for them.
    Returns the quantized weights to keep (the method's own where nothing improved) and a record."""
    if config.steps < 1:
        raise ValueError(f"steps must be >= 1 (got {config.steps})")
    started = time.perf_counter()
    lr = config.lr if config.lr is not None else 1.0 / config.steps
    gen = torch.Generator().manual_seed(config.seed)
    with torch.inference_mode(False), torch.enable_grad():
        inputs = [_detached(call) for call in inputs]
        targets = [t.detach().clone() for t in targets]
        bases = {n: b.detach().clone().float() for n, (b, _) in layers.items()}
        spacing = {n: level_spacing(qw).clone() for n, (_, qw) in layers.items()}
        qws = {n: qw for n, (_, qw) in layers.items()}
        expanded = {n: qw.layout.expand(qw.params) for n, qw in qws.items()}  # [param_rows, in] each, once
        v = {n: torch.zeros_like(b, requires_grad=True) for n, b in bases.items()}

        def run(k: int, idx: torch.Tensor | None) -> torch.Tensor:
            weights = {f"{n}.weight": _fake_quant(qws[n], expanded[n], bases[n], v[n], spacing[n]) for n in v}
            args, kwargs = inputs[k]
            batch = hidden_of(args, kwargs)
            target = targets[k]
            if idx is not None:
                b = batch.shape[0]
                args, kwargs, target = tree_map(lambda x: _take(x, idx, b), (args, kwargs, target))
            out = _hidden(functional_call(block, weights, args, kwargs))
            return F.mse_loss(out, target)

        def full_loss() -> float:
            with torch.no_grad():
                sizes = [t.shape[0] for t in targets]
                return sum(float(run(k, None)) * s for k, s in enumerate(sizes)) / sum(sizes)

        before = full_loss()
        for step in range(config.steps):
            k = int(torch.randint(len(inputs), (1,), generator=gen))
            n = targets[k].shape[0]
            idx = torch.randperm(n, generator=gen)[: config.batch_size].sort().values
            # only the sign of each gradient is used, which bfloat16 matmuls keep for all but the smallest
            with torch.autocast(targets[k].device.type, dtype=torch.bfloat16, enabled=config.amp):
                loss = run(k, idx)
            grads = torch.autograd.grad(loss, list(v.values()))
            step_lr = lr * (1 - step / config.steps)
            with torch.no_grad():
                for t, g in zip(v.values(), grads):
                    t.sub_(step_lr * g.sign()).clamp_(-limit, limit)
        after = full_loss()
    kept = after < before
    out, changed = {}, 0
    with torch.no_grad():
        for n, qw in qws.items():
            if not kept:
                out[n] = qw
                continue
            codes = qw.grid.encode(bases[n] + v[n].detach() * spacing[n], expanded[n])
            changed += int((codes != qw.codes).sum())
            out[n] = QuantizedWeight(codes, qw.params, qw.grid, qw.layout)
    record = BlockRound(before, after if kept else before, kept, changed, sum(b.numel() for b in bases.values()),
                        time.perf_counter() - started)
    return out, record


def float_copy(block: nn.Module) -> nn.Module:
    """A frozen float copy of `block` whose tensors autograd can use (the original's may be
    inference tensors, written while quantizing)."""
    with torch.inference_mode(False):
        twin = copy.deepcopy(block)
        for p in twin.parameters():
            p.requires_grad_(False)
        for name, t in list(twin.named_parameters()) + list(twin.named_buffers()):
            owner = twin.get_submodule(name.rpartition(".")[0]) if "." in name else twin
            leaf = name.rpartition(".")[2]
            clone = t.detach().clone()
            if isinstance(t, nn.Parameter):
                setattr(owner, leaf, nn.Parameter(clone, requires_grad=False))
            else:
                owner._buffers[leaf] = clone
    return twin
