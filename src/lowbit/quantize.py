"""Quantize a model in place by a recipe: plan which layers get which scheme, gather calibration
Hessians block by block where an algorithm needs them (GPTQ, PTQ1.61, a format search), and swap
each nn.Linear for a quantized module (QuantLinear, PTQ161Linear). With `recipe.preprocess.steps`
> 0 the model is first preprocessed (PTQ1.61's restorative LoRA, see `preprocess_model`); with
`recipe.tune.steps` > 0 the quantized model's scales and norms are then tuned end to end
against the original (`tune_model`)."""

from __future__ import annotations

import copy
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from .algos import (
    GPTQConfig, PTQ161Config, RestorativeConfig, TuneConfig, gptq_quantize, gptq_quantize_rounded, ptq161_quantize, restorative_lora, rtn_quantize,
    search_format, tune_continuous,
)
from .algos.awq import AWQConfig, AWQError, awq_block
from .algos.pvq import pvq_quantize
from .algos.vq import vq_quantize
from .algos.signround import RoundConfig, float_copy, learn_block_rounding
from .calib.fisher import FisherError, TokenWeights, fisher_token_weights
from .calib.hessian import pooled
from .calib.walker import BlockInputs, hidden_of, walk_blocks, whole_model_hessians, with_hidden
from .errors import LowbitError
from .formats import GroupLayout, SearchSpace
from .formats.pvq import PVQFormat
from .formats.vq import VQFormat
from .models import find_blocks, find_linears, linear_weight, tied_parameter_names
from .nn import IntActLinear, PTQ161Linear, PVQLinear, QuantLinear, RotatedQuantLinear, VQLinear
from .recipe import PreprocessOptions, Recipe, Scheme
from .rotate import HadamardRotation, RotateError

if TYPE_CHECKING:
    from .parallel import Parallel


def _target_scheme(scheme: Scheme, target: str, in_features: int) -> tuple[Scheme | None, str | None, str]:
    """A layer's scheme under an export target (`--target`): unchanged if the target's block divides
    its input width, else its fallback's (TQ1_0/TQ2_0 -> gguf:q4_0, as llama.cpp's quantizer does);
    returns (scheme or None if no block fits, the target it is quantized for, why it is not `target`).
    Imported late: export reads artifacts."""
    from .export.targets import get_target, recipe_settings, target_for_width

    asked = get_target(target)
    fit = target_for_width(target, in_features)
    why = f"input width {in_features} is not a multiple of the {asked.name} block ({asked.block})"
    if fit is None:
        return None, None, f"{why}: kept in float" + (" (exported as F16)" if asked.ggml_type else "")
    if fit.name == asked.name:
        return scheme, fit.name, ""
    fallback = scheme.model_copy(update={**recipe_settings(fit.name, None), "format_options": {}})  # options belong to a format
    return fallback, fit.name, f"{why}: quantized for {fit.name}"


class QuantizeError(LowbitError):
    pass


@dataclass
class LayerPlan:
    scheme: Scheme
    layout: GroupLayout
    target: str | None = None  # the export target its codes fit (the recipe's, or its fallback)
    note: str = ""  # why the target is a fallback


@dataclass
class QuantizeReport:
    modules: dict[str, dict] = field(default_factory=dict)  # name -> what was done, bpw, seconds
    skipped: dict[str, str] = field(default_factory=dict)  # name -> why it stays unquantized
    seconds: float = 0.0
    preprocess: dict | None = None  # what the preprocessing did (steps, losses, seconds); None: off
    tune: dict | None = None  # what the end-to-end tuning did; None: off
    scaling: dict | None = None  # what the activation-aware scaling did (AWQ); None: off
    rounding: dict | None = None  # what the learned rounding did (SignRound); None: off


