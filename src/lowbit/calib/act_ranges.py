"""Activation range observers for static activation quantization (the integer-inference
whitepaper's calibration; Nagel et al. 2021's range-setting choices):

- `minmax`: the extreme values seen;
- `percentile`: the 0.01% and 99.99% quantiles of a seeded sample of the values (outliers clipped);
- `mse`: the range, shrunk from min/max, whose quantization error on the sample is smallest.

The observer keeps the running min/max and a bounded seeded sample, so memory does not grow with
the calibration set and the result is deterministic.
"""

from __future__ import annotations

import torch

from ..nn.static_act import fake_quantize, range_params

RANGE_METHODS = ("minmax", "percentile", "mse")
PERCENTILE = 99.99
SAMPLE_PER_CALL = 1 << 16
MAX_SAMPLE = 1 << 20
MSE_STEPS = 80
MSE_SAMPLE = 1 << 16  # values the MSE search scores each candidate range on (seeded, from the sample)


class RangeObserver:
    def __init__(self, method: str, bits: int, seed: int = 0) -> None:
        if method not in RANGE_METHODS:
            raise ValueError(f"activation range {method!r} is not one of {', '.join(RANGE_METHODS)}")
        self.method, self.bits = method, bits
        self.lo, self.hi = float("inf"), float("-inf")
        self._gen = torch.Generator().manual_seed(seed)
        self._samples: list[torch.Tensor] = []
        self._n = 0

    def observe(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1).float()
        lo, hi = torch.aminmax(flat)
        self.lo, self.hi = min(self.lo, float(lo)), max(self.hi, float(hi))
        if self.method != "minmax" and self._n < MAX_SAMPLE:
            k = min(SAMPLE_PER_CALL, flat.numel())
            idx = torch.randint(flat.numel(), (k,), generator=self._gen)
            self._samples.append(flat[idx].clone())
            self._n += k

    def range(self) -> tuple[float, float]:
        if self.lo > self.hi:
            raise ValueError("the observer saw no values: no calibration input reached this layer")
        if self.method == "minmax":
            return self.lo, self.hi
        sample = torch.cat(self._samples)
        if self.method == "percentile":
            q = torch.quantile(sample[:1 << 24].double(), torch.tensor([1 - PERCENTILE / 100, PERCENTILE / 100], dtype=torch.float64))
            return min(float(q[0]), 0.0), max(float(q[1]), 0.0)
        return self._mse_range(sample)

    def _mse_range(self, sample: torch.Tensor) -> tuple[float, float]:
        """Shrink [lo, hi] by a common factor in (0, 1]; keep the factor of least squared error."""
        lo, hi = min(self.lo, 0.0), max(self.hi, 0.0)
        if sample.numel() > MSE_SAMPLE:
            sample = sample[torch.randperm(sample.numel(), generator=self._gen)[:MSE_SAMPLE]]
        best, best_err = (lo, hi), float("inf")
        for i in range(MSE_STEPS):
            f = 1.0 - i / MSE_STEPS * 0.95
            scale, zero = range_params(lo * f, hi * f, self.bits)
            err = float((fake_quantize(sample, torch.tensor(scale), torch.tensor(zero), self.bits) - sample).pow(2).sum())
            if err < best_err:
                best, best_err = (lo * f, hi * f), err
        return best

    def params(self) -> tuple[float, float]:
        """(scale, zero point) of the calibrated range."""
        return range_params(*self.range(), self.bits)
