"""Search spaces: a format name that stands for a list of candidate grids, one of which is chosen
per layer by `algos.format_search` (by the layer's output error on calibration data).

* `fp{b}_search` (b = 3 ... 8), LLM-FP4's search (Liu et al., 2023, "LLM-FP4: 4-Bit
  Floating-Point Quantized Transformers"): every exponent/mantissa split of a b-bit minifloat
  (fp4: E1M2, E2M1, E3M0) times every clipping factor in `clips` (default 1.0, 0.95, ..., 0.7).
  LLM-FP4 searches the exponent bits and the exponent bias (equivalently the maximal value).
  With a fitted scale per block the bias is not a separate degree of freedom: changing it
  multiplies every level by a power of two, which the scale absorbs (see `formats.minifloat`).
  What the bias search really moves is the clipping range, which `clips` (a multiplier of the
  absmax scale) searches on a finer grid than powers of two. So this is LLM-FP4's search in
  substance: exponent/mantissa split x clipping range, per layer.
* `power{b}_search` (b = 2 ... 8), NUPES's power-exponent search (Yvinec et al., 2023, "NUPES:
  Non-Uniform Post-Training Quantization via Power Exponent Search"): the power grid's alpha over
  `alphas` (default 1.0, 1.125, ..., 2.0) times `clips` (default 1.0, 0.9, 0.8).

Options (recipe `format_options`): `clips`, `splits` (fp: e.g. ["e2m1", "e1m2"]), `subnormals`
(fp), `alphas` (power), `refine`: with GPTQ, how many of the best candidates by RTN error are
quantized with GPTQ to choose among (default 3; every candidate would cost a GPTQ run each).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from .base import Grid
from .clip import ClippedGrid
from .minifloat import MinifloatGrid
from .power import PowerGrid

FP_CLIPS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)
POWER_ALPHAS = (1.0, 1.125, 1.25, 1.375, 1.5, 1.625, 1.75, 1.875, 2.0)
POWER_CLIPS = (1.0, 0.9, 0.8)


@dataclass(frozen=True)
class SearchSpace:
    """Candidate grids for one layer; `refine`: GPTQ re-runs of the best RTN candidates."""

    name: str
    candidates: tuple[Grid, ...]
    refine: int = 3

    def __post_init__(self) -> None:
        if not self.candidates:
            raise ValueError(f"{self.name}: the search space is empty")
        if len({(g.bits, g.fixed_group_size) for g in self.candidates}) != 1:
            raise ValueError(f"{self.name}: candidates must share their code width and block size")
        if isinstance(self.refine, bool) or int(self.refine) != self.refine or self.refine < 1:
            raise ValueError(f"refine is a positive integer, got {self.refine!r}")

    @property
    def bits(self) -> int:
        return self.candidates[0].bits

    @property
    def fixed_group_size(self) -> int | None:
        return self.candidates[0].fixed_group_size

    def spec(self) -> dict[str, Any]:
        return {"format": self.name, "refine": self.refine, "candidates": [g.spec() for g in self.candidates]}


def _clipped(grid: Grid, clip: float) -> Grid:
    return grid if float(clip) == 1.0 else ClippedGrid(grid, clip)


def _numbers(name: str, values: Sequence[Any]) -> list[float]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        raise ValueError(f"{name} is a non-empty list of numbers, got {values!r}")
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in values):
        raise ValueError(f"{name} is a non-empty list of numbers, got {values!r}")
    return [float(v) for v in values]


def minifloat_search(
    bits: int, clips: Sequence[float] = FP_CLIPS, splits: Sequence[str] | None = None, subnormals: bool = True, refine: int = 3
) -> SearchSpace:
    """`fp{bits}_search`: every ExMy split (or those in `splits`, like "e2m1") x every clip."""
    if splits is None:
        pairs = [(e, bits - 1 - e) for e in range(1, bits)]
    else:
        if isinstance(splits, str) or not isinstance(splits, Sequence) or not splits:
            raise ValueError(f"splits is a non-empty list like ['e2m1', 'e1m2'], got {splits!r}")
        pairs = []
        for s in splits:
            e, _, m = str(s).lower().removeprefix("e").partition("m")
            if not (e.isdigit() and m.isdigit()) or int(e) + int(m) + 1 != bits:
                raise ValueError(f"split {s!r} is not an E+M split of a {bits}-bit minifloat (like e2m1 for 4 bits)")
            pairs.append((int(e), int(m)))
    cands = [_clipped(MinifloatGrid(e, m, subnormals=subnormals), c) for e, m in pairs for c in _numbers("clips", clips)]
    return SearchSpace(f"fp{bits}_search", tuple(cands), refine)


def power_search(
    bits: int, alphas: Sequence[float] = POWER_ALPHAS, clips: Sequence[float] = POWER_CLIPS, refine: int = 3
) -> SearchSpace:
    """`power{bits}_search`: NUPES power grids for every alpha x every clip."""
    cands = [_clipped(PowerGrid(bits, a), c) for a in _numbers("alphas", alphas) for c in _numbers("clips", clips)]
    return SearchSpace(f"power{bits}_search", tuple(cands), refine)
