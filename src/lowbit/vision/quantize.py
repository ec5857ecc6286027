"""Quantize a convolutional network by a recipe: batch norms folded, every Conv2d and Linear put
on the recipe's grid (RTN or GPTQ), and optionally the inputs of every quantized layer given a
static calibrated int8/int4 range (the integer-inference whitepaper's W8A8 / W4A8 / W4A4).

Calibration gathers at every quantized layer its GPTQ Hessian and its input range, by default layer
by layer in execution order on the inputs the already quantized layers produce (so each layer's
range and error feedback see the quantization noise before it), or in one pass of the float model:
- a conv's Hessian is that of its unfolded (im2col) input patches, whose column order is the
  stored row order (`nn.quant_conv`);
- a depthwise conv (groups = channels) has one small Hessian per channel, since each output
  channel sees only its own input channel; GPTQ then solves each channel's row alone;
- other grouped convs fall back to RTN (their groups' Hessians are not gathered).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from rich.progress import Progress
from torch import nn

from ..algos import GPTQConfig, gptq_quantize, rtn_quantize
from ..calib.act_ranges import RangeObserver
from ..calib.hessian import HessianAccumulator
from ..errors import LowbitError
from ..formats import GroupLayout, SearchSpace
from ..formats.pvq import PVQFormat
from ..formats.vq import VQFormat
from ..nn import QuantConv2d, QuantLinear, StaticActLinear
from ..nn.quant_conv import conv_geometry
from ..nn.static_act import ACT_BITS, act_spec
from ..qtensor import QuantizedWeight
from ..recipe import Recipe
from .fold import fold_batchnorm


class VisionQuantizeError(LowbitError):
    pass


@dataclass
class VisionReport:
    modules: dict[str, dict] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    folded: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _rows(module: nn.Module) -> torch.Tensor:
    """The weight as stored: [out, in/groups * kh * kw] for a conv, [out, in] for a linear."""
    return module.weight.detach().float().reshape(module.weight.shape[0], -1)


def _depthwise(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels == module.out_channels


def find_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def _patches(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """x: [batch, in, H, W] -> [batch * positions, in * kh * kw] unfolded input patches."""
    cols = F.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride)  # [batch, in*kh*kw, L]
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


class _DepthwiseHessians:
    """One Hessian per channel of a depthwise conv: [channels, k, k], k = kh * kw."""

    def __init__(self, conv: nn.Conv2d) -> None:
        self.conv = conv
        k = conv.kernel_size[0] * conv.kernel_size[1]
        self.sum = torch.zeros(conv.in_channels, k, k, dtype=torch.float64)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        c = self.conv
        cols = F.unfold(x, c.kernel_size, c.dilation, c.padding, c.stride)  # [batch, C*k, L]
        cols = cols.reshape(x.shape[0], c.in_channels, -1, cols.shape[-1]).double()  # [batch, C, k, L]
        self.sum += torch.einsum("bckl,bcjl->ckj", cols, cols)
        self.count += x.shape[0] * cols.shape[-1]

    def hessian(self) -> torch.Tensor:
        return (2 * self.sum / max(self.count, 1)).float()


class _Stop(Exception):
    """Raised by the last hook a calibration needs: the rest of the forward pass is not computed."""


@torch.no_grad()
def calibrate(model: nn.Module, layers: dict[str, nn.Module], images: torch.Tensor, hessian_for: set[str],
              observers: dict[str, RangeObserver], batch_size: int = 16, stop_after: str | None = None,
              show_progress: bool = True, means: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """One pass over `images` ([n, 3, H, W]); fills `observers` with every layer's inputs and returns
    the Hessians of the layers in `hessian_for` ([cols, cols], or [channels, k, k] for depthwise).
    `stop_after`: a layer after whose inputs nothing more is needed (the forward stops there).
    `means`: filled, for the layers it names, with the mean input patch ([in * kh * kw], float64)."""
    sums: dict[str, list] = {n: [0.0, 0] for n in (means or {})}
    accs: dict[str, object] = {}
    for name in hessian_for:
        m = layers[name]
        accs[name] = _DepthwiseHessians(m) if _depthwise(m) else HessianAccumulator(_rows(m).shape[1])

    def hook(name: str):
        def pre(module: nn.Module, args: tuple) -> None:
            x = args[0]
            if name in observers:
                observers[name].observe(x)
            if name in sums:
                if isinstance(module, nn.Conv2d):
                    cols = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)  # [b, in*k, L]
                    sums[name][0] = sums[name][0] + cols.double().sum(dim=(0, 2))
                    sums[name][1] += cols.shape[0] * cols.shape[2]
                else:
                    sums[name][0] = sums[name][0] + x.reshape(-1, x.shape[-1]).double().sum(0)
                    sums[name][1] += x.reshape(-1, x.shape[-1]).shape[0]
            if name in accs:
                acc = accs[name]
                if isinstance(acc, _DepthwiseHessians):
                    acc.add(x)
                else:
                    acc.add(_patches(module, x) if isinstance(module, nn.Conv2d) else x.reshape(-1, x.shape[-1]))
            if name == stop_after:
                raise _Stop
        return pre

    handles = [layers[n].register_forward_pre_hook(hook(n))
               for n in set(accs) | set(observers) | set(sums) | ({stop_after} - {None})]
    try:
        with Progress(transient=True, disable=not show_progress) as bar:
            task = bar.add_task("calibrating", total=images.shape[0])
            for i in range(0, images.shape[0], batch_size):
                try:
                    model(images[i:i + batch_size])
                except _Stop:
                    pass
                bar.advance(task, min(batch_size, images.shape[0] - i))
    finally:
        for h in handles:
            h.remove()
    for n, (total, count) in sums.items():
        means[n] = total / max(count, 1)
    return {n: a.hessian() for n, a in accs.items()}


def corrected_bias(m: nn.Module, w: torch.Tensor, w_hat: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Bias correction (Nagel et al., data-free quantization): the bias plus (W - W_hat) E[x] per
    output channel, so the quantized layer's mean output equals the float layer's on the calibration
    inputs. w, w_hat: [out, cols]; mean: [in * kh * kw] the mean input patch (grouped convs: each
    group of rows reads its own slice)."""
    groups = m.groups if isinstance(m, nn.Conv2d) else 1
    per_group = mean.reshape(groups, -1)  # [groups, cols]
    rows_group = torch.arange(w.shape[0]) // (w.shape[0] // groups)
    delta = ((w.double() - w_hat.double()) * per_group[rows_group]).sum(1)
    bias = torch.zeros(w.shape[0], dtype=torch.float64) if m.bias is None else m.bias.detach().double()
    return (bias + delta).float()


