"""Write a lowbit artifact as a compressed-tensors checkpoint: plain transformers (with the
`compressed-tensors` package) and vLLM load it, no lowbit needed.

Per quantized linear (layouts of compressed-tensors' pack_quantized, nvfp4 and mxfp4 compressors):

    integer grids -> `pack-quantized` (int2..int8 sym/asym; ternary and binary as int2 sym)
    weight_packed      int32 [out, ceil(in*b/32)]   lowbit's unsigned codes u, dense LSB first along
                                                     `in`; u stands for the signed value u - 2^(b-1)
    weight_scale       float32 [out, G]             lowbit's fp16 scales, widened (the decoder works
                                                     in the scale's dtype: exact in fp32, not in fp16)
    weight_zero_point  int32 [ceil(out*b/32), G]    asymmetric only: lowbit's zero, packed along `out`
    weight_shape       int64 [2]                    [out, in]
    decoded as scale * ((u - 2^(b-1)) - (zero - 2^(b-1))) = lowbit's scale * (u - zero), bit for bit.

    nvfp4 -> `nvfp4-pack-quantized`: weight_packed uint8 [out, in/2] (two E2M1 nibbles, low first:
    lowbit's sign-magnitude codes are the OCP nibbles), weight_scale float8_e4m3fn [out, in/16]
    (lowbit's E4M3 code, the same bits), weight_global_scale fp32 [1] = 2^-tensor_scale_exp;
    decoded as fp4 * (scale / global_scale) = lowbit's E2M1 * E4M3 * 2^tensor_scale_exp.
    mxfp4 -> `mxfp4-pack-quantized`: weight_packed as nvfp4, weight_scale uint8 [out, in/32]
    (lowbit's E8M0 code); decoded as fp4 * 2^(code - 127).

Groups the format cannot state are rewritten exactly: a shorter last group (96 columns in groups of
64) and per-channel or per-tensor layers beside grouped ones with the same bit width are written at
G = gcd(group sizes, widths), each lowbit scale (and zero) repeated over the G-groups it covers.

transformers 5.24's loader (compressed-tensors 0.19 and 0.20.1, measured; see the table in
tests/test_export_ct.py) and what this writer does about it:
* asymmetric zero points fail to load in the default compressed mode (the model it builds expects
  an unpacked [out, G] zero, the checkpoint holds the packed one), and nvfp4/mxfp4 decompress to
  bfloat16 there, which a float32 model cannot multiply. Both load exactly when dequantized at
  load time, so such an export carries `"dequantize": true` in its quantization_config: a plain
  `from_pretrained(dir)` (or `run_compressed=False`) is exact; forcing the compressed mode fails.
* dequantizing at load decodes every layer with the first config group's scheme, silently wrong
  when there are several. Several groups (several bit widths) are therefore written only when
  every group is symmetric int, which loads exactly in the default compressed mode; such an
  export must not be loaded with `run_compressed=False` / `dequantize=True`. Several groups of
  which one is asymmetric or fp4 would fail in the one mode and decode wrongly in the other, so
  they are refused.
Refused as well, naming the grid, why and what to quantize with: grids with no integer or fp4
form (nf4, lut, fp*_e*m* with fp16 scales, power, log, nested8), PTQ1.61 modules, fp4 layers
whose width is not a whole number of blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..formats import LogGrid, MinifloatGrid, MXFP4Grid, NestedIntGrid, NVFP4Grid
from ..formats.lookup import TableGrid
from ..qtensor import QuantizedWeight
from ._common import (
    IntegerView, check_export_target, copy_side_files, dense_state, integer_view, linear_module_names, pack_int32,
    read_artifact, regroup, unwrap, write_config, write_output,
)
from .errors import ExportError

__all__ = ["ExportError", "write_compressed_tensors", "plan_groups", "quantization_config"]

#: what this writer maps, for refusal messages
MAPPABLE = ("int2..int8 symmetric or asymmetric (--format intN, --sym/--asym), ternary/binary (as int2), "
            "nvfp4, mxfp4")
FORMATS = {"int": "pack-quantized", "nvfp4": "nvfp4-pack-quantized", "mxfp4": "mxfp4-pack-quantized"}
FP4_BLOCK = {"nvfp4": 16, "mxfp4": 32}


@dataclass
class ConfigGroup:
    """One compressed-tensors config group: the modules that share a weight scheme."""

    kind: str  # "int", "nvfp4" or "mxfp4"
    bits: int
    members: dict[str, Any] = field(default_factory=dict)  # name -> IntegerView (int) or QuantizedWeight (fp4)
    symmetric: bool = True
    group_size: int | None = None  # int groups: None = per channel

    @property
    def format(self) -> str:
        return FORMATS[self.kind]

    @property
    def needs_dequantize(self) -> bool:
        """Loads exactly in transformers 5.24 only when dequantized at load (see the module docstring)."""
        return self.kind != "int" or not self.symmetric

    def describe(self) -> str:
        if self.kind != "int":
            return self.kind
        return f"int{self.bits} {'sym' if self.symmetric else 'asym'} " + (f"g{self.group_size}" if self.group_size else "channel")

    def weights(self) -> dict[str, Any]:
        """The group's `weights` QuantizationArgs, as compressed-tensors' own presets write them."""
        if self.kind == "nvfp4":  # the NVFP4A16 preset
            return _args(4, "float", True, "tensor_group", 16, scale_dtype="torch.float8_e4m3fn")
        if self.kind == "mxfp4":  # the MXFP4A16 preset
            return _args(4, "float", True, "group", 32, scale_dtype="torch.uint8")
        return _args(self.bits, "int", self.symmetric, "group" if self.group_size else "channel", self.group_size,
                     zp_dtype=None if self.symmetric else "torch.int8")


def _args(bits: int, kind: str, symmetric: bool, strategy: str, group_size: int | None,
          scale_dtype: str | None = None, zp_dtype: str | None = None) -> dict[str, Any]:
    return {"num_bits": bits, "type": kind, "symmetric": symmetric, "strategy": strategy, "group_size": group_size,
            "block_structure": None, "dynamic": False, "actorder": None, "scale_dtype": scale_dtype, "zp_dtype": zp_dtype,
            "observer": None, "observer_kwargs": {}}


def _no_layout(name: str, qw: QuantizedWeight) -> ExportError:
    grid = unwrap(qw.grid)
    if isinstance(grid, MinifloatGrid):
        why = (f"{grid.name} has an fp16 scale per group, and compressed-tensors' 4-bit float formats store E4M3 scales "
               "per 16 (nvfp4) or power-of-two E8M0 scales per 32 (mxfp4) only")
        instead = "--format nvfp4 or --format mxfp4"
    elif isinstance(grid, NestedIntGrid):
        why = f"{grid.name} decodes to half-integer levels, which no b-bit scale * (q - zero) holds"
        instead = "--format int8 (or int2..int7)"
    elif isinstance(grid, (TableGrid, LogGrid)):
        why = f"{grid.name} has non-uniform levels, and compressed-tensors decodes uniform integer grids and E2M1 only"
        instead = "--format int4 (uniform levels), nvfp4 or mxfp4"
    else:
        why = f"{grid.name} has neither an integer form scale * (q - zero) nor an E2M1 block form"
        instead = "--format int4, nvfp4 or mxfp4"
    return ExportError(f"module {name}: grid {qw.grid.spec()} has no compressed-tensors layout: {why}; "
                       f"quantize with {instead} (what maps: {MAPPABLE})")


def _classify(name: str, qw: QuantizedWeight) -> tuple[str, int, Any]:
    """(kind, bits, member) of a module that maps exactly, else an ExportError saying why."""
    grid = unwrap(qw.grid)
    for kind, cls in (("nvfp4", NVFP4Grid), ("mxfp4", MXFP4Grid)):
        if isinstance(grid, cls):
            block, n_in = FP4_BLOCK[kind], qw.layout.in_features
            if n_in % block or qw.layout.group_size != block:
                raise ExportError(
                    f"module {name}: grid {kind} on a width of {n_in}, not a whole number of {block}-blocks; "
                    f"{FORMATS[kind]} has no shorter last block. Keep the layer unquantized (--ignore) or quantize it "
                    "with an int grid (--format int4)"
                )
            return kind, 4, qw
    try:
        view = integer_view(name, qw)
    except ExportError:
        raise _no_layout(name, qw) from None
    return "int", view.bits, view


def plan_groups(weights: dict[str, QuantizedWeight]) -> list[ConfigGroup]:
    """The config groups for `weights` (one per format and bit width), with every int layer
    regrouped onto its group's common group size; ExportError for what would not load exactly."""
    if not weights:
        raise ExportError("the artifact has no quantized layers: there is nothing to write in compressed-tensors' layout")
    groups: dict[tuple[str, int], ConfigGroup] = {}
    for name in sorted(weights):
        kind, bits, member = _classify(name, weights[name])
        groups.setdefault((kind, bits), ConfigGroup(kind, bits)).members[name] = member
    for g in groups.values():
        if g.kind != "int":
            continue
        views: list[IntegerView] = list(g.members.values())
        g.symmetric = all(v.symmetric for v in views)
        grouped = [v.group_size for v in views if v.group_size < v.shape[1]]
        # a common size dividing every group size and every width: exact, and no ragged last group
        g.group_size = math.gcd(*grouped, *(v.shape[1] for v in views)) if grouped else None
        g.members = {n: regroup(v, g.group_size or v.shape[1]) for n, v in g.members.items()}
    out = [groups[k] for k in sorted(groups)]
    if len(out) > 1 and any(g.needs_dequantize for g in out):
        raise ExportError(
            f"this artifact needs {len(out)} compressed-tensors config groups ({', '.join(g.describe() for g in out)}), "
            "and transformers 5.24 loads asymmetric zero points and nvfp4/mxfp4 only when dequantizing at load, a mode "
            "that decodes every layer with the first group's scheme (silently wrong). Quantize every layer with one "
            "format and bit width, or use symmetric int grids (--sym), whose groups load exactly"
        )
    return out


