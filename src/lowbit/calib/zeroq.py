"""ZeroQ's distilled data (Cai et al., 2020): calibration inputs made from the model alone.

Inputs start as Gaussian noise and are optimised so that, at every BatchNorm layer, the batch
statistics of what reaches it match the statistics the layer stored in training:

    min_x  sum_l  || mu_l(x) - running_mean_l ||^2 + || sigma_l(x) - sqrt(running_var_l) ||^2

Matching those statistics makes the inputs look, layer by layer, like the data the model was trained
on, without any of that data: they then calibrate activation ranges and GPTQ's Hessians where no
image may be used. Needs the model before its batch norms are folded.
"""

from __future__ import annotations

import torch
from rich.progress import Progress
from torch import nn

from ..errors import LowbitError


class DistillError(LowbitError):
    pass


def _bn_loss_hooks(model: nn.Module, losses: list[torch.Tensor]) -> list:
    def hook(bn: nn.BatchNorm2d, args: tuple) -> None:
        x = args[0]  # [batch, C, H, W]
        mean = x.mean(dim=(0, 2, 3))
        std = torch.sqrt(x.var(dim=(0, 2, 3), unbiased=False) + bn.eps)
        losses.append((mean - bn.running_mean).pow(2).sum() + (std - torch.sqrt(bn.running_var + bn.eps)).pow(2).sum())

    return [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


def distill_images(model: nn.Module, n: int, size: int = 224, steps: int = 100, lr: float = 0.2, batch_size: int = 32,
                   seed: int = 0, show_progress: bool = True) -> tuple[torch.Tensor, dict]:
    """[n, 3, size, size] distilled inputs, and a summary (the BN loss per batch at the start and at the
    end). `model` keeps its weights (eval mode, no gradients to them)."""
    if not any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        raise DistillError("ZeroQ's distilled data matches BatchNorm statistics, and this model has no BatchNorm2d "
                           "(already folded?); pass calibration images instead")
    if n < 1 or steps < 1:
        raise DistillError(f"distillation needs at least one input and one step (n={n}, steps={steps})")
    model.eval()
    params = [p for p in model.parameters()]
    was = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    out, first, last = [], [], []
    losses: list[torch.Tensor] = []
    handles = _bn_loss_hooks(model, losses)
    try:
        with torch.enable_grad(), Progress(transient=True, disable=not show_progress) as bar:
            task = bar.add_task("distilling data (ZeroQ)", total=-(-n // batch_size) * steps)
            for start in range(0, n, batch_size):
                x = torch.randn(min(batch_size, n - start), 3, size, size, generator=gen).requires_grad_(True)
                opt = torch.optim.Adam([x], lr=lr)
                for step in range(steps):
                    losses.clear()
                    opt.zero_grad()
                    model(x)
                    loss = torch.stack(losses).sum()
                    loss.backward()
                    opt.step()
                    if step == 0:
                        first.append(float(loss.detach()))
                    bar.advance(task)
                last.append(float(loss.detach()))
                out.append(x.detach())
    finally:
        for h in handles:
            h.remove()
        for p, r in zip(params, was):
            p.requires_grad_(r)
    return torch.cat(out), {"steps": steps, "lr": lr, "batch_size": batch_size, "bn_loss_start": first, "bn_loss_end": last}