def plan_layers(model: nn.Module, recipe: Recipe) -> tuple[dict[str, LayerPlan], dict[str, str]]:
    """Decide every linear layer's scheme and layout up front, so a bad group size fails before any work."""
    tied = tied_parameter_names(model)
    plans: dict[str, LayerPlan] = {}
    skipped: dict[str, str] = {}
    for name, module in find_linears(model).items():
        scheme = recipe.scheme_for(name)
        if name in tied:
            skipped[name] = "weight tied to another module (e.g. the embedding): kept unquantized"
            continue
        if scheme is None:
            skipped[name] = "excluded by the recipe (ignore/override)"
            continue
        out_f, in_f = linear_weight(module).shape
        target, note = None, ""
        if recipe.target:
            scheme, target, note = _target_scheme(scheme, recipe.target, in_f)
            if scheme is None:
                skipped[name] = note
                continue
        grid = scheme.grid()
        try:
            if isinstance(grid, VQFormat):  # a codebook per layer, a scale per group of whole vectors
                grid.check_width(in_f)
                grid.check_group_size(scheme.group_size)
                layout = GroupLayout(out_f, in_f, scheme.group_size, recipe.ragged)
            elif isinstance(grid, PVQFormat):  # an amplitude scale per row: the group size does not apply
                grid.check_width(in_f)
                layout = GroupLayout(out_f, in_f, -1, recipe.ragged)
            else:
                fixed = grid.fixed_group_size  # a format with its own block size (MXFP4) sets the groups
                layout = GroupLayout(out_f, in_f, fixed or scheme.group_size, recipe.ragged)
                layout.check_span(grid)
        except ValueError as exc:
            raise QuantizeError(f"{name}: {exc}") from None
        plans[name] = LayerPlan(scheme, layout, target, note)
    if not plans:
        raise QuantizeError("no linear layer to quantize: check the recipe's ignore patterns and overrides")
    widest = max(p.layout.in_features for p in plans.values())
    too_wide = sorted({p.scheme.group_size for p in plans.values() if p.scheme.group_size > widest
                       and not isinstance(p.scheme.grid(), (VQFormat, PVQFormat)) and not p.scheme.grid().fixed_group_size})
    if too_wide and "group_size" in recipe.model_fields_set:  # asked for, not the default
        raise QuantizeError(
            f"group size {too_wide[0]} is wider than every layer (the widest takes {widest} inputs): it would mean one "
            f"group per output channel; say so with --group-size -1, or pick a size up to the layer width (e.g. "
            f"{max(32, 1 << (widest.bit_length() - 1))})"
        )
    return plans, skipped


def _quantize_layer(model: nn.Module, name: str, plan: LayerPlan, hessian: torch.Tensor | None, recipe: Recipe,
                    rounded: dict[str, torch.Tensor] | None = None) -> dict:
    """Quantize one layer by its plan and swap it in; the entry for the artifact's header. `rounded`:
    where GPTQ leaves the values it rounded ([out, in], by layer name), for learned rounding."""
    module = model.get_submodule(name)
    w = linear_weight(module).detach().float()
    if not torch.isfinite(w).all():
        raise QuantizeError(f"{name}: the weight holds NaN or infinite values; fix the checkpoint first")
    grid = plan.scheme.grid()  # a Grid, or a SearchSpace to choose one from
    method = plan.scheme.method
    start = time.perf_counter()
    if plan.scheme.needs_calibration and hessian is None:
        raise QuantizeError(f"{name}: {method} {plan.scheme.format} needs calibration inputs but none reached this layer")
    gptq_cfg = GPTQConfig(recipe.gptq.damp, recipe.gptq.block_size, recipe.gptq.act_order, recipe.gptq.sweeps)
    rotation = None
    if recipe.rotate == "hadamard":  # quantize W T^T on the rotated inputs' Hessian T H T^T
        try:
            rotation = HadamardRotation.for_layer(w.shape[1], name, recipe.calib.seed)
        except RotateError as exc:
            raise QuantizeError(f"{exc}; or quantize without --rotate") from None
        w = rotation.weight(w)
        hessian = None if hessian is None else rotation.hessian(hessian)
    bias = getattr(module, "bias", None)
    bias = None if bias is None else bias.detach()
    extra: dict = {}
    if method == "ptq161":
        cfg = PTQ161Config(recipe.ptq161.salient_fraction, recipe.ptq161.iters, recipe.gptq.damp, gptq=gptq_cfg)
        try:
            qw = ptq161_quantize(w, pooled(hessian), grid, plan.layout.group_size, cfg)
        except ValueError as exc:
            raise QuantizeError(f"{name}: {exc}") from None
        layer = PTQ161Linear.from_quantized(qw, bias)
        extra["n_salient"] = qw.salient.layout.in_features
    elif isinstance(grid, VQFormat):
        qw = vq_quantize(w, grid, None if hessian is None else pooled(hessian), method, gptq_cfg, recipe.calib.seed,
                         plan.layout.group_size)
        layer = VQLinear.from_quantized(qw, bias)
    elif isinstance(grid, PVQFormat):
        qw = pvq_quantize(w, grid, None if hessian is None else pooled(hessian), method, gptq_cfg)
        layer = PVQLinear.from_quantized(qw, bias)
    else:
        if isinstance(grid, SearchSpace):
            found = search_format(w, hessian, grid, plan.layout, method, gptq_cfg)
            qw, extra["search"] = found.qw, found.summary()
        elif method == "gptq" and rounded is not None:
            qw, rounded[name] = gptq_quantize_rounded(w, hessian, grid, plan.layout, gptq_cfg)
        elif method == "gptq":
            qw = gptq_quantize(w, hessian, grid, plan.layout, gptq_cfg)
        else:
            qw = rtn_quantize(w, grid, plan.layout)
        plain = IntActLinear if recipe.act == "int8" else QuantLinear  # W8A8: the same weight, inputs in int8
        layer = (plain.from_quantized(qw, bias) if rotation is None
                 else RotatedQuantLinear.from_rotated(qw, bias, rotation))
    model.set_submodule(name, layer)
    return {
        "method": method,
        "grid": layer.entry()["grid"],
        "group_size": plan.layout.group_size,
        "shape": list(qw.shape),
        "bpw": layer.bits_per_weight(),  # everything stored: with a rotation, its signs too
        "seconds": time.perf_counter() - start,
        **({"rotation": f"hadamard/{rotation.block}"} if rotation is not None else {}),
        **({"target": plan.target} if plan.target else {}),
        **({"target_note": plan.note} if plan.note else {}),
        **extra,
    }


