"""PTQ161Linear: the runtime module of a PTQ1.61 weight (`qtensor.PTQ161Weight`, `algos.ptq161`).

Buffers (all counted in bits per weight): `mask` (1 bit per input channel, packed),
`salient_codes` and `salient_<param>` (the salient channels' grid, as in QuantLinear),
`signs` (1 bit per binarized weight, packed), `alpha` ([out * n_blocks] fp16), `beta` ([n_binary] fp16).
"""

from __future__ import annotations

from typing import Any

import torch

from ..formats import Grid, GroupLayout, grid_from_spec
from ..pack import pack_codes, packed_nbytes, unpack_codes
from ..qtensor import PTQ161Weight
from .base import QuantModule, TensorSpec, bias_spec, read_weight, register_buffers, register_kind, store_weight, weight_buffer_specs


@register_kind
class PTQ161Linear(QuantModule):
    kind = "ptq161"

    def __init__(self, out_features: int, in_features: int, n_salient: int, salient_grid: Grid,
                 salient_group_size: int, block_size: int, bias: bool, ragged: str = "short-last") -> None:
        super().__init__()
        if not 0 < n_salient < in_features:
            raise ValueError(f"PTQ1.61 needs 1 to {in_features - 1} salient channels, got {n_salient}")
        self.in_features, self.out_features = in_features, out_features
        self.n_salient, self.n_binary = n_salient, in_features - n_salient
        if not 0 < block_size <= self.n_binary:
            raise ValueError(f"binary block size must lie in [1, {self.n_binary}], got {block_size}")
        self.block_size = block_size
        self.n_blocks = -(-self.n_binary // block_size)
        self.salient_grid = salient_grid
        self.salient_layout = GroupLayout(out_features, n_salient, salient_group_size, ragged)
        register_buffers(self, self._specs(out_features, in_features, n_salient, block_size, salient_grid, self.salient_layout, bias))
        self._init_bias(bias)

    @staticmethod
    def _specs(out_f: int, in_f: int, n_salient: int, block_size: int, salient_grid: Grid,
               salient_layout: GroupLayout, bias: bool) -> dict[str, TensorSpec]:
        n_binary = in_f - n_salient
        n_blocks = -(-n_binary // block_size)
        return {
            "mask": ((packed_nbytes(in_f, 1),), torch.uint8),
            **weight_buffer_specs("salient_", salient_grid, salient_layout),
            "signs": ((packed_nbytes(out_f * n_binary, 1),), torch.uint8),
            "alpha": ((out_f * n_blocks,), torch.float16),
            "beta": ((n_binary,), torch.float16),
            **bias_spec(out_f, bias),
        }

    @classmethod
    def state_specs(cls, entry: dict[str, Any]) -> dict[str, TensorSpec]:
        out_f, in_f = entry["shape"]
        n_salient, block_size = entry["n_salient"], entry["block_size"]
        if not 0 < n_salient < in_f or not 0 < block_size <= in_f - n_salient:
            raise ValueError(f"n_salient {n_salient} / block_size {block_size} do not fit an input width of {in_f}")
        grid = grid_from_spec(entry["grid"]["salient"])
        layout = GroupLayout(out_f, n_salient, entry["group_size"], entry.get("ragged", "short-last"))
        return cls._specs(out_f, in_f, n_salient, block_size, grid, layout, entry["bias"])

    @classmethod
    def from_quantized(cls, pw: PTQ161Weight, bias: torch.Tensor | None) -> "PTQ161Linear":
        out_f, in_f = pw.shape
        s = pw.salient
        layer = cls(out_f, in_f, s.layout.in_features, s.grid, s.layout.group_size, pw.block_size, bias is not None, s.layout.ragged)
        layer.mask.copy_(pack_codes(pw.mask.to(torch.uint8), 1))
        store_weight(layer, "salient_", s)
        layer.signs.copy_(pack_codes(pw.signs, 1))
        layer.alpha.copy_(pw.alpha.reshape(-1).to(torch.float16))
        layer.beta.copy_(pw.beta.to(torch.float16))
        layer._copy_bias(bias)
        return layer

    def entry(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "grid": {"format": "ptq161", "salient": self.salient_grid.spec()},
            "shape": [self.out_features, self.in_features],
            "n_salient": self.n_salient,
            "block_size": self.block_size,
            "group_size": self.salient_layout.group_size,
            "ragged": self.salient_layout.ragged,
            "bias": self.bias is not None,
        }

    @classmethod
    def from_entry(cls, entry: dict[str, Any]) -> "PTQ161Linear":
        out_f, in_f = entry["shape"]
        return cls(out_f, in_f, entry["n_salient"], grid_from_spec(entry["grid"]["salient"]), entry["group_size"],
                   entry["block_size"], entry["bias"], entry.get("ragged", "short-last"))

    def weight(self) -> PTQ161Weight:
        """Unpack the stored tensors."""
        mask = unpack_codes(self.mask, 1, self.in_features).bool()
        if int(mask.sum()) != self.n_salient:
            raise ValueError(f"the stored mask marks {int(mask.sum())} salient channels, the module expects {self.n_salient}")
        signs = unpack_codes(self.signs, 1, self.out_features * self.n_binary).reshape(self.out_features, self.n_binary)
        return PTQ161Weight(
            mask=mask,
            salient=read_weight(self, "salient_", self.salient_grid, self.salient_layout),
            signs=signs,
            alpha=self.alpha.float().reshape(self.out_features, self.n_blocks),
            beta=self.beta.float(),
            block_size=self.block_size,
        )

    def _dequantize(self) -> torch.Tensor:
        return self.weight().dequantize()

    def storage_bytes(self) -> dict[str, int]:
        return {name: buf.numel() * buf.element_size() for name, buf in self.named_buffers() if name != "bias"}

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, salient={self.n_salient} "
            f"on {self.salient_grid.spec()}, binary block={self.block_size}, bias={self.bias is not None}"
        )
