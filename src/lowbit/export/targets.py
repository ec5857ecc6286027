"""Export targets: external storage layouts that a lowbit grid reproduces bit for bit.

A target (`--target gguf:q4_0`) fixes the grid, the symmetric flag and the group size so that
RTN/GPTQ choose codes for exactly what the external format stores; the export then only moves
bits. GGUF's blocks run along a row (the input features) with one scale per block:

    target      block  decode                      lowbit grid
    gguf:q4_0   32     d * (u - 8),  u in 0..15    int4 symmetric: (q - 8) * scale
    gguf:q4_1   32     d * u + m,    u in 0..15    int4_min: q * scale + min (fp16 min)
    gguf:q5_0   32     d * (u - 16), u in 0..31    int5 symmetric
    gguf:q5_1   32     d * u + m,    u in 0..31    int5_min
    gguf:q8_0   32     d * q,        q in -128..127 int8 symmetric: (q - 128) * scale
    gguf:mxfp4  32     2^(e-127) * E2M1[u]         mxfp4 (E8M0 scale code e)
    gguf:tq2_0  256    d * t, t in {-1, 0, 1}      ternary2 (2 bits per trit)
    gguf:tq1_0  256    d * t                       ternary (5 trits per byte)
    gguf:q4_k   256    (d*sc_j) * u - dmin*m_j     int4_k: 6-bit block scales/mins (blocks of 32) under fp16 d, dmin
    gguf:q5_k   256    as q4_k, u in 0..31         int5_k
    gguf:q6_k   256    (d*s_j) * (u - 32)          int6_k: int8 block scales (blocks of 16) under fp16 d

(lowbit's symmetric grids use the extra negative level, as GGUF does, so the scales agree too.)
A group of 64 or 128 maps as well (its scale is repeated in each block), but stores the same
bytes as groups of one block, so the target's default is the block.

Beyond its own type, a weight maps exactly into a *wider* type whenever its values are small
integers times an fp16 scale per block (`integer_range`): int2/int3 symmetric, ternary and
binary fit Q4_0; int4 asymmetric with an integer zero point (q - zero in [-15, 15]) fits Q5_0;
int6/int7 (symmetric, or asymmetric up to int7) fit Q8_0; binary fits the TQ types. Such a
weight is written that way only on request (`lowbit export --to gguf:q5_0`); it never fits
Q4_1/Q5_1, whose min -zero * scale is generally not an fp16 number.

Widths a block does not divide follow one rule (`target_for_width`): under a target such a
layer is quantized for the target's fallback (as llama.cpp's own quantizer does: TQ1_0/TQ2_0 ->
Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0), reported per layer; where no block fits (a width that is not a multiple of
32) it is kept in float and exported as F16 (llama.cpp's own fallback for such rows).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..errors import LowbitError
from ..formats import BinaryGrid, Grid, IntGrid, IntMinGrid, KQuantGrid, MXFP4Grid, TernaryGrid, get_grid, grid_from_spec
from .errors import ExportError


@dataclass(frozen=True)
class GGMLType:
    """One GGUF storage type lowbit writes from stored codes (layouts: `gguf_blocks`)."""

    name: str  # gguf.GGMLQuantizationType member
    block: int  # weights per block along a row
    block_bytes: int
    decode: str  # "signed": d * v, v an integer in [lo, hi]; "affine": d * u + m, u in [0, hi]; "mxfp4"; "kquant"
    lo: int = 0
    hi: int = 0

    @property
    def bpw(self) -> float:
        return 8 * self.block_bytes / self.block


GGML_TYPES: dict[str, GGMLType] = {
    t.name: t
    for t in [
        GGMLType("Q4_0", 32, 18, "signed", -8, 7),
        GGMLType("Q4_1", 32, 20, "affine", 0, 15),
        GGMLType("Q5_0", 32, 22, "signed", -16, 15),
        GGMLType("Q5_1", 32, 24, "affine", 0, 31),
        GGMLType("Q8_0", 32, 34, "signed", -128, 127),
        GGMLType("MXFP4", 32, 17, "mxfp4"),
        GGMLType("TQ2_0", 256, 66, "signed", -1, 1),
        GGMLType("TQ1_0", 256, 54, "signed", -1, 1),
        GGMLType("Q4_K", 256, 144, "kquant"),
        GGMLType("Q5_K", 256, 176, "kquant"),
        GGMLType("Q6_K", 256, 210, "kquant"),
    ]
}


@dataclass(frozen=True)
class Target:
    name: str  # as --target spells it
    format: str  # the lowbit grid
    symmetric: bool | None  # None: the grid has no such choice
    ggml_type: str | None  # gguf.GGMLQuantizationType member; None for compressed-tensors / GPTQ targets
    description: str
    fallback: str | None = None  # the target for widths this block does not divide; None: kept in float
    group: int | None = None  # the group size the target fixes (compressed-tensors / GPTQ); GGUF: its block

    @property
    def ggml(self) -> GGMLType:
        return GGML_TYPES[self.ggml_type]

    @property
    def block(self) -> int:
        """Weights per block along a row: what a layer's width must be a multiple of."""
        if self.ggml_type is not None:
            return self.ggml.block
        return get_grid(self.format).fixed_group_size or 1  # nvfp4: 16, mxfp4: 32; integer grids: any width


