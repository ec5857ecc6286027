"""A KV cache stored in 2-8-bit integers (Liu et al., 2024, "KIVI: A Tuning-Free Asymmetric 2bit
Quantization for KV Cache").

Keys have a few outlier channels that stay large across tokens; values do not. So keys are
quantized per channel, each channel's run of R tokens a group, and values per token, each token's
run of G channels a group. Both use an asymmetric grid (w ~ scale * q + min, fp16 scale and min:
lowbit's `int{b}_min`). The newest tokens (fewer than R) stay in full precision in a residual
window. When the window fills, its R tokens are quantized as one chunk and appended. Chunks are
never quantized again; transformers' QuantizedCache, by contrast, re-quantizes the whole cache at
every flush. Attention always sees the current step's own keys and values at full precision, as
in the paper.

Stored per value: b bits, plus 32 bits of scale and min per group. That is b + 32/R bits for
keys and b + 32/G for values (`kivi_bits_per_value`), and the residual window at 16 bits. This
implementation keeps each chunk's codes and parameters, and also a dequantized copy that
attention reads. It measures what the quantization does to the model, not the memory a packed
kernel would save.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from ..formats.int import IntMinGrid


def kivi_bits_per_value(bits: int, residual: int, group: int) -> dict[str, float]:
    """Stored bits per cached value, scale and min counted (the residual window aside)."""
    return {"keys": bits + 32 / residual, "values": bits + 32 / group, "mean": bits + 16 / residual + 16 / group}


class KIVILayer(DynamicLayer):
    """One attention layer's cache. `self.keys` / `self.values` hold the residual window
    [batch, heads, < R, head_dim]; `chunks` the quantized ones (codes and parameters)."""

    is_croppable = False

    def __init__(self, bits: int = 2, residual: int = 128, group: int = 32) -> None:
        super().__init__()
        self.grid = IntMinGrid(bits)
        self.residual = residual
        self.group = group
        self.chunks: list[dict] = []
        self.length = 0
        self._past_k: torch.Tensor | None = None  # the chunks dequantized, [batch, heads, n * R, head_dim]
        self._past_v: torch.Tensor | None = None

    def _round_trip(self, rows: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """rows: [n, group] -> (dequantized rows, what is stored)."""
        params = self.grid.fit(rows)
        codes = self.grid.encode(rows, params)
        return self.grid.decode(codes, params), {"codes": codes, **{k: v.half() for k, v in params.items()}}

    def _quantize_chunk(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v: [batch, heads, R, head_dim] -> their dequantized values; the chunk is stored."""
        b, h, r, d = k.shape
        if d % self.group:
            raise ValueError(f"value groups of {self.group} channels do not tile head_dim {d}; pick a divisor")
        k_rows = k.float().permute(0, 1, 3, 2).reshape(-1, r)  # a channel's R tokens per row
        k_hat, k_store = self._round_trip(k_rows)
        v_hat, v_store = self._round_trip(v.float().reshape(-1, self.group))  # G channels of a token per row
        self.chunks.append({"keys": k_store, "values": v_store})
        k_hat = k_hat.reshape(b, h, d, r).permute(0, 1, 3, 2).to(k.dtype)
        return k_hat, v_hat.reshape(b, h, r, d).to(v.dtype)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.length += key_states.shape[-2]
        window_k = torch.cat([self.keys, key_states], dim=-2) if self.keys.numel() else key_states
        window_v = torch.cat([self.values, value_states], dim=-2) if self.values.numel() else value_states
        seen_k = window_k if self._past_k is None else torch.cat([self._past_k, window_k], dim=-2)
        seen_v = window_v if self._past_v is None else torch.cat([self._past_v, window_v], dim=-2)
        full = (window_k.shape[-2] // self.residual) * self.residual
        for start in range(0, full, self.residual):  # the filled chunks leave the window, quantized
            k_hat, v_hat = self._quantize_chunk(window_k[..., start:start + self.residual, :],
                                                window_v[..., start:start + self.residual, :])
            self._past_k = k_hat if self._past_k is None else torch.cat([self._past_k, k_hat], dim=-2)
            self._past_v = v_hat if self._past_v is None else torch.cat([self._past_v, v_hat], dim=-2)
        self.keys, self.values = window_k[..., full:, :], window_v[..., full:, :]
        return seen_k, seen_v

    def get_seq_length(self) -> int:
        return self.length

    def reset(self) -> None:
        super().reset()
        self.chunks, self.length, self._past_k, self._past_v = [], 0, None, None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: every stored and dequantized state reordered along the batch (each chunk's
        rows start with the batch dimension)."""
        if not self.is_initialized:
            return
        super().reorder_cache(beam_idx)
        b = self._past_k.shape[0] if self._past_k is not None else None
        if b is None:
            return
        self._past_k, self._past_v = self._past_k.index_select(0, beam_idx), self._past_v.index_select(0, beam_idx)
        for chunk in self.chunks:
            for part in chunk.values():
                for key, t in part.items():
                    part[key] = t.reshape(b, -1, t.shape[-1]).index_select(0, beam_idx).reshape(t.shape)


class KIVICache(Cache):
    """A cache of KIVILayers, one per decoder layer, for `model(..., cache=cache)` and
    `generate(cache=cache)`."""

    def __init__(self, num_layers: int, bits: int = 2, residual: int = 128, group: int = 32) -> None:
        super().__init__(layers=[KIVILayer(bits, residual, group) for _ in range(num_layers)])
        self.bits, self.residual, self.group = bits, residual, group

    def bits_per_value(self) -> dict[str, float]:
        return kivi_bits_per_value(self.bits, self.residual, self.group)
