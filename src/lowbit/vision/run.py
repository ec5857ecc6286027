"""The convolutional path end to end, as the CLI runs it: load a vision model, quantize it by a
recipe on calibration crops, write the artifact; and measure an artifact against its float
original on evaluation crops (top-1 agreement, KL, size)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..artifact import load, read_header, save
from ..calib.zeroq import distill_images
from ..eval.size import artifact_size
from ..recipe import Recipe
from .eval import fidelity, logits
from .images import random_crops
from .models import load_vision_model
from ..mixed.candidates import CandidateError
from .mixed import allocate_bits, mixed_recipe, sensitivities
from .quantize import VisionQuantizeError, VisionReport, quantize_vision

CALIB_SOURCE = "photos-calib"
EVAL_SOURCE = "photos-eval"
EVAL_SEED = 1_000_003  # evaluation crops never share the calibration's seed


def quantize_vision_job(source: str, recipe: Recipe, out: str | Path, force: bool = False) -> tuple[Path, VisionReport]:
    """Quantize the vision model `source` (an alias or a state-dict file) by `recipe` and save it.
    Calibration: `recipe.calib.n_samples` crops (seed `calib.seed`) of `calib.path` (a directory of
    images, or the bundled calibration photos)."""
    model, record = load_vision_model(source)
    recipe_budget = recipe.budget
    needs_images = recipe.method == "gptq" or recipe.act != "none" or any(o.method == "gptq" for o in recipe.overrides)
    needs_images = needs_images or recipe.budget is not None
    images, calibration = calibration_images(model, recipe) if needs_images else (None, {})
    mixed = None
    if recipe.budget is not None:  # ZeroQ's mixed precision: sensitivities, then the knapsack
        costs = sensitivities(model, recipe, images, batch_size=recipe.calib.batch_size)
        try:
            allocation = allocate_bits(costs, recipe.budget)
        except CandidateError as exc:
            raise VisionQuantizeError(str(exc)) from None
        recipe = mixed_recipe(recipe.model_copy(update={"budget": None}), allocation)
        mixed = {"budget": recipe_budget, "bpw": allocation.bpw, "predicted_kl": allocation.damage,
                 "choice": dict(sorted(allocation.choice.items()))}
    report = quantize_vision(model, recipe, images, recipe.act, recipe.calib.act_range, recipe.calib.batch_size)
    record = {**record, "folded_batchnorms": len(report.folded), "calibration": calibration,
              **({"mixed_precision": mixed} if mixed else {})}
    path = save(model, out, source=record, recipe=recipe.to_dict(),
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
