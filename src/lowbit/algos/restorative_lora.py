"""Restorative LoRA: the "quantization preprocessing" of PTQ1.61 (Zhao et al., 2025, "PTQ1.61: Push
the Real Limit of Extremely Low-Bit Post-Training Quantization Methods for Large Language Models").

A first PTQ pass gives every quantized layer its dequantized weight Q(W). The float model holding
Q(W) (the student) gets low-rank adapters on the target layers, W = Q(W) + s B A with A [r, in]
(small seeded random values), B [out, r] (zeros, so training starts from the first-pass model) and
s = alpha / r, and only A and B are trained to restore the model. Merged, W' = Q(W) + s B A is the
"preprocessed" model that the second PTQ pass quantizes: its weights start on the first pass's
grid and the rank-r correction moves them little, so the second pass loses less than it does on W.

Losses, on the calibration windows:
* `distill` (the default; our deviation from the paper): KL(P_teacher || P_student) of the
  next-token distributions at every position, the teacher being the original float model. lowbit
  measures fidelity to the original, and with only the calibration windows to train on, matching
  the original's distributions restores the model instead of fitting the text.
* `lm` (the paper's): next-token cross-entropy on the windows.

Training as the paper's run (the transformers Trainer's defaults): AdamW without weight decay, a
linear warm-up over the first 5% of the steps then cosine decay to zero, the gradient norm clipped
at 1. Batches are drawn from the windows in a seeded order (a new permutation every epoch), so the
same inputs and seed give the same merged weights. Left out: the paper's LoRA dropout (0.1) and its
training set (RedPajama, 20000 steps on a 7B model): lowbit trains on the calibration windows only.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..models import linear_weight
from .distill import batches, distill_loss, lm_loss, lr_factor, optimizer_step, progress  # noqa: F401 (lr_factor re-exported)

Loss = Literal["distill", "lm"]


class LoRALinear(nn.Module):
    """A frozen linear weight W [out, in] plus a trainable low-rank term: y = x W^T + b + s (x A^T) B^T."""

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, rank: int, alpha: float, generator: torch.Generator
    ) -> None:
        super().__init__()
        out_f, in_f = weight.shape
        self.register_buffer("weight", weight.detach().float().clone())  # [out, in], frozen
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        bound = 1 / math.sqrt(in_f)  # the scale of nn.Linear's (and PEFT's) init of A
        self.lora_a = nn.Parameter((torch.rand(rank, in_f, generator=generator) * 2 - 1) * bound)  # [r, in]
        self.lora_b = nn.Parameter(torch.zeros(out_f, rank))  # [out, r]
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        return F.linear(x, self.weight, self.bias) + self.scale * F.linear(F.linear(x, self.lora_a), self.lora_b)

    def merged_weight(self) -> torch.Tensor:
        """[out, in] float32: W + s B A, the weight whose plain forward equals this module's."""
        return self.weight + self.scale * (self.lora_b.detach() @ self.lora_a.detach())


@dataclass(frozen=True)
class RestorativeConfig:
    steps: int = 100
    rank: int = 64
    alpha: float = 16.0
    lr: float = 1e-3
    loss: Loss = "distill"
    batch_size: int = 8  # windows per step
    seed: int = 0


@dataclass
class RestorativeResult:
    losses: list[float] = field(default_factory=list)  # per step, before its update
    seconds: float = 0.0
    targets: int = 0  # layers that got an adapter

    def summary(self) -> dict:
        """What the artifact records (lowbit.json: source.preprocess)."""
        return {
            "steps": len(self.losses), "targets": self.targets, "first_loss": self.losses[0],
            "last_loss": self.losses[-1], "seconds": round(self.seconds, 3),
        }


def restorative_lora(
    teacher: nn.Module,
    student: nn.Module,
    windows: torch.Tensor,
    targets: list[str],
    cfg: RestorativeConfig,
    show_progress: bool = False,
) -> RestorativeResult:
    """Train adapters on the `targets` linears of `student` (a float causal LM holding the first
    pass's dequantized weights) and merge them into its weights in place. `teacher`: the original
    model, only run forward (distill loss). `windows`: [n, seq] token ids. Returns per-step losses."""
    if not targets:
        raise ValueError("no target layer for the adapters")
    if cfg.steps < 1:
        raise ValueError(f"steps must be >= 1 (got {cfg.steps})")
    started = time.perf_counter()
    gen = torch.Generator().manual_seed(cfg.seed)
    student.eval()  # no dropout: the adapters see the model as it will run
    for p in student.parameters():
        p.requires_grad_(False)
    originals = {name: student.get_submodule(name) for name in targets}
    adapters: dict[str, LoRALinear] = {}
    for name, module in originals.items():
        bias = getattr(module, "bias", None)
        adapters[name] = LoRALinear(linear_weight(module), bias, cfg.rank, cfg.alpha, gen)
        student.set_submodule(name, adapters[name])
    params = [p for a in adapters.values() for p in (a.lora_a, a.lora_b)]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    result = RestorativeResult(targets=len(targets))
    try:
        with torch.enable_grad(), progress() as bar:
            task = bar.add_task(f"restorative LoRA ({cfg.loss})", total=cfg.steps, loss="", visible=show_progress)
            for step, idx in enumerate(batches(windows.shape[0], cfg.batch_size, cfg.steps, gen)):
                ids = windows[idx]  # [b, seq]
                logits = student(input_ids=ids, use_cache=False).logits
                if cfg.loss == "distill":
                    with torch.no_grad():
                        teacher_logits = teacher(input_ids=ids, use_cache=False).logits
                    loss = distill_loss(logits, teacher_logits)
                else:
                    loss = lm_loss(logits, ids)
                result.losses.append(optimizer_step(opt, params, loss, cfg.lr, step, cfg.steps))
                bar.update(task, advance=1, loss=f"{result.losses[-1]:.4g}")
    finally:  # the plain layers back, holding the merged weights (or untouched on an error)
        with torch.no_grad():
            for name, module in originals.items():
                if len(result.losses) == cfg.steps:
                    linear_weight(module).copy_(adapters[name].merged_weight().to(linear_weight(module).dtype))
                student.set_submodule(name, module)
    result.seconds = time.perf_counter() - started
    return result