TARGETS: dict[str, Target] = {
    t.name: t
    for t in [
        Target("gguf:q4_0", "int4", True, "Q4_0", "llama.cpp Q4_0: 4-bit symmetric, fp16 scale per 32 (4.5 bpw)"),
        Target("gguf:q4_1", "int4_min", None, "Q4_1", "llama.cpp Q4_1: 4-bit, fp16 scale and min per 32 (5.0 bpw)"),
        Target("gguf:q5_0", "int5", True, "Q5_0", "llama.cpp Q5_0: 5-bit symmetric, fp16 scale per 32 (5.5 bpw)"),
        Target("gguf:q5_1", "int5_min", None, "Q5_1", "llama.cpp Q5_1: 5-bit, fp16 scale and min per 32 (6.0 bpw)"),
        Target("gguf:q8_0", "int8", True, "Q8_0", "llama.cpp Q8_0: 8-bit symmetric, fp16 scale per 32 (8.5 bpw)"),
        Target("gguf:mxfp4", "mxfp4", None, "MXFP4", "llama.cpp MXFP4: E2M1 with an E8M0 scale per 32 (4.25 bpw)"),
        Target("gguf:tq2_0", "ternary2", None, "TQ2_0", "llama.cpp TQ2_0: ternary, fp16 scale per 256 (2.06 bpw)",
               fallback="gguf:q4_0"),
        Target("gguf:tq1_0", "ternary", None, "TQ1_0", "llama.cpp TQ1_0: ternary, 5 trits a byte, fp16 scale per 256 "
               "(1.69 bpw)", fallback="gguf:q4_0"),
        Target("gguf:q4_k", "int4_k", None, "Q4_K", "llama.cpp Q4_K: 4-bit, 6-bit scale and min per 32 under fp16 "
               "scales per 256 (4.5 bpw)", fallback="gguf:q5_0"),
        Target("gguf:q5_k", "int5_k", None, "Q5_K", "llama.cpp Q5_K: 5-bit, 6-bit scale and min per 32 under fp16 "
               "scales per 256 (5.5 bpw)", fallback="gguf:q5_1"),
        Target("gguf:q6_k", "int6_k", None, "Q6_K", "llama.cpp Q6_K: 6-bit, int8 scale per 16 under an fp16 scale "
               "per 256 (6.56 bpw)", fallback="gguf:q8_0"),
    ]
}
_BY_TYPE = {t.ggml_type: t for t in TARGETS.values()}

