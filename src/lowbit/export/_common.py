"""Shared pieces of the compressed-tensors and HF GPTQ exporters: reading an artifact without
building the model, the integer view of a lowbit weight (w = scale * (u - zero) with unsigned
codes u), regrouping parameters onto a finer group size, dense int32 bit packing, and writing an
output directory atomically.

Why an integer view: both targets decode `scale * (u - zero)` with b-bit unsigned codes, so every
lowbit grid that can be written in that form exports the same way (int sym/asym, ternary and
binary as int2 sym); the others are refused with `ExportError`.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file

from ..artifact import DENSE, HEADER, QUANTIZED, load_quantized, quantized_files, validate
from ..validation.paths import clean_stale_work_dirs, make_work_dir, swap_into_place
from .errors import ExportError
from ..formats import BinaryGrid, Grid, IntGrid, TernaryGrid
from ..nn import module_from_entry
from ..qtensor import QuantizedWeight

#: artifact files that are not copied into an export (the rest: tokenizer files, generation config ...)
_ARTIFACT_OWN = {HEADER, QUANTIZED, DENSE, "config.json"}


#: written into every export directory: the only kind of directory an export's --force replaces
MARKER = "lowbit_export.json"


@dataclass
class ArtifactContents:
    header: dict[str, Any]
    weights: dict[str, QuantizedWeight]  # module name -> weight (quantized modules of kind "linear")
    biases: dict[str, torch.Tensor]  # module name -> [out] float32, modules with a bias only
    dense: dict[str, torch.Tensor]  # every other tensor, stored once (tied aliases dropped)
    config: dict[str, Any]  # config.json
    dtype: torch.dtype  # the source checkpoint's dtype (dense tensors are stored in it)
    root: Path


def read_artifact(artifact_dir: str | Path) -> ArtifactContents:
    """Read a lowbit artifact's quantized weights and dense tensors (checksums and stored shapes
    verified first, as `lowbit.load` does) without building the model."""
    root = Path(artifact_dir)
    header, _ = validate(root)
    quantized = load_quantized(root, header)
    weights: dict[str, QuantizedWeight] = {}
    biases: dict[str, torch.Tensor] = {}
    for name, entry in header["modules"].items():
        kind = entry.get("kind", "linear")
        if kind != "linear":
            what = {"ptq161": "salient channels plus binary weights",
                    "rotated-linear": "a Hadamard-rotated weight, which needs the rotation applied to its inputs at run time"}
            raise ExportError(
                f"module {name} is a {kind!r} module ({what.get(kind, 'not a plain quantized linear')}); only plain quantized "
                f"linears (kind 'linear') map onto an integer checkpoint format: re-quantize without that method"
                + (" (drop --rotate)" if kind == "rotated-linear" else "")
            )
        layer = module_from_entry(entry)
        own = {k.removeprefix(name + "."): v for k, v in quantized.items() if k.startswith(name + ".")}
        layer.load_state_dict(own, strict=True)
        weights[name] = layer.quantized_weight()
        if layer.bias is not None:
            biases[name] = layer.bias.detach().float()
    dense = load_file(str(root / DENSE))
    dtype = getattr(torch, header.get("dense_dtype", "float32"))
    config = json.loads((root / "config.json").read_text())
    return ArtifactContents(header, weights, biases, dense, config, dtype, root)


@dataclass
class IntegerView:
    """A weight as w[o, i] = scale[o, gi] * (u[o, i] - zero[o, gi]), gi = i // group_size (the last
    group may be shorter), all exact in float32."""

    bits: int
    u: torch.Tensor  # [out, in] int64, unsigned codes in [0, 2**bits)
    zero: torch.Tensor  # [out, n_groups] int64 in [0, 2**bits)
    scale: torch.Tensor  # [out, n_groups] float32, fp16-exact
    group_size: int  # columns per group (in_features for one group per row)
    symmetric: bool  # zero == 2**(bits-1) everywhere, by construction of the grid
    source: str  # what lowbit grid this came from, for messages

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.u.shape)  # type: ignore[return-value]

    def dequantize(self) -> torch.Tensor:
        """[out, in] float32: the decode both target formats perform."""
        idx = torch.arange(self.u.shape[1]) // self.group_size
        return self.scale[:, idx] * (self.u - self.zero[:, idx]).float()


def unwrap(grid: Grid) -> Grid:
    """The grid that decodes (clipping changes only how scales were fitted)."""
    return grid.decoder


INT_MAPPABLE = "int2..int8 (symmetric or asymmetric), ternary/ternary2 (as int2 symmetric), binary (as int2 symmetric)"


def integer_view(name: str, qw: QuantizedWeight) -> IntegerView:
    """The integer form of `qw`, or ExportError naming the module, its grid and what would map."""
    grid, layout = unwrap(qw.grid), qw.layout
    out_f = layout.out_features
    # one parameter set for the whole tensor (group size 0) is written per channel, repeated: exact
    params = {k: v.expand(out_f, -1).contiguous() for k, v in qw.params.items()} if layout.per_tensor else qw.params
    scale = params["scale"].float()
    codes = qw.codes.long()

    def half_zero(bits: int) -> torch.Tensor:  # the implicit zero of a symmetric b-bit grid, [out, n_groups]
        return torch.full_like(scale, 2 ** (bits - 1), dtype=torch.int64)

    if isinstance(grid, IntGrid):
        if grid.symmetric:
            view = IntegerView(grid.bits, codes, half_zero(grid.bits), scale, layout.effective_group_size, True, grid.name)
        else:
            zero = params["zero"].long()
            view = IntegerView(grid.bits, codes, zero, scale, layout.effective_group_size, False, grid.name)
    elif isinstance(grid, TernaryGrid):  # (c - 1) * s = ((c + 1) - 2) * s
        view = IntegerView(2, codes + 1, half_zero(2), scale, layout.effective_group_size, True, grid.name)
    elif isinstance(grid, BinaryGrid):  # (2c - 1) * s = ((2c + 1) - 2) * s
        view = IntegerView(2, 2 * codes + 1, half_zero(2), scale, layout.effective_group_size, True, grid.name)
    else:
        raise ExportError(
            f"module {name}: grid {qw.grid.spec()} has no integer form 'scale * (q - zero)'; what maps: {INT_MAPPABLE}"
        )
    return view


def regroup(view: IntegerView, group_size: int) -> IntegerView:
    """The same weight with parameters repeated onto groups of `group_size` columns; exact when
    every new group lies inside one old group (`group_size` divides the old one, or the row is
    one group)."""
    n_in = view.shape[1]
    if group_size == view.group_size:
        return view
    if view.group_size != n_in and view.group_size % group_size:
        raise ValueError(f"groups of {group_size} do not nest in groups of {view.group_size}")
    starts = torch.arange(0, n_in, group_size)  # first column of every new group
    old = starts // view.group_size  # [n_new] the old group holding it
    return IntegerView(view.bits, view.u, view.zero[:, old], view.scale[:, old], group_size, view.symmetric, view.source)


def pack_int32(values: torch.Tensor, bits: int) -> torch.Tensor:
    """[rows, n] integers in [0, 2**bits) -> [rows, ceil(n*bits/32)] int32: a dense little-endian
    bit stream along each row (element j at bits j*bits .. j*bits+bits-1, LSB first, words may
    split an element), as both GPTQ (2/3/4/8 bits) and compressed-tensors pack."""
    rows, n = values.shape
    v = values.to(torch.int64)
    if n and (int(v.min()) < 0 or int(v.max()) >= 2**bits):
        raise ValueError(f"a value is outside [0, {2**bits})")
    n_words = math.ceil(n * bits / 32)
    bit_planes = (v.unsqueeze(-1) >> torch.arange(bits)) & 1  # [rows, n, bits], LSB first
    stream = bit_planes.reshape(rows, n * bits)
    stream = torch.nn.functional.pad(stream, (0, n_words * 32 - n * bits))
    words = (stream.reshape(rows, n_words, 32) << torch.arange(32)).sum(-1)  # [rows, n_words] in [0, 2^32)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def linear_module_names(art: ArtifactContents) -> list[str]:
    """Names of every nn.Linear of the artifact's model (built on the meta device, no weights)."""
    from transformers import AutoConfig

    from ..models import auto_class

    cfg = AutoConfig.from_pretrained(art.root)
    with torch.device("meta"):
        model = auto_class(art.header["source"].get("kind", "causal-lm")).from_config(cfg)
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def check_export_target(out: Path, force: bool) -> None:
    """Refuse an output directory that exists, unless `force` and it is an earlier lowbit export."""
    if out.exists():
        if not force:
            raise ExportError(f"{out} already exists; choose another output directory or pass --force to replace an earlier export")
        if not (out.is_dir() and (out / MARKER).is_file()):
            raise ExportError(f"--force replaces only an earlier lowbit export, and {out} is not one; choose another output path")


