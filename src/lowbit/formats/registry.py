"""Format names, as recipes and the CLI spell them, and how to build a grid from one."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import LowbitError
from .base import Grid
from .binary import BinaryGrid
from .clip import ClippedGrid
from .mse_fit import MSEFitGrid
from .pvq import NAMED as NAMED_PVQ
from .pvq import PATTERN as PVQ_PATTERN
from .pvq import PVQFormat
from .vq import NAMED as NAMED_VQ
from .vq import VQFormat
from .int import IntGrid, IntMinGrid
from .kquant import KQuantGrid
from .log import LogGrid
from .lookup import LookupGrid, NormalFloatGrid
from .minifloat import MinifloatGrid, MXFP4Grid, NVFP4Grid
from .nested import NestedIntGrid
from .power import PowerGrid
from .search import SearchSpace, minifloat_search, power_search
from .ternary import TernaryGrid


class UnknownFormatError(LowbitError):
    pass


class FormatOptionError(UnknownFormatError):
    """A known format name with options it does not accept (or a name whose numbers do not fit)."""


class MissingFormatOptionError(FormatOptionError):
    """A known format name that needs an option to build (the table of `lut`)."""


@dataclass(frozen=True)
class _Format:
    pattern: re.Pattern[str]
    build: Callable[[re.Match[str], dict[str, Any]], Any]  # a Grid (a SearchSpace for _SEARCHES)
    description: str
    bits: str  # width of one code, for the listing
    params: str  # what each block stores besides its codes


def _options(name: str, given: dict[str, Any], accepted: tuple[str, ...]) -> dict[str, Any]:
    """The options a builder uses; `symmetric` (passed by recipes to every format) is ignored
    where the format has no such choice, anything else unknown is refused."""
    unknown = sorted(set(given) - set(accepted) - {"symmetric"})
    if unknown:
        allowed = ", ".join(accepted) or "none"
        raise FormatOptionError(f"format {name!r} does not take option(s) {', '.join(unknown)} (options: {allowed})")
    return {k: v for k, v in given.items() if k in accepted}


def _minifloat(m: re.Match[str], o: dict[str, Any]) -> Grid:
    total, e, mant = (int(g) for g in m.groups())
    if 1 + e + mant != total:
        raise FormatOptionError(f"{m.group(0)}: 1 sign + {e} exponent + {mant} mantissa bits is {1 + e + mant}, not {total}")
    return MinifloatGrid(e, mant, **_options(m.group(0), o, ("subnormals", "bias")))


_FORMATS: list[_Format] = [
    _Format(
        re.compile(r"int([2-8])"),
        lambda m, o: IntGrid(int(m.group(1)), symmetric=bool(_options(m.group(0), o, ("symmetric",)).get("symmetric", False))),
        "uniform integer grid, 2-8 bits; options: symmetric (default false: asymmetric with a zero point)",
        "2-8", "fp16 scale (+ b-bit zero point if asymmetric)",
    ),
    _Format(
        re.compile(r"int([2-8])_min"),
        lambda m, o: IntMinGrid(int(m.group(1)), **_options(m.group(0), o, ())),
        "unsigned integer codes with an fp16 step and an fp16 min per block, w = scale*q + min (llama.cpp's "
        "Q4_1/Q5_1 decode: int4_min, int5_min); what --target gguf:q4_1 / gguf:q5_1 quantize onto",
        "2-8", "fp16 scale + fp16 min",
    ),
    _Format(
        re.compile(r"int([456])_k"),
        lambda m, o: KQuantGrid(int(m.group(1)), **_options(m.group(0), o, ())),
        "llama.cpp K-quants (Q4_K, Q5_K, Q6_K): int4_k/int5_k w = d*sc*q - dmin*m in blocks of 32, int6_k "
        "w = d*s*(q - 32) in blocks of 16, the block scales 6/8-bit codes under one fp16 d per 256 (fixed; rows "
        "a multiple of 256); what --target gguf:q4_k / q5_k / q6_k quantize onto",
        "4-6", "6-bit scale (+ 6-bit min) per block, fp16 d (+ dmin) per 256",
    ),
    _Format(
        re.compile(r"fp([3-8])_e([1-7])m([0-6])"),
        _minifloat,
        "ExMy minifloat (LLM-FP4, FLIQS), e.g. fp4_e2m1, fp4_e1m2, fp4_e3m0, fp6_e3m2, fp8_e4m3, fp8_e5m2; "
        "absmax maps to the format's max; options: subnormals (default true), bias (default 2^(E-1)-1)",
        "3-8", "fp16 scale",
    ),
    _Format(
        re.compile(r"mxfp4"),
        lambda m, o: MXFP4Grid(**_options("mxfp4", o, ("scale_rule",))),
        "OCP MXFP4: E2M1 in blocks of 32 (fixed), shared power-of-two scale as an 8-bit E8M0 code; "
        "option scale_rule: ocp (default) | mse",
        "4", "8-bit E8M0 scale exponent per 32",
    ),
    _Format(
        re.compile(r"nvfp4"),
        lambda m, o: NVFP4Grid(**_options("nvfp4", o, ("scale_rule", "tensor_scale_exp"))),
        "NVFP4: E2M1 in blocks of 16 (fixed), scale as an 8-bit FP8 E4M3 code times a fixed 2^tensor_scale_exp "
        "(default -7, in place of the per-tensor FP32 scale); option scale_rule: nearest (default) | mse",
        "4", "8-bit E4M3 scale per 16",
    ),
    _Format(
        re.compile(r"nf([2-8])"),
        lambda m, o: NormalFloatGrid(int(m.group(1)), **_options(m.group(0), o, ())),
        "NormalFloat (QLoRA): normal-quantile levels with an exact zero, absmax scale; nf4, nf3, ...",
        "2-8", "fp16 scale",
    ),
    _Format(
        re.compile(r"lut"),
        lambda m, o: _lut(o),
        "user lookup table: get_grid('lut', levels=[...]) (2-256 distinct values), code = index of the nearest "
        "level, absmax scale; the table is stored in the spec",
        "1-8", "fp16 scale",
    ),
    _Format(
        re.compile(r"power([2-8])"),
        lambda m, o: PowerGrid(int(m.group(1)), **_options(m.group(0), o, ("alpha",))),
        "NUPES power grid: levels sign(q)|q/qmax|^alpha * scale for integer q; option alpha (default 1.25)",
        "2-8", "fp16 scale",
    ),
    _Format(
        re.compile(r"post([3-8])"),
        lambda m, o: LogGrid(int(m.group(1)), "post", **_options(m.group(0), o, ())),
        "powers of sqrt(2) (ASQ's POST): +-scale*2^(-k/2) and zero, absmax scale",
        "3-8", "fp16 scale",
    ),
    _Format(
        re.compile(r"log([3-8])"),
        lambda m, o: LogGrid(int(m.group(1)), "log", **_options(m.group(0), o, ())),
        "powers of two (log2 quantization, RepQuant): +-scale*2^(-k) and zero, absmax scale",
        "3-8", "fp16 scale",
    ),
    _Format(
        re.compile(r"ternary"),
        lambda m, o: TernaryGrid(packed=True, **_options("ternary", o, ("scale",))),
        "BitNet b1.58 ternary {-1,0,+1}*scale, 5 codes per byte (1.6 bits); option scale: absmean (default) | median",
        "2 (packed 1.6)", "fp16 scale",
    ),
    _Format(
        re.compile(r"ternary2"),
        lambda m, o: TernaryGrid(packed=False, **_options("ternary2", o, ("scale",))),
        "ternary as above, codes stored at plain 2 bits",
        "2", "fp16 scale",
    ),
    _Format(
        re.compile(r"nested([3-8])"),
        lambda m, o: NestedIntGrid(int(m.group(1)), **_options(m.group(0), o, ("precision", "fit", "targets"))),
        "Double Rounding nested integers (Nearly Lossless Adaptive Bit Switching): one symmetric 8-bit (nested8) "
        "code per weight, lower precisions derived at load time by rounding the code again "
        "(lowbit.load(path, bits=4)); options: precision, fit: joint (default) | top, targets (default [8, 6, 4])",
        "3-8 (stored), any lower at load", "fp16 scale",
    ),
    _Format(
        re.compile(r"binary"),
        lambda m, o: BinaryGrid(**_options("binary", o, ())),
        "sign * scale, scale = mean|w| per block (1 bit)",
        "1", "fp16 scale",
    ),
]


_SEARCHES: list[_Format] = [
    _Format(
        re.compile(r"fp([3-8])_search"),
        lambda m, o: minifloat_search(int(m.group(1)), **_options(m.group(0), o, ("clips", "splits", "subnormals", "refine"))),
        "LLM-FP4 search, per layer: every ExMy split of a b-bit minifloat x clipping factors, the one with the "
        "least output error on calibration data (RTN or GPTQ); options: clips, splits, subnormals, refine",
        "3-8", "fp16 scale",
    ),
    _Format(
        re.compile(r"power([2-8])_search"),
        lambda m, o: power_search(int(m.group(1)), **_options(m.group(0), o, ("alphas", "clips", "refine"))),
        "NUPES power-exponent search, per layer: power grids over alphas x clipping factors, the one with the "
        "least output error on calibration data; options: alphas, clips, refine",
        "2-8", "fp16 scale",
    ),
]


def _lut(o: dict[str, Any]) -> Grid:
    opts = _options("lut", o, ("levels",))
    if "levels" not in opts:
        raise MissingFormatOptionError("format 'lut' needs its table: get_grid('lut', levels=[...])")
    return LookupGrid(opts["levels"])


EXAMPLE_NAMES = [
    "int8", "int4", "int3", "int2", "int4_min", "int5_min", "int4_k", "int5_k", "int6_k",
    "fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp5_e2m2", "fp4_e2m1", "fp4_e1m2", "fp4_e3m0", "mxfp4", "nvfp4",
    "nf4", "nf3", "lut", "power4", "post4", "log4", "ternary", "ternary2", "binary", "nested8",
]
SEARCH_NAMES = ["fp4_search", "fp3_search", "power4_search", "power3_search", "vq2", "vq3", "vq4x8", "pvq2", "pvq3"]


def _build(fmt: _Format, match: re.Match[str], name: str, options: dict[str, Any]) -> Any:
    try:
        return fmt.build(match, options)
    except UnknownFormatError:
        raise
    except (ValueError, TypeError) as exc:
        raise FormatOptionError(f"format {name!r}: {exc}") from None


def get_grid(name: str, **options: Any) -> Grid:
    """Build the grid that `name` names (`int4`, `fp4_e2m1`, `nf4`, ...) with its options
    (`symmetric=True`, `alpha=1.5`, `levels=[...]`, ...). Every grid whose only parameter is an
    fp16 scale also takes `clip` (see `formats.clip`); every grid takes `mse_fit=True` (per-block
    parameters searched for the least rounding error, `formats.mse_fit`)."""
    key = name.strip().lower()
    clip = options.pop("clip", None)
    mse_fit = options.pop("mse_fit", False)
    if not isinstance(mse_fit, bool):
        raise FormatOptionError(f"format {name!r}: mse_fit is true (parameters searched per block) or false, got {mse_fit!r}")
    for fmt in _FORMATS:
        match = fmt.pattern.fullmatch(key)
        if match:
            grid = _build(fmt, match, name, options)
            if mse_fit:
                if clip is not None and not (not isinstance(clip, bool) and clip == 1):
                    raise FormatOptionError(f"format {name!r}: mse_fit searches the clipping itself; drop clip={clip!r}")
                return MSEFitGrid(grid)
            if clip is None or (not isinstance(clip, bool) and clip == 1):
                return grid
            try:
                return ClippedGrid(grid, clip)
            except ValueError as exc:
                raise FormatOptionError(f"format {name!r}: {exc}") from None
    if any(f.pattern.fullmatch(key) for f in _SEARCHES):
        raise UnknownFormatError(f"{name!r} is a search over grids, not one grid: use it as a recipe format (get_format)")
    raise UnknownFormatError(
        f"unknown format {name!r}; known formats: {', '.join(EXAMPLE_NAMES + SEARCH_NAMES)} "
        "(see `lowbit formats` for the patterns: int2-8, int2-8_min, int4-6_k, fpN_eXmY, nf2-8, power2-8, post3-8, log3-8, "
        "fpN_search, powerN_search, vqDxK, rvqDxKsS, grvqDxKsSgG (each with an optional oP suffix), pvqNkKaB)"
    )


def _pct(group: str | None) -> int:
    return int(group) if group else 0


_CODEBOOKS: list[_Format] = [
    _Format(
        re.compile(r"vq([1-8])x([1-9]|1[0-2])(?:o([1-9]|[1-4][0-9]|50))?"),
        lambda m, o: (_options(m.group(0), o, ()), VQFormat(int(m.group(1)), int(m.group(2)), outlier_pct=_pct(m.group(3))))[1],
        "vector codebook: every d consecutive weights of a row -> one of 2^k codewords (vqDxK; vq2 = vq4x8, "
        "vq3 = vq2x6), one fp16 codebook per layer, fp16 scales per --group-size columns (a multiple of d; -1: "
        "per row); k-means + GPTQ-style error feedback (VPTQ/GPTVQ) with method gptq, nearest codeword with rtn; "
        "suffix oP (vq4x8o1, also on rvq/grvq): the P% most salient input columns on an outlier codebook of their own "
        "(VPTQ), their indices stored",
        "k per d weights", "fp16 codebook per layer, fp16 scale per group (or row)",
    ),
    _Format(
        re.compile(r"rvq([1-8])x([1-9]|1[0-2])s([2-8])(?:o([1-9]|[1-4][0-9]|50))?"),
        lambda m, o: (_options(m.group(0), o, ()),
                      VQFormat(int(m.group(1)), int(m.group(2)), int(m.group(3)), outlier_pct=_pct(m.group(4))))[1],
        "residual vector codebooks (RVQ): S stages of 2^k d-dim codewords, each coding what the stages before left, "
        "the codewords summed (rvqDxKsS; rvq8x8s2 = 2 bits per weight with two 256-entry 8-dim codebooks), fp16 "
        "scales as vqDxK; greedy stage-by-stage assignment inside GPTQ's error feedback with method gptq",
        "S x k per d weights", "S fp16 codebooks per layer, fp16 scale per group (or row)",
    ),
    _Format(
        re.compile(r"grvq([1-8])x([1-9]|1[0-2])s([1-8])g([2-9]|[1-5][0-9]|6[0-4])(?:o([1-9]|[1-4][0-9]|50))?"),
        lambda m, o: (_options(m.group(0), o, ()),
                      VQFormat(int(m.group(1)), int(m.group(2)), int(m.group(3)), int(m.group(4)), _pct(m.group(5))))[1],
        "group-residual vector codebooks (GRVQ): the rows cut into G contiguous groups, each with its own S residual "
        "codebooks (grvqDxKsSgG; grvq4x8s1g4 = vq4x8 with a codebook per quarter of the rows)",
        "S x k per d weights", "G x S fp16 codebooks per layer, fp16 scale per group (or row)",
    ),
    _Format(
        PVQ_PATTERN,
        lambda m, o: (_options(m.group(0), o, ()), PVQFormat(int(m.group(1)), int(m.group(2)), int(m.group(3))))[1],
        "pyramid VQ, codebook-free: every N consecutive weights of a row -> a point with K integer pulses on the L1 "
        "pyramid (its enumeration index) times a B-bit amplitude (pvqNkKaB; pvq2 = pvq16k9a4, 1.94 bits per weight in "
        "codes; pvq3 = pvq8k10a4, 3.0); GPTQ-style error feedback with method gptq",
        "ceil(log2 V(N,K)) + B per N weights", "fp16 amplitude scale per row",
    ),
]


def get_format(name: str, **options: Any) -> Grid | SearchSpace | VQFormat | PVQFormat:
    """A grid (`get_grid`), for a search name (`fp4_search`, `power3_search`) the search space that
    `algos.format_search` chooses from per layer, or for a codebook name (`vq4x8`, `vq2`) the
    vector codebook format that `algos.vq` quantizes onto, for a pyramid name (`pvq16k9a4`, `pvq2`)
    the pyramid format of `algos.pvq`."""
    key = name.strip().lower()
    key = "vq{}x{}".format(*NAMED_VQ[key]) if key in NAMED_VQ else key
    key = "pvq{}k{}a{}".format(*NAMED_PVQ[key]) if key in NAMED_PVQ else key
    for fmt in _CODEBOOKS:
        match = fmt.pattern.fullmatch(key)
        if match:
            return _build(fmt, match, name, options)
    for fmt in _SEARCHES:
        match = fmt.pattern.fullmatch(key)
        if match:
            return _build(fmt, match, name, options)
    return get_grid(name, **options)


def grid_from_spec(spec: dict[str, Any]) -> Grid:
    """Rebuild a grid from `Grid.spec()` (as stored in an artifact header)."""
    options = {k: v for k, v in spec.items() if k != "format"}
    return get_grid(spec["format"], **options)


def describe_formats() -> list[dict[str, str]]:
    """One row per format pattern: pattern, description, bits (code width), params (per block)."""
    return [
        {"pattern": f.pattern.pattern, "description": f.description, "bits": f.bits, "params": f.params}
        for f in _FORMATS + _SEARCHES + _CODEBOOKS
    ]
