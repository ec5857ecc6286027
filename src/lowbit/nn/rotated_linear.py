"""RotatedQuantLinear: a QuantLinear whose stored weight is W' = W T^T for a randomized Hadamard
rotation T of its inputs (`lowbit.rotate`); forward rotates the activations, then runs the
QuantLinear path on them: y = Q(W') (T x) + b. `dequantize()` gives the stored W' (the rotated
basis); `original_weight()` gives W' T, the layer's weight in the model's basis.

Stored: the QuantLinear tensors and the +-1 signs of T as one bit each (`signs`, counted in the
layer's size); the block is in the entry. No external format holds a rotated layer, so exports
refuse it."""

from __future__ import annotations

from typing import Any

import torch

from ..formats import Grid, GroupLayout
from ..pack import pack_codes, unpack_codes
from ..qtensor import QuantizedWeight
from ..rotate import HadamardRotation, hadamard_block
from .base import TensorSpec, register_kind, store_weight
from .quant_linear import QuantLinear


@register_kind
class RotatedQuantLinear(QuantLinear):
    kind = "rotated-linear"

    def __init__(self, grid: Grid, layout: GroupLayout, bias: bool, block: int) -> None:
        super().__init__(grid, layout, bias)
        if block != hadamard_block(layout.in_features):
            raise ValueError(f"rotation block {block} is not the Hadamard block of width {layout.in_features}")
        self.block = block
        self.register_buffer("signs", torch.zeros(-(-layout.in_features // 8), dtype=torch.uint8))
        self._rotation: HadamardRotation | None = None

    @classmethod
    def from_rotated(cls, qw: QuantizedWeight, bias: torch.Tensor | None, rotation: HadamardRotation) -> "RotatedQuantLinear":
        """A layer from the quantized rotated weight `qw` (of W T^T) and the rotation T."""
        layer = cls(qw.grid, qw.layout, bias is not None, rotation.block)
        store_weight(layer, "", qw)
        layer._copy_bias(bias)
        layer.signs.copy_(pack_codes((rotation.signs > 0).to(torch.uint8), 1))
        return layer

    @property
    def rotation(self) -> HadamardRotation:
        if self._rotation is None:
            bits = unpack_codes(self.signs, 1, self.in_features)
            self._rotation = HadamardRotation(bits.float() * 2 - 1, self.block)
        return self._rotation

    def entry(self) -> dict[str, Any]:
        return {**super().entry(), "kind": self.kind, "rotation": {"kind": "hadamard", "block": self.block}}

    @classmethod
    def from_entry(cls, entry: dict[str, Any]) -> "RotatedQuantLinear":
        rot = entry.get("rotation") or {}
        if rot.get("kind") != "hadamard" or not isinstance(rot.get("block"), int):
            raise ValueError(f"rotation {rot!r} is not a Hadamard rotation with an integer block")
        return cls(*cls._grid_layout(entry), entry["bias"], rot["block"])

    @classmethod
    def state_specs(cls, entry: dict[str, Any]) -> dict[str, TensorSpec]:
        in_features = entry["shape"][1]
        return {**super().state_specs(entry), "signs": ((-(-in_features // 8),), torch.uint8)}

    def storage_bytes(self) -> dict[str, int]:
        return {**super().storage_bytes(), "signs": -(-self.in_features // 8)}

    def _load_from_state_dict(self, *args, **kwargs):
        self._rotation = None  # new signs
        super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.rotation.apply(x))

    def original_weight(self) -> torch.Tensor:
        """[out, in] float32: W = W' T, the layer's weight in the model's basis."""
        return self.rotation.invert(self.dequantize())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rotation=hadamard/{self.block}"