def _awq_scaler(model: nn.Module, plans: dict[str, LayerPlan], recipe: Recipe, report: QuantizeReport):
    """`scale(prefix, block, hessians) -> hessians`: AWQ's scales searched and folded for one block
    (`algos.awq`), each candidate rounded by the layer's own grid (RTN), its record in
    `report.scaling`. The norms absorb the scales at the checkpoint's dtype, as they are saved."""
    from .models.loading import checkpoint_dtype

    searched = [n for n, p in plans.items() if isinstance(p.scheme.grid(), SearchSpace)]
    if searched:
        raise QuantizeError(f"{searched[0]}: scaling: awq rounds its candidates on one grid, not a format search")
    config = getattr(model, "config", None)
    dense_dtype = checkpoint_dtype(config) if config is not None else torch.float32
    cfg = AWQConfig(recipe.awq.grid, recipe.awq.duo)
    report.scaling = {"method": "awq", "grid": cfg.grid, "duo": cfg.duo, "groups": [], "skipped": {}}

    def quantize(name: str, w: torch.Tensor) -> torch.Tensor:
        plan = plans[name]
        return rtn_quantize(w, plan.scheme.grid(), plan.layout).dequantize()

    def scale(prefix: str, block: nn.Module, hessians: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        layers = [n for n in plans if n.startswith(prefix + ".")]
        group_size = plans[layers[0]].layout.group_size if layers else None
        try:
            hessians, result = awq_block(model, block, prefix, hessians, quantize, set(plans), dense_dtype, cfg, group_size)
        except AWQError as exc:
            raise QuantizeError(str(exc)) from None
        report.scaling["groups"] += [g.summary() for g in result.groups]
        report.scaling["skipped"].update(result.skipped)
        return hessians

    return scale


def _smooth_scaler(model: nn.Module, plans: dict[str, LayerPlan], recipe: Recipe, report: QuantizeReport):
    """`scale(prefix, block, hessians) -> hessians`: SmoothQuant's scales folded for one block
    (`algos.smoothquant`), recorded in `report.scaling`."""
    from .algos.smoothquant import smooth_block
    from .models.loading import checkpoint_dtype

    config = getattr(model, "config", None)
    dense_dtype = checkpoint_dtype(config) if config is not None else torch.float32
    report.scaling = {"method": "smooth", "alpha": recipe.smooth.alpha, "groups": [], "skipped": {}}

    def scale(prefix: str, block: nn.Module, hessians: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        try:
            hessians, result = smooth_block(model, block, prefix, hessians, set(plans), dense_dtype, recipe.smooth.alpha)
        except AWQError as exc:
            raise QuantizeError(str(exc)) from None
        report.scaling["groups"] += result.groups
        report.scaling["skipped"].update(result.skipped)
        return hessians

    return scale


class _LearnedRounding:
    """SignRound over the block walk (`algos.signround`): `observe` keeps each block's calls and runs
    the original float block on the original model's hidden states (the targets, and the next
    block's float inputs); `before` takes a float copy of the block as the method is about to
    quantize it (after any AWQ scaling); `after` learns the block's offsets and stores the codes.
    The offsets start from the values the method rounded: the float weight for RTN, the error-fed
    values GPTQ rounded (`rounded`, filled by the layer quantization) for GPTQ; either way v = 0 is
    the method's own codes, and half a level in either direction reaches a neighbouring code."""

    def __init__(self, model: nn.Module, plans: dict[str, LayerPlan], recipe: Recipe, report: QuantizeReport) -> None:
        bad = sorted({f"{p.scheme.method} {p.scheme.format}" for p in plans.values()
                      if p.scheme.method not in ("rtn", "gptq") or isinstance(p.scheme.grid(), SearchSpace)})
        if bad:
            raise QuantizeError(f"rounding: learned refines RTN or GPTQ codes on one grid; not {', '.join(bad)}")
        self.model, self.plans = model, plans
        o = recipe.signround
        self.config = RoundConfig(o.steps, o.lr, o.batch_size, o.seed, o.amp)
        self.report = report
        report.rounding = {"method": "signround", "steps": o.steps, "lr": o.lr if o.lr is not None else 1 / o.steps,
                           "batch_size": o.batch_size, "amp": o.amp, "blocks": {}}
        self.float_hidden: list[torch.Tensor] | None = None
        self.inputs: BlockInputs = []
        self.targets: list[torch.Tensor] = []
        self.twin: nn.Module | None = None
        self.bases: dict[str, torch.Tensor] = {}
        self.rounded: dict[str, torch.Tensor] = {}  # GPTQ's rounded values, by layer name

    def observe(self, _i: int, block: nn.Module, inputs: BlockInputs) -> None:
        if self.float_hidden is None:  # block 0: both models' inputs are the embeddings
            self.float_hidden = [hidden_of(a, k) for a, k in inputs]
        self.inputs = inputs
        self.targets = []
        for (args, kwargs), h in zip(inputs, self.float_hidden):
            a, k = with_hidden(args, kwargs, h)
            out = block(*a, **k)
            self.targets.append(out[0] if isinstance(out, (tuple, list)) else out)
        self.float_hidden = self.targets

    def before(self, prefix: str, block: nn.Module, names: list[str]) -> None:
        self.twin = float_copy(block)
        self.bases = {n: linear_weight(self.model.get_submodule(n)).detach().float().clone() for n in names
                      if self.plans[n].scheme.method == "rtn"}

    def after(self, prefix: str, names: list[str]) -> None:
        layers = {}
        for n in names:
            qw = self.model.get_submodule(n).quantized_weight()
            base = self.rounded.pop(n) if self.plans[n].scheme.method == "gptq" else self.bases[n]
            layers[n.removeprefix(prefix + ".")] = (base, qw)
        kept, record = learn_block_rounding(self.twin, layers, self.inputs, self.targets, 0.5, self.config)
        for rel, qw in kept.items():
            name = f"{prefix}.{rel}"
            layer = self.model.get_submodule(name)
            self.model.set_submodule(name, QuantLinear.from_quantized(qw, layer.bias))
        self.report.rounding["blocks"][prefix] = record.summary()
        self.twin, self.bases = None, {}


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.fields[layer]}"), transient=True,
    )