# compressed-tensors and HF GPTQ: integer grids at any width (a shorter last group is exported
# exactly), or the FP4 formats with their own blocks. Names follow llm-compressor's schemes
# (W4A16: int4 symmetric, groups of 128) and GPTQ's usual `bits` / `group_size`.
_INT_TARGET = re.compile(r"ct:w([2-8])a16|gptq:int([2348])")
_FP4_TARGETS = {
    "ct:nvfp4": Target("ct:nvfp4", "nvfp4", None, None, "compressed-tensors nvfp4-pack-quantized: E2M1, E4M3 scale per 16 (4.5 bpw)"),
    "ct:mxfp4": Target("ct:mxfp4", "mxfp4", None, None, "compressed-tensors mxfp4-pack-quantized: E2M1, E8M0 scale per 32 (4.25 bpw)"),
}
EXAMPLES = [*TARGETS, "ct:w4a16", "ct:w8a16", "ct:w4a16-asym", "ct:w4a16-g32", "ct:nvfp4", "ct:mxfp4", "gptq:int4",
            "gptq:int4-g32", "gptq:int3", "gptq:int8", "gptq:int4-asym"]


def _int_target(key: str) -> Target | None:
    base, *options = key.split("-")  # ct:w4a16-g32-asym: options in any order
    m = _INT_TARGET.fullmatch(base)
    groups = [o for o in options if re.fullmatch(r"g[1-9]\d*", o)]
    if m is None or len(groups) > 1 or options.count("asym") > 1 or len(groups) + options.count("asym") != len(options):
        return None
    bits = int(m.group(1) or m.group(2))
    group = int(groups[0][1:]) if groups else 128
    sym = "asym" not in options
    kind = "compressed-tensors pack-quantized" if key.startswith("ct:") else "HF GPTQ"
    return Target(key, f"int{bits}", sym, None, f"{kind}: int{bits} {'symmetric' if sym else 'asymmetric'}, groups of {group}",
                  group=group)


def get_target(name: str) -> Target:
    key = name.strip().lower()
    found = TARGETS.get(key) or _FP4_TARGETS.get(key) or _int_target(key)
    if found is None:
        raise ExportError(f"unknown target {name!r}; known targets: {', '.join(EXAMPLES)} "
                          "(ct:wNa16 and gptq:intN take -gSIZE and -asym)")
    return found


def recipe_settings(name: str, group_size: int | None) -> dict[str, Any]:
    """The recipe keys a target fixes: format, symmetric (where the grid has the choice) and a
    group size that is a whole number of blocks (the given one if it is, else the block)."""
    t = get_target(name)
    fixed = get_grid(t.format).fixed_group_size  # MXFP4: its own block of 32, no other
    if fixed and group_size is not None and group_size != fixed:
        raise ExportError(f"target {t.name} stores one scale per {fixed} weights; group size {group_size} is not {fixed} "
                          f"(leave --group-size out)")
    if not fixed and group_size is not None and not (group_size == -1 or (group_size > 0 and group_size % t.block == 0)):
        raise ExportError(
            f"target {t.name} stores blocks of {t.block}; group size {group_size} is not a multiple of it "
            f"(use {t.block}, a multiple of it, or -1)"
        )
    if t.group is not None and group_size is not None and group_size != t.group:
        raise ExportError(f"target {t.name} fixes groups of {t.group}; drop --group-size {group_size} or name the "
                          f"group in the target ({t.name.split('-g')[0]}-g{group_size})")
    default = t.group if t.group is not None else fixed or t.block  # K-quants: their block of 32 / 16
    settings: dict[str, Any] = {"format": t.format, "group_size": default if group_size is None else group_size}
    if t.symmetric is not None:
        settings["symmetric"] = t.symmetric
    return settings


