"""What every peer adapter shares: the layer set, honest byte counting, weight swapping.

An adapter is a function `quantize(model, calib=None, **options) -> PeerResult`: it takes the
loaded float32 Hugging Face model (and, if its method needs data, calibration windows of token
ids, [n, seq]), quantizes the same layers lowbit does (every nn.Linear inside the decoder blocks;
lm_head and embeddings stay float) and returns the model, the true bits per weight of what the peer
stores for those layers, and notes.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn


class PeerUnavailable(RuntimeError):
    """The peer cannot run here (package missing, or the method is not implemented on CPU)."""


@dataclass
class PeerResult:
    model: nn.Module
    bpw: float
    notes: str = ""
    # where the tool stores scales in the model's dtype (float32 here): its size on a 16-bit model
    bpw_16bit: float | None = None


def require(module: str, dist: str | None = None):
    """Import a peer's package or raise PeerUnavailable with the install hint."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise PeerUnavailable(
            f"package {dist or module} not installed ({exc.__class__.__name__}: {exc}); "
            "install the bench extras: make bench-setup"
        ) from None


def version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def decoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """name -> nn.Linear for every linear layer inside the transformer blocks (lowbit's layer set
    under its default recipe: lm_head, embeddings and anything outside the blocks stay float)."""
    from lowbit.models import find_blocks

    found = find_blocks(model)
    if found is None:
        raise ValueError("no transformer block list found in the model")
    prefix, blocks = found
    out = {f"{prefix}.{n}": m for n, m in blocks.named_modules() if isinstance(m, nn.Linear)}
    if not out:
        raise ValueError("no nn.Linear inside the transformer blocks")
    return out


SAFETENSORS_BYTES = {"I32": 4, "I64": 8, "F32": 4, "F16": 2, "BF16": 2, "I16": 2, "I8": 1, "U8": 1}


def layer_tensors(ckpt, layers) -> "Iterator[tuple[str, str, str, int, Callable[[], torch.Tensor]]]":
    """(layer, leaf, safetensors dtype, bytes stored, loader) for every tensor a saved checkpoint
    directory holds for `layers`, biases left out; raises if one of them was saved unquantized."""
    import math
    import os

    from safetensors import safe_open

    for fname in sorted(f for f in os.listdir(ckpt) if f.endswith(".safetensors")):
        with safe_open(os.path.join(ckpt, fname), "pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a dict
                layer, _, leaf = key.rpartition(".")
                if layer not in layers or leaf == "bias":
                    continue
                if leaf == "weight":
                    raise RuntimeError(f"{layer} was saved unquantized")
                t = f.get_slice(key)
                yield layer, leaf, t.get_dtype(), math.prod(t.get_shape()) * SAFETENSORS_BYTES[t.get_dtype()], (
                    lambda key=key: f.get_tensor(key))


def stored_bytes(t) -> int:
    """Bytes a tensor really holds, looking inside tensor subclasses (packed / quantized tensors)
    at their inner tensors rather than at the logical shape."""
    if t is None:
        return 0
    if hasattr(t, "__tensor_flatten__") and type(t) is not torch.Tensor and type(t) is not nn.Parameter:
        names, _ = t.__tensor_flatten__()
        return sum(stored_bytes(getattr(t, n)) for n in names)
    if isinstance(t, torch.Tensor):
        return t.numel() * t.element_size()
    if hasattr(t, "nbytes"):  # numpy
        return int(t.nbytes)
    return 0


def set_weight(model: nn.Module, name: str, weight: torch.Tensor) -> None:
    """Make the layer compute with `weight` (the peer's dequantized weight), as a plain nn.Linear."""
    old = model.get_submodule(name)
    w = weight.detach().to(torch.float32).reshape(old.out_features, old.in_features).contiguous()
    if not torch.isfinite(w).all():
        raise ValueError(f"{name}: dequantized weight holds NaN/inf")
    new = nn.Linear(old.in_features, old.out_features, bias=old.bias is not None, device="meta")
    new.weight = nn.Parameter(w, requires_grad=False)
    if old.bias is not None:
        new.bias = nn.Parameter(old.bias.detach().clone(), requires_grad=False)
    model.set_submodule(name, new)


def bpw_of(total_bytes: float, n_weights: int) -> float:
    return 8.0 * total_bytes / n_weights
