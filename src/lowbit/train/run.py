"""`lowbit train`: load a model, make its linear layers fake-quantized (the recipe's format), train
them (`train.qat`), convert to packed layers and write an ordinary artifact that `lowbit eval`,
`lowbit.load` and the exporters take. The recipe's method is where training starts: `rtn` rounds
the float weights, `gptq` (or any calibrated method) quantizes first, calibrated on the training
windows, and training starts from its codes. The training state lives beside the output
(`.NAME.lowbit-train/`) until the artifact is written, so a stopped run continues where it was."""

from __future__ import annotations

import copy
import hashlib
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from ..artifact import quantized_modules, save
from ..quantize import quantize_model
from ..calib.sources import default_text
from ..calib.text import random_windows, read_text
from ..models import load_model
from ..recipe import Recipe
from ..validation.finite import check_finite_model
from ..validation.paths import check_output
from .qat import QATConfig, QATResult, TrainError, convert, fingerprint, prepare, train


def state_dir(out: Path) -> Path:
    """Where a training run of `out` keeps its saved states (beside it, hidden)."""
    return out.parent / f".{out.name}.lowbit-train"


def train_model(source: str, recipe: Recipe, cfg: QATConfig, out: str | Path, data: str | Path | None = None,
                teacher_source: str | None = None, seq_len: int = 256, n_windows: int = 256, force: bool = False,
                show_progress: bool = True, stop_after: int | None = None) -> tuple[Path | None, QATResult]:
    """Train `source` for `recipe`'s format and write the artifact to `out`. `data`: a text file
    (default: the calibration plays); `teacher_source`: the model to distill from (default: the
    float `source` itself). With `stop_after`, leave after that many steps (the state saved, no
    artifact: returns None)."""
    out = Path(out)
    if recipe.cnn_only():
        raise TrainError(recipe.cnn_only())
    local = Path(source).expanduser()
    check_output(out, force=force, sources=(local,) if local.exists() else ())
    text, desc = (read_text(data), str(data)) if data else default_text("calib")
    loaded = load_model(source)
    check_finite_model(loaded.model, f"model {source}")
    if loaded.kind != "causal-lm":
        raise TrainError(f"{source} is a {loaded.kind} model; lowbit train takes causal language models for now")
    teacher = None
    if cfg.loss == "kd":
        teacher = load_model(teacher_source).model if teacher_source else copy.deepcopy(loaded.model)
        teacher.eval()
    seq_len = min(seq_len, getattr(loaded.model.config, "max_position_embeddings", seq_len))
    windows = random_windows(loaded.tokenizer, text, seq_len, n_windows, cfg.seed)  # [n, seq]
    start = None
    if recipe.method != "rtn":  # start from the recipe's post-training method, calibrated on the training windows
        ptq = copy.deepcopy(loaded.model)
        quantize_model(ptq, recipe, loaded.kind, list(windows.split(4)), show_progress)
        start = {n: m.quantized_weight() for n, m in quantized_modules(ptq).items()}
        del ptq
    fakes, skipped = prepare(loaded.model, recipe, cfg.step_sizes, start)
    data_info = {"text": desc, "text_sha256": hashlib.sha256(text.encode()).hexdigest(), "seq_len": seq_len,
                 "n_windows": n_windows}
    key = fingerprint(windows, cfg, recipe, {"model": loaded.source, "path": loaded.path, "teacher": teacher_source,
                                              "data": data_info})
    where = state_dir(out)
    result = train(loaded.model, teacher, windows, fakes, cfg, where, key, show_progress, stop_after)
    if len(result.losses) < cfg.steps:
        return None, result
    convert(loaded.model, fakes)
    source_info = {**loaded.source_record(),
                   "train": {**asdict(cfg), **{k: v for k, v in result.summary().items() if k != "resumed_at"},
                             "teacher": (teacher_source or loaded.source) if cfg.loss == "kd" else None, "data": data_info}}
    with torch.no_grad():
        path = save(loaded.model, out, tokenizer=loaded.tokenizer, source=source_info, recipe=recipe.to_dict(),
                    module_info={n: {"method": f"qat-{cfg.step_sizes}"} for n in fakes}, skipped=skipped,
                    dense_dtype=loaded.dtype, force=force)
    shutil.rmtree(where, ignore_errors=True)  # the artifact is written: the saved states are spent
    return path, result