def target_for_width(name: str, in_features: int) -> Target | None:
    """The target a layer of this input width is quantized for: `name` if its block divides the
    width, else the first of its fallbacks that does; None if none does (the layer stays float)."""
    t: Target | None = get_target(name)
    while t is not None and in_features % t.block:
        t = get_target(t.fallback) if t.fallback else None
    return t


# ---- which stored weight maps onto which type --------------------------------------------------

def _inner(grid: Grid) -> Grid:
    return grid.decoder  # clipping or an MSE fit change only the fit


def integer_range(grid: Grid) -> tuple[int, int] | None:
    """[lo, hi] of the integers v such that the grid's values are v * (fp16 scale of the group), or
    None if its values are not of that form. Asymmetric int: v = q - zero."""
    g = _inner(grid)
    if isinstance(g, IntGrid):
        half = 2 ** (g.bits - 1)
        return (-half, half - 1) if g.symmetric else (-g.maxq, g.maxq)
    if isinstance(g, (TernaryGrid, BinaryGrid)):
        return (-1, 1)
    return None


def grid_label(grid: Grid) -> str:
    g = _inner(grid)
    if isinstance(g, IntGrid):
        return f"{g.name} {'sym' if g.symmetric else 'asym'}"
    return g.name


def misfit(grid: Grid, group_size: int, in_features: int, ggml_type: str) -> str | None:
    """Why a weight of `in_features` columns on `grid`, in groups of `group_size` (> 0, -1 per row,
    0 per tensor), does not decode exactly from `ggml_type` blocks; None if it does."""
    t, g = GGML_TYPES[ggml_type], _inner(grid)
    if in_features % t.block:
        return f"input width {in_features} is not a multiple of {t.name}'s {t.block}-weight block"
    if t.decode == "kquant":
        if isinstance(g, KQuantGrid) and g.ggml_type == t.name:
            return None
        return (f"{t.name} stores {t.name[1]}-bit codes whose block scales are coded under an fp16 scale per 256 "
                f"(format int{t.name[1]}_k)")
    if group_size > 0 and group_size % t.block:
        return f"group size {group_size} is not a multiple of {t.name}'s {t.block}-weight block (one scale per block)"
    if t.decode == "mxfp4":
        return None if isinstance(g, MXFP4Grid) else f"{t.name} holds E2M1 values with power-of-two block scales (format mxfp4)"
    if t.decode == "affine":
        if isinstance(g, IntMinGrid) and g.maxq <= t.hi:
            return None
        if isinstance(g, IntGrid) and not g.symmetric:
            return f"{grid_label(g)} stores an integer zero point, whose min -zero*scale is generally not the fp16 min {t.name} stores"
        return f"{t.name} decodes d*u + m with an fp16 step and min, u in [0, {t.hi}] (format int{t.hi.bit_length()}_min)"
    rng = integer_range(g)
    if rng is None:
        return f"{t.name} holds integers times a per-block fp16 scale, which {g.name}'s levels are not"
    if rng[0] < t.lo or rng[1] > t.hi:
        return f"{t.name} holds integers in [{t.lo}, {t.hi}], {grid_label(g)} needs [{rng[0]}, {rng[1]}]"
    return None


def native_type(grid: Grid) -> str | None:
    """The GGUF type a grid is made for (same code width and decode), if any."""
    g = _inner(grid)
    if isinstance(g, IntGrid) and g.symmetric:
        return {4: "Q4_0", 5: "Q5_0", 8: "Q8_0"}.get(g.bits)
    if isinstance(g, IntMinGrid):
        return {4: "Q4_1", 5: "Q5_1"}.get(g.bits)
    if isinstance(g, MXFP4Grid):
        return "MXFP4"
    if isinstance(g, TernaryGrid):
        return "TQ1_0" if g.packed else "TQ2_0"
    if isinstance(g, KQuantGrid):
        return g.ggml_type
    return None