@torch.no_grad()
def execution_order(model: nn.Module, layers: dict[str, nn.Module], example: torch.Tensor) -> list[str]:
    """The layers' names in the order a forward pass first calls them."""
    order: list[str] = []
    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: order.append(n) if n not in order else None)
               for n, m in layers.items()]
    try:
        model(example)
    finally:
        for h in handles:
            h.remove()
    return order + [n for n in layers if n not in order]


def _gptq_rows(w: torch.Tensor, hessians: torch.Tensor, grid, group_size: int, cfg: GPTQConfig) -> QuantizedWeight:
    """GPTQ of each row alone under its own Hessian (a depthwise conv's channels): w [out, k],
    hessians [out, k, k]. With one parameter set per row (the usual case: k = 9 weights) all rows are
    solved at once, column by column in natural order, on batched Cholesky factors; otherwise row by row."""
    out_f, k = w.shape
    layout = GroupLayout(out_f, k, group_size)
    if layout.n_groups != 1 or layout.per_tensor:
        parts = [gptq_quantize(w[r:r + 1], hessians[r], grid, GroupLayout(1, k, group_size), cfg) for r in range(out_f)]
        params = {n: torch.cat([p.params[n] for p in parts]) for n in parts[0].params}
        return QuantizedWeight(torch.cat([p.codes for p in parts]), params, grid, layout)
    W = w.double().clone()
    H = hessians.double().clone()
    diag = H.diagonal(dim1=1, dim2=2)  # a view: edits reach H
    dead = diag == 0  # an input never active in calibration: its weight does not matter
    diag[dead] = 1.0
    W[dead] = 0.0
    diag += cfg.damp * diag.mean(1, keepdim=True)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)  # [out, k, k]
    params = layout.fit(grid, W.float())  # [out, 1] each
    codes = torch.zeros(out_f, k, dtype=torch.uint8)
    for j in range(k):
        c = grid.encode(W[:, j:j + 1].float(), params)
        codes[:, j] = c[:, 0]
        err = (W[:, j] - grid.decode(c, params)[:, 0].double()) / U[:, j, j]
        W[:, j:] -= err[:, None] * U[:, j, j:]  # push each row's error onto its later columns
    return QuantizedWeight(codes, params, grid, layout)


