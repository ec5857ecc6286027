"""The lowbit artifact: a directory that holds a quantized model, and how to write and read it.

    out/
      lowbit.json             header: lowbit version, source model, recipe, per-module kind
                              (the runtime class: "linear", "ptq161"), grid, layout and bits per
                              weight, totals, sha256 of every other file, and a sha256 of the
                              header itself
      quantized.safetensors   per quantized module: packed codes and packed/fp16 grid parameters
      dense.safetensors       every other tensor (embeddings, norms, biases of skipped layers ...)
      config.json, tokenizer files   to rebuild the model and its tokenizer offline

Written into a temporary directory beside the target, then renamed into place: an interrupted
save leaves nothing half-written, and an existing directory is replaced only with `force`.
Reading checks every checksum first and names the file that does not match.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__
from .models import auto_class
from .nn import QuantModule, module_from_entry
from .checksum import sha256_file

HEADER = "lowbit.json"
QUANTIZED = "quantized.safetensors"
DENSE = "dense.safetensors"
FORMAT_VERSION = 1


class ArtifactError(RuntimeError):
    pass


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def quantized_modules(model: nn.Module) -> dict[str, QuantModule]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantModule)}


def split_state(model: nn.Module, dense_dtype: torch.dtype) -> tuple[dict, dict, dict[str, str]]:
    """(quantized tensors, dense tensors in `dense_dtype`, aliases of shared dense tensors)."""
    qmods = quantized_modules(model)
    quantized: dict[str, torch.Tensor] = {}
    for name, module in qmods.items():
        for key, value in module.state_dict().items():
            quantized[f"{name}.{key}"] = value.detach().contiguous()
    dense: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    owner: dict[tuple[int, tuple], str] = {}
    for key, value in model.state_dict(keep_vars=False).items():
        if key in quantized:
            continue
        ident = (value.data_ptr(), tuple(value.shape))
        if ident in owner:  # a tied tensor: store once
            aliases[key] = owner[ident]
            continue
        owner[ident] = key
        v = value.detach()
        dense[key] = (v.to(dense_dtype) if v.is_floating_point() else v).contiguous()
    return quantized, dense, aliases


def _module_entry(name: str, module: QuantModule, info: dict) -> dict:
    stored = module.storage_bytes()
    numel = module.in_features * module.out_features
    return {**info, **module.entry(), "numel": numel, "stored_bytes": stored, "bpw": 8 * sum(stored.values()) / numel}


def save(
    model: nn.Module,
    out_dir: str | Path,
    *,
    tokenizer=None,
    source: dict | None = None,
    recipe: dict | None = None,
    module_info: dict[str, dict] | None = None,
    skipped: dict[str, str] | None = None,
    dense_dtype: torch.dtype = torch.float32,
    force: bool = False,
) -> Path:
    """Write `model` (with quantized modules) as an artifact directory; returns its path."""
    out = Path(out_dir)
    if out.exists() and not force:
        raise ArtifactError(f"{out} already exists; choose another output directory or pass --force to replace it")
    qmods = quantized_modules(model)
    if not qmods:
        raise ArtifactError("the model holds no quantized module; quantize it before saving")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        quantized, dense, aliases = split_state(model, dense_dtype)
        save_file(quantized, str(tmp / QUANTIZED))
        save_file(dense, str(tmp / DENSE))
        config = getattr(model, "config", None)
        if config is not None:
            config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        modules = {n: _module_entry(n, m, (module_info or {}).get(n, {})) for n, m in sorted(qmods.items())}
        q_numel = sum(m["numel"] for m in modules.values())
        q_bytes = sum(sum(m["stored_bytes"].values()) for m in modules.values())
        dense_numel = sum(v.numel() for v in dense.values())
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        header = {
            "lowbit_version": __version__,
            "format_version": FORMAT_VERSION,
            "source": source or {},
            "recipe": recipe or {},
            "dense_dtype": str(dense_dtype).removeprefix("torch."),
            "modules": modules,
            "skipped": dict(sorted((skipped or {}).items())),
            "aliases": dict(sorted(aliases.items())),
            "summary": {
                "quantized_params": q_numel,
                "quantized_bytes": q_bytes,
                "bpw": 8 * q_bytes / q_numel,
                "dense_params": dense_numel,
                "dense_bytes": sum(v.numel() * v.element_size() for v in dense.values()),
            },
            "files": files,
        }
        header["header_sha256"] = hashlib.sha256(_canonical(header)).hexdigest()
        (tmp / HEADER).write_text(json.dumps(header, indent=2, sort_keys=True) + "\n")
        if out.exists():  # force: move the old one aside, swap, then delete it
            backup = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, backup / out.name)
            os.replace(tmp, out)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_header(path: str | Path, verify: bool = True) -> dict:
    """The artifact's header, after checking it and (with `verify`) every file's sha256."""
    root = Path(path)
    if not root.is_dir():
        raise ArtifactError(f"{root} is not a directory; give the output directory of `lowbit quantize`")
    hfile = root / HEADER
    if not hfile.is_file():
        raise ArtifactError(f"{root} is not a lowbit artifact: {HEADER} is missing")
    try:
        header = json.loads(hfile.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{hfile} is corrupt (not valid JSON: {exc})") from None
    if not isinstance(header, dict) or "files" not in header or "header_sha256" not in header:
        raise ArtifactError(f"{hfile} is not a lowbit header (fields missing)")
    claimed = header.pop("header_sha256")
    if hashlib.sha256(_canonical(header)).hexdigest() != claimed:
        raise ArtifactError(f"{hfile} was edited or is corrupt: its content does not match its own checksum")
    if header.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{hfile}: format version {header.get('format_version')} is not supported by lowbit {__version__}")
    if verify:
        for name, digest in header["files"].items():
            f = root / name
            if not f.is_file():
                raise ArtifactError(f"artifact file {f} is missing")
            if sha256_file(f) != digest:
                raise ArtifactError(f"artifact file {f} does not match its sha256 in {HEADER}: it was truncated or edited")
    return header


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise ArtifactError(f"artifact file {path} cannot be read: {exc}") from None


def load(
    path: str | Path, model: nn.Module | None = None, verify: bool = True, cache_weights: bool = False, bits: int | None = None
) -> nn.Module:
    """Rebuild the quantized model from an artifact. `model`: a skeleton to fill instead of the
    one built from the stored config (for models that are not Hugging Face models).
    `cache_weights`: keep each layer's dequantized weight after its first use (faster repeated
    forwards, such as evaluation or generation, at the memory cost of a float model).
    `bits`: decode every nested module (`nested8`, Double Rounding) at this precision; other
    modules are unaffected; an artifact without nested modules refuses it."""
    root = Path(path)
    header = read_header(root, verify)
    if model is None:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(root)
        model = auto_class(header["source"].get("kind", "causal-lm")).from_config(config, dtype=torch.float32)
    quantized = _load_tensors(root / QUANTIZED)
    switched = 0
    for name, entry in header["modules"].items():
        try:
            layer = module_from_entry(entry)
            if bits is not None:
                switched += layer.set_precision(bits)
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"{root / HEADER}: module {name} cannot be rebuilt: {exc}") from None
        own = {k.removeprefix(name + "."): v for k, v in quantized.items() if k.startswith(name + ".")}
        try:
            layer.load_state_dict(own, strict=True)
            layer.cache_weight = cache_weights
            model.set_submodule(name, layer)
        except (RuntimeError, AttributeError) as exc:
            raise ArtifactError(f"{root / QUANTIZED}: tensors of module {name} do not fit: {exc}") from None
    if bits is not None and not switched:
        formats = sorted({e["grid"]["format"] for e in header["modules"].values()})
        raise ArtifactError(
            f"{root}: bits={bits} selects the precision of nested modules (format nested8), but this artifact has "
            f"none ({', '.join(formats)}); load it without bits"
        )
    dense = _load_tensors(root / DENSE)
    for alias, target in header.get("aliases", {}).items():
        dense[alias] = dense[target]
    result = model.load_state_dict(dense, strict=False)
    qkeys = {f"{n}.{k}" for n, m in quantized_modules(model).items() for k in m.state_dict()}
    missing = [k for k in result.missing_keys if k not in qkeys]
    if missing or result.unexpected_keys:
        raise ArtifactError(
            f"{root / DENSE} does not match the model: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
    model.eval()
    model.lowbit_header = header
    model.lowbit_precision = bits
    return model
