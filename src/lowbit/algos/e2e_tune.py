"""End-to-end tuning of the continuous parameters of a quantized model, codes frozen: the E2E-QP
stage of EfficientQAT (Chen et al., 2024, "EfficientQAT: Efficient Quantization-Aware Training for
Large Language Models") and the continuous half of PV-Tuning (Malinovskii et al., 2024).

After any post-training method has chosen the codes, every quantized layer's fp16 grid parameters
(scales, and an fp16 min where the grid has one; integer zero points and coded block scales stay
as they are; for vector codebooks the codebook and the row scales), the norm weights and the biases are trained together against the original model's
next-token distributions (KL, `algos.distill`) on the calibration windows, then rounded back to
what the artifact stores (fp16 parameters; norms in the artifact's dense dtype). The codes do not
move, so the bits per weight do not change: the step only repairs what rounding each layer on its
own could not see, the interaction of all layers' errors in the model's output.

Training as restorative LoRA's: AdamW without weight decay, 5% warm-up then cosine decay, the
gradient norm clipped at 1, seeded batch order, so the same inputs give the same artifact.

The codes stay frozen. PV-Tuning's discrete step (Malinovskii et al., 2024: codes re-encoded at a
linearized target Q - step * G for the entries with the largest gradient) was tried on the
reference model's vq4x8 g64 (40 steps, codes moved every 2 or 4 steps, 1-5% of them, a signed or
Adam-normalized step, kept only where <G, Q' - Q> < 0): it changed nearly nothing (178 codes,
KL 0.0147 as without it) or made the model worse (0.038 to 0.86 with 39k-161k codes moved): at 2
bits a codeword jump is too long for the first-order model to judge, and the paper's many small
steps on a GPU are out of reach of a 40-step CPU budget.

With `holdout` > 0 the last calibration windows are kept out of training, and the KL on them is
measured before and after: the tuned parameters are kept only if it dropped, so tuning never
leaves a model worse than its method did on text it did not train on (on SmolLM2 it lowered GPTQ
int3's KL by 29% but raised int4's by 9%, with the same settings).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..formats import GroupLayout, Grid, round_to_fp16
from ..nn import QuantLinear, RotatedQuantLinear, VQLinear
from ..nn.base import store_weight
from ..qtensor import QuantizedWeight, VQWeight
from ..rotate import HadamardRotation
from .distill import batches, distill_loss, is_norm, optimizer_step, progress


@dataclass(frozen=True)
class TuneConfig:
    steps: int = 0
    lr: float = 1e-4
    batch_size: int = 4  # windows per step
    norms: bool = True  # also train the norm weights (and the quantized layers' biases)
    seed: int = 0
    holdout: int = 0  # calibration windows kept out of training: tuned parameters kept only if their KL drops


@dataclass
class TuneResult:
    losses: list[float] = field(default_factory=list)  # per step, before its update
    seconds: float = 0.0
    layers: int = 0  # quantized layers whose parameters trained
    params: int = 0  # trained numbers in all
    holdout_before: float | None = None  # KL on the held-out windows before and after (holdout > 0)
    holdout_after: float | None = None
    kept: bool = True  # False: the held-out KL did not drop, and the model was left as it was

    def summary(self) -> dict:
        out = {"steps": len(self.losses), "layers": self.layers, "params": self.params, "first_loss": self.losses[0],
               "last_loss": self.losses[-1], "seconds": round(self.seconds, 3)}
        if self.holdout_before is not None:
            out |= {"holdout_before": self.holdout_before, "holdout_after": self.holdout_after, "kept": self.kept}
        return out


class TunableLinear(nn.Module):
    """A QuantLinear's weight as frozen codes and trainable fp16-field parameters:
    W = layout.decode(grid, codes, params), differentiable in the parameters."""

    def __init__(self, layer: QuantLinear) -> None:
        super().__init__()
        qw = layer.quantized_weight()
        self.grid: Grid = qw.grid
        self.layout: GroupLayout = qw.layout
        # clones: the layer's tensors may be inference tensors (quantization runs in inference mode)
        self.register_buffer("codes", qw.codes.clone())  # [out, in] uint8, frozen
        # a field shared by several groups (a K-quant super-block scale) trains one value per run of groups
        self.shared = {f.name: f.shared for f in qw.grid.param_fields if f.kind == "float16"}
        self.tuned = nn.ParameterDict({k: nn.Parameter(v[:, :: self.shared[k]].float().clone())
                                       for k, v in qw.params.items() if k in self.shared})
        self.fixed = {k: v.clone() for k, v in qw.params.items() if k not in self.shared}  # integer zero points, coded scales
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().float().clone())
        # a Hadamard-rotated layer's stored weight acts on rotated inputs (`nn.rotated_linear`)
        self.rotation = (HadamardRotation(layer.rotation.signs.clone(), layer.rotation.block)  # out of inference mode
                         if isinstance(layer, RotatedQuantLinear) else None)

    def _expanded(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.repeat_interleave(self.shared[k], dim=1) if self.shared[k] > 1 else v for k, v in values.items()}

    def params(self) -> dict[str, torch.Tensor]:
        return {**self.fixed, **self._expanded(dict(self.tuned.items()))}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.layout.decode(self.grid, self.codes, self.params())
        return F.linear(x if self.rotation is None else self.rotation.apply(x), w, self.bias)

    def quantized_weight(self) -> QuantizedWeight:
        """The tuned weight as stored: fp16 fields rounded to fp16, codes and other fields unchanged."""
        with torch.no_grad():
            params = {**self.fixed, **self._expanded({k: round_to_fp16(v.detach()) for k, v in self.tuned.items()})}
        return QuantizedWeight(self.codes, params, self.grid, self.layout)


class TunableVQ(nn.Module):
    """A VQLinear's weight as frozen codeword indices and a trainable codebook and scales
    (PV-Tuning's continuous step for vector codebooks): W = scales * codebook[codes]."""

    def __init__(self, layer: VQLinear) -> None:
        super().__init__()
        qw = layer.quantized_weight()
        self.fmt, self.group_size, self.columns = qw.fmt, qw.group_size, qw.columns
        self.register_buffer("codes", qw.codes.clone())  # [out, in / dim * stages], frozen
        self.tuned = nn.ParameterDict({"codebook": nn.Parameter(qw.codebook.float().clone()),
                                       "scales": nn.Parameter(qw.scales.float().clone())})
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = VQWeight(self.codes, self.tuned["codebook"], self.tuned["scales"], self.fmt, self.group_size,
                     self.columns).dequantize()
        return F.linear(x, w, self.bias)

    def quantized_weight(self) -> VQWeight:
        with torch.no_grad():
            return VQWeight(self.codes, round_to_fp16(self.tuned["codebook"].detach()),
                            round_to_fp16(self.tuned["scales"].detach()), self.fmt, self.group_size, self.columns)


@torch.no_grad()
def heldout_kl(teacher: nn.Module, student: nn.Module, windows: torch.Tensor, batch_size: int) -> float:
    """Mean KL(teacher || student) per position over `windows` ([n, seq] token ids)."""
    total = 0.0
    for ids in windows.split(batch_size):
        kl = distill_loss(student(input_ids=ids, use_cache=False).logits, teacher(input_ids=ids, use_cache=False).logits)
        total += float(kl) * ids.numel()
    return total / windows.numel()


def tune_continuous(teacher: nn.Module, student: nn.Module, windows: torch.Tensor, cfg: TuneConfig,
                    show_progress: bool = False) -> TuneResult:
    """Train `student`'s continuous quantization parameters (see the module docstring) in place.
    `teacher`: the original model, only run forward. `windows`: [n, seq] token ids, the last
    `cfg.holdout` of them held out for the keep-or-discard check."""
    if cfg.steps < 1:
        raise ValueError(f"steps must be >= 1 (got {cfg.steps})")
    if cfg.holdout < 0 or cfg.holdout >= windows.shape[0]:
        raise ValueError(f"holdout must leave windows to train on: {cfg.holdout} of {windows.shape[0]} calibration "
                         "windows (lower holdout, or give more calibration samples)")
    held = windows[windows.shape[0] - cfg.holdout:]
    windows = windows[: windows.shape[0] - cfg.holdout]
    started = time.perf_counter()
    gen = torch.Generator().manual_seed(cfg.seed)
    student.eval()
    for p in student.parameters():
        p.requires_grad_(False)
    layers = {n: m for n, m in student.named_modules() if type(m) in (QuantLinear, RotatedQuantLinear, VQLinear)}
    tunable = {n: TunableVQ(m) if isinstance(m, VQLinear) else TunableLinear(m) for n, m in layers.items()}
    params = [p for t in tunable.values() for p in t.tuned.values()]
    norms: list[nn.Parameter] = []
    if cfg.norms:
        norms = [m.weight for m in student.modules() if is_norm(m) and isinstance(getattr(m, "weight", None), nn.Parameter)]
        params += [t.bias for t in tunable.values() if t.bias is not None]
    if not params and not norms:
        raise ValueError("nothing to tune: no quantized layer with fp16 parameters, and norms are off")
    saved = [(p, p.data) for p in norms]  # restored on an error; their dtype restored in any case
    for p in norms:
        p.data = p.data.float().clone()  # train in fp32, outside inference mode
        p.requires_grad_(True)
    params += norms
    result = TuneResult(layers=sum(1 for t in tunable.values() if len(t.tuned)), params=sum(p.numel() for p in params))
    for name, t in tunable.items():
        student.set_submodule(name, t)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    try:
        if held.shape[0]:
            result.holdout_before = heldout_kl(teacher, student, held, cfg.batch_size)
        with torch.enable_grad(), progress() as bar:
            task = bar.add_task("tuning scales and norms", total=cfg.steps, loss="", visible=show_progress)
            for step, idx in enumerate(batches(windows.shape[0], cfg.batch_size, cfg.steps, gen)):
                ids = windows[idx]  # [b, seq]
                with torch.no_grad():
                    teacher_logits = teacher(input_ids=ids, use_cache=False).logits
                loss = distill_loss(student(input_ids=ids, use_cache=False).logits, teacher_logits)
                result.losses.append(optimizer_step(opt, params, loss, cfg.lr, step, cfg.steps))
                bar.update(task, advance=1, loss=f"{result.losses[-1]:.4g}")
        if held.shape[0]:
            # the fp16 fields rounded as the artifact stores them (norms stay float32 until the end)
            with torch.no_grad():
                for t in tunable.values():
                    for v in t.tuned.values():
                        v.copy_(round_to_fp16(v))
            result.holdout_after = heldout_kl(teacher, student, held, cfg.batch_size)
            result.kept = result.holdout_after < result.holdout_before
    finally:  # the QuantLinear layers back, holding the tuned parameters (or untouched on an error / no gain)
        done = len(result.losses) == cfg.steps and result.kept
        with torch.inference_mode():  # the layers' buffers may be inference tensors: written in that mode
            for name, layer in layers.items():
                if done and isinstance(layer, VQLinear):
                    tuned = tunable[name].quantized_weight()
                    layer.codebook.copy_(tuned.codebook.to(torch.float16))
                    layer.scales.copy_(tuned.scales.to(torch.float16))
                    if layer.bias is not None:
                        layer.bias = nn.Parameter(tunable[name].bias.detach().clone(), requires_grad=False)
                    layer._cached = None
                elif done:
                    store_weight(layer, "", tunable[name].quantized_weight())
                    if layer.bias is not None:
                        layer.bias = nn.Parameter(tunable[name].bias.detach().clone(), requires_grad=False)
                    layer._packed = None  # new scales: rebuild the runtime view
                    layer._cached = None
                student.set_submodule(name, layer)
            for p, old in saved:
                p.requires_grad_(False)
                p.data = p.data.to(old.dtype) if done else old
    result.seconds = time.perf_counter() - started
    return result
