"""The choices a mixed-precision search picks from, one per layer: a format and a group size.

A candidate is written `FORMAT-gGROUP` (`int4-g64`, `int3-g128`, `vq2-g128`; `-g-1` or `-row`:
one scale per output row). The method and everything else (GPTQ's settings, loss-aware Hessians,
`mse_fit`) come from the search's base recipe, so the searched recipe differs from a uniform one
only in which format and group size each layer gets. Integer and floating-point grids stand side
by side (FLIQS: `int4-g64,fp4-g64,nf4-g64`); their exact bits per weight come from the quantized
modules themselves, everything stored counted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import LowbitError

#: scalar integer grids from 2 to 8 bits: enough spread for budgets from ~2.5 to ~8 bpw
DEFAULT_CANDIDATES = "int2-g64,int3-g128,int3-g64,int4-g128,int4-g64,int5-g64,int6-g64,int8-g128"

_NAME = re.compile(r"^(?P<format>[a-z0-9_]+)-(?:g(?P<group>-1|\d+)|(?P<row>row))$")


class CandidateError(LowbitError):
    pass


@dataclass(frozen=True, order=True)
class Candidate:
    format: str
    group_size: int

    @property
    def name(self) -> str:
        return f"{self.format}-{'row' if self.group_size == -1 else f'g{self.group_size}'}"

    @classmethod
    def parse(cls, text: str) -> "Candidate":
        m = _NAME.match(text.strip().lower())
        if m is None:
            raise CandidateError(f"candidate {text!r}: write FORMAT-gGROUP (int4-g64, vq2-g128) or FORMAT-row")
        return cls(m["format"], -1 if m["row"] else int(m["group"]))


def parse_candidates(text: str) -> list[Candidate]:
    """A comma-separated list, duplicates dropped, in the order given; at least two."""
    seen: dict[Candidate, None] = {}
    for part in text.split(","):
        if part.strip():
            seen.setdefault(Candidate.parse(part), None)
    if len(seen) < 2:
        raise CandidateError(f"--candidates {text!r}: a search needs at least two candidates to choose between")
    return list(seen)
