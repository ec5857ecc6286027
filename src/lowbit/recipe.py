"""A declarative quantization recipe: which layers, which grid, which algorithm.

    method: gptq            # rtn | gptq | ptq161
    format: int4            # a grid name (see `lowbit formats`), or a search over grids (fp4_search, ...)
    format_options: {}      # passed to the format: {alpha: 1.5}, {levels: [-1, 0, 1]}, {clip: 0.9}, ...
    group_size: 128         # > 0 groups along in_features, -1 per output channel, 0 per tensor
    symmetric: false
    ragged: short-last      # a width the group size does not divide: shorter last group, or "error"
    gptq: {damp: 0.01, block_size: 128, act_order: auto}
    ptq161: {salient_fraction: 0.2, iters: 4}   # method ptq161: `format` is the salient channels' grid
    calib: {seq_len: 512, n_samples: 128, seed: 0}
    preprocess: {steps: 0}  # PTQ1.61's quantization preprocessing (restorative LoRA), any method; 0: off
      # {steps: 100, rank: 64, alpha: 16, lr: 1e-3, loss: distill, targets: null, batch_size: 8, seed: 0}
    hessian: inputs         # fisher: tokens weighted by the loss gradient at each layer's output (GuidedQuant)
    hessian_groups: 1       # with fisher: one weighted Hessian per group of output channels
    entropy_code: false     # true: codes stored ANS-coded (smaller file, same weights after loading)
    rotate: none            # hadamard: randomized Hadamard rotation of each layer's inputs (QuIP#/QuaRot incoherence)
    scaling: none           # awq: activation-aware scales per input channel, folded into the norm / layer before
    awq: {grid: 20, duo: true}   # AWQ's search: alpha on a grid of [0, 1); duo: divide by the weight magnitude too
    smooth: {alpha: 0.5}    # scaling: smooth (SmoothQuant): activation outliers moved into the weights, for --act
    act: none               # int8: activations quantized per token at run time, products in integers (W8A8, W4A8);
                            # on a CNN int8/int4 with static per-tensor ranges (calib.act_range: minmax|percentile|mse)
    data_free: none         # zeroq: calibrate a CNN on inputs distilled from its BatchNorm statistics (ZeroQ)
    zeroq: {steps: 100, lr: 0.2, batch_size: 32}
    bias_correction: false  # a CNN's biases absorb the mean effect of each layer's weight error
    budget: null            # a CNN's bits per weight: per-layer int2..int8 by ZeroQ's sensitivities (`vision.mixed`)
    tune: {steps: 0}        # end-to-end tuning of scales, norms and biases after quantization, codes frozen; 0: off
      # {steps: 100, lr: 1e-4, batch_size: 4, norms: true, seed: 0}
    ignore: [lm_head]       # regexes (re.search on the module name): keep these layers unquantized
    overrides:              # first matching pattern wins; unset keys keep the defaults above
      - {pattern: "layers\\.0\\.mlp\\.down_proj", format: int8}

An override that sets `format` without `format_options` starts from no options (options belong
to a format); one that sets only `format_options` applies them to the inherited format.
YAML or JSON; CLI flags build the same object. Unknown keys are refused with their name.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from .algos import METHODS
from .errors import LowbitError
from .formats import Grid, MissingFormatOptionError, SearchSpace, UnknownFormatError, get_format
from .formats.pvq import PVQFormat
from .formats.vq import VQFormat

# methods that need calibration inputs (layer Hessians)
CALIBRATED_METHODS = ("gptq", "ptq161")


class RecipeError(LowbitError):
    pass


# Named starting points (`lowbit quantize --preset`); a recipe file and flags are laid over them.
# Measured on SmolLM2-135M, int4 g64, 32 x 512 calibration tokens, 4,096 eval tokens
# (bench/results/smollm2): see the README's table; fast (RTN) KL 0.305 in seconds.
PRESETS: dict[str, dict[str, Any]] = {
    # GPTQ on loss-aware (Fisher) Hessians with every group's parameters searched for the least
    # rounding error (mse_fit): the lowest KL per bit measured on SmolLM2 (bench/results/smollm2);
    # AWQ scales and end-to-end tuning both raised its KL at 4 bits there, so neither is in it
    "quality": {"method": "gptq", "hessian": "fisher", "format_options": {"mse_fit": True}},
    "fast": {"method": "rtn"},  # round to nearest: no calibration
}

#: format options every grid takes (`formats.get_format`): they outlive a change of format
GRID_WIDE_OPTIONS = ("mse_fit",)


def preset(name: str) -> dict[str, Any]:
    """The recipe keys of a named preset; a RecipeError names the known ones."""
    try:
        return dict(PRESETS[name.lower()])
    except KeyError:
        raise RecipeError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}") from None


def _check_format(name: str) -> str:
    try:
        get_format(name)
    except MissingFormatOptionError:  # a known name that needs its options (lut): checked with format_options
        pass
    except UnknownFormatError as exc:
        raise ValueError(str(exc)) from None
    return name.lower()


def build_format(name: str, symmetric: bool, options: dict[str, Any]) -> Grid | SearchSpace:
    """The grid (or search space) a scheme names; a ValueError says what is wrong."""
    try:
        return get_format(name, symmetric=symmetric, **options)
    except UnknownFormatError as exc:
        raise ValueError(str(exc)) from None


def _check_method(name: str) -> str:
    if name == "vptq":
        raise ValueError("method vptq is set once for the whole recipe (it is gptq onto a vector format); "
                         "an override takes method gptq with a vector format")
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(METHODS)}")
    return name


def _check_group_size(g: int) -> int:
    if g < -1:
        raise ValueError("group_size must be > 0, -1 (per output channel) or 0 (per tensor)")
    return g


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _vptq_alias(data: Any) -> Any:
    """`method: vptq` names GPTQ onto a vector format (VPTQ's second-order assignment is GPTQ's error
    feedback a vector at a time, `algos.vq`): it becomes `gptq`, and is refused on a scalar grid."""
    if not isinstance(data, dict) or data.get("method") != "vptq":
        return data
    fmt = data.get("format", "vq2")
    if not isinstance(get_format(str(fmt)), (VQFormat, PVQFormat)):
        raise ValueError(f"method vptq quantizes onto vector codebooks (vq2, vq4x8o1, rvq8x8s2, grvq4x8s1g4, pvq2), "
                         f"not {fmt}: use method gptq for a scalar grid")
    return {"format": "vq2", **data, "method": "gptq"}


def _lift_symmetric(data: Any) -> Any:
    """`format_options: {symmetric: true}` means the scheme's `symmetric` (one place for it)."""
    if not isinstance(data, dict) or not isinstance(data.get("format_options"), dict) or "symmetric" not in data["format_options"]:
        return data
    options = dict(data["format_options"])
    sym = options.pop("symmetric")
    if not isinstance(sym, bool):
        raise ValueError(f"format option symmetric must be true or false, got {sym!r}")
    if data.get("symmetric") is not None and data["symmetric"] != sym:
        raise ValueError("symmetric and format_options.symmetric disagree; give one of them")
    return {**data, "format_options": options, "symmetric": sym}


