"""What a search is asked to fit: bits per weight over the quantized layers, or the size of the
whole artifact on disk.

A size budget counts every byte the artifact directory will hold: the searched layers' stored
tensors (codes, scales, zero points, codebooks: the table's bits), and the rest, which does not
depend on the choice (`artifact_overhead`): the tensors left dense in the checkpoint's dtype (the
embedding, norms, an untied output layer), the searched layers' biases, the tokenizer and config
files, and an allowance for the JSON headers. The searched layers then get what is left, as bits
per weight, and the allocation runs as for a bpw budget.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import LowbitError
from ..models.loading import LoadedModel

#: header bytes allowed per quantized layer (its entry in lowbit.json, its recipe override, its
#: tensors' safetensors header entries: 0.96 KB per layer measured on SmolLM2, whose layer names
#: are ~30 characters long), per dense tensor (its safetensors header entry, ~110 bytes measured),
#: and for the rest (source, summary, the base recipe: ~3 KB)
HEADER_BYTES_PER_LAYER = 1024
HEADER_BYTES_PER_NAME_CHAR = 6  # a layer's name is written about six times (tensor keys, entry, override)
HEADER_BYTES_PER_DENSE = 96
HEADER_BYTES_BASE = 16 * 1024

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"^\s*(?P<num>\d+(?:\.\d*)?|\.\d+)\s*(?P<unit>[kmgt]i?b|b)?\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Budget:
    """One budget: `bpw` (bits per weight over the quantized layers) or `size` (bytes on disk)."""

    kind: str  # "bpw" or "size"
    value: float
    text: str  # as the user wrote it, for names and reports

    @property
    def label(self) -> str:
        """Its directory name when a search has several: bpw-3, size-60MB."""
        return f"bpw-{self.value:g}" if self.kind == "bpw" else f"size-{self.text.replace(' ', '')}"

    def bpw_for(self, overhead_bytes: int, weights: int) -> float:
        """The bits per weight the searched layers may store under this budget."""
        if self.kind == "bpw":
            return self.value
        return 8.0 * (self.value - overhead_bytes) / weights


def parse_size(text: str) -> int:
    """'60MB', '57.5 MiB', '1.2GB', '123456' (bytes) -> bytes. MB = 10^6, MiB = 2^20."""
    m = _SIZE.match(text)
    if not m:
        raise LowbitError(f"--size {text!r}: give a size such as 60MB, 57.5MiB or 1.2GB (MB = 10^6 bytes, MiB = 2^20)")
    return int(float(m["num"]) * _UNITS[(m["unit"] or "").lower()])


def parse_budgets(bpw: str | None, size: str | None) -> list[Budget]:
    """The budgets of `--budget 2.5,3` and `--size 60MB,80MB` (either or both, in that order)."""
    budgets: list[Budget] = []
    for part in [p.strip() for p in (bpw or "").split(",") if p.strip()]:
        try:
            value = float(part)
        except ValueError:
            raise LowbitError(f"--budget {bpw!r}: give bits per weight such as 3.0, or several: 2.5,3,3.5") from None
        if not 1.0 <= value <= 32.0:
            raise LowbitError(f"--budget {bpw!r}: bits per weight lie between 1 and 32")
        budgets.append(Budget("bpw", value, part))
    for part in [p.strip() for p in (size or "").split(",") if p.strip()]:
        budgets.append(Budget("size", float(parse_size(part)), part))
    if not budgets:
        raise LowbitError("give a budget: --budget BITS_PER_WEIGHT (e.g. 3.0) or --size SIZE (e.g. 60MB), or both")
    return budgets


def header_allowance(layers: list[str], dense_keys: list[str]) -> int:
    """Bytes allowed for the artifact's JSON and safetensors headers (see the constants)."""
    return (HEADER_BYTES_BASE + sum(HEADER_BYTES_PER_LAYER + HEADER_BYTES_PER_NAME_CHAR * len(n) for n in layers)
            + sum(HEADER_BYTES_PER_DENSE + 2 * len(k) for k in dense_keys))


def artifact_overhead(loaded: LoadedModel, layers: list[str]) -> int:
    """Bytes of the artifact that do not depend on how `layers` are quantized (see the module
    docstring): dense tensors at the checkpoint's dtype, the layers' biases (float32), the
    tokenizer and config files as written, and the header allowance."""
    from ..artifact import dense_state

    searched = set(layers)
    skip = {k for k in loaded.model.state_dict() if k.rsplit(".", 1)[0] in searched}
    dense, _aliases = dense_state(loaded.model, skip)
    width = loaded.dtype.itemsize
    total = sum(t.numel() * (width if t.is_floating_point() else t.element_size()) for t in dense.values())
    total += sum(4 * t.numel() for k, t in loaded.model.state_dict().items() if k in skip and k.endswith(".bias"))
    with tempfile.TemporaryDirectory() as tmp:  # the files as the artifact will hold them
        if getattr(loaded.model, "config", None) is not None:
            loaded.model.config.save_pretrained(tmp)
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(tmp)
        total += sum(p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file())
    return total + header_allowance(sorted(searched), list(dense))


def size_range(overhead_bytes: int, weights: int, low_bpw: float, high_bpw: float) -> tuple[int, int]:
    """The least and most bytes an artifact of this search can take."""
    return (overhead_bytes + int(low_bpw * weights / 8 + 0.999), overhead_bytes + int(high_bpw * weights / 8 + 0.999))
