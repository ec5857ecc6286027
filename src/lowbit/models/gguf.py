"""GGUF files as input: read which quantization type their linear weights were stored in, and
dequantize them into an ordinary float model (transformers' GGUF support, with `gguf`)."""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from pathlib import Path

import torch

from .errors import ModelLoadError


def gguf_weight_type(path: Path) -> str:
    """The most common storage type of the file's 2-D weights (blk.*), e.g. 'Q4_1'."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # gguf raises plain errors for a bad file
        raise ModelLoadError(f"{path} is not a readable GGUF file: {exc}") from None
    kinds = Counter(t.tensor_type.name for t in reader.tensors if t.name.startswith("blk.") and len(t.shape) == 2)
    return kinds.most_common(1)[0][0] if kinds else "unknown"


def load_gguf(path: Path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) dequantized from a GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"could not load GGUF {path}: {exc}") from None
    if hasattr(model.config, "quantization_config"):  # dequantized: a plain float model now
        del model.config.quantization_config
    return model.eval(), tok


def gguf_to_checkpoint(path: Path, out: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write a GGUF file as a Hugging Face checkpoint directory (atomically)."""
    from transformers import AutoModelForCausalLM

    model, tok = load_gguf(path)
    config = model.config
    config.dtype = dtype
    target = AutoModelForCausalLM.from_config(config, dtype=dtype)
    target.load_state_dict(model.state_dict())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    target.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / "lowbit_source.txt").write_text(f"converted from {path.name} (weights stored as gguf {gguf_weight_type(path)})\n")
    if out.exists():
        import shutil

        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