def quantize_model(
    model: nn.Module,
    recipe: Recipe,
    kind: str = "causal-lm",
    calib_batches: list[torch.Tensor] | None = None,
    show_progress: bool = True,
    parallel: "Parallel | None" = None,
) -> QuantizeReport:
    """Quantize `model` in place. `calib_batches` ([batch, seq] token ids each) are needed for GPTQ,
    PTQ1.61, the format searches and the preprocessing. `parallel`: this process's rank in a
    data-parallel run (`parallel.Parallel`; every rank calls this with the same arguments)."""
    started = time.perf_counter()
    if recipe.cnn_only():
        raise QuantizeError(recipe.cnn_only())
    if parallel is not None and (recipe.tune.steps > 0 or recipe.preprocess.steps > 0 or recipe.rounding != "nearest"):
        raise QuantizeError("preprocessing, learned rounding and end-to-end tuning do not run data-parallel yet: run one process")
    teacher = None
    if recipe.tune.steps > 0:
        _check_training_inputs("tuning (tune.steps > 0)", "tune.steps", kind, calib_batches)
        with torch.inference_mode(False):
            teacher = copy.deepcopy(model)  # the original, for the tuning's distillation targets
    preprocess = None
    if recipe.preprocess.steps > 0:
        preprocess = preprocess_model(model, recipe, kind, calib_batches, show_progress)
    report = _quantize_layers(model, recipe, kind, calib_batches, show_progress, parallel)
    report.preprocess = preprocess
    if teacher is not None:
        report.tune = tune_model(teacher, model, recipe, calib_batches, show_progress)
    report.seconds = time.perf_counter() - started
    return report