def check_recipe(recipe: Recipe) -> None:
    """What the vision path runs: RTN or GPTQ on a scalar grid; activations none/int8/int4."""
    for where, s in [("the recipe", recipe), *((f"override {o.pattern!r}", o) for o in recipe.overrides if not o.skip)]:
        method = getattr(s, "method", None)
        if method is not None and method not in ("rtn", "gptq"):
            raise VisionQuantizeError(f"{where}: method {method} is not available for convolutional networks yet; use rtn or gptq")
    grid = recipe.grid()
    if isinstance(grid, (SearchSpace, VQFormat, PVQFormat)):
        raise VisionQuantizeError(f"format {recipe.format} is not available for convolutional networks yet; use a scalar grid "
                                  "(int4, int8, nf4, fp4_e2m1, ...)")
    for key, on in (("scaling", recipe.scaling != "none"), ("rotate", recipe.rotate != "none"), ("rounding", recipe.rounding != "nearest"),
                    ("tune", recipe.tune.steps > 0), ("preprocess", recipe.preprocess.steps > 0), ("hessian: fisher", recipe.hessian != "inputs"),
                    ("target", recipe.target is not None), ("entropy_code", recipe.entropy_code),
                    ("sweeps", recipe.gptq.sweeps > 0)):
        if on:
            raise VisionQuantizeError(f"{key} is a language-model option; the convolutional path does not take it yet")


def _quantize_layer(model: nn.Module, name: str, m: nn.Module, scheme, layout: GroupLayout, hessian: torch.Tensor | None,
                    observer: RangeObserver | None, spec: dict | None, cfg: GPTQConfig, mean: torch.Tensor | None = None) -> dict:
    """Quantize one Conv2d/Linear by its plan, swap the quantized module in; its report entry. With
    `mean` (the mean input patch), the bias is corrected for the weight's quantization error."""
    t0 = time.perf_counter()
    w = _rows(m)
    if not torch.isfinite(w).all():
        raise VisionQuantizeError(f"{name}: the weight holds NaN or infinite values")
    grid = scheme.grid()
    if scheme.method == "gptq" and _depthwise(m):
        qw = _gptq_rows(w, hessian, grid, layout.group_size, cfg)
    elif scheme.method == "gptq":
        qw = gptq_quantize(w, hessian, grid, layout, cfg)
    else:
        qw = rtn_quantize(w, grid, layout)
    bias = None if m.bias is None else m.bias.detach()
    if mean is not None:
        bias = corrected_bias(m, w, qw.dequantize(), mean)
    if isinstance(m, nn.Conv2d):
        layer = QuantConv2d.from_quantized_conv(qw, bias, conv_geometry(m), spec)
    elif spec is not None:
        layer = StaticActLinear.from_quantized_act(qw, bias, spec)
    else:
        layer = QuantLinear.from_quantized(qw, bias)
    if spec is not None:
        layer.set_act_range(*observer.params())
    model.set_submodule(name, layer)
    return {"method": scheme.method, "grid": layer.entry()["grid"], "group_size": layout.group_size, "shape": list(qw.shape),
            "bpw": layer.bits_per_weight(), "seconds": time.perf_counter() - t0, **({"depthwise": True} if _depthwise(m) else {})}


