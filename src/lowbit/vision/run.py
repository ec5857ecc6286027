"""The convolutional path end to end, as the CLI runs it: load a vision model, quantize it by a
recipe on calibration crops, write the artifact; and measure an artifact against its float
original on evaluation crops (top-1 agreement, KL, size)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..artifact import load, read_header, save
from ..calib.zeroq import distill_images
from ..eval.size import artifact_size
from ..mixed.candidates import CandidateError
from ..recipe import Recipe
from .eval import fidelity, logits
from .images import random_crops
from .models import load_vision_model
from .mixed import allocate_bits, mixed_recipe, sensitivities
from .quantize import VisionQuantizeError, VisionReport, quantize_vision

CALIB_SOURCE = "photos-calib"
EVAL_SOURCE = "photos-eval"
EVAL_SEED = 1_000_003  # evaluation crops never share the calibration's seed


def quantize_cnn(model: nn.Module, recipe: Recipe, images: torch.Tensor | None = None) -> tuple[Recipe, VisionReport, dict]:
    """Quantize `model` (Conv2d + Linear layers, batch norms folded) in place by `recipe`: inputs
    distilled when `data_free: zeroq`, else `images` (or the recipe's calibration crops) where GPTQ,
    activation ranges or a budget need them; with `budget`, ZeroQ's mixed precision first. Returns
    the recipe actually applied (per-layer formats under a budget), the report, and what the artifact
    records of the calibration and the allocation."""
    needs = (recipe.method == "gptq" or recipe.act != "none" or recipe.budget is not None or recipe.bias_correction
             or any(o.method == "gptq" for o in recipe.overrides))
    record: dict = {}
    if needs and (images is None or recipe.data_free != "none"):
        images, record["calibration"] = calibration_images(model, recipe)
    elif images is not None:
        record["calibration"] = {"images": "given", "n_inputs": int(images.shape[0])}
    if recipe.budget is not None:  # ZeroQ's mixed precision: sensitivities, then the knapsack
        costs = sensitivities(model, recipe, images, batch_size=recipe.calib.batch_size)
        try:
            allocation = allocate_bits(costs, recipe.budget)
        except CandidateError as exc:
            raise VisionQuantizeError(str(exc)) from None
        record["mixed_precision"] = {"budget": recipe.budget, "bpw": allocation.bpw, "predicted_kl": allocation.damage,
                                     "choice": dict(sorted(allocation.choice.items()))}
        recipe = mixed_recipe(recipe.model_copy(update={"budget": None}), allocation)
    report = quantize_vision(model, recipe, images, recipe.act, recipe.calib.act_range, recipe.calib.batch_size,
                             bias_correction=recipe.bias_correction)
    record["folded_batchnorms"] = len(report.folded)
    return recipe, report, record


def quantize_vision_job(source: str, recipe: Recipe, out: str | Path, force: bool = False) -> tuple[Path, VisionReport]:
    """Quantize the vision model `source` (an alias or a state-dict file) by `recipe` and save it.
    Calibration: `recipe.calib.n_samples` crops (seed `calib.seed`) of `calib.path` (a directory of
    images, or the bundled calibration photos), or ZeroQ's distilled inputs."""
    model, source_record = load_vision_model(source)
    applied, report, record = quantize_cnn(model, recipe)
    path = save(model, out, source={**source_record, **record}, recipe=applied.to_dict(),
                module_info={n: {"method": m["method"]} for n, m in report.modules.items()}, skipped=report.skipped, force=force)
    return path, report


def calibration_images(model, recipe: Recipe) -> tuple[torch.Tensor, dict]:
    """The recipe's calibration inputs and their record: `calib.n_samples` seeded crops of `calib.path`
    (default: the bundled calibration photos), or with `data_free: zeroq` as many inputs distilled
    from the model's BatchNorm statistics (before folding), no image used."""
    if recipe.data_free == "zeroq":
        if recipe.calib.path:
            raise VisionQuantizeError("data_free: zeroq uses no images; drop the calibration path (--calib) or data_free")
        z = recipe.zeroq
        images, info = distill_images(model, recipe.calib.n_samples, steps=z.steps, lr=z.lr, batch_size=z.batch_size,
                                      seed=recipe.calib.seed)
        return images, {"data_free": "zeroq", "n_inputs": recipe.calib.n_samples, "seed": recipe.calib.seed,
                        "bn_loss_start": info["bn_loss_start"], "bn_loss_end": info["bn_loss_end"]}
    source = recipe.calib.path or CALIB_SOURCE
    return (random_crops(recipe.calib.n_samples, recipe.calib.seed, source),
            {"images": str(source), "n_crops": recipe.calib.n_samples, "seed": recipe.calib.seed})


def evaluate_vision(path: str | Path, images: str | None = None, n_images: int = 1000, seed: int = EVAL_SEED,
                    reference: str | None = None) -> dict:
    """Fidelity of a vision artifact to its float original (or `reference`) on `n_images` crops."""
    header = read_header(path)
    quantized = load(path, verify=False, cache_weights=True)
    src = header["source"]
    ref_source = reference or (src.get("path") if src.get("path") and Path(src["path"]).exists() else src.get("model"))
    ref, _ = load_vision_model(ref_source, src.get("factory", "mobilenet-v2"))
    crops = random_crops(n_images, seed, images or EVAL_SOURCE)
    result = {"artifact": str(path), "reference": str(ref_source), "images": str(images or EVAL_SOURCE), "crop_seed": seed}
    result.update(fidelity(logits(ref, crops, what="float model"), logits(quantized, crops, what="quantized model")))
    result.update(artifact_size(path, header))
    return result


__all__ = ["evaluate_vision", "quantize_vision_job"]
