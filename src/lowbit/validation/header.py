"""The schema of an artifact header (`lowbit.json`), checked before anything is built from it.

The header is untrusted: its checksum detects corruption, not an attacker who recomputes it. So
every field is typed and bounded here (strict types, no NaN, shapes positive and below 2^31,
file names confined to the artifact directory, aliases pointing at stored tensors), and only a
header that passes is used to size any tensor (`stored.check_stored_tensors` then compares the
claimed shapes with the stored ones).
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..errors import ArtifactError, LowbitError

MAX_DIM = 2**31 - 1
MAX_HEADER_BYTES = 64 << 20  # a header is KBs to a few MB; more is not a lowbit header
MAX_JSON_DEPTH = 32

Dim = Annotated[int, Field(ge=1, le=MAX_DIM)]
Count = Annotated[int, Field(ge=0, le=2**62)]
# a plain file name inside the artifact directory: no separators, no leading dot (so no `..`)
FileName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,254}$")]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
# a dotted module path as torch names submodules
ModuleName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+){0,63}$", max_length=1024)]


class HeaderError(ArtifactError):
    pass


class _Checked(BaseModel):
    model_config = ConfigDict(strict=True, allow_inf_nan=False, frozen=True)


class _Open(_Checked):
    """Known fields typed, further fields kept (written by newer lowbit versions or for information)."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False, frozen=True, extra="allow")


class CodedStream(_Checked):
    """An entropy-coded tensor (`lowbit.coding`): n symbols below `alphabet` in `words` uint32 words."""

    kind: Literal["ans"]
    n: Count
    words: Count
    alphabet: Annotated[int, Field(ge=2, le=256)]


class ConvGeometry(_Checked):
    """A quantized Conv2d's geometry (`nn.quant_conv`)."""

    in_channels: Dim
    kernel_size: Annotated[list[Annotated[int, Field(ge=1, le=64)]], Field(min_length=2, max_length=2)]
    stride: Annotated[list[Annotated[int, Field(ge=1, le=64)]], Field(min_length=2, max_length=2)]
    padding: Annotated[list[Annotated[int, Field(ge=0, le=64)]], Field(min_length=2, max_length=2)]
    dilation: Annotated[list[Annotated[int, Field(ge=1, le=64)]], Field(min_length=2, max_length=2)]
    groups: Dim


class ModuleEntry(_Open):
    kind: Literal["linear", "ptq161", "rotated-linear", "vq-linear", "pvq-linear", "act-linear", "conv2d",
                  "static-act-linear"] = "linear"
    grid: dict[str, Any]
    shape: Annotated[list[Dim], Field(min_length=2, max_length=2)]
    group_size: Annotated[int, Field(ge=-1, le=MAX_DIM)]
    ragged: Literal["short-last", "error"] = "short-last"
    bias: bool
    numel: Count
    stored_bytes: dict[Annotated[str, Field(max_length=128)], Count]
    bpw: Annotated[float, Field(ge=0)]
    method: str | None = None
    n_salient: Dim | None = None
    block_size: Dim | None = None
    coding: dict[Literal["codes"], CodedStream] | None = None
    act: dict[str, Any] | None = None  # how a act-linear's (static-act-linear's, conv2d's) inputs are quantized
    conv: ConvGeometry | None = None  # a conv2d's geometry

    @field_validator("grid")
    @classmethod
    def _grid_named(cls, v: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(v.get("format"), str):
            raise ValueError("grid needs a 'format' name")
        return v


class Source(_Open):
    model: str = ""
    path: str | None = None
    kind: Literal["causal-lm", "encoder", "image-classifier"] = "causal-lm"
    factory: str | None = None  # image-classifier: the architecture lowbit builds (`vision.models`)
    dtype: str | None = None
    source_format: str | None = None


class Summary(_Open):
    quantized_params: Count
    quantized_bytes: Count
    bpw: Annotated[float, Field(ge=0)]
    dense_params: Count
    dense_bytes: Count


class Header(_Checked):
    lowbit_version: str
    format_version: Literal[1]
    source: Source
    recipe: dict[str, Any]
    dense_dtype: Literal["float32", "float16", "bfloat16"]
    modules: Annotated[dict[ModuleName, ModuleEntry], Field(min_length=1)]
    skipped: dict[ModuleName, str]
    aliases: dict[Annotated[str, Field(max_length=1024)], Annotated[str, Field(max_length=1024)]]
    summary: Summary
    files: dict[FileName, Sha256]
    quantized_shards: Annotated[list[FileName], Field(min_length=2, max_length=100000)] | None = None


def json_depth(obj: Any, limit: int = MAX_JSON_DEPTH) -> int:
    """Nesting depth of a parsed JSON value (stops counting past `limit`)."""
    depth, level = 0, [obj]
    while level and depth <= limit:
        depth += 1
        level = [c for o in level if isinstance(o, (dict, list)) for c in (o.values() if isinstance(o, dict) else o)]
    return depth


def parse_json(raw: bytes, where: str) -> Any:
    """Parse an untrusted JSON document: bounded size and depth; NaN/Infinity refused."""
    if len(raw) > MAX_HEADER_BYTES:
        raise HeaderError(f"{where} is {len(raw):,} bytes, more than any lowbit header ({MAX_HEADER_BYTES:,}); it is not one")

    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not a JSON number")

    try:
        value = json.loads(raw.decode("utf-8"), parse_constant=no_constants)
    except RecursionError:
        raise HeaderError(f"{where} is nested too deeply to be a lowbit header") from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError, huge integers, NaN
        raise HeaderError(f"{where} is corrupt (not valid JSON: {exc})") from None
    if json_depth(value) > MAX_JSON_DEPTH:
        raise HeaderError(f"{where} is nested more than {MAX_JSON_DEPTH} levels deep; it is not a lowbit header")
    return value


def validate_header(header: dict, where: str) -> Header:
    """The typed header, or a HeaderError that names the first bad fields."""
    try:
        parsed = Header.model_validate(header)
    except ValidationError as exc:
        parts = []
        for err in exc.errors()[:4]:
            loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
            parts.append(f"{loc}: {err['msg']}")
        more = f" (+{exc.error_count() - 4} more)" if exc.error_count() > 4 else ""
        raise HeaderError(f"{where} is not a valid lowbit header: {'; '.join(parts)}{more}") from None
    for name, m in parsed.modules.items():
        if m.numel != m.shape[0] * m.shape[1]:
            raise HeaderError(f"{where}: module {name} claims {m.numel} weights for shape {m.shape}")
        if m.kind == "ptq161" and (m.n_salient is None or m.block_size is None or not isinstance(m.grid.get("salient"), dict)):
            raise HeaderError(f"{where}: ptq161 module {name} lacks n_salient, block_size or its salient grid")
        if m.kind == "conv2d" and m.conv is None:
            raise HeaderError(f"{where}: conv2d module {name} does not give its geometry (conv)")
        if m.kind in ("act-linear", "static-act-linear") and m.act is None:
            raise HeaderError(f"{where}: act-linear module {name} does not say how its activations are quantized (act)")
        if not math.isfinite(m.bpw):
            raise HeaderError(f"{where}: module {name} has a non-finite bpw")
    return parsed