def exact_types(grid: Grid, group_size: int, in_features: int) -> list[str]:
    """Every GGUF type the weight decodes exactly from, fewest bits per weight first."""
    found = [t for t in GGML_TYPES.values() if misfit(grid, group_size, in_features, t.name) is None]
    return [t.name for t in sorted(found, key=lambda t: (t.bpw, t.name))]


def _entry_grid(entry: dict[str, Any]) -> Grid | None:
    if entry.get("kind", "linear") != "linear":
        return None
    try:
        return grid_from_spec(entry["grid"])
    except (LowbitError, KeyError, TypeError):  # a format (or option) this lowbit does not know: no mapping
        return None


def gguf_type_for(entry: dict[str, Any], to: str | None = None) -> str | None:
    """The GGUF type an artifact module is written as, or None if none stores it exactly. With `to`
    (a target such as gguf:q5_0): that target's type, or its fallback's for widths its block does
    not divide. Without: the module's recorded target, else the type its grid is made for."""
    grid = _entry_grid(entry)
    if grid is None:
        return None
    g, in_f = entry["group_size"], entry["shape"][1]
    if to is not None:
        t = target_for_width(to, in_f)
        wanted = [t.ggml_type] if t is not None and t.ggml_type is not None else []
    else:
        wanted = [get_target(entry["target"]).ggml_type] if entry.get("target") in TARGETS else []
        wanted += [n for n in [native_type(grid)] if n is not None]
    return next((w for w in wanted if misfit(grid, g, in_f, w) is None), None)


def _suggest(grid: Grid) -> list[str]:
    """Targets whose --target would quantize a weight like this one onto a GGUF type of its own."""
    g = _inner(grid)
    if isinstance(g, (TernaryGrid, BinaryGrid)):
        return ["gguf:tq1_0", "gguf:tq2_0", "gguf:q4_0"]
    if isinstance(g, MXFP4Grid) or g.name.startswith("fp4"):
        return ["gguf:mxfp4", "gguf:q4_0"]
    if isinstance(g, KQuantGrid):
        return [f"gguf:q{g.bits}_k"]
    bits = getattr(g, "bits", 4)
    if bits <= 4:
        return ["gguf:q4_0", "gguf:q4_1"]
    if bits == 5:
        return ["gguf:q5_0", "gguf:q5_1"]
    return ["gguf:q8_0"]


def why_not_gguf(name: str, entry: dict[str, Any], to: str | None = None) -> str:
    """One sentence: why this module has no exact GGUF layout, what it would fit losslessly, and
    the quantize flag that gives it one."""
    g, in_f = entry["group_size"], entry["shape"][1]
    grid = _entry_grid(entry)
    if grid is None:
        kind = entry.get("kind", "linear")
        what = f"a {kind!r} module" if kind != "linear" else f"grid {entry['grid'].get('format', '?')}"
        return f"{name}: {what} has no GGUF layout; re-quantize with --method rtn or gptq and --target gguf:q4_0"
    if in_f % 32:
        return f"{name}: its input width {in_f} is not a multiple of GGUF's 32-weight blocks"
    desc = f"{grid_label(grid)} g{g}"
    wanted = target_for_width(to, in_f).ggml_type if to is not None else native_type(grid)
    if wanted is not None:
        head = f"{name}: {desc} does not map exactly to {wanted}: {misfit(grid, g, in_f, wanted)}"
    elif isinstance(_inner(grid), IntGrid) and not _inner(grid).symmetric:
        head = f"{name}: {desc} stores an integer zero point, which Q4_1/Q5_1 cannot hold (their min is an fp16 number)"
    else:
        head = f"{name}: grid {desc} has no exact GGUF layout of its own"
    wider = [t for t in exact_types(grid, g, in_f) if t != wanted]
    if wider:
        head += f"; it fits {', '.join(_BY_TYPE[t].name for t in wider)} exactly (export with --to {_BY_TYPE[wider[0]].name})"
    flags = " or ".join(f"--target {t}" for t in _suggest(grid))
    return f"{head}; or quantize with {flags}"