def _check_training_inputs(what: str, key: str, kind: str, calib_batches: list[torch.Tensor] | None) -> None:
    if kind != "causal-lm":
        raise QuantizeError(f"{what} trains on next-token outputs and needs a causal LM, not a {kind} model: set {key} to 0")
    if not calib_batches:
        raise QuantizeError(f"{what} trains on calibration windows: pass a text file with --calib")


def tune_model(teacher: nn.Module, model: nn.Module, recipe: Recipe, calib_batches: list[torch.Tensor],
               show_progress: bool = True) -> dict:
    """End-to-end tuning of the quantized `model`'s scales, norms and biases against `teacher`
    (`algos.e2e_tune`), in place. Returns the summary that QuantizeReport.tune records."""
    opts = recipe.tune
    cfg = TuneConfig(opts.steps, opts.lr, opts.batch_size, opts.norms, opts.seed, opts.holdout)
    with torch.inference_mode(False):
        try:
            result = tune_continuous(teacher, model, torch.cat(calib_batches), cfg, show_progress)
        except ValueError as exc:
            raise QuantizeError(f"tune: {exc}") from None
    return result.summary()


def preprocess_model(
    model: nn.Module,
    recipe: Recipe,
    kind: str,
    calib_batches: list[torch.Tensor] | None,
    show_progress: bool = True,
) -> dict:
    """PTQ1.61's quantization preprocessing (Zhao et al., 2025; `algos.restorative_lora`), in place:
    quantize a copy of `model` by `recipe` (without preprocessing), put its dequantized weights into
    a float copy, train LoRA adapters on the calibration windows against the untouched `model`, merge
    them, and write every quantized layer's resulting weight (Q(W) + s B A on the targets, Q(W) on
    the others) into `model`. Returns the summary that QuantizeReport.preprocess records."""
    opts = recipe.preprocess
    _check_training_inputs("preprocessing (preprocess.steps > 0)", "preprocess.steps", kind, calib_batches)
    plain = recipe.model_copy(update={"preprocess": PreprocessOptions()})
    plans, _ = plan_layers(model, plain)  # a bad recipe fails before the first pass
    targets = [n for n in plans if opts.targets is None or re.search(opts.targets, n)]
    if not targets:
        some = ", ".join(list(plans)[:3])
        raise QuantizeError(f"preprocess.targets {opts.targets!r} matches none of the quantized layers ({some}, ...)")
    with torch.inference_mode(False):  # the adapters train even if the caller runs in inference mode
        first = copy.deepcopy(model)
        _quantize_layers(first, plain, kind, calib_batches, show_progress)
        student = copy.deepcopy(model).float()
        with torch.no_grad():
            for name in plans:  # the first pass's Q(W), [out, in]
                linear_weight(student.get_submodule(name)).copy_(first.get_submodule(name).dequantize())
        del first
        cfg = RestorativeConfig(opts.steps, opts.rank, opts.alpha, opts.lr, opts.loss, opts.batch_size, opts.seed)
        result = restorative_lora(model, student, torch.cat(calib_batches), targets, cfg, show_progress)
        with torch.no_grad():
            for name in plans:
                w = linear_weight(model.get_submodule(name))
                w.copy_(linear_weight(student.get_submodule(name)).to(w.dtype))
    return {"loss": opts.loss, **result.summary()}


