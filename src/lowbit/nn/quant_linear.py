"""QuantLinear: a linear layer that holds its weight as packed codes plus grid parameters and
dequantizes it in forward. Its state dict is exactly what the artifact stores."""

from __future__ import annotations

from typing import Any

import torch

from ..formats import Grid, GroupLayout, grid_from_spec
from ..qtensor import QuantizedWeight, weight_storage_bytes
from .base import QuantModule, TensorSpec, bias_spec, read_weight, register_kind, register_weight_buffers, store_weight, weight_buffer_specs


@register_kind
class QuantLinear(QuantModule):
    kind = "linear"

    def __init__(self, grid: Grid, layout: GroupLayout, bias: bool) -> None:
        super().__init__()
        self.grid = grid
        self.layout = layout
        self.in_features = layout.in_features
        self.out_features = layout.out_features
        register_weight_buffers(self, "", grid, layout)
        self._init_bias(bias)
        self._packed: object = None  # runtime.packed.PackedInt once built, False where the kernels do not apply

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None) -> "QuantLinear":
        layer = cls(qw.grid, qw.layout, bias is not None)
        store_weight(layer, "", qw)
        layer._copy_bias(bias)
        return layer

    def entry(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "grid": self.grid.spec(),
            "bits": self.grid.bits,
            "shape": [self.out_features, self.in_features],
            "group_size": self.layout.group_size,
            "ragged": self.layout.ragged,
            "n_groups_per_row": self.layout.n_groups,
            "bias": self.bias is not None,
        }

    @staticmethod
    def _grid_layout(entry: dict[str, Any]) -> tuple[Grid, GroupLayout]:
        out_f, in_f = entry["shape"]
        return grid_from_spec(entry["grid"]), GroupLayout(out_f, in_f, entry["group_size"], entry.get("ragged", "short-last"))

    @classmethod
    def from_entry(cls, entry: dict[str, Any]) -> "QuantLinear":
        return cls(*cls._grid_layout(entry), entry["bias"])

    @classmethod
    def state_specs(cls, entry: dict[str, Any]) -> dict[str, TensorSpec]:
        grid, layout = cls._grid_layout(entry)
        return {**weight_buffer_specs("", grid, layout), **bias_spec(layout.out_features, entry["bias"])}

    def set_precision(self, bits: int) -> bool:
        grid = self.grid.with_precision(bits)
        if grid is None:
            return False
        self.grid = grid
        self._cached = None
        self._packed = None
        return True

    def _load_from_state_dict(self, *args, **kwargs):
        self._packed = None  # new codes: rebuild the packed view on the next forward
        super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """With integer grids on the CPU, `runtime.packed`'s kernels (no float weight per call);
        anything else, or a forward that needs gradients, dequantizes as the base class does."""
        packed = self._packed_view()
        if packed and x.dtype == torch.float32 and x.device.type == "cpu" and not (torch.is_grad_enabled() and x.requires_grad):
            return packed.linear(x, None if self.bias is None else self.bias.float(), self.dequantize)
        return super().forward(x)

    def _packed_view(self):
        if self._packed is None:
            from ..runtime.packed import PackedInt

            self._packed = PackedInt.from_module(self) or False
        return self._packed

    def quantized_weight(self) -> QuantizedWeight:
        """Unpack the stored tensors into codes and parameters."""
        return read_weight(self, "", self.grid, self.layout)

    def _dequantize(self) -> torch.Tensor:
        packed = self._packed_view()  # the C decode where it applies: the same values, bit for bit
        return packed.dequantize() if packed else self.quantized_weight().dequantize()

    def storage_bytes(self) -> dict[str, int]:
        return weight_storage_bytes(self.grid, self.layout)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"grid={self.grid.spec()}, group_size={self.layout.group_size}, bias={self.bias is not None}"
        )
