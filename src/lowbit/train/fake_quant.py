"""Fake-quantized linear layers for quantization-aware training, for every scalar grid.

A `FakeQuantLinear` keeps a latent float weight and, on every forward, quantizes it exactly as the
artifact will store it (and, with `act`, its inputs to int8 per token as `nn.IntActLinear` does): the grid's own `fit` / `encode` / `decode` through the layer's group layout,
fp16 fields rounded to fp16. Its output is the packed layer's output; `quantized_weight` gives the
codes and parameters that `nn.QuantLinear` stores, so a trained model converts without a change.

The gradient goes through the rounding by the straight-through estimator (Bengio et al., 2013;
BitNet b1.58 trains its ternary weights so): the latent weight receives the gradient of its
quantized value. Step sizes are either

- `fixed`: refitted from the latent weights on every step by the grid's rule (absmax for int,
  absmean / median for ternary: BitNet's recipe), not trained; or
- `lsq`: trained (LSQ, Esser et al., 2020, "Learned Step Size Quantization"; LSQ+ for grids with a
  learned offset, `int*_min`), initialised from the grid's fit; for grids of evenly spaced levels
  (int, int*_min, ternary). The step's gradient is LSQ's:
  level - w / s for a weight inside the grid's range, the edge level outside, scaled by
  1 / sqrt(n_group * levels); a weight outside the range gets no gradient. The codes are the grid's
  encoding at the current (fp16-rounded) step, so forward, gradient and artifact agree.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..formats import Grid, GroupLayout, round_to_fp16
from ..formats.binary import BinaryGrid
from ..formats.int import IntGrid, IntMinGrid
from ..formats.nested import NestedIntGrid
from ..formats.ternary import TernaryGrid
from ..nn.act_linear import fits_int_act, quantize_tokens
from ..qtensor import QuantizedWeight

STEP_RULES = ("fixed", "lsq", "biper")
LSQ_GRIDS = (IntGrid, IntMinGrid, TernaryGrid)  # value = level(code) * scale (+ min), levels evenly spaced


def _fp16_ste(x: torch.Tensor) -> torch.Tensor:
    """x rounded to its stored fp16 value, with the identity gradient."""
    return x + (round_to_fp16(x.detach()) - x).detach()


def _scaled_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """x in value, its gradient multiplied by `factor` (LSQ's step-size gradient scale)."""
    return x * factor + (x - x * factor).detach()


class FakeQuantLinear(nn.Module):
    """`weight: [out, in]` latent float (trained), quantized on the fly onto `grid` by `layout`."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, grid: Grid, layout: GroupLayout,
                 steps: str = "fixed", act: bool = False) -> None:
        super().__init__()
        if steps not in STEP_RULES:
            raise ValueError(f"step sizes are {' or '.join(STEP_RULES)}, not {steps!r}")
        self.grid, self.layout, self.steps, self.act = grid, layout, steps, act
        if act and not fits_int_act(grid):
            raise ValueError(f"int8 activations run against integer or ternary weights, not {grid.name}")
        self.precision: int | None = None  # a nested grid trained at a lower precision (Double Rounding)
        self.weight = nn.Parameter(weight.detach().float().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone())
        self.learned = nn.ParameterDict()
        if steps == "biper" and not isinstance(grid, BinaryGrid):
            raise ValueError(f"biper binarizes by a square wave: it takes the binary grid, not {grid.name}")
        if steps == "biper":  # the frequency puts every weight in the first half period: sign(sin(w0 w)) = sign(w)
            self.register_buffer("omega", torch.tensor(0.5 * math.pi / max(float(self.weight.detach().abs().max()), 1e-12)))
        if steps in ("lsq", "biper"):
            if steps == "lsq" and not isinstance(grid, LSQ_GRIDS):
                raise ValueError(f"lsq learns the step of grids whose codes are evenly spaced levels (int, int*_min, "
                                 f"ternary), not {grid.name}; use fixed steps (lowbit train --qat fixed)")
            with torch.no_grad():
                fitted = layout.fit(grid, self.weight)
            fields = [f.name for f in grid.param_fields if f.kind == "float16"]
            self.learned.update({k: nn.Parameter(fitted[k].float().clone()) for k in fields})
            for k, v in fitted.items():  # an integer zero point: fitted once, then fixed (the step moves around it)
                if k not in fields:
                    self.register_buffer(f"fixed_{k}", v.clone())
        levels = 2 ** grid.bits - 1
        group = layout.effective_group_size if not layout.per_tensor else layout.in_features * layout.out_features
        self.grad_scale = 1.0 / math.sqrt(max(1, group) * levels)

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None, steps: str = "fixed",
                       act: bool = False) -> "FakeQuantLinear":
        """Start from a post-training quantization (GPTQ's codes, say): the latent weight is its
        decoded weight, and learned steps start at its stored parameters, so the first forward is
        that quantization exactly (`fixed` steps refit from the decoded weights instead)."""
        layer = cls(qw.dequantize(), bias, qw.grid, qw.layout, steps, act)
        with torch.no_grad():
            for k, p in layer.learned.items():
                p.copy_(qw.params[k].float())
            for k, b in layer.named_buffers():
                if k.startswith("fixed_"):
                    b.copy_(qw.params[k.removeprefix("fixed_")])
        return layer

    @property
    def in_features(self) -> int:
        return self.layout.in_features

    @property
    def out_features(self) -> int:
        return self.layout.out_features

    def _params(self) -> dict[str, torch.Tensor]:
        """The parameters this step quantizes with: [param_rows, n_groups] each, fp16 fields as stored."""
        if self.steps == "fixed":
            with torch.no_grad():
                return self.layout.fit(self.grid, self.weight)
        fixed = {k.removeprefix("fixed_"): v for k, v in self.named_buffers() if k.startswith("fixed_")}
        return {**fixed, **{k: _fp16_ste(_scaled_grad(v, self.grad_scale)) for k, v in self.learned.items()}}

    def _decoding_grid(self) -> Grid:
        """The grid the forward decodes with: a nested grid at `precision` (its codes stay top-bit)."""
        if self.precision is None:
            return self.grid
        if not isinstance(self.grid, NestedIntGrid):
            raise ValueError(f"only nested grids decode at another precision, not {self.grid.name}")
        return self.grid.with_precision(self.precision)

    def quantized(self) -> torch.Tensor:
        """[out, in]: the weight as the artifact decodes it, differentiable (see the module docstring)."""
        w = self.weight
        params = self._params()
        detached = {k: v.detach() for k, v in params.items()}
        if self.steps == "biper":
            return self._biper(w, params, detached)
        codes = self.layout.encode(self.grid, w.detach(), detached)
        w_hat = self.layout.decode(self._decoding_grid(), codes, params)  # gradient to learned fields: the level
        if self.steps == "fixed":
            return w_hat.detach() + (w - w.detach())  # straight through
        # LSQ: inside the grid's range the weight passes straight through, and the step's gradient gains
        # -(w - min) / s (and a learned min's loses its 1): the rounding's input moves with them
        big = torch.full_like(w, 1e30)
        lo = self.layout.decode(self.grid, self.layout.encode(self.grid, -big, detached), detached)
        hi = self.layout.decode(self.grid, self.layout.encode(self.grid, big, detached), detached)
        expanded = self.layout.expand(params)
        s = expanded["scale"]
        half = 0.5 * s.detach().abs()
        inside = ((w.detach() >= lo - half) & (w.detach() <= hi + half)).float()
        m = expanded.get("min")
        offset = 0.0 if m is None else m.detach()
        through = inside * ((w - w.detach()) - ((w.detach() - offset) / s.detach()) * (s - s.detach()))
        if m is not None:
            through = through - inside * (m - m.detach())
        return w_hat + through

    def _biper(self, w: torch.Tensor, params: dict[str, torch.Tensor], detached: dict[str, torch.Tensor]) -> torch.Tensor:
        """BiPer (Vargas et al., 2024): the sign of sin(omega w), a square wave, forward; the sine of the
        same period backward (gradient scale * omega * cos(omega w)); the scale learned."""
        phase = torch.sin(self.omega * w)
        codes = self.layout.encode(self.grid, phase.detach(), detached)
        w_hat = self.layout.decode(self.grid, codes, params)
        s = self.layout.expand(params)["scale"].detach()
        return w_hat + s * (phase - phase.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act:  # int8 per token, absmax (BitNet's activations; `nn.IntActLinear` at run time), straight through
            q, s = quantize_tokens(x.detach().float())
            x = x + (q * s - x).detach().to(x.dtype)
        return F.linear(x, self.quantized(), self.bias)

    @torch.no_grad()
    def quantized_weight(self) -> QuantizedWeight:
        """The codes and parameters the packed layer stores: its decode is this layer's forward weight."""
        params = {k: v.detach().clone() for k, v in self._params().items()}
        latent = torch.sin(self.omega * self.weight) if self.steps == "biper" else self.weight
        codes = self.layout.encode(self.grid, latent.detach(), params)
        return QuantizedWeight(codes, params, self.grid, self.layout)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, grid={self.grid.name}, steps={self.steps}"
                + (", act=int8 per token" if self.act else ""))
