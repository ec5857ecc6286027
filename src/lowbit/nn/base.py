"""What every runtime module that holds a quantized weight shares, and how an artifact finds the
right module class for a stored module: its `kind` (QuantLinear: "linear", PTQ161Linear: "ptq161").

A module's `entry()` is the JSON-able description that the artifact header stores; the class
registered for `entry["kind"]` rebuilds an empty module of the same shape from it
(`module_from_entry`), and the stored tensors fill its state dict. Entries without a kind
(artifacts written before kinds existed) are "linear".

Also here: the buffers that hold one `QuantizedWeight` (packed codes and packed/fp16 grid
parameters), under a name prefix, so that modules holding several (PTQ1.61) reuse them.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..formats import Grid, GroupLayout
from ..pack import pack_codes, unpack_codes
from ..qtensor import QuantizedWeight


class QuantModule(nn.Module):
    """A linear layer whose weight is stored quantized and dequantized in forward."""

    kind: ClassVar[str]
    in_features: int
    out_features: int
    bias: nn.Parameter | None

    def __init__(self) -> None:
        super().__init__()
        self.cache_weight = False  # keep the dequantized weight between calls (faster, more memory)
        self._cached: torch.Tensor | None = None

    # to implement
    def _dequantize(self) -> torch.Tensor:
        raise NotImplementedError

    def entry(self) -> dict[str, Any]:
        """JSON-able description from which `from_entry` rebuilds an empty module like this one."""
        raise NotImplementedError

    @classmethod
    def from_entry(cls, entry: dict[str, Any]) -> "QuantModule":
        raise NotImplementedError

    @classmethod
    def state_specs(cls, entry: dict[str, Any]) -> dict[str, "TensorSpec"]:
        """Shape and dtype of every tensor of the state dict that `from_entry(entry)` would hold,
        computed without allocating (checked against the stored tensors before loading)."""
        raise NotImplementedError

    def storage_bytes(self) -> dict[str, int]:
        """Exact bytes of every stored tensor of the weight (bias excluded)."""
        raise NotImplementedError

    # shared
    def set_precision(self, bits: int) -> bool:
        """Decode at another precision if the weight's format allows it (nested grids); False if not."""
        return False

    def _load_from_state_dict(self, *args, **kwargs):
        self._cached = None  # new codes: forget the dequantized copy
        super()._load_from_state_dict(*args, **kwargs)

    def dequantize(self) -> torch.Tensor:
        """[out, in] float32 weight."""
        if self._cached is not None:
            return self._cached
        w = self._dequantize()
        if self.cache_weight:
            self._cached = w
        return w

    def bits_per_weight(self) -> float:
        return 8 * sum(self.storage_bytes().values()) / (self.in_features * self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantize().to(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def _init_bias(self, bias: bool) -> None:
        self.bias = nn.Parameter(torch.zeros(self.out_features), requires_grad=False) if bias else None

    def _copy_bias(self, bias: torch.Tensor | None) -> None:
        if bias is not None:
            self.bias.data.copy_(bias.detach().float())


MODULE_KINDS: dict[str, type[QuantModule]] = {}


def entry_format(entry: dict[str, Any], expected: type, what: str):
    """The format an artifact entry names, refused unless it is an `expected` one (`what` names it)."""
    from ..formats.registry import get_format

    fmt = get_format(entry["grid"]["format"])
    if not isinstance(fmt, expected):
        raise ValueError(f"{entry['grid']['format']!r} is not a {what} format")
    return fmt


def register_kind(cls: type[QuantModule]) -> type[QuantModule]:
    MODULE_KINDS[cls.kind] = cls
    return cls


def module_class(entry: dict[str, Any]) -> type[QuantModule]:
    """The runtime class registered for an artifact header entry's kind."""
    kind = entry.get("kind", "linear")
    if kind not in MODULE_KINDS:
        raise ValueError(f"unknown quantized module kind {kind!r} (known: {', '.join(MODULE_KINDS)})")
    return MODULE_KINDS[kind]


def module_from_entry(entry: dict[str, Any]) -> QuantModule:
    """An empty module of the kind and shape that an artifact header entry describes."""
    return module_class(entry).from_entry(entry)


# buffers of one QuantizedWeight, names prefixed
TensorSpec = tuple[tuple[int, ...], torch.dtype]  # (shape, dtype) of one stored tensor


def weight_buffer_specs(prefix: str, grid: Grid, layout: GroupLayout) -> dict[str, TensorSpec]:
    """Shape and dtype of every buffer that holds one QuantizedWeight: computed, not allocated, so
    that an artifact's claimed shapes can be compared with its stored tensors before anything is built."""
    n = layout.out_features * layout.in_features
    sets = layout.n_param_sets
    specs: dict[str, TensorSpec] = {f"{prefix}codes": ((grid.packed_nbytes(n),), torch.uint8)}
    for f in grid.param_fields:
        n = sets // f.shared  # a shared field: one value per `shared` groups (layouts check the span)
        if f.kind == "float16":
            specs[f"{prefix}{f.name}"] = ((n,), torch.float16)
        else:
            specs[f"{prefix}{f.name}"] = ((-(-n * f.bits // 8),), torch.uint8)
    return specs


def bias_spec(out_features: int, bias: bool) -> dict[str, TensorSpec]:
    return {"bias": ((out_features,), torch.float32)} if bias else {}


def register_buffers(module: nn.Module, specs: dict[str, TensorSpec]) -> None:
    """Zero buffers of the given shapes (the bias, if any, is a frozen parameter: `_init_bias`)."""
    for name, (shape, dtype) in specs.items():
        if name != "bias":
            module.register_buffer(name, torch.zeros(shape, dtype=dtype))


def register_weight_buffers(module: nn.Module, prefix: str, grid: Grid, layout: GroupLayout) -> None:
    register_buffers(module, weight_buffer_specs(prefix, grid, layout))


def store_weight(module: nn.Module, prefix: str, qw: QuantizedWeight) -> None:
    getattr(module, f"{prefix}codes").copy_(qw.grid.pack(qw.codes))
    for f in qw.grid.param_fields:
        value = stored_values(qw.params[f.name], f.shared)
        if f.kind == "float16":
            getattr(module, f"{prefix}{f.name}").copy_(value.to(torch.float16))
        else:
            getattr(module, f"{prefix}{f.name}").copy_(pack_codes(value.round().to(torch.uint8), f.bits))


def read_weight(module: nn.Module, prefix: str, grid: Grid, layout: GroupLayout) -> QuantizedWeight:
    n = layout.out_features * layout.in_features
    codes = grid.unpack(getattr(module, f"{prefix}codes"), n).reshape(layout.out_features, layout.in_features)
    params = {}
    for f in grid.param_fields:
        stored = getattr(module, f"{prefix}{f.name}")
        n = layout.n_param_sets // f.shared
        value = stored.float() if f.kind == "float16" else unpack_codes(stored, f.bits, n).float()
        params[f.name] = value.reshape(layout.param_rows, -1).repeat_interleave(f.shared, dim=1)
    return QuantizedWeight(codes, params, grid, layout)


def stored_values(param: torch.Tensor, shared: int) -> torch.Tensor:
    """A parameter [param_rows, n_groups] as stored, flat: every group's value, or for a field
    shared by `shared` consecutive groups the first of each run (which must all be equal)."""
    if shared == 1:
        return param.reshape(-1)
    first = param[:, ::shared]
    if not torch.equal(first.repeat_interleave(shared, dim=1), param):
        raise ValueError(f"a parameter shared by {shared} groups differs within a run of them")
    return first.reshape(-1)
