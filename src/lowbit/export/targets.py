"""Export targets: external storage layouts that a lowbit grid reproduces bit for bit.

A target (`--target gguf:q4_0`) fixes the grid, the symmetric flag and the group size so that
RTN/GPTQ choose codes for exactly what the external format stores; the export then only moves
bits. GGUF's legacy blocks hold 32 weights along a row with one fp16 scale `d`:

    gguf:q4_0   d * (u - 8),  u in 0..15    = lowbit int4 symmetric: (q - 8) * scale
    gguf:q5_0   d * (u - 16), u in 0..31    = lowbit int5 symmetric
    gguf:q8_0   d * q,        q in -128..127 = lowbit int8 symmetric: (q - 128) * scale

(lowbit's symmetric grids use the extra negative level, as GGUF does, so the scales agree too.)
A group of 64 or 128 maps as well (its scale is repeated in each 32-block), but stores the same
bytes as groups of 32, so the target's default is 32. A layer whose input width is not a multiple
of 32 has no block layout: under a target it is kept in float and exported as F16 (llama.cpp's
own fallback for such rows), and the report says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import ExportError


@dataclass(frozen=True)
class Target:
    name: str  # as --target spells it
    format: str  # the lowbit grid
    symmetric: bool
    block: int  # weights per block along a row
    ggml_type: str  # gguf.GGMLQuantizationType member
    description: str


TARGETS: dict[str, Target] = {
    t.name: t
    for t in [
        Target("gguf:q4_0", "int4", True, 32, "Q4_0", "llama.cpp Q4_0: 4-bit symmetric, fp16 scale per 32 (4.5 bpw)"),
        Target("gguf:q5_0", "int5", True, 32, "Q5_0", "llama.cpp Q5_0: 5-bit symmetric, fp16 scale per 32 (5.5 bpw)"),
        Target("gguf:q8_0", "int8", True, 32, "Q8_0", "llama.cpp Q8_0: 8-bit symmetric, fp16 scale per 32 (8.5 bpw)"),
    ]
}


def get_target(name: str) -> Target:
    key = name.strip().lower()
    if key not in TARGETS:
        raise ExportError(f"unknown target {name!r}; known targets: {', '.join(TARGETS)}")
    return TARGETS[key]


def recipe_settings(name: str, group_size: int | None) -> dict[str, Any]:
    """The recipe keys a target fixes: format, symmetric and a group size that is a whole number
    of blocks (the given one if it is, else the block)."""
    t = get_target(name)
    if group_size is not None and not (group_size == -1 or (group_size > 0 and group_size % t.block == 0)):
        raise ExportError(
            f"target {t.name} stores blocks of {t.block}; group size {group_size} is not a multiple of it "
            f"(use {t.block}, a multiple of it, or -1)"
        )
    return {"format": t.format, "symmetric": t.symmetric, "group_size": t.block if group_size is None else group_size}


def gguf_type_for(entry: dict[str, Any]) -> str | None:
    """The GGUF block type that stores an artifact module's weights exactly, or None."""
    if entry.get("kind", "linear") != "linear":
        return None
    grid = entry["grid"]
    in_f = entry["shape"][1]
    for t in TARGETS.values():
        if not t.name.startswith("gguf:"):
            continue
        if grid.get("format") != t.format or grid.get("symmetric") is not t.symmetric or set(grid) - {"format", "symmetric"}:
            continue
        g = entry["group_size"]
        if in_f % t.block == 0 and (g in (-1, 0) or (g > 0 and g % t.block == 0)):
            return t.ggml_type
    return None


def why_not_gguf(name: str, entry: dict[str, Any]) -> str:
    """One sentence: why this module has no exact GGUF layout, and what would give it one."""
    grid = entry["grid"]
    desc = grid.get("format", "?") + ("" if "symmetric" not in grid else (" sym" if grid["symmetric"] else " asym"))
    fits = [t.name for t in TARGETS.values() if t.format == grid.get("format")]
    if entry["shape"][1] % 32:
        return f"{name}: its input width {entry['shape'][1]} is not a multiple of GGUF's 32-weight blocks"
    hint = f"quantize with --target {fits[0] if fits else 'gguf:q4_0'}"
    if fits and grid.get("symmetric") is False:
        return f"{name}: {desc} g{entry['group_size']} stores an integer zero point, which {', '.join(fits)} cannot hold; {hint}"
    return f"{name}: grid {desc} g{entry['group_size']} has no exact GGUF layout (targets: {', '.join(TARGETS)}); {hint}"
