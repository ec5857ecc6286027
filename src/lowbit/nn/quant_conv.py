"""QuantConv2d: a 2-D convolution whose weight is stored quantized on any scalar grid.

The weight [out, in/groups, kh, kw] is stored as the matrix [out, in/groups * kh * kw]: each output
channel a row, its inputs in (channel, kernel row, kernel column) order, which is the order of
`F.unfold`'s patches. So groups run along the patch axis, GPTQ's Hessian is that of the unfolded
inputs, and a depthwise conv (groups = in = out) is a row of kh * kw weights per channel. Codes and
grid parameters are stored exactly as QuantLinear stores them; the entry adds the conv's geometry,
and with static activation quantization (`nn.static_act`) the inputs' scale and zero point.

`StaticActLinear` is the linear layer with the same static input quantization (a CNN's classifier).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..formats import Grid, GroupLayout
from ..qtensor import QuantizedWeight
from .base import TensorSpec, register_kind
from .quant_linear import QuantLinear
from .static_act import fake_quantize, spec_bits

CONV_KEYS = ("in_channels", "kernel_size", "stride", "padding", "dilation", "groups")


def conv_geometry(conv: torch.nn.Conv2d) -> dict[str, Any]:
    """The JSON-able geometry of a Conv2d (padding as numbers; string padding modes are refused)."""
    if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        raise ValueError(f"conv padding {conv.padding!r} / mode {conv.padding_mode!r} is not supported; zero padding by numbers only")
    return {"in_channels": conv.in_channels, "kernel_size": list(conv.kernel_size), "stride": list(conv.stride),
            "padding": list(conv.padding), "dilation": list(conv.dilation), "groups": conv.groups}


class _StaticActMixin:
    """Optional static per-tensor input quantization: buffers `act_scale`, `act_zero` ([1] float32)."""

    act: dict[str, Any] | None

    def _init_act(self, act: dict[str, Any] | None) -> None:
        self.act = None if act is None else dict(act)
        self.act_bits = None if act is None else spec_bits(act)
        if act is not None:
            self.register_buffer("act_scale", torch.ones(1))
            self.register_buffer("act_zero", torch.zeros(1))

    def set_act_range(self, scale: float, zero: float) -> None:
        self.act_scale.fill_(scale)
        self.act_zero.fill_(zero)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.act is None:
            return x
        return fake_quantize(x, self.act_scale.to(x.dtype), self.act_zero.to(x.dtype), self.act_bits)

    @staticmethod
    def act_specs(entry: dict[str, Any]) -> dict[str, TensorSpec]:
        if entry.get("act") is None:
            return {}
        spec_bits(entry["act"])
        return {"act_scale": ((1,), torch.float32), "act_zero": ((1,), torch.float32)}

    def act_bytes(self) -> dict[str, int]:
        return {} if self.act is None else {"act_scale": 4, "act_zero": 4}


@register_kind
class QuantConv2d(_StaticActMixin, QuantLinear):
    kind = "conv2d"

    def __init__(self, grid: Grid, layout: GroupLayout, bias: bool, conv: dict[str, Any], act: dict[str, Any] | None = None) -> None:
        super().__init__(grid, layout, bias)
        self.conv = {k: conv[k] for k in CONV_KEYS}
        kh, kw = self.conv["kernel_size"]
        if self.conv["in_channels"] % self.conv["groups"] or layout.in_features != self.conv["in_channels"] // self.conv["groups"] * kh * kw:
            raise ValueError(f"a {layout.in_features}-wide row does not fit conv {self.conv}")
        self._init_act(act)

    @classmethod
    def from_quantized_conv(cls, qw: QuantizedWeight, bias: torch.Tensor | None, conv: dict[str, Any],
                            act: dict[str, Any] | None = None) -> "QuantConv2d":
        layer = cls(qw.grid, qw.layout, bias is not None, conv, act)
        layer._store(qw, bias)
        return layer

    def _store(self, qw: QuantizedWeight, bias: torch.Tensor | None) -> None:
        from .base import store_weight

        store_weight(self, "", qw)
        self._copy_bias(bias)

    def entry(self) -> dict[str, Any]:
        return {**super().entry(), "kind": self.kind, "conv": dict(self.conv), **({"act": dict(self.act)} if self.act else {})}

    @classmethod
    def from_entry(cls, entry: dict[str, Any]) -> "QuantConv2d":
        return cls(*cls._grid_layout(entry), entry["bias"], entry["conv"], entry.get("act"))

    @classmethod
    def state_specs(cls, entry: dict[str, Any]) -> dict[str, TensorSpec]:
        return {**super().state_specs(entry), **cls.act_specs(entry)}

    def storage_bytes(self) -> dict[str, int]:
        return {**super().storage_bytes(), **self.act_bytes()}

    def weight_4d(self) -> torch.Tensor:
        """[out, in/groups, kh, kw] float32."""
        kh, kw = self.conv["kernel_size"]
        return self.dequantize().reshape(self.out_features, -1, kh, kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [batch, in, H, W] -> [batch, out, H', W']."""
        c = self.conv
        return F.conv2d(self.quantize_input(x), self.weight_4d().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype),
                        tuple(c["stride"]), tuple(c["padding"]), tuple(c["dilation"]), c["groups"])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, conv={self.conv}" + (f", act={self.act['format']} per tensor (static)" if self.act else "")


@register_kind
class StaticActLinear(_StaticActMixin, QuantLinear):
    """A QuantLinear whose inputs are quantized with a calibrated static per-tensor range."""

    kind = "static-act-linear"

    def __init__(self, grid: Grid, layout: GroupLayout, bias: bool, act: dict[str, Any]) -> None:
        super().__init__(grid, layout, bias)
        self._init_act(act)

    @classmethod
    def from_quantized_act(cls, qw: QuantizedWeight, bias: torch.Tensor | None, act: dict[str, Any]) -> "StaticActLinear":
        from .base import store_weight

        layer = cls(qw.grid, qw.layout, bias is not None, act)
        store_weight(layer, "", qw)
        layer._copy_bias(bias)
        return layer

    def entry(self) -> dict[str, Any]:
        return {**super().entry(), "kind": self.kind, "act": dict(self.act)}

    @classmethod
    def from_entry(cls, entry: dict[str, Any]) -> "StaticActLinear":
        return cls(*cls._grid_layout(entry), entry["bias"], entry["act"])

    @classmethod
    def state_specs(cls, entry: dict[str, Any]) -> dict[str, TensorSpec]:
        return {**super().state_specs(entry), **cls.act_specs(entry)}

    def storage_bytes(self) -> dict[str, int]:
        return {**super().storage_bytes(), **self.act_bytes()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.quantize_input(x))
