"""The user-level jobs that the CLI, the demo and the benchmarks share: quantize a model from
its source to an artifact, and evaluate an artifact against its original."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from .artifact import load, read_header, save
from .calib.sources import default_text, sentences
from .calib.text import consecutive_windows, framing, random_windows, read_text
from .eval import artifact_size, causal_lm_fidelity, encoder_fidelity
from .eval.source_grid import artifact_contains_source_grid
from .models import LoadedModel, load_model
from .quantize import QuantizeReport, quantize_model
from .recipe import Recipe
from .validation.finite import check_finite_model


@dataclass
class QuantizeJob:
    loaded: LoadedModel
    report: QuantizeReport
    calib: dict  # where the calibration text came from


def calibration_batches(loaded: LoadedModel, recipe: Recipe) -> tuple[list[torch.Tensor], dict]:
    c = recipe.calib
    if c.path:
        text, desc = read_text(c.path), str(c.path)
    else:
        text, desc = default_text("calib")
    seq_len = min(c.seq_len, getattr(loaded.model.config, "max_position_embeddings", c.seq_len))
    windows = random_windows(loaded.tokenizer, text, seq_len, c.n_samples, c.seed)
    info = {
        "text": desc,
        "text_sha256": hashlib.sha256(text.encode()).hexdigest(),
        "seq_len": seq_len,
        "n_samples": c.n_samples,
        "seed": c.seed,
    }
    return list(windows.split(c.batch_size)), info


def quantize(source: str, recipe: Recipe, show_progress: bool = True, allow_pickle: bool = False, parallel=None) -> QuantizeJob:
    """Load `source` and quantize it in memory by `recipe`. Every tensor of the source is checked
    for NaN/Inf first, and a calibration file named by the recipe must be readable text, whether
    or not the method needs it (a misspelled path is never recorded silently)."""
    if recipe.calib.path:
        read_text(recipe.calib.path)
    loaded = load_model(source, allow_pickle=allow_pickle)
    check_finite_model(loaded.model, f"model {source}")
    needs_calib = recipe.preprocess.steps > 0 or recipe.tune.steps > 0 or recipe.scaling != "none" or recipe.rounding != "nearest" or any(
        s is not None and s.needs_calibration
        for s in (recipe.scheme_for(n) for n, _ in loaded.model.named_modules())
    )
    batches, calib = calibration_batches(loaded, recipe) if needs_calib else (None, {})
    report = quantize_model(loaded.model, recipe, loaded.kind, batches, show_progress, parallel)
    return QuantizeJob(loaded, report, calib)


def save_job(job: QuantizeJob, recipe: Recipe, out: str | Path, force: bool = False, max_shard_bytes: int | None = None) -> Path:
    loaded = job.loaded
    source = {**loaded.source_record(), "calibration": job.calib}
    if job.report.preprocess is not None:  # the quantized weights are the preprocessed source's
        # without its seconds, as the modules' seconds: the same inputs give a byte-identical artifact
        source["preprocess"] = {k: v for k, v in job.report.preprocess.items() if k != "seconds"}
    if job.report.scaling is not None:  # the norms and layers were rescaled before quantization
        source["scaling"] = job.report.scaling
    if job.report.rounding is not None:  # the codes were refined by learned rounding
        source["rounding"] = job.report.rounding
    if job.report.tune is not None:
        source["tune"] = {k: v for k, v in job.report.tune.items() if k != "seconds"}
    return save(
        loaded.model, out, tokenizer=loaded.tokenizer, source=source, recipe=recipe.to_dict(),
        module_info={n: {k: m[k] for k in ("method", "target", "target_note") if k in m} for n, m in job.report.modules.items()},
        skipped=job.report.skipped, dense_dtype=loaded.dtype, force=force, max_shard_bytes=max_shard_bytes,
        entropy_code=recipe.entropy_code,
    )


def evaluate(
    path: str | Path,
    text_path: str | None = None,
    reference: str | LoadedModel | None = None,
    max_tokens: int = 4096,
    seq_len: int = 512,
    n_sentences: int = 256,
    bits: int | None = None,
) -> dict:
    """Fidelity of the artifact at `path` to its original model (or to `reference`, a source or an
    already loaded model), plus its size. `bits`: the precision to load nested modules at."""
    header = read_header(path)
    quantized = load(path, verify=False, cache_weights=True, bits=bits)  # read_header verified every file
    if isinstance(reference, LoadedModel):
        ref, ref_desc = reference, reference.source
    else:
        ref_desc = reference or _header_reference(header)
        ref = load_model(ref_desc)
    if text_path:
        text, text_desc = read_text(text_path), str(text_path)
    else:
        text, text_desc = default_text("eval")
    result: dict = {"artifact": str(path), "reference": str(ref_desc), "reference_from_header": reference is None,
                    "text": text_desc}
    if bits is not None:
        result["precision"] = bits
    if ref.kind == "causal-lm":
        seq = min(seq_len, getattr(ref.model.config, "max_position_embeddings", seq_len))
        windows = consecutive_windows(ref.tokenizer, text, seq, max_tokens)
        frame = framing(ref.tokenizer)
        result.update(causal_lm_fidelity(ref.model, quantized, windows))
        result.update({"stride": seq, "bos": bool(frame.prefix), "special_prefix": frame.prefix, "max_text_tokens": max_tokens})
    else:
        result.update(encoder_fidelity(ref.model, quantized, ref.tokenizer, sentences(text, n_sentences)))
    result.update(artifact_size(path, header))
    result["source_format"] = header["source"].get("source_format")
    result["source_grid"] = artifact_contains_source_grid(header)
    return result


def _header_reference(header: dict) -> str:
    """The original model an artifact names: its local path if that still exists, else what the
    user passed when quantizing (an alias, a path, a hub id)."""
    src = header["source"]
    path = src.get("path")
    if path and Path(path).exists():
        return path
    return src.get("model") or path or ""