class Scheme(_Strict):
    """How one layer is quantized."""

    method: str = "gptq"
    format: str = "int4"
    group_size: int = 128
    symmetric: bool = False
    format_options: dict[str, Any] = Field(default_factory=dict, validate_default=True)

    _symmetric_option = model_validator(mode="before")(classmethod(lambda cls, data: _lift_symmetric(data)))
    _format = field_validator("format")(classmethod(lambda cls, v: _check_format(v)))
    _method = field_validator("method")(classmethod(lambda cls, v: _check_method(v)))
    _group = field_validator("group_size")(classmethod(lambda cls, v: _check_group_size(v)))

    @field_validator("format_options")
    @classmethod
    def _options_build(cls, v: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        if "format" in info.data:  # else the format itself was refused
            built = build_format(info.data["format"], info.data.get("symmetric", False), v)
            if info.data.get("method") == "ptq161" and isinstance(built, SearchSpace):
                raise ValueError(f"method ptq161 quantizes its salient channels on one grid, not a search ({info.data['format']})")
        return v

    def grid(self) -> Grid | SearchSpace:
        """The layer's grid, or the search space its grid is chosen from (`fp4_search`, ...)."""
        return get_format(self.format, symmetric=self.symmetric, **self.format_options)

    @property
    def needs_calibration(self) -> bool:
        """Whether quantizing with this scheme needs the layer's Hessian from calibration inputs."""
        return self.method in CALIBRATED_METHODS or isinstance(self.grid(), SearchSpace)


class Override(_Strict):
    pattern: str
    skip: bool = False
    method: str | None = None
    format: str | None = None
    group_size: int | None = None
    symmetric: bool | None = None
    format_options: dict[str, Any] | None = None

    _symmetric_option = model_validator(mode="before")(classmethod(lambda cls, data: _lift_symmetric(data)))

    @field_validator("pattern")
    @classmethod
    def _regex(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as exc:
            raise ValueError(f"pattern {v!r} is not a valid regular expression: {exc}") from None
        return v

    _format = field_validator("format")(classmethod(lambda cls, v: None if v is None else _check_format(v)))
    _method = field_validator("method")(classmethod(lambda cls, v: None if v is None else _check_method(v)))
    _group = field_validator("group_size")(classmethod(lambda cls, v: None if v is None else _check_group_size(v)))


class GPTQOptions(_Strict):
    damp: float = Field(0.01, gt=0, le=1)
    block_size: int = Field(128, ge=1)
    # true: visit columns by decreasing diag(H) (groups stay contiguous: no storage cost); false: in order;
    # auto: both, per layer, keeping the lower output error (act-order helps int grids, can hurt ternary/binary)
    act_order: Literal["auto"] | bool = "auto"
    # vector formats: sweeps of exact coordinate descent on the codes after GPTQ's pass (each vector's
    # codeword re-chosen with all others fixed, on the layer's output error; `algos.vq.refine_codes`)
    sweeps: int = Field(0, ge=0, le=50)


class PTQ161Options(_Strict):
    salient_fraction: float = Field(0.2, gt=0, lt=1)  # input channels kept at the salient grid
    iters: int = Field(4, ge=1)  # alternating-minimisation rounds of the binary scales


class AWQOptions(_Strict):
    """AWQ's scale search (`lowbit.algos.awq`), used when `scaling: awq`."""

    grid: int = Field(20, ge=1, le=200)  # alpha in {0, 1/grid, ..., (grid-1)/grid}
    duo: bool = True  # s = a^alpha / w^(1-alpha) (AutoAWQ's default); false: s = a^alpha


class SmoothOptions(_Strict):
    """SmoothQuant's migration (`lowbit.algos.smoothquant`), used when `scaling: smooth`."""

    alpha: float = Field(0.5, ge=0, le=1)  # s = a^alpha / w^(1 - alpha): how much of the range moves to the weights


class SignRoundOptions(_Strict):
    """SignRound's learned rounding (`lowbit.algos.signround`), used when `rounding: learned`."""

    steps: int = Field(50, ge=1)  # signed-gradient steps per block (AutoRound: 200)
    lr: float | None = Field(None, gt=0, le=1)  # None: 1 / steps, decaying linearly to 0
    batch_size: int = Field(4, ge=1)  # calibration windows per step
    seed: int = 0  # which windows each step sees
    amp: bool = True  # training steps under bfloat16 autocast (faster); the keep-or-not loss stays float32


class CalibOptions(_Strict):
    path: str | None = None  # a text file; None: the default calibration text
    seq_len: int = Field(512, ge=8)
    n_samples: int = Field(128, ge=1)
    batch_size: int = Field(8, ge=1)
    seed: int = 0
    # convolutional models' static activation ranges (`calib.act_ranges`): minmax | percentile | mse
    act_range: Literal["minmax", "percentile", "mse"] = "mse"


class PreprocessOptions(_Strict):
    """PTQ1.61's quantization preprocessing (`lowbit.algos.restorative_lora`): a first pass with the
    same recipe, LoRA adapters trained on the calibration windows over its dequantized weights,
    merged, and the merged model quantized again. Causal LMs; any method."""

    steps: int = Field(0, ge=0)  # training steps of the adapters; 0: no preprocessing
    rank: int = Field(64, ge=1)
    alpha: float = Field(16.0, gt=0)  # the adapters' scale is alpha / rank
    lr: float = Field(1e-3, gt=0, le=1)  # AdamW peak (5% warm-up, cosine decay); the paper: 1e-4 over 20000 steps
    loss: Literal["distill", "lm"] = "distill"  # KL to the original model, or the paper's next-token loss
    targets: str | None = None  # regex (re.search) among the quantized layers; None: all of them
    batch_size: int = Field(8, ge=1)  # calibration windows per step
    seed: int = 0  # the adapters' init and the batch order

    @field_validator("targets")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"targets {v!r} is not a valid regular expression: {exc}") from None
        return v


class ZeroQOptions(_Strict):
    """ZeroQ's distillation (`calib.zeroq`): optimiser steps per batch of inputs, Adam's rate, inputs per batch."""

    steps: int = Field(100, ge=1, le=100_000)
    lr: float = Field(0.2, gt=0)
    batch_size: int = Field(32, ge=1)


class TuneOptions(_Strict):
    """End-to-end tuning after quantization (`lowbit.algos.e2e_tune`, EfficientQAT's E2E-QP): codes
    frozen, the fp16 grid parameters, norms and biases trained against the original model's
    next-token distributions on the calibration windows. Causal LMs; bits per weight unchanged."""

    steps: int = Field(0, ge=0)  # 0: off
    lr: float = Field(1e-4, gt=0, le=1)  # AdamW peak (5% warm-up, cosine decay)
    batch_size: int = Field(4, ge=1)  # calibration windows per step
    norms: bool = True  # also the norm weights and the quantized layers' biases
    seed: int = 0  # the batch order
    # calibration windows kept out of training; the tuned parameters are kept only if the KL on them drops
    holdout: int = Field(0, ge=0)


def _apply_target(data: Any) -> Any:
    """`target: gguf:q4_0` fixes format, symmetric and group size (`export.targets`); a conflicting
    value given alongside is refused rather than silently replaced."""
    if not isinstance(data, dict) or data.get("target") is None:
        return data
    from .export.errors import ExportError
    from .export.targets import recipe_settings

    if not isinstance(data["target"], str):
        raise ValueError(f"target must be a name such as gguf:q4_0, got {data['target']!r}")
    try:
        settings = recipe_settings(data["target"], data.get("group_size"))
    except ExportError as exc:
        raise ValueError(str(exc)) from None
    for key in ("format", "symmetric"):  # symmetric: only where the target's grid has the choice
        if key in settings and data.get(key) is not None and str(data[key]).lower() != str(settings[key]).lower():
            raise ValueError(f"target {data['target']} stores {key} {settings[key]}; drop {key} {data[key]!r} or the target")
    return {**data, **settings, "target": data["target"].strip().lower()}


class Recipe(Scheme):
    target: str | None = None  # an export layout the codes must fit exactly (`lowbit.export.targets`)
    ragged: Literal["short-last", "error"] = "short-last"
    gptq: GPTQOptions = GPTQOptions()
    ptq161: PTQ161Options = PTQ161Options()
    # per-input-channel scales before quantization, folded into the norm / layer before: AWQ's
    # (searched for the weights' rounding) or SmoothQuant's (activation outliers moved into the weights)
    scaling: Literal["none", "awq", "smooth"] = "none"
    awq: AWQOptions = AWQOptions()
    smooth: SmoothOptions = SmoothOptions()
    # nearest: the method's codes; learned: each block's codes refined by SignRound on its output error
    rounding: Literal["nearest", "learned"] = "nearest"
    # hadamard: every quantized layer's input side rotated by a randomized Hadamard transform first
    # (incoherence processing, `lowbit.rotate`); the runtime rotates the activations
    rotate: Literal["none", "hadamard"] = "none"
    # int8: every quantized layer's inputs quantized to int8 per token at run time and its product
    # run in integers (`nn.act_linear`: W8A8, W4A8, ...); its weights must be on an integer grid
    # int4 (and int8) on a convolutional model: static per-tensor ranges calibrated on images (`vision`)
    act: Literal["none", "int8", "int4"] = "none"
    # store each quantized linear's codes ANS-coded under their histogram (`lowbit.coding`): a
    # smaller file, the same codes after loading
    entropy_code: bool = False
    signround: SignRoundOptions = SignRoundOptions()
    # inputs: GPTQ's H = 2 X^T X / n; fisher: each token weighted by the loss gradient at the layer's
    # output (GuidedQuant's loss-aware Hessian, `calib.fisher`), for every method that reads Hessians
    hessian: Literal["inputs", "fisher"] = "inputs"
    # hessian: fisher's output-channel groups (GuidedQuant): each group of a layer's rows gets its own
    # loss-weighted Hessian; 1: one per layer
    hessian_groups: int = Field(1, ge=1, le=4096)
    calib: CalibOptions = CalibOptions()
    preprocess: PreprocessOptions = PreprocessOptions()
    tune: TuneOptions = TuneOptions()
    # zeroq: no calibration data at all: inputs distilled from the model's BatchNorm statistics
    # (ZeroQ), calib.n_samples of them, for GPTQ and activation ranges (convolutional models)
    data_free: Literal["none", "zeroq"] = "none"
    zeroq: ZeroQOptions = ZeroQOptions()
    # convolutional models: bits per weight over the quantized layers; each layer gets int2..int8 by
    # ZeroQ's sensitivities and a knapsack (`vision.mixed`); language models use `lowbit search`
    budget: float | None = Field(None, gt=0, le=32)
    # convolutional models: each layer's bias absorbs the mean effect of its weight error on the
    # calibration inputs (bias correction, Nagel et al.'s data-free quantization, empirical form)
    bias_correction: bool = False
    ignore: list[str] = ["lm_head"]
    overrides: list[Override] = []

    _target = model_validator(mode="before")(classmethod(
        lambda cls, data: _apply_target(_lift_symmetric(_vptq_alias(data)))))

    def _layer_rewrites(self) -> list[str]:
        """The steps set in this recipe that read or rewrite a layer as a scalar grid's plain weight
        (AWQ, learned rounding, an export layout): what rotated and codebook layers do not take yet."""
        return [what for what, on in ((f"scaling: {self.scaling}", self.scaling != "none"), ("rounding: learned", self.rounding != "nearest"),
                                      (f"target: {self.target}", self.target is not None)) if on]

    @model_validator(mode="after")
    def _codebooks_combine(self) -> "Recipe":
        schemes = [self._base(), *(_apply(self._base(), o) for o in self.overrides if not o.skip)]
        vq = [s for s in schemes if isinstance(s.grid(), (VQFormat, PVQFormat))]
        if self.gptq.sweeps and not any(isinstance(s.grid(), VQFormat) and s.method == "gptq" for s in schemes):
            raise ValueError("gptq.sweeps re-chooses codewords of vector codebooks after GPTQ: it takes method gptq "
                             "with a vq/rvq/grvq format (drop sweeps for other formats)")
        if not vq:
            return self
        clash = (["method ptq161"] if any(s.method == "ptq161" for s in vq) else []) + (
            [f"rotate: {self.rotate}"] if self.rotate != "none" else []) + self._layer_rewrites()
        if clash:
            raise ValueError(f"vector formats ({vq[0].format}) do not combine with {', '.join(clash)} yet: "
                             "use a scalar format for that, or drop it")
        return self

    @model_validator(mode="after")
    def _act_needs_int8_rows(self) -> "Recipe":
        if self.act == "none":
            return self
        from .nn.act_linear import fits_int_act

        need = ("needs integer weights: format int2..int8 (symmetric or asymmetric, any group size; int8 with one "
                "scale per row, `--bits 8 --sym --group-size -1`, is W8A8's fastest: one integer product per layer) or "
                "ternary (BitNet's W1.58A8), method rtn or gptq")
        named = [("the recipe", self._base())] + [(f"override {o.pattern!r}", _apply(self._base(), o))
                                                  for o in self.overrides if not o.skip]
        for where, s in named:
            grid = s.grid()
            if s.method not in ("rtn", "gptq") or not fits_int_act(grid):
                raise ValueError(f"act: {self.act} runs each layer's product in integers and {need}; {where} has "
                                 f"method {s.method}, format {s.format}")
        clash = ([f"rotate: {self.rotate}"] if self.rotate != "none" else []) + [
            what for what, on in ((f"target: {self.target}", self.target is not None), ("rounding: learned", self.rounding != "nearest"),
                                  ("entropy_code", self.entropy_code), ("tune", self.tune.steps > 0)) if on]
        if clash:
            raise ValueError(f"act: {self.act} does not combine with {', '.join(clash)} yet; drop one of them")
        return self

    @model_validator(mode="after")
    def _rotate_combines(self) -> "Recipe":
        if self.rotate == "none":
            return self
        ptq161 = self.method == "ptq161" or any(o.method == "ptq161" for o in self.overrides)
        clash = (["method: ptq161"] if ptq161 else []) + self._layer_rewrites()
        if clash:
            raise ValueError(f"rotate: {self.rotate} does not combine with {', '.join(clash)} yet (an export target "
                             "has no rotated layout); drop one of them")
        return self

    @model_validator(mode="after")
    def _groups_need_fisher(self) -> "Recipe":
        if self.hessian_groups > 1 and self.hessian != "fisher":
            raise ValueError(f"hessian_groups: {self.hessian_groups} groups the loss gradients of hessian: fisher; "
                             "set hessian: fisher, or drop hessian_groups")
        return self

    @field_validator("ignore")
    @classmethod
    def _regexes(cls, v: list[str]) -> list[str]:
        for p in v:
            try:
                re.compile(p)
            except re.error as exc:
                raise ValueError(f"ignore pattern {p!r} is not a valid regular expression: {exc}") from None
        return v

    @field_validator("overrides")
    @classmethod
    def _overrides_build(cls, v: list[Override], info: ValidationInfo) -> list[Override]:
        keys = ("method", "format", "group_size", "symmetric", "format_options")
        if not all(k in info.data for k in keys):
            return v  # the defaults themselves were refused
        base = Scheme.model_construct(**{k: info.data[k] for k in keys})
        for i, o in enumerate(v):
            if o.skip:
                continue
            try:
                Scheme.model_validate(_apply(base, o).model_dump())
            except ValidationError as exc:
                what = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg'].removeprefix('Value error, ')}" for e in exc.errors())
                raise ValueError(f"override {i} ({o.pattern!r}) gives an invalid scheme: {what}") from None
        return v

    def _base(self) -> Scheme:
        return Scheme.model_construct(
            method=self.method, format=self.format, group_size=self.group_size, symmetric=self.symmetric,
            format_options=dict(self.format_options),
        )

    def scheme_for(self, module_name: str) -> Scheme | None:
        """The scheme for one module, or None if it stays unquantized."""
        base = self._base()
        for o in self.overrides:
            if re.search(o.pattern, module_name):
                return None if o.skip else _apply(base, o)
        if any(re.search(p, module_name) for p in self.ignore):
            return None
        return base

    @property
    def needs_calibration(self) -> bool:
        """Whether the defaults or any override need calibration inputs (a conservative answer
        for `lowbit.pipeline`: the defaults count even if every layer is overridden), or the
        preprocessing trains on them."""
        if self.preprocess.steps > 0 or self.tune.steps > 0 or self.scaling != "none" or self.rounding != "nearest":
            return True
        base = self._base()
        return any(s.needs_calibration for s in [base, *(_apply(base, o) for o in self.overrides if not o.skip)])

    def cnn_only(self) -> str | None:
        """What in this recipe only the convolutional path runs (so a language model refuses it), or None."""
        if self.budget is not None:
            return (f"budget: {self.budget} allocates a convolutional model's bits; for a language model run "
                    f"`lowbit search MODEL --budget {self.budget:g}`")
        if self.data_free != "none":
            return (f"data_free: {self.data_free} distils inputs from BatchNorm statistics, which a language model does "
                    "not have; calibrate it on text instead")
        if self.bias_correction:
            return "bias_correction is the convolutional path's; a language model's layers keep their biases"
        if self.act == "int4":
            return ("act: int4 is the convolutional path's static per-tensor activations; a language model's activations "
                    "are quantized per token in int8 (act: int8)")
        return None

    def to_dict(self) -> dict:
        """JSON-able keys; without `preprocess` / `tune` / `scaling` / `rounding` when they are off and `target` when there is
        none, so artifacts read as they did before those existed."""
        exclude = (({"preprocess"} if self.preprocess.steps == 0 else set()) | ({"tune"} if self.tune.steps == 0 else set())
                   | ({"target"} if self.target is None else set()) | ({"scaling"} if self.scaling == "none" else set())
                   | ({"awq"} if self.scaling != "awq" else set()) | ({"smooth"} if self.scaling != "smooth" else set())
                   | ({"rounding", "signround"} if self.rounding == "nearest" else set())
                   | ({"hessian"} if self.hessian == "inputs" else set())
                   | ({"hessian_groups"} if self.hessian_groups == 1 else set())
                   | ({"rotate"} if self.rotate == "none" else set())
                   | ({"act"} if self.act == "none" else set())
                   | ({"data_free", "zeroq"} if self.data_free == "none" else set())
                   | ({"budget"} if self.budget is None else set())
                   | ({"bias_correction"} if not self.bias_correction else set())
                   | ({"entropy_code"} if not self.entropy_code else set()))
        nested: dict = ({k: True for k in exclude} | ({"gptq": {"sweeps"}} if self.gptq.sweeps == 0 else {})
                        | ({"calib": {"act_range"}} if self.act == "none" else {}))
        return self.model_dump(mode="json", exclude=nested or None)

    @classmethod
    def from_dict(cls, data: dict) -> "Recipe":
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise RecipeError(describe_validation_error(exc)) from None
        except RecursionError:
            raise RecipeError("invalid recipe: nested too deeply") from None

    @classmethod
    def from_file(cls, path: str | Path) -> "Recipe":
        p = Path(path)
        if not p.is_file():
            raise RecipeError(f"recipe file {p} not found")
        if p.stat().st_size > 1 << 20:
            raise RecipeError(f"recipe file {p} is {p.stat().st_size:,} bytes; a recipe is a few lines (at most 1 MB)")
        try:
            text = p.read_text(encoding="utf-8")
            data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
        except RecursionError:
            raise RecipeError(f"recipe file {p} is nested too deeply to be a recipe") from None
        except (ValueError, yaml.YAMLError) as exc:  # JSONDecodeError, UnicodeDecodeError, huge integers
            raise RecipeError(f"recipe file {p} is not valid {'JSON' if p.suffix == '.json' else 'YAML'}: {exc}") from None
        if not isinstance(data, dict):
            raise RecipeError(f"recipe file {p} must hold a mapping of keys (method, format, ...)")
        return cls.from_dict(data)


def _apply(base: Scheme, o: Override) -> Scheme:
    """`base` with what the override `o` sets (a new format without options starts from none)."""
    changes = {k: v for k, v in o.model_dump(exclude={"pattern", "skip"}).items() if v is not None}
    if "format" in changes and "format_options" not in changes:
        changes["format_options"] = {}
    return base.model_copy(update=changes)


def describe_validation_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(part) for part in err["loc"]) or "(recipe)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check its spelling; see `lowbit quantize --help`)"
        lines.append(f"recipe key '{key}': {msg}")
    return "invalid recipe:\n  " + "\n  ".join(lines)
