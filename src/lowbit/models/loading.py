"""Load a model from a built-in alias, a local directory, a .gguf file or a hub id."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from .aliases import ALIASES
from .errors import ModelLoadError

ModelKind = Literal["causal-lm", "encoder"]


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    kind: ModelKind
    source: str  # what the user passed
    path: str  # what it resolved to
    dtype: torch.dtype  # the checkpoint's own dtype, used to store unquantized tensors
    source_format: str | None = None  # e.g. "gguf Q4_1" when the weights were already quantized


def resolve(source: str | Path) -> str:
    """An alias, a local directory or .gguf file, or a hub id -> what the loaders take."""
    text = str(source)
    if text in ALIASES:
        return str(ALIASES[text].materialize())
    path = Path(text).expanduser()
    if path.exists():
        if path.is_file() and path.suffix == ".gguf":
            return str(path)
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is neither a .gguf file nor a model directory with a config.json")
        return str(path)
    if text.count("/") == 1 and not text.startswith((".", "/", "~")) and not text.endswith(".gguf"):
        return text  # a hub id; from_pretrained reports what goes wrong
    raise ModelLoadError(
        f"model {text!r} not found: give a local model directory, a .gguf file, a hub id (org/name) "
        f"or an alias ({', '.join(ALIASES)}; see `lowbit models`)"
    )


def model_kind(config) -> ModelKind:
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return "causal-lm"
    return "encoder"


def auto_class(kind: ModelKind):
    from transformers import AutoModel, AutoModelForCausalLM

    return AutoModelForCausalLM if kind == "causal-lm" else AutoModel


def checkpoint_dtype(config) -> torch.dtype:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, torch.float32)
    return dtype if dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float32


def _source_format(source: str, path: str) -> str | None:
    if source in ALIASES:
        return ALIASES[source].source_format
    if path.endswith(".gguf"):
        from .gguf import gguf_weight_type

        return f"gguf {gguf_weight_type(Path(path))}"
    return None


def load_model(source: str | Path) -> LoadedModel:
    """Load in float32 for quantization and evaluation on the CPU."""
    from transformers import AutoConfig, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = resolve(source)
    fmt = _source_format(str(source), path)
    if path.endswith(".gguf"):
        from .gguf import load_gguf

        model, tokenizer = load_gguf(Path(path))
        # the GGUF's own weights are quantized; unquantized tensors are stored as fp16 at most
        return LoadedModel(model, tokenizer, "causal-lm", str(source), str(Path(path).resolve()), torch.float16, fmt)
    try:
        config = AutoConfig.from_pretrained(path)
        kind = model_kind(config)
        model = auto_class(kind).from_pretrained(path, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as exc:
        raise ModelLoadError(
            f"could not load model {source!r} ({exc.__class__.__name__}: {str(exc).splitlines()[0]}). "
            "Without network access, pass a local model directory or an alias instead of a hub id."
        ) from exc
    model.eval()
    return LoadedModel(model, tokenizer, kind, str(source), path, checkpoint_dtype(config), fmt)
