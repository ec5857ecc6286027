"""Accumulate a linear layer's Hessian H = 2 X^T X / n from the inputs it sees."""

from __future__ import annotations

import torch


class HessianAccumulator:
    """Running H over calibration tokens; inputs `x: [..., in]`. With token weights (`calib.fisher`),
    H = 2 sum_t w_t x_t x_t^T / sum_t w_t, `count` then the sum of the weights."""

    def __init__(self, in_features: int) -> None:
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.count: float = 0

    @torch.inference_mode()
    def add(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        """`weight`: one per token of `x` (`x.shape[:-1]`), or None for all 1."""
        x = x.reshape(-1, x.shape[-1]).float()
        if weight is None:
            self.sum += (x.T @ x).double()  # float32 products per batch, float64 running sum
            self.count += x.shape[0]
            return
        w = weight.reshape(-1).float()
        if w.shape[0] != x.shape[0]:
            raise ValueError(f"{w.shape[0]} token weights for {x.shape[0]} tokens")
        self.sum += (x.T @ (x * w[:, None])).double()
        self.count += float(w.double().sum())

    def hessian(self) -> torch.Tensor:
        if self.count == 0:
            raise RuntimeError("no calibration inputs reached this layer")
        return (2.0 * self.sum / self.count).float()