def quantize_vision(model: nn.Module, recipe: Recipe, images: torch.Tensor | None, act: str = "none",
                    act_range: str = "mse", batch_size: int = 16, sequential: bool = True,
                    bias_correction: bool = False) -> VisionReport:
    """Fold, calibrate and quantize `model` in place (see the module docstring). `images`
    [n, 3, H, W] are needed for GPTQ and for activation ranges. `sequential`: calibrate each layer
    on the outputs of the layers already quantized before it (GPTQ's sequential order; one forward
    prefix per layer), or all layers at once on the float model (one pass, faster). `bias_correction`:
    each layer's bias absorbs its weight error's mean effect on the calibration inputs (`corrected_bias`)."""
    check_recipe(recipe)
    if act != "none" and act not in ACT_BITS:
        raise VisionQuantizeError(f"activation format {act!r}: use none, {', '.join(ACT_BITS)}")
    start = time.perf_counter()
    report = VisionReport()
    model.eval()
    report.folded = fold_batchnorm(model)
    layers = find_layers(model)
    plans = {}
    for name, m in layers.items():
        scheme = recipe.scheme_for(name)
        if scheme is None:
            report.skipped[name] = "excluded by the recipe (ignore/override)"
            continue
        if isinstance(m, nn.Conv2d) and m.groups > 1 and not _depthwise(m) and scheme.method == "gptq":
            scheme = scheme.model_copy(update={"method": "rtn"})
        out_f, cols = _rows(m).shape
        try:
            layout = GroupLayout(out_f, cols, scheme.group_size, recipe.ragged)
            layout.check_span(scheme.grid())
        except ValueError as exc:
            raise VisionQuantizeError(f"{name}: {exc}") from None
        if _depthwise(m) and scheme.method == "gptq" and layout.per_tensor:
            raise VisionQuantizeError(f"{name}: GPTQ of a depthwise conv solves each channel alone and needs a scale per "
                                      "channel or group; use --group-size -1, or method rtn for one scale per tensor")
        plans[name] = (scheme, layout)
    if not plans:
        raise VisionQuantizeError("no Conv2d or Linear layer to quantize: check the recipe's ignore patterns")
    need_h = {n for n, (s, _) in plans.items() if s.method == "gptq"}
    observers = {n: RangeObserver(act_range, ACT_BITS[act], recipe.calib.seed) for n in plans} if act != "none" else {}
    if (need_h or observers or bias_correction) and (images is None or images.shape[0] == 0):
        raise VisionQuantizeError("GPTQ and activation ranges need calibration images; pass some, or use method rtn without --act")
    spec = act_spec(act, act_range) if act != "none" else None
    cfg = GPTQConfig(recipe.gptq.damp, recipe.gptq.block_size, recipe.gptq.act_order, recipe.gptq.sweeps)
    if not (need_h or observers or bias_correction):
        for name in plans:
            report.modules[name] = _quantize_layer(model, name, layers[name], *plans[name], None, None, None, cfg)
    elif sequential:  # each layer calibrated on the inputs the already quantized layers before it produce
        names = [n for n in execution_order(model, layers, images[:1]) if n in plans]
        with Progress(transient=True) as bar:
            task = bar.add_task("calibrating and quantizing layer by layer", total=len(names))
            for name in names:
                obs = {name: observers[name]} if observers else {}
                means: dict[str, torch.Tensor] = {name: None} if bias_correction else {}
                h = calibrate(model, layers, images, need_h & {name}, obs, batch_size, stop_after=name, show_progress=False,
                              means=means)
                report.modules[name] = _quantize_layer(model, name, layers[name], *plans[name], h.get(name), obs.get(name), spec,
                                                       cfg, means.get(name))
                bar.advance(task)
    else:  # one pass of the float model gathers every layer's statistics
        means = dict.fromkeys(plans) if bias_correction else {}
        hessians = calibrate(model, layers, images, need_h, observers, batch_size, means=means)
        for name in plans:
            report.modules[name] = _quantize_layer(model, name, layers[name], *plans[name], hessians.get(name),
                                                   observers.get(name), spec, cfg, means.get(name))
    report.seconds = time.perf_counter() - start
    return report


__all__ = ["VisionQuantizeError", "VisionReport", "calibrate", "check_recipe", "find_layers", "quantize_vision"]
