"""Which weights share one set of grid parameters: the whole tensor, one output channel,
or a group of consecutive input columns of one output channel.

`group_size` follows the usual convention: > 0 groups of that many columns along
in_features, -1 one group per output channel, 0 one group for the whole tensor.

Widths that the group size does not divide (576 with groups of 128, say) follow one rule
everywhere in lowbit: **the last group of each row is shorter** (576 = 4 x 128 + 64). It is
fitted, stored and counted like the others (one more set of parameters per row), and it is what
the Hugging Face GPTQ layout expresses with its group index. `ragged="error"` refuses such
widths instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..errors import LowbitError
from .base import Grid, Params


class GroupSizeError(LowbitError):
    pass


@dataclass(frozen=True)
class GroupLayout:
    out_features: int
    in_features: int
    group_size: int
    ragged: Literal["short-last", "error"] = "short-last"

    def __post_init__(self) -> None:
        g = self.group_size
        if g < -1:
            raise GroupSizeError(
                f"group size {g} is not valid: use a positive size, -1 (per output channel) or 0 (per tensor)"
            )
        if g > 0 and self.in_features % g and self.ragged == "error":
            raise GroupSizeError(
                f"group size {g} does not divide the input width {self.in_features}; pick a divisor "
                f"(e.g. {largest_divisor_at_most(self.in_features, g)}) or allow a shorter last group"
            )

    @property
    def per_tensor(self) -> bool:
        return self.group_size == 0

    @property
    def effective_group_size(self) -> int:
        """Columns per group (the whole row for per-channel and per-tensor layouts)."""
        return self.group_size if self.group_size > 0 else self.in_features

    @property
    def n_groups(self) -> int:
        """Groups per row (1 for per-channel and per-tensor)."""
        g = self.effective_group_size
        return -(-self.in_features // g)

    @property
    def param_rows(self) -> int:
        return 1 if self.per_tensor else self.out_features

    @property
    def n_param_sets(self) -> int:
        """How many parameter sets the whole tensor stores."""
        return 1 if self.per_tensor else self.out_features * self.n_groups

    def group_of_column(self) -> torch.Tensor:
        """[in] the group index of every input column."""
        return torch.arange(self.in_features) // self.effective_group_size

    def group_columns(self, group: int) -> slice:
        g = self.effective_group_size
        return slice(group * g, min((group + 1) * g, self.in_features))

    def check_span(self, grid: Grid) -> None:
        """A grid that fits several groups at once (K-quant super-blocks) needs rows made of whole
        spans. (A format search's space, not a grid itself, chooses among one-block grids.)"""
        span = getattr(grid, "fit_span", 1)
        if span > 1 and (self.group_size != grid.fixed_group_size or self.n_groups % span or self.in_features % self.group_size):
            raise GroupSizeError(
                f"{grid.name} stores super-blocks of {span} x {grid.fixed_group_size} weights; input width "
                f"{self.in_features} is not a multiple of {span * (grid.fixed_group_size or 1)} (quantize with "
                f"--target gguf:{grid.name.replace('int', 'q')}, which gives such layers llama.cpp's fallback type)"
            )

    def span_groups(self, grid: Grid, group: int) -> range:
        """The groups fitted together with `group` (itself alone unless the grid has a fit span)."""
        start = group - group % grid.fit_span
        return range(start, min(start + grid.fit_span, self.n_groups))

    def fit_block(self, grid: Grid, w: torch.Tensor) -> Params:
        """Fit one group's (or one fit span's) parameters on its columns `w: [out, k]`:
        [param_rows, 1] (or [param_rows, fit_span]) each."""
        return grid.fit(w.reshape(1, -1) if self.per_tensor else w)

    def fit(self, grid: Grid, w: torch.Tensor) -> Params:
        """Fit every group of `w: [out, in]` at once: [param_rows, n_groups] each."""
        if self.per_tensor:
            return grid.fit(w.reshape(1, -1))
        if grid.fit_span > 1:
            self.check_span(grid)
            span_cols = grid.fit_span * self.group_size
            fitted = grid.fit(w.reshape(-1, span_cols))  # [out * n_spans, fit_span] each
            return {k: v.reshape(self.out_features, self.n_groups) for k, v in fitted.items()}
        g, n_full = self.effective_group_size, self.in_features // self.effective_group_size
        out = self.out_features
        full = w[:, : n_full * g].reshape(out * n_full, g)
        params = {k: v.reshape(out, n_full) for k, v in grid.fit(full).items()} if n_full else {}
        if n_full * g < self.in_features:
            tail = grid.fit(w[:, n_full * g :])
            params = {k: torch.cat([params[k], v], dim=1) if params else v for k, v in tail.items()}
        return params

    def expand(self, params: Params) -> Params:
        """Per-column parameters ([param_rows, in] each) for whole-matrix encode/decode."""
        idx = self.group_of_column()
        return {k: v.index_select(1, idx) if v.shape[1] > 1 else v for k, v in params.items()}

    def encode(self, grid: Grid, w: torch.Tensor, params: Params) -> torch.Tensor:
        return grid.encode(w, self.expand(params))

    def decode(self, grid: Grid, codes: torch.Tensor, params: Params) -> torch.Tensor:
        return grid.decode(codes, self.expand(params))


def largest_divisor_at_most(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)
