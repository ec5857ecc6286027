"""A quantized weight matrix: integer codes, per-group grid parameters, the grid and the layout.

This is what every algorithm returns and what the artifact stores and the runtime runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .formats import Grid, GroupLayout, Params
from .pack import packed_nbytes


@dataclass
class QuantizedWeight:
    codes: torch.Tensor  # [out, in] uint8, each < 2**grid.bits
    params: Params  # name -> [param_rows, n_groups] float32 (fp16-exact) or integer-valued codes
    grid: Grid
    layout: GroupLayout

    @property
    def shape(self) -> tuple[int, int]:
        return (self.layout.out_features, self.layout.in_features)

    @property
    def numel(self) -> int:
        return self.layout.out_features * self.layout.in_features

    def dequantize(self) -> torch.Tensor:
        """[out, in] float32 weights."""
        return self.layout.decode(self.grid, self.codes, self.params)

    def storage_bytes(self) -> dict[str, int]:
        """Exact bytes each stored tensor takes: packed codes and every parameter field."""
        sets = self.layout.n_param_sets
        sizes = {"codes": self.grid.packed_nbytes(self.numel)}
        for f in self.grid.param_fields:
            sizes[f.name] = 2 * sets if f.kind == "float16" else packed_nbytes(sets, f.bits)
        return sizes

    def bits_per_weight(self) -> float:
        """Stored bits (codes + scales + zero points ...) per weight."""
        return 8 * sum(self.storage_bytes().values()) / self.numel
