"""Artifacts out to the runtimes people deploy with: `export_artifact(path, to=..., out=...)`.

One module per target format: `gguf` (llama.cpp, llama-cpp-python, ollama), `compressed_tensors`
(transformers, vLLM), `hf_gptq` (transformers + gptqmodel, vLLM, TGI); `_common` holds what they
share (an artifact's weights as integers, int32 bit packing, atomic output directories). Which lowbit
grid maps exactly onto which external layout lives in `targets`; a module whose grid has no exact
mapping is refused (naming the grid, the targets it would fit and the `--target` flag that makes
it fit), never converted with a silent loss.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from .errors import ExportError

WRITERS: dict[str, str] = {
    "gguf": "lowbit.export.gguf:write_gguf",
    "compressed-tensors": "lowbit.export.compressed_tensors:write_compressed_tensors",
    "gptq": "lowbit.export.hf_gptq:export_hf_gptq",
}


def _writer(to: str) -> Callable[..., Path]:
    import importlib

    if to not in WRITERS:
        raise ExportError(f"unknown export format {to!r}; known: {', '.join(WRITERS)}")
    module, name = WRITERS[to].split(":")
    return getattr(importlib.import_module(module), name)


def export_artifact(artifact: str | Path, to: str, out: str | Path, force: bool = False, **options) -> Path:
    """Write the artifact at `artifact` in format `to` at `out`; returns the written path. `to` may
    name a GGUF type as a target, `gguf:q5_0`: every quantized module is written as that type."""
    container, _, kind = to.partition(":")
    if kind and container == "gguf":
        return _writer("gguf")(Path(artifact), Path(out), force=force, to=to, **options)
    return _writer(to)(Path(artifact), Path(out), force=force, **options)


__all__ = ["ExportError", "WRITERS", "export_artifact"]
