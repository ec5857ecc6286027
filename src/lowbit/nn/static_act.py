"""Static activation quantization (the integer-inference whitepaper, Krishnamoorthi 2018): one
affine range per tensor, fixed after calibration, applied to a quantized layer's inputs.

    q = clamp(round(x / s) + z, 0, 2^b - 1),   x_hat = (q - z) * s

The range always contains 0, so that zero (padding, ReLU outputs) is exact. The layer then
computes on x_hat: every product is an integer product of codes times the two scales, so this is
the whitepaper's *simulated* integer inference (the same values an integer kernel gives, up to
float rounding of the accumulation). The scale and zero point are stored with the layer (8 bytes)
and counted in its size; the artifact entry records the spec.
"""

from __future__ import annotations

from typing import Any

import torch

ACT_BITS = {"int8": 8, "int4": 4}


def act_spec(name: str, calibration: str) -> dict[str, Any]:
    """The artifact entry's `act` for static per-tensor asymmetric activations of format `name`."""
    if name not in ACT_BITS:
        raise ValueError(f"activation format {name!r} is not one of {', '.join(ACT_BITS)}")
    return {"format": name, "symmetric": False, "granularity": "tensor", "calibration": calibration}


def spec_bits(spec: dict[str, Any]) -> int:
    if spec.get("granularity") != "tensor" or spec.get("symmetric") is not False or spec.get("format") not in ACT_BITS:
        raise ValueError(f"static activation quantization {spec!r} is not one this lowbit runs "
                         f"(per-tensor asymmetric {'/'.join(ACT_BITS)})")
    return ACT_BITS[spec["format"]]


def range_params(lo: float, hi: float, bits: int) -> tuple[float, float]:
    """(scale, zero point) of the affine grid over [min(lo, 0), max(hi, 0)]; the zero point an integer."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    qmax = 2**bits - 1
    scale = (hi - lo) / qmax if hi > lo else 1.0
    zero = min(max(round(-lo / scale), 0), qmax)
    return float(scale), float(zero)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """x -> its nearest point on the grid (scale, zero) of `bits` bits, clamped to the range."""
    q = torch.clamp(torch.round(x / scale) + zero, 0, 2**bits - 1)
    return (q - zero) * scale
