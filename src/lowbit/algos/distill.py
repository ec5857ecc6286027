"""What the training passes share (restorative LoRA, end-to-end tuning): the distillation and
next-token losses, the learning-rate schedule of the transformers Trainer's defaults (linear
warm-up over the first 5% of the steps, then cosine decay to zero), seeded batch order and a
progress bar."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

WARMUP = 0.05  # fraction of the steps with a linearly rising learning rate
MAX_GRAD_NORM = 1.0


def lr_factor(step: int, steps: int) -> float:
    """Multiplier of the learning rate at `step` (0-based): linear warm-up, then cosine decay to 0."""
    warmup = max(1, round(WARMUP * steps))
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy. logits [b, seq, vocab], ids [b, seq]."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean KL(P_teacher || P_student) over every position. Both [b, seq, vocab]."""
    logp_s = F.log_softmax(student_logits.float(), dim=-1).flatten(0, 1)
    logp_t = F.log_softmax(teacher_logits.float(), dim=-1).flatten(0, 1)
    return F.kl_div(logp_s, logp_t, log_target=True, reduction="batchmean")


def optimizer_step(opt: torch.optim.Optimizer, params: list[torch.Tensor], loss: torch.Tensor, lr: float, step: int,
                   steps: int) -> float:
    """One update: the scheduled learning rate, backward, the gradient norm clipped, step. Returns the loss."""
    for group in opt.param_groups:
        group["lr"] = lr * lr_factor(step, steps)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
    opt.step()
    return loss.item()


def is_norm(module: torch.nn.Module) -> bool:
    """A normalization layer (RMSNorm, LayerNorm of any model family): what the training passes tune besides the
    quantized layers."""
    return type(module).__name__.endswith(("RMSNorm", "LayerNorm")) or isinstance(module, torch.nn.LayerNorm)


def batches(n: int, batch_size: int, steps: int, generator: torch.Generator) -> list[torch.Tensor]:
    """`steps` index batches over n windows: seeded permutations, one after another."""
    order = torch.cat([torch.randperm(n, generator=generator) for _ in range(-(-steps * batch_size // n))])
    return [order[i * batch_size : (i + 1) * batch_size] for i in range(steps)]


def progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("loss {task.fields[loss]}"), transient=True,
    )
