"""How close a quantized classifier stays to its float original on the same images: top-1
agreement, top-5 agreement (the float top-1 among the quantized top 5) and the mean KL divergence
of the class distributions, KL(float || quantized). With no labelled ImageNet image available
offline, these measure fidelity instead of accuracy."""

from __future__ import annotations

import torch
from rich.progress import Progress
from torch import nn


@torch.no_grad()
def logits(model: nn.Module, images: torch.Tensor, batch_size: int = 50, what: str = "evaluating") -> torch.Tensor:
    """[n, classes] float32 logits of `images` [n, 3, H, W]."""
    out = []
    with Progress(transient=True) as bar:
        task = bar.add_task(what, total=images.shape[0])
        for i in range(0, images.shape[0], batch_size):
            out.append(model(images[i:i + batch_size]).float())
            bar.advance(task, min(batch_size, images.shape[0] - i))
    return torch.cat(out)


def fidelity(reference: torch.Tensor, logits_q: torch.Tensor) -> dict[str, float]:
    """reference, logits_q: [n, classes] -> top-1/top-5 agreement and mean KL(reference || quantized)."""
    top1_ref = reference.argmax(-1)
    top5_q = logits_q.topk(5, dim=-1).indices
    logp = reference.log_softmax(-1)
    logq = logits_q.log_softmax(-1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    return {"top1_agreement": float((logits_q.argmax(-1) == top1_ref).float().mean()),
            "top5_agreement": float((top5_q == top1_ref[:, None]).any(-1).float().mean()),
            "kl": float(kl.mean()), "n_images": int(reference.shape[0])}
