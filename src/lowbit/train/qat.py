"""Quantization-aware training: a model's linear layers made `FakeQuantLinear` (the recipe's grid,
group size and ignore patterns, as `lowbit quantize` plans them), trained against a teacher, then
converted to the packed layers the artifact stores.

The loss is the distillation KL to the teacher's next-token distributions (`kd`, default) or the
next-token cross-entropy on the text (`ce`). Measured on the reference model (research notes):
with KD, 100 steps of 1k tokens close 90% of ternary PTQ's KL gap and 73% of int2 g32's, while
cross-entropy on a small text moves even the float model away from itself (KL 0.16), so it cannot
get below that; hence KD by default, and the float control in the bench.

Training trains the latent weights, learned steps (LSQ), the quantized layers' biases and the
norms; embeddings and the output layer stay as they are. AdamW, 5% warm-up then cosine decay, the
gradient norm clipped at 1, seeded batch order. Every `save_every` steps the trainable tensors and
the optimizer's state are written (safetensors + JSON, atomically) to a state directory; a run
started again with the same inputs continues from there and ends in the same artifact, byte for
byte, as one that was never stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..algos.distill import batches, distill_loss, is_norm, lm_loss, optimizer_step, progress
from ..errors import LowbitError
from ..formats import Grid
from ..formats.nested import NestedIntGrid
from ..nn import IntActLinear, QuantLinear
from ..qtensor import QuantizedWeight
from ..quantize import plan_layers
from ..recipe import Recipe
from .fake_quant import FakeQuantLinear

STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"


class TrainError(LowbitError):
    pass


@dataclass(frozen=True)
class QATConfig:
    steps: int = 100
    lr: float = 5e-4
    batch_size: int = 4  # windows per step
    loss: Literal["kd", "ce"] = "kd"
    step_sizes: Literal["fixed", "lsq", "biper"] = "fixed"
    seed: int = 0
    save_every: int = 50  # steps between saved states (0: only at the end)
    # nested grids (Double Rounding): every step trains at each of these precisions (the mean of their
    # losses), so one stored code serves all of them; () trains at the grid's own precision
    precisions: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise TrainError(f"steps must be >= 1 (got {self.steps})")
        if self.loss not in ("kd", "ce"):
            raise TrainError(f"loss is kd (distillation to the teacher) or ce (next-token cross-entropy), not {self.loss!r}")
        if any(not 2 <= p <= 8 for p in self.precisions):
            raise TrainError(f"precisions are bit widths from 2 to 8, got {list(self.precisions)}")
        if self.lr <= 0 or self.batch_size < 1 or self.save_every < 0:
            raise TrainError("lr must be > 0, batch_size >= 1 and save_every >= 0")


@dataclass
class QATResult:
    losses: list[float] = field(default_factory=list)  # per step, before its update (all steps, resumed ones too)
    seconds: float = 0.0
    layers: int = 0
    params: int = 0  # trained numbers
    resumed_at: int = 0  # the step a saved state let the run start from

    def summary(self) -> dict:
        return {"steps": len(self.losses), "layers": self.layers, "params": self.params, "first_loss": self.losses[0],
                "last_loss": self.losses[-1], "resumed_at": self.resumed_at}


def prepare(model: nn.Module, recipe: Recipe, step_sizes: str = "fixed",
            start: dict[str, QuantizedWeight] | None = None) -> tuple[dict[str, FakeQuantLinear], dict[str, str]]:
    """Replace every linear layer the recipe quantizes by a FakeQuantLinear, in place; returns them,
    and the layers kept in float with the reason. `start`: a post-training quantization of the
    same model (layer name -> weight) to start from instead of rounding the float weights."""
    plans, skipped = plan_layers(model, recipe)
    fakes: dict[str, FakeQuantLinear] = {}
    for name, plan in plans.items():
        grid = plan.scheme.grid()
        if not isinstance(grid, Grid):
            raise TrainError(f"{name}: quantization-aware training takes scalar grids (int, ternary, fp, ...), not "
                             f"{plan.scheme.format}: vector and searched formats are post-training only")
        if plan.scheme.method not in ("rtn", "gptq"):
            raise TrainError(f"{name}: method {plan.scheme.method} has a layout of its own; train with a plain grid")
        layer = model.get_submodule(name)
        act = recipe.act == "int8"
        try:
            fake = (FakeQuantLinear.from_quantized(start[name], layer.bias, step_sizes, act) if start and name in start
                    else FakeQuantLinear(layer.weight, layer.bias, grid, plan.layout, step_sizes, act))
        except ValueError as exc:
            raise TrainError(f"{name}: {exc}") from None
        model.set_submodule(name, fake)
        fakes[name] = fake
    if not fakes:
        raise TrainError("no linear layer to train: check the recipe's ignore patterns")
    return fakes, skipped


def trainable(model: nn.Module, fakes: dict[str, FakeQuantLinear]) -> dict[str, nn.Parameter]:
    """Name -> parameter of what QAT trains: the fake-quantized layers (latent weights, learned steps,
    biases) and the norm weights; everything else frozen."""
    for p in model.parameters():
        p.requires_grad_(False)
    out: dict[str, nn.Parameter] = {}
    for name, fake in fakes.items():
        for k, p in fake.named_parameters():
            out[f"{name}.{k}"] = p
    for name, module in model.named_modules():
        if is_norm(module) and isinstance(getattr(module, "weight", None), nn.Parameter):
            out[f"{name}.weight"] = module.weight
    for p in out.values():
        p.data = p.data.float()
        p.requires_grad_(True)
    return out


def fingerprint(windows: torch.Tensor, cfg: QATConfig, recipe: Recipe, extra: dict) -> str:
    """What a saved state depends on: the training windows, the settings, the recipe, the models."""
    blob = json.dumps({"cfg": asdict(cfg), "recipe": recipe.to_dict(), "extra": extra}, sort_keys=True, default=str)
    h = hashlib.sha256(blob.encode())
    h.update(windows.numpy().tobytes())
    return h.hexdigest()


def _save_state(state_dir: Path, params: dict[str, nn.Parameter], opt: torch.optim.Optimizer, step: int,
                losses: list[float], key: str) -> None:
    """Write the trainable tensors and the optimizer's state, each file through a temporary name."""
    state_dir.mkdir(parents=True, exist_ok=True)
    index = {id(p): i for i, p in enumerate(params.values())}
    tensors = {f"param.{k}": p.detach().contiguous() for k, p in params.items()}
    for p in params.values():
        for k, v in opt.state.get(p, {}).items():
            tensors[f"opt.{index[id(p)]}.{k}"] = v.detach().contiguous() if torch.is_tensor(v) else torch.tensor(v)
    tmp = state_dir / f".{STATE_TENSORS}.tmp"
    save_file(tensors, str(tmp))
    os.replace(tmp, state_dir / STATE_TENSORS)
    tmp = state_dir / f".{STATE_JSON}.tmp"
    tmp.write_text(json.dumps({"fingerprint": key, "step": step, "losses": losses}))
    os.replace(tmp, state_dir / STATE_JSON)


