"""What a safetensors file holds, read from its header alone (no tensor data), and the check that
an artifact's stored tensors are exactly the ones its header's modules need.

The file's header is parsed by the safetensors library, which checks that every tensor's byte
range lies inside the file and matches its dtype and shape; so after `check_stored_tensors` every
allocation the loader makes is bounded by the size of the files it reads.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import ArtifactError, LowbitError
from ..nn.base import TensorSpec, module_class
from .header import Header

# safetensors' dtype names -> torch dtypes (those lowbit writes and HF checkpoints use)
_DTYPES = {
    "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64, "BOOL": torch.bool,
}


class StoredTensorError(ArtifactError):
    pass


def stored_specs(path: Path) -> dict[str, TensorSpec]:
    """name -> (shape, dtype) of every tensor in a safetensors file, from its header only."""
    try:
        with safe_open(str(path), framework="pt") as f:
            specs = {}
            for key in f.keys():
                s = f.get_slice(key)
                dtype = _DTYPES.get(s.get_dtype())
                if dtype is None:
                    raise StoredTensorError(f"{path}: tensor {key} has dtype {s.get_dtype()}, which lowbit does not read")
                specs[key] = (tuple(int(d) for d in s.get_shape()), dtype)
            return specs
    except StoredTensorError:
        raise
    except Exception as exc:  # SafetensorError, OSError, a header the library refuses
        raise StoredTensorError(f"{path} is not a readable safetensors file: {exc}") from None


def _fmt(spec: TensorSpec) -> str:
    return f"{list(spec[0])} {str(spec[1]).removeprefix('torch.')}"


def module_specs(header: Header, where: str) -> dict[str, dict[str, TensorSpec]]:
    """Per module, the tensors its entry says it stores (computed, nothing allocated)."""
    out = {}
    for name, entry in header.modules.items():
        raw = entry.model_dump()
        try:
            out[name] = module_class(raw).state_specs(raw)
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise StoredTensorError(f"{where}: module {name} cannot be rebuilt: {exc}") from None
        coded = (entry.coding or {}).get("codes")
        if coded is not None:  # stored as an ANS stream and its model instead of packed codes
            if "codes" not in out[name] or coded.n != entry.numel:
                raise StoredTensorError(f"{where}: module {name} claims coded codes that its kind or shape does not have")
            del out[name]["codes"]
            out[name]["codes_ans"] = ((4 * coded.words,), torch.uint8)
            out[name]["codes_ans_counts"] = ((coded.alphabet,), torch.int32)
        claimed = sum(entry.stored_bytes.values())
        counted = sum(_nbytes(s) for k, s in out[name].items() if k != "bias")
        if claimed != counted:
            raise StoredTensorError(f"{where}: module {name} claims {claimed} stored bytes, its grid and shape give {counted}")
    return out


def _nbytes(spec: TensorSpec) -> int:
    shape, dtype = spec
    n = 1
    for d in shape:
        n *= d
    return n * dtype.itemsize


def check_stored_tensors(header: Header, quantized_files: list[Path], dense: Path, where: str) -> dict[str, TensorSpec]:
    """Every quantized module's tensors are stored with exactly the shapes and dtypes its entry
    implies, once across the quantized file (or its shards), nothing else is there, and every alias
    names a stored dense tensor. Returns the dense file's specs (for the caller to compare with
    the model skeleton)."""
    stored: dict[str, TensorSpec] = {}
    for path in quantized_files:
        specs = stored_specs(path)
        twice = sorted(set(specs) & set(stored))
        if twice:
            raise StoredTensorError(f"{path}: tensors {twice[:3]} are stored in another shard too")
        stored.update(specs)
    quantized = quantized_files[0] if len(quantized_files) == 1 else quantized_files[0].parent / "quantized shards"
    expected: dict[str, TensorSpec] = {}
    for name, specs in module_specs(header, where).items():
        expected.update({f"{name}.{k}": v for k, v in specs.items()})
    for key, spec in expected.items():
        if key not in stored:
            raise StoredTensorError(f"{quantized}: tensor {key} is missing (the header's module needs {_fmt(spec)})")
        if stored[key] != spec:
            raise StoredTensorError(f"{quantized}: tensor {key} is {_fmt(stored[key])}, the header's module needs {_fmt(spec)}")
    extra = sorted(set(stored) - set(expected))
    if extra:
        raise StoredTensorError(f"{quantized}: tensors {extra[:5]} belong to no module of the header")
    dense_specs = stored_specs(dense)
    for alias, target in header.aliases.items():
        if target not in dense_specs:
            raise StoredTensorError(f"{where}: alias {alias} -> {target} names no tensor of {dense.name}")
        if alias in dense_specs or alias in expected:
            raise StoredTensorError(f"{where}: alias {alias} shadows a stored tensor")
    return dense_specs
