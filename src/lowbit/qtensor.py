"""A quantized weight matrix: integer codes, per-group grid parameters, the grid and the layout.

This is what every algorithm returns and what the artifact stores and the runtime runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .formats.pvq import PVQFormat
from .formats.vq import VQFormat, stored_order
from .formats import Grid, GroupLayout, Params
from .pack import packed_nbytes


def weight_storage_bytes(grid: Grid, layout: GroupLayout) -> dict[str, int]:
    """Exact bytes of the packed codes and of every parameter field of a weight on `grid` laid out by `layout`."""
    sets = layout.n_param_sets
    sizes = {"codes": grid.packed_nbytes(layout.out_features * layout.in_features)}
    for f in grid.param_fields:
        n = sets // f.shared
        sizes[f.name] = 2 * n if f.kind == "float16" else packed_nbytes(n, f.bits)
    return sizes


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
        return weight_storage_bytes(self.grid, self.layout)

    def bits_per_weight(self) -> float:
        """Stored bits (codes + scales + zero points ...) per weight."""
        return 8 * sum(self.storage_bytes().values()) / self.numel


@dataclass
class PTQ161Weight:
    """A PTQ1.61 weight (`algos.ptq161`): salient input channels on a low-bit grid, the rest of
    every row binarized with a per-(row, block) scale alpha and a per-column scale beta:

        W[:, mask]  = salient.dequantize()                                 [out, n_salient]
        W[:, ~mask] = (2 * signs - 1) * alpha[:, block(j)] * beta[j]       [out, n_binary]

    Binary columns are counted in ascending channel order; block(j) = j // block_size (the last
    block may be shorter; block_size == n_binary: one alpha per row). Stored: the mask (1 bit per
    input channel), the salient codes and parameters, 1-bit signs, fp16 alpha and beta."""

    mask: torch.Tensor  # [in] bool, True for the salient input channels
    salient: QuantizedWeight  # [out, n_salient]
    signs: torch.Tensor  # [out, n_binary] uint8 in {0, 1}
    alpha: torch.Tensor  # [out, n_blocks] float32 (fp16-exact)
    beta: torch.Tensor  # [n_binary] float32 (fp16-exact)
    block_size: int  # binary columns per alpha block

    @property
    def shape(self) -> tuple[int, int]:
        return (self.signs.shape[0], self.mask.numel())

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def binary_block_of_column(self) -> torch.Tensor:
        """[n_binary] the alpha block of every binary column."""
        return torch.arange(self.signs.shape[1]) // self.block_size

    def dequantize(self) -> torch.Tensor:
        """[out, in] float32 weights."""
        w = torch.empty(self.shape)
        w[:, self.mask] = self.salient.dequantize()
        alpha = self.alpha.index_select(1, self.binary_block_of_column())  # [out, n_binary]
        w[:, ~self.mask] = (2 * self.signs.float() - 1) * alpha * self.beta
        return w

    def storage_bytes(self) -> dict[str, int]:
        """Exact bytes of every stored tensor (the mask is 1 bit per input channel)."""
        out, n_in = self.shape
        sizes = {"mask": packed_nbytes(n_in, 1)}
        sizes.update({f"salient_{k}": v for k, v in self.salient.storage_bytes().items()})
        sizes.update({"signs": packed_nbytes(self.signs.numel(), 1), "alpha": 2 * self.alpha.numel(), "beta": 2 * self.beta.numel()})
        return sizes

    def bits_per_weight(self) -> float:
        return 8 * sum(self.storage_bytes().values()) / self.numel


@dataclass
class VQWeight:
    """A vector-codebook weight (`formats.vq`): `codes: [out, in / dim * stages]` indices (the
    stages of a vector adjacent) into `codebook: [n_codebooks * 2^bits, dim]` (fp16-exact float32;
    row group, then stage; the outlier stages last), times `scales: [out, n_groups]` (fp16-exact),
    one per `group_size` input columns (-1: one per row, `[out]` accepted):
    W[i, d*j : d*(j+1)] = scales[i, group of column d*j] * sum_s codebook[g_i, s][codes[i, j, s]],
    g_i the row group of row i. One stage and one group: codebook[codes[i, j]]. With outlier
    columns (`columns: [n_outlier]`, ascending), the vectors are in the order "those columns, then
    the others", the first n_outlier / dim of them on the outlier codebooks."""

    codes: torch.Tensor
    codebook: torch.Tensor
    scales: torch.Tensor
    fmt: "VQFormat"
    group_size: int = -1
    columns: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return (self.codes.shape[0], self.codes.shape[1] // self.fmt.stages * self.fmt.dim)

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def dequantize(self) -> torch.Tensor:
        """[out, in] float32 weights."""
        w = self.vectors().reshape(self.shape)
        if self.columns is not None:
            w = w[:, torch.argsort(self.column_order())]
        return w * self.column_scales()

    def column_order(self) -> torch.Tensor:
        """[in] int64: the input column of every stored position (outlier columns first)."""
        return stored_order(self.columns, self.shape[1])

    def vectors(self) -> torch.Tensor:
        """[out, in / dim, dim]: every stored vector's codeword sum, before its scale."""
        fmt, out_f = self.fmt, self.shape[0]
        stages, k = fmt.stages, fmt.codebook_size
        codes = self.codes.long().reshape(out_f, -1, stages)
        if stages == 1 and fmt.groups == 1 and self.columns is None:
            return self.codebook[codes[..., 0]]
        first = ((fmt.row_groups(out_f) * stages).reshape(-1, 1, 1) + torch.arange(stages)).expand_as(codes)
        if self.columns is not None:  # the outlier vectors on the last stages' codebooks
            first = first.clone()
            first[:, : self.columns.numel() // fmt.dim] = fmt.groups * stages + torch.arange(stages)
        return self.codebook[codes + first * k].sum(2)

    def column_scales(self) -> torch.Tensor:
        """[out, in]: the scale each weight is multiplied by."""
        return self.fmt.column_scales(self.scales, self.shape[1], self.group_size)

    def storage_bytes(self) -> dict[str, int]:
        return self.fmt.storage_bytes(*self.shape, self.group_size)

    def bits_per_weight(self) -> float:
        return 8 * sum(self.storage_bytes().values()) / self.numel


@dataclass
class PVQWeight:
    """A pyramid-vector weight (`formats.pvq`): `index: [out, in / N]` int64 pyramid-point indices,
    `amps: [out, in / N]` uint8 amplitude codes, `scales: [out]` fp16-exact row scales:
    W[i, N*j : N*(j+1)] = amps[i, j] * scales[i] * y / ||y||_2, y the point `index[i, j]` names."""

    index: torch.Tensor
    amps: torch.Tensor
    scales: torch.Tensor
    fmt: "PVQFormat"

    @property
    def shape(self) -> tuple[int, int]:
        return (self.index.shape[0], self.index.shape[1] * self.fmt.dim)

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def dequantize(self) -> torch.Tensor:
        """[out, in] float32 weights."""
        out, n_vec = self.index.shape
        u = self.fmt.directions(self.fmt.decode(self.index.reshape(-1)))  # [out * n_vec, N]
        gain = self.amps.reshape(-1).float() * self.scales.repeat_interleave(n_vec)
        return (u * gain[:, None]).reshape(self.shape)

    def storage_bytes(self) -> dict[str, int]:
        return self.fmt.storage_bytes(*self.shape)

    def bits_per_weight(self) -> float:
        return 8 * sum(self.storage_bytes().values()) / self.numel
