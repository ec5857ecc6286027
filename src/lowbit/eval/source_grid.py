"""Source-grid guard. A model published already quantized (SmolLM2 here: GGUF Q4_1, asymmetric
4-bit in blocks of 32) has weights that lie on that grid; re-quantizing it onto a grid that
contains the source grid reproduces it almost exactly and proves nothing. Results that do so are
flagged `source_grid: true` so no table claims a win from it."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class SourceGrid:
    bits: int
    symmetric: bool
    block: int


# llama.cpp's block formats: bits, symmetric (no min), block size along the row
_GGUF = {
    "Q4_0": SourceGrid(4, True, 32), "Q4_1": SourceGrid(4, False, 32),
    "Q5_0": SourceGrid(5, True, 32), "Q5_1": SourceGrid(5, False, 32),
    "Q8_0": SourceGrid(8, True, 32),
}


def parse_source_format(source_format: str | None) -> SourceGrid | None:
    match = re.fullmatch(r"gguf (\w+)", source_format or "")
    return _GGUF.get(match.group(1)) if match else None


def contains_source_grid(source_format: str | None, fmt: str, symmetric: bool, group_size: int) -> bool:
    """Does an integer grid (`fmt` like 'int4', asymmetric unless `symmetric`, groups of
    `group_size`) hold every value of the source grid? True when it has at least as many bits,
    a zero point if the source has one, and each of its groups lies inside one source block."""
    src = parse_source_format(source_format)
    match = re.fullmatch(r"int(\d)(?:_min)?", fmt)  # int4_min: an fp16 step and min, asymmetric
    if src is None or match is None:
        return False
    bits = int(match.group(1))
    if bits < src.bits or (symmetric and not src.symmetric):
        return False
    return group_size > 0 and src.block % group_size == 0


def artifact_contains_source_grid(header: dict) -> bool:
    """True if any quantized module of the artifact re-quantizes onto a grid containing the source's."""
    source_format = header.get("source", {}).get("source_format")
    return any(
        contains_source_grid(source_format, m["grid"]["format"], bool(m["grid"].get("symmetric", False)), m["group_size"])
        for m in header["modules"].values()
    )