@torch.inference_mode()
def _fisher_weights(model: nn.Module, recipe: Recipe, kind: str, calib_batches: list[torch.Tensor] | None,
                    names: set[str], parallel: "Parallel | None", show_progress: bool) -> TokenWeights | None:
    """The loss-aware token weights of `hessian: fisher` (`calib.fisher`), or None for GPTQ's plain
    input Hessians."""
    if recipe.hessian != "fisher":
        return None
    if not names:
        raise QuantizeError("hessian: fisher weights the Hessians that GPTQ, AWQ and the searches read, and this "
                            "recipe reads none (RTN): drop it, or use a calibrated method")
    if kind != "causal-lm":
        raise QuantizeError(f"hessian: fisher takes next-token loss gradients and needs a causal LM, not a {kind} model")
    if parallel is not None:
        raise QuantizeError("hessian: fisher does not run data-parallel yet: run one process")
    try:
        return fisher_token_weights(model, calib_batches or [], names, show_progress, recipe.hessian_groups)
    except FisherError as exc:
        raise QuantizeError(str(exc)) from None


def _quantize_layers(
    model: nn.Module,
    recipe: Recipe,
    kind: str,
    calib_batches: list[torch.Tensor] | None,
    show_progress: bool,
    parallel: "Parallel | None" = None,
) -> QuantizeReport:
    """The quantization proper (no preprocessing): every planned layer swapped for its quantized
    module. Data-parallel (`parallel`): this rank's share of the batches, all-reduced Hessians,
    each block's layers solved round-robin and shared (see `parallel`)."""
    plans, skipped = plan_layers(model, recipe)
    report = QuantizeReport(skipped=skipped)
    needs_hessian = {n for n, p in plans.items() if p.scheme.needs_calibration}
    scale_block = None
    if recipe.scaling != "none":
        scale_block = (_awq_scaler if recipe.scaling == "awq" else _smooth_scaler)(model, plans, recipe, report)
        needs_hessian = set(plans)  # every layer's input statistics and loss
    rounder = None
    if recipe.rounding == "learned":
        rounder = _LearnedRounding(model, plans, recipe, report)
        needs_hessian = set(plans)  # the walk gives every block's inputs
    if needs_hessian and not calib_batches:
        what = sorted({f"{p.scheme.method} {p.scheme.format}" for n, p in plans.items() if n in needs_hessian})
        raise QuantizeError(f"{', '.join(what)} need(s) calibration data (layer Hessians): pass a text file with --calib")
    token_weights = _fisher_weights(model, recipe, kind, calib_batches, needs_hessian, parallel, show_progress)

    reduce = None
    if parallel is not None and needs_hessian:
        calib_batches = parallel.shard(calib_batches)
        reduce = parallel.reduce_hessian
    with _progress() as progress:
        task = progress.add_task("quantizing", total=len(plans), layer="", visible=show_progress)

        def do(name: str, hessian: torch.Tensor | None) -> None:
            progress.update(task, layer=name)
            report.modules[name] = _quantize_layer(model, name, plans[name], hessian, recipe,
                                                   rounder.rounded if rounder is not None else None)
            progress.advance(task)

        blocks = find_blocks(model) if needs_hessian else None
        if blocks is None and (scale_block is not None or rounder is not None):
            raise QuantizeError(f"scaling: {recipe.scaling} and rounding: learned work block by block and found no block list in this "
                                "model; drop them")
        if blocks is not None:
            blocks_name, block_list = blocks

            def on_block(_i: int, prefix: str, block: nn.Module, hessians: dict[str, torch.Tensor]) -> None:
                if scale_block is not None:
                    hessians = scale_block(prefix, block, hessians)
                names = [n for n in plans if n.startswith(prefix + ".")]
                if rounder is not None:
                    rounder.before(prefix, block, names)
                for k, name in enumerate(names):
                    if parallel is None or parallel.owner(k) == parallel.rank:
                        do(name, hessians.get(name))
                if rounder is not None and names:
                    rounder.after(prefix, names)
                if parallel is not None:  # every rank needs the whole quantized block for the next one's inputs
                    for k, name in enumerate(names):
                        report.modules[name] = parallel.share_module(model, name, parallel.owner(k), report.modules.get(name))

            walk_blocks(model, blocks_name, block_list, calib_batches, kind, needs_hessian, on_block, reduce=reduce,
                        observe=rounder.observe if rounder is not None else None, token_weights=token_weights)
        remaining_hessian = needs_hessian - set(report.modules)
        hessians = (whole_model_hessians(model, calib_batches, kind, remaining_hessian, reduce, token_weights)
                    if remaining_hessian else {})
        for name in plans:
            if name not in report.modules:
                do(name, hessians.get(name))
    return report