def _load_state(state_dir: Path, params: dict[str, nn.Parameter], opt: torch.optim.Optimizer, key: str) -> tuple[int, list[float]]:
    """Restore a saved state of the same run (fingerprint); (0, []) when there is none to take."""
    meta_path, tensor_path = state_dir / STATE_JSON, state_dir / STATE_TENSORS
    if not (meta_path.is_file() and tensor_path.is_file()):
        return 0, []
    try:
        meta = json.loads(meta_path.read_text())
        tensors = load_file(str(tensor_path))
    except (ValueError, OSError) as exc:
        raise TrainError(f"the saved training state in {state_dir} cannot be read ({exc}); delete it to start over") from None
    if meta.get("fingerprint") != key:
        raise TrainError(f"the saved training state in {state_dir} belongs to another run (other data, settings or "
                         "model); delete it to start over, or run with the inputs that made it")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(tensors[f"param.{k}"])
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, i, name = k.split(".", 2)
            state.setdefault(int(i), {})[name] = v
    saved = opt.state_dict()
    saved["state"] = state
    opt.load_state_dict(saved)
    return int(meta["step"]), list(meta["losses"])


def train(student: nn.Module, teacher: nn.Module | None, windows: torch.Tensor, fakes: dict[str, FakeQuantLinear],
          cfg: QATConfig, state_dir: Path | None = None, key: str = "", show_progress: bool = False,
          stop_after: int | None = None) -> QATResult:
    """Train `student` (prepared) on `windows: [n, seq]` token ids. `teacher`: the float model, run
    forward only (kd). `state_dir`: where states are saved and resumed from. `stop_after`: leave
    after that many steps of this call (an interruption, for tests)."""
    if cfg.loss == "kd" and teacher is None:
        raise TrainError("distillation (loss kd) needs a teacher model")
    if cfg.precisions:
        top = {f.grid.bits for f in fakes.values() if isinstance(f.grid, NestedIntGrid)}
        if len(top) != 1 or any(not isinstance(f.grid, NestedIntGrid) for f in fakes.values()):
            raise TrainError("precisions train one stored code at several bit widths: every trained layer needs the same "
                             "nested grid (--format nested8)")
        if max(cfg.precisions) > top.pop():
            raise TrainError(f"precisions {list(cfg.precisions)} exceed the nested grid's stored bits")
    started = time.perf_counter()
    student.eval()  # no dropout: the same inputs give the same model
    params = trainable(student, fakes)
    opt = torch.optim.AdamW(list(params.values()), lr=cfg.lr, weight_decay=0.0)
    result = QATResult(layers=len(fakes), params=sum(p.numel() for p in params.values()))
    start, result.losses = _load_state(state_dir, params, opt, key) if state_dir else (0, [])
    result.resumed_at = start
    order = batches(windows.shape[0], cfg.batch_size, cfg.steps, torch.Generator().manual_seed(cfg.seed))
    plist = list(params.values())
    with torch.enable_grad(), progress() as bar:
        task = bar.add_task(f"training ({cfg.loss}, {cfg.step_sizes} steps)", total=cfg.steps, completed=start, loss="",
                            visible=show_progress)
        for step in range(start, cfg.steps):
            if stop_after is not None and step - start >= stop_after:
                break
            ids = windows[order[step]]
            target = None
            if cfg.loss == "kd":
                with torch.no_grad():
                    target = teacher(input_ids=ids, use_cache=False).logits
            loss = 0.0
            for p in cfg.precisions or (None,):  # Double Rounding: each precision's loss, averaged
                for f in fakes.values():
                    f.precision = p
                logits = student(input_ids=ids, use_cache=False).logits
                loss = loss + (distill_loss(logits, target) if target is not None else lm_loss(logits, ids))
            loss = loss / len(cfg.precisions or (None,))
            result.losses.append(optimizer_step(opt, plist, loss, cfg.lr, step, cfg.steps))
            bar.update(task, advance=1, loss=f"{result.losses[-1]:.4g}")
            done = step + 1
            if state_dir and (done == cfg.steps or (cfg.save_every and done % cfg.save_every == 0)):
                _save_state(state_dir, params, opt, done, result.losses, key)
    for f in fakes.values():
        f.precision = None  # stored and converted at the grid's own precision
    for p in params.values():
        p.requires_grad_(False)
    result.seconds = time.perf_counter() - started
    return result


@torch.no_grad()
def convert(model: nn.Module, fakes: dict[str, FakeQuantLinear]) -> None:
    """Replace every FakeQuantLinear by the packed QuantLinear (IntActLinear with int8 activations) of
    its current codes and parameters (same outputs), in place."""
    for name, fake in fakes.items():
        bias = None if fake.bias is None else fake.bias.detach()
        packed = IntActLinear if fake.act else QuantLinear
        model.set_submodule(name, packed.from_quantized(fake.quantized_weight(), bias))
