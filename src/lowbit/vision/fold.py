"""Batch-norm folding (the integer-inference whitepaper, section 3.2): a Conv2d followed by a
BatchNorm2d in inference mode is one Conv2d with

    W' = W * gamma / sqrt(var + eps)   (per output channel),   b' = (b - mean) * gamma / sqrt(var + eps) + beta

so the deployed network has no normalisation left and the quantizer sees the weights that run.
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Fold `bn` into `conv` in place (the conv gains a bias)."""
    if conv.out_channels != bn.num_features:
        raise ValueError(f"a BatchNorm of {bn.num_features} channels cannot follow a conv of {conv.out_channels}")
    inv = torch.rsqrt(bn.running_var.double() + bn.eps)
    gamma = bn.weight.double() if bn.affine else torch.ones_like(inv)
    beta = bn.bias.double() if bn.affine else torch.zeros_like(inv)
    scale = gamma * inv  # [out]
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
    conv.weight.copy_((conv.weight.double() * scale.view(-1, 1, 1, 1)).to(conv.weight.dtype))
    new_bias = ((bias - bn.running_mean.double()) * scale + beta).to(conv.weight.dtype)
    if conv.bias is None:
        conv.bias = nn.Parameter(new_bias)
    else:
        conv.bias.copy_(new_bias)


def fold_batchnorm(model: nn.Module) -> list[str]:
    """Fold every BatchNorm2d that directly follows a Conv2d inside an nn.Sequential into it and
    replace the BatchNorm by nn.Identity (keeping the module names, so state-dict keys of the other
    layers do not move). Returns the names of the folded BatchNorms."""
    folded: list[str] = []
    for name, seq in list(model.named_modules()):
        if not isinstance(seq, nn.Sequential):
            continue
        children = list(seq.named_children())
        for (_, a), (key, b) in zip(children, children[1:]):
            if isinstance(a, nn.Conv2d) and isinstance(b, nn.BatchNorm2d):
                fold_conv_bn(a, b)
                setattr(seq, key, nn.Identity())
                folded.append(f"{name}.{key}" if name else key)
    return folded

