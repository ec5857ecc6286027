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

    def source_record(self) -> dict:
        """What an artifact's header records of the model it was made from."""
        return {"model": self.source, "path": self.path, "kind": self.kind,
                "dtype": str(self.dtype).removeprefix("torch."), "source_format": self.source_format}


PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth")


def resolve(source: str | Path) -> str:
    """An alias, a local directory or .gguf file, or a hub id -> what the loaders take."""
    text = str(source)
    if text in ALIASES:
        return str(ALIASES[text].materialize())
    path = Path(text).expanduser()
    if path.exists():
        if path.is_file() and path.suffix == ".gguf":
            return str(path)
        if (path / "lowbit.json").is_file():
            raise ModelLoadError(
                f"{path} is a lowbit artifact (already quantized); quantize the model it was made from instead "
                "(`lowbit inspect` shows its source), or evaluate it with `lowbit eval`"
            )
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


def check_local_model(path: Path, allow_pickle: bool) -> None:
    """Refuse what would run or unpickle the directory's code or data: configs that need remote code,
    and (without `allow_pickle`) checkpoints stored only as PyTorch pickles."""
    import json

    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ModelLoadError(f"{path / 'config.json'} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{path / 'config.json'} is not a model config (a JSON object is expected)")
    if config.get("auto_map") or config.get("trust_remote_code"):
        raise ModelLoadError(
            f"{path} needs its own Python code (auto_map in config.json); lowbit never runs a model's remote code. "
            "Use a model whose architecture transformers ships"
        )
    has_safetensors = any(path.glob("*.safetensors"))
    if not has_safetensors and any((path / name).exists() for name in PICKLE_WEIGHTS):
        if not allow_pickle:
            raise ModelLoadError(
                f"{path} holds its weights only as a PyTorch pickle (pytorch_model.bin); lowbit reads safetensors. "
                "Convert it to safetensors, or pass --allow-pickle to read it with torch's restricted unpickler "
                "(weights_only=True: blocks code in the file, but a crafted pickle is still untrusted input)"
            )


def load_model(source: str | Path, allow_pickle: bool = False) -> LoadedModel:
    """Load in float32 for quantization and evaluation on the CPU. Local checkpoints are read from
    safetensors only unless `allow_pickle`; remote code is never run."""
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
    if Path(path).is_dir():
        check_local_model(Path(path), allow_pickle)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
        kind = model_kind(config)
        model = auto_class(kind).from_pretrained(path, dtype=torch.float32, use_safetensors=None if allow_pickle else True,
                                                 trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except ValueError as exc:  # unknown model type, an architecture transformers does not have
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelLoadError(f"could not load model {source!r}: {first}") from None
    except OSError as exc:
        hint = ("Check that the directory holds the model's weights and tokenizer files." if Path(path).exists() else
                "Without network access, pass a local model directory or an alias instead of a hub id.")
        raise ModelLoadError(f"could not load model {source!r} ({exc.__class__.__name__}: {str(exc).splitlines()[0]}). {hint}") from exc
    model.eval()
    return LoadedModel(model, tokenizer, kind, str(source), path, checkpoint_dtype(config), fmt)