def write_output(out_dir: str | Path, force: bool, fill: Callable[[Path], None], what: str = "") -> Path:
    """Run `fill(tmp)` on a work directory beside `out_dir`, then rename it into place: an
    interrupted export leaves nothing half-written. An existing output is replaced only with
    `force`, and only if it is an earlier lowbit export (it holds MARKER), never anything else."""
    out = Path(out_dir)
    check_export_target(out, force)
    clean_stale_work_dirs(out)
    tmp = make_work_dir(out)
    try:
        fill(tmp)
        (tmp / MARKER).write_text(json.dumps({"format": what}, indent=2) + "\n")
        swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def copy_side_files(art: ArtifactContents, dest: Path) -> None:
    """Copy the tokenizer files (and any other non-lowbit file) of the artifact."""
    for p in sorted(art.root.iterdir()):
        if p.is_file() and p.name not in _ARTIFACT_OWN and p.name not in quantized_files(art.header):
            shutil.copy2(p, dest / p.name)


def write_config(art: ArtifactContents, dest: Path, quantization_config: dict[str, Any]) -> None:
    """config.json of the source model with its own dtype and the target's quantization_config."""
    config = dict(art.config)
    config["dtype"] = str(art.dtype).removeprefix("torch.")
    config.pop("torch_dtype", None)
    config["quantization_config"] = quantization_config
    (dest / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def dense_state(art: ArtifactContents) -> dict[str, torch.Tensor]:
    """The non-quantized tensors in the source dtype (tied aliases are not stored: the model re-ties them)."""
    out = {}
    for k, v in art.dense.items():
        out[k] = (v.to(art.dtype) if v.is_floating_point() else v).contiguous()
    return out
