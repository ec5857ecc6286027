"""Vector codebook formats (`vq{d}x{k}`): every run of d consecutive weights of a row (along
in_features) is replaced by the nearest of 2^k codewords of one codebook per layer, times one
fp16 scale per group of input columns (the recipe's `group_size`, a multiple of d) or per row
(group size -1). A codeword index costs k bits for d weights: vq4x8 stores 2 bits per weight in
codes, plus the codebook (2^k x d fp16 values per layer) and the scales (16 bits per group: 0.125
bpw at group 128), all counted. Group scales matter where a layer has outlier columns: on
SmolLM2's layer-0 o_proj (kurtosis 26) one scale per row leaves 11x the output error that scales
per 64 columns do.

At 2 bits per dimension a vector codebook sits closer to the rate-distortion bound than any
scalar grid can (Lloyd-Max scalar: 2.74 dB from Shannon on a Gaussian, an 8-dim codebook about
1.7 dB): the reason VPTQ, GPTVQ, AQLM and QuIP# reach ~2 bits where scalar GPTQ breaks. The
quantizer (k-means for the codebook, then nearest codewords or GPTQ-style error feedback) is in
`algos.vq`; this module says what is stored.

Residual stages (`rvq{d}x{k}s{S}`, RVQ: each stage codes what the stages before it left, the
codewords summed) and group-residual codebooks (`grvq{d}x{k}s{S}g{G}`, GRVQ as in HiFi-Codec: the
rows cut into G contiguous groups, each with its own S residual codebooks) cost S indices per
vector and G x S codebooks, all counted. `vq{d}x{k}` is the one-stage, one-group case.

An outlier codebook (suffix `o{P}`, VPTQ's outlier elimination): the P% of input columns with the
largest Hessian diagonal times mean squared weight (their share of the output error) are gathered,
in index order, cut into d-vectors of their own and coded on their own S codebooks; their indices
are stored (int32, counted). On SmolLM2's layer-0 o_proj 1% of the columns so coded lowered
GPTQ-VQ's output error to 0.83x at vq4x8 g128 (0.93-0.99x on three other layers).

These are not scalar grids (`base.Grid`): GPTQ's column loop, the scalar searches, AWQ and the
export layouts do not take them; `algos.vq` quantizes them and `nn.VQLinear` runs them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..pack import packed_nbytes

MAX_INDEX_BITS = 12  # 4096 codewords: beyond, k-means++ seeding on its 4096-point sample cannot place them
MAX_STAGES = 8
MAX_GROUPS = 64
MAX_OUTLIER_PCT = 50
NAMED = {"vq2": (4, 8), "vq3": (2, 6)}  # ~2 and ~3 bits per weight in codes


@dataclass(frozen=True)
class VQFormat:
    """d-dim codewords (`dim`), 2^`bits` of them per codebook, `stages` residual codebooks summed,
    one set per `groups` contiguous row groups, fp16 scales per group of columns."""

    dim: int
    bits: int
    stages: int = 1
    groups: int = 1
    outlier_pct: int = 0  # percent of input columns coded on an outlier codebook of their own

    def __post_init__(self) -> None:
        if not 1 <= self.dim <= 8:
            raise ValueError(f"vector dimension {self.dim}: use 1 to 8")
        if not 1 <= self.bits <= MAX_INDEX_BITS:
            raise ValueError(f"a codebook of 2^{self.bits} entries: use 2^1 to 2^{MAX_INDEX_BITS} (indices of 1-{MAX_INDEX_BITS} bits)")
        if not 1 <= self.stages <= MAX_STAGES:
            raise ValueError(f"{self.stages} residual stages: use 1 to {MAX_STAGES}")
        if not 1 <= self.groups <= MAX_GROUPS:
            raise ValueError(f"{self.groups} row groups: use 1 to {MAX_GROUPS}")
        if not 0 <= self.outlier_pct <= MAX_OUTLIER_PCT:
            raise ValueError(f"{self.outlier_pct}% outlier columns: use 0 to {MAX_OUTLIER_PCT}")

    @property
    def name(self) -> str:
        tail = f"o{self.outlier_pct}" if self.outlier_pct else ""
        if self.groups > 1:
            return f"grvq{self.dim}x{self.bits}s{self.stages}g{self.groups}{tail}"
        if self.stages > 1:
            return f"rvq{self.dim}x{self.bits}s{self.stages}{tail}"
        return f"vq{self.dim}x{self.bits}{tail}"

    @property
    def n_codebooks(self) -> int:
        """Codebooks per layer: S per row group, and S more for the outlier columns."""
        return self.stages * (self.groups + (1 if self.outlier_pct else 0))

    def outlier_columns(self, in_features: int) -> int:
        """How many input columns the outlier codebook codes: P% of the width in whole vectors (at
        least one vector, and at least one vector left to the main codebooks); 0 without outliers."""
        if not self.outlier_pct:
            return 0
        n = max(1, round(in_features * self.outlier_pct / 100 / self.dim))
        return min(n, in_features // self.dim - 1) * self.dim

    def row_groups(self, out_features: int) -> torch.Tensor:
        """[out] int64: the codebook group of every row (contiguous, sizes differing by at most one)."""
        if out_features < self.groups:
            raise ValueError(f"{self.name} cuts the rows into {self.groups} groups; this layer has {out_features} rows")
        return torch.arange(out_features) * self.groups // out_features

    @property
    def codebook_size(self) -> int:
        return 2**self.bits

    def spec(self) -> dict[str, Any]:
        return {"format": self.name}

    def check_width(self, in_features: int) -> None:
        if in_features % self.dim:
            raise ValueError(f"{self.name} cuts rows into vectors of {self.dim}, which do not tile width {in_features}")
        if self.outlier_pct and in_features < 2 * self.dim:
            raise ValueError(f"{self.name} splits the columns into outliers and the rest: width {in_features} is under two vectors")

    def check_group_size(self, group_size: int) -> None:
        """Scales per row (-1) or per group of whole vectors: a vector never straddles two scales."""
        if group_size != -1 and (group_size <= 0 or group_size % self.dim):
            raise ValueError(f"{self.name} takes a scale per row (group size -1) or per group of a multiple of "
                             f"{self.dim} columns, not group size {group_size}")

    def scale_groups(self, in_features: int, group_size: int) -> int:
        """Scales per row: ceil(in / group_size) (the last group may be shorter), 1 per row for -1."""
        self.check_group_size(group_size)
        return 1 if group_size == -1 else -(-in_features // group_size)

    @staticmethod
    def column_scales(scales: torch.Tensor, in_features: int, group_size: int) -> torch.Tensor:
        """`scales: [out, n_groups]` (or `[out]` for one per row) -> [out, in]: every column's scale."""
        s = scales.reshape(scales.shape[0], -1)
        if s.shape[1] == 1:
            return s.expand(-1, in_features)
        return s[:, torch.arange(in_features, device=s.device) // group_size]

    def storage_bytes(self, out_features: int, in_features: int, group_size: int = -1) -> dict[str, int]:
        """Exact bytes stored for an [out, in] weight: packed indices (one per vector and stage), the
        fp16 codebooks (groups x stages), fp16 scales."""
        self.check_width(in_features)
        if out_features < self.groups:
            self.row_groups(out_features)
        sizes = {"codes": packed_nbytes(out_features * in_features // self.dim * self.stages, self.bits),
                 "codebook": 2 * self.n_codebooks * self.codebook_size * self.dim,
                 "scales": 2 * out_features * self.scale_groups(in_features, group_size)}
        if self.outlier_pct:
            sizes["columns"] = 4 * self.outlier_columns(in_features)
        return sizes


def stored_order(columns: torch.Tensor | None, in_features: int) -> torch.Tensor:
    """[in] int64: the input column at every stored position: the outlier `columns` (ascending)
    first, then the others in order; the identity without outliers."""
    if columns is None:
        return torch.arange(in_features)
    rest = torch.ones(in_features, dtype=torch.bool)
    rest[columns.long()] = False
    return torch.cat([columns.long(), rest.nonzero()[:, 0]])
