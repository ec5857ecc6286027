"""Accumulate a linear layer's Hessian H = 2 X^T X / n from the inputs it sees."""

from __future__ import annotations

import torch


def row_groups(out_features: int, groups: int) -> list[slice]:
    """GuidedQuant's output-channel groups: `groups` contiguous row ranges of a layer's weight,
    their sizes differing by at most one. Each group's rows share one loss-weighted Hessian."""
    if groups < 1:
        raise ValueError(f"{groups} output-channel groups: use 1 or more")
    groups = min(groups, out_features)
    bounds = [round(k * out_features / groups) for k in range(groups + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:])]


def pooled(h: torch.Tensor) -> torch.Tensor:
    """One [in, in] Hessian for a layer: `h` itself, or the mean of its row groups' ([groups, in, in])
    for the methods that weigh all rows by one (PTQ1.61's salient channels, AWQ's input statistics)."""
    return h if h.dim() == 2 else h.mean(0)


#: rows per step when a float32 matrix is widened into a float64 one: torch casts a whole mixed-dtype
#: operand at once, which for an 8,960-wide layer is a 642 MB temporary; a few MB at a time is not
_WIDEN_BYTES = 4 << 20


def _row_step(cols: int) -> int:
    return max(1, _WIDEN_BYTES // (8 * max(cols, 1)))


def add_widened(total: torch.Tensor, part: torch.Tensor) -> None:
    """total += part, `total` float64 and `part` float32 (same shape), a few rows at a time:
    the same values as `total += part.double()` without its full-size float64 copy."""
    step = _row_step(part.shape[-1])
    for i in range(0, part.shape[-2], step):
        total[..., i : i + step, :].add_(part[..., i : i + step, :])


#: float32 bytes of one piece of a batch's product X^T X: a wide layer's (8,960 inputs: 321 MB) is
#: made a band of rows at a time; a layer up to 2,896 wide in one piece, as a plain matmul
_PRODUCT_BYTES = 32 << 20


def add_product(total: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> None:
    """total += x^T y for `x, y: [tokens, in]` (float32; `total: [in, in]` float64), a band of rows
    of the product at a time, each widened into the sum: the peak is one band, not the product."""
    n = x.shape[1]
    step = max(256, _PRODUCT_BYTES // (4 * max(n, 1)))
    for i in range(0, n, step):
        add_widened(total[i : i + step], x[:, i : i + step].T @ y)


class HessianAccumulator:
    """Running H over calibration tokens; inputs `x: [..., in]`. With token weights (`calib.fisher`),
    H = 2 sum_t w_t x_t x_t^T / sum_t w_t, `count` then the sum of the weights. With `groups` > 1 the
    weights are one per token and output-channel group (`[..., groups]`) and H is `[groups, in, in]`,
    one weighted Hessian per group of rows (`row_groups`)."""

    def __init__(self, in_features: int, groups: int = 1) -> None:
        self.groups = groups
        shape = (in_features, in_features) if groups == 1 else (groups, in_features, in_features)
        self.sum = torch.zeros(shape, dtype=torch.float64)
        self.count: float | torch.Tensor = 0 if groups == 1 else torch.zeros(groups, dtype=torch.float64)

    @torch.inference_mode()
    def add(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        """`weight`: one per token of `x` (`x.shape[:-1]`; with groups, `x.shape[:-1] + (groups,)`),
        or None for all 1."""
        x = x.reshape(-1, x.shape[-1]).float()
        if weight is None:
            if self.groups != 1:
                raise ValueError("grouped Hessians need token weights per group")
            add_product(self.sum, x, x)  # float32 products per batch, float64 running sum
            self.count += x.shape[0]
            return
        w = weight.reshape(x.shape[0], -1).float() if weight.numel() == x.shape[0] * self.groups else None
        if w is None or w.shape[1] != self.groups:
            raise ValueError(f"{weight.numel()} token weights for {x.shape[0]} tokens and {self.groups} group(s)")
        if self.groups == 1:
            add_product(self.sum, x, x * w)
            self.count += float(w.double().sum())
            return
        for k in range(self.groups):
            add_product(self.sum[k], x, x * w[:, k : k + 1])
        self.count += w.double().sum(0)

    def hessian(self) -> torch.Tensor:
        """[in, in], or [groups, in, in], in float32: 2 sum / count formed in float64 a few rows at
        a time (the float64 temporaries of the whole matrix would be twice its float32 size)."""
        if self.groups == 1:
            if self.count == 0:
                raise RuntimeError("no calibration inputs reached this layer")
            count: float | torch.Tensor = float(self.count)
        else:
            if bool((self.count == 0).any()):
                raise RuntimeError("no calibration inputs (or no loss gradient) reached a group of this layer")
            count = self.count[:, None, None]
        h = torch.empty(self.sum.shape, dtype=torch.float32)
        step = _row_step(self.sum.shape[-1])
        for i in range(0, self.sum.shape[-2], step):
            h[..., i : i + step, :] = 2.0 * self.sum[..., i : i + step, :] / count
        return h
