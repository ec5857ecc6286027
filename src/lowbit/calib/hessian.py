"""Accumulate a linear layer's Hessian H = 2 X^T X / n from the inputs it sees."""

from __future__ import annotations

import torch


class HessianAccumulator:
    """Running H over calibration tokens; inputs `x: [..., in]`."""

    def __init__(self, in_features: int) -> None:
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.count = 0

    @torch.inference_mode()
    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.sum += (x.T @ x).double()  # float32 products per batch, float64 running sum
        self.count += x.shape[0]

    def hessian(self) -> torch.Tensor:
        if self.count == 0:
            raise RuntimeError("no calibration inputs reached this layer")
        return (2.0 * self.sum / self.count).float()