def _int_tensors(view: IntegerView, symmetric: bool) -> dict[str, torch.Tensor]:
    t = {
        "weight_packed": pack_int32(view.u, view.bits),  # [out, ceil(in*b/32)]
        "weight_scale": view.scale.float().contiguous(),  # [out, G]
        "weight_shape": torch.tensor(list(view.shape), dtype=torch.int64),
    }
    if not symmetric:  # the group's symmetric members write their implicit zero 2^(b-1)
        t["weight_zero_point"] = pack_int32(view.zero.T, view.bits).T.contiguous()  # [ceil(out*b/32), G]
    return t


def _fp4_tensors(name: str, kind: str, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    c = qw.codes.to(torch.uint8)
    t = {"weight_packed": (c[:, 0::2] | (c[:, 1::2] << 4)).contiguous()}  # element 2j in the low nibble
    if kind == "nvfp4":
        code = qw.params["scale"].round().to(torch.uint8)  # [out, in/16] E4M3 bit patterns
        if int(code.max()) > 126:  # 0x7F is E4M3's NaN; lowbit's decode clamps it, the format would not
            raise ExportError(f"module {name}: an nvfp4 scale code above 126 (E4M3 NaN); the artifact is not one lowbit writes")
        t["weight_scale"] = code.view(torch.float8_e4m3fn).contiguous()
        t["weight_global_scale"] = torch.tensor([2.0 ** -unwrap(qw.grid).tensor_scale_exp], dtype=torch.float32)
    else:
        code = qw.params["scale_exp"].round().to(torch.uint8)  # [out, in/32] E8M0 exponents
        if int(code.max()) > 254:  # 0xFF is E8M0's NaN
            raise ExportError(f"module {name}: an mxfp4 scale code of 255 (E8M0 NaN); the artifact is not one lowbit writes")
        t["weight_scale"] = code.contiguous()
    return t


def quantization_config(groups: list[ConfigGroup], ignore: list[str]) -> dict[str, Any]:
    """config.json's `quantization_config` for `groups`; `ignore`: the unquantized Linears."""
    single = len(groups) == 1
    config_groups = {
        f"group_{i}": {
            "targets": ["Linear"] if single else [f"re:^{n.replace('.', '[.]')}$" for n in sorted(g.members)],
            "weights": g.weights(), "input_activations": None, "output_activations": None, "format": g.format,
        }
        for i, g in enumerate(groups)
    }
    qc: dict[str, Any] = {
        "quant_method": "compressed-tensors", "format": groups[0].format if single else "mixed-precision",
        "quantization_status": "compressed", "config_groups": config_groups, "ignore": ignore,
        "kv_cache_scheme": None, "sparsity_config": {}, "global_compression_ratio": None,
    }
    if any(g.needs_dequantize for g in groups):
        qc["dequantize"] = True  # read by transformers' CompressedTensorsConfig: decode at load time (exact)
    return qc


def write_compressed_tensors(artifact: Path, out: Path, *, force: bool = False, **_: Any) -> Path:
    """Write `artifact` as a compressed-tensors checkpoint directory `out` (model.safetensors,
    config.json with a quantization_config, tokenizer files); returns `out`."""
    out = Path(out)
    check_export_target(out, force)  # before the artifact is read
    art = read_artifact(artifact)
    groups = plan_groups(art.weights)
    linears = linear_module_names(art)
    strays = sorted(set(art.weights) - set(linears))
    if strays:
        raise ExportError(f"modules {strays[:3]} are not torch.nn.Linear in the model; compressed-tensors targets Linear layers")
    qc = quantization_config(groups, sorted(n for n in linears if n not in art.weights))

    def fill(tmp: Path) -> None:
        state = dense_state(art)
        for g in groups:
            for name, member in g.members.items():
                tensors = _int_tensors(member, g.symmetric) if g.kind == "int" else _fp4_tensors(name, g.kind, member)
                state.update({f"{name}.{k}": v for k, v in tensors.items()})
                if name in art.biases:
                    state[f"{name}.bias"] = art.biases[name].to(art.dtype)
        save_file(dict(sorted(state.items())), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        write_config(art, tmp, qc)
        copy_side_files(art, tmp)

    return write_output(out, force, fill, what=f"compressed-tensors {qc['format']}")
