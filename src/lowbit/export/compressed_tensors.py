"""Write a lowbit artifact as a compressed-tensors checkpoint (`pack-quantized`): plain
transformers (with the `compressed-tensors` package) and vLLM load it, no lowbit needed.

Per quantized linear (layouts from compressed-tensors' pack_quantized compressor):

    weight_packed  int32 [out, ceil(in*b/32)]   the b-bit codes of each row, dense, LSB first;
                                                 code u stands for the signed value u - 2^(b-1)
    weight_scale   float32 [out, n_groups]      lowbit's fp16 scales, widened exactly
    weight_shape   int64 [2]                    [out, in]

decoded as weight_scale * (signed code), which is lowbit's symmetric grid, (u - 2^(b-1)) * scale,
bit for bit. Refused, with the reason and the flag that fits: asymmetric grids (transformers 5.24
loads packed zero points with the wrong shape in its default mode), groups the width does not
divide (the format has no shorter last group), mixed schemes across layers (loaded with the wrong
scheme when dequantized at load), and every grid that is not an integer grid.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..artifact import DENSE, HEADER, QUANTIZED, load, read_header
from ..nn import QuantLinear
from ..pack import pack_codes
from ._common import check_export_target, write_output
from .errors import ExportError



def _scheme(name: str, entry: dict[str, Any]) -> tuple[int, str, int | None]:
    """(bits, strategy, group_size) of a module that maps exactly, else an ExportError saying why."""
    grid = entry["grid"]
    fmt = str(grid.get("format", ""))
    if entry.get("kind", "linear") != "linear" or not fmt.startswith("int") or set(grid) - {"format", "symmetric", "clip"}:
        raise ExportError(f"{name}: grid {fmt} has no compressed-tensors layout; quantize with --format intN --sym")
    if not grid.get("symmetric"):
        raise ExportError(
            f"{name}: {fmt} asymmetric stores zero points, which transformers 5.24 loads with the wrong shape in "
            "compressed-tensors' default mode; quantize with --sym"
        )
    g, in_f = entry["group_size"], entry["shape"][1]
    if g == -1:
        return int(fmt[3:]), "channel", None
    if g == 0:
        return int(fmt[3:]), "tensor", None
    if in_f % g:
        raise ExportError(f"{name}: group size {g} does not divide the width {in_f} (no shorter last group in compressed-tensors); "
                          f"use a group size that divides {in_f}, or -1")
    return int(fmt[3:]), "group", g


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes: [out, in] uint8 -> [out, ceil(in*bits/32)] int32, each row packed densely LSB first."""
    out_f, in_f = codes.shape
    words = math.ceil(in_f * bits / 32)
    step = 32 // math.gcd(32, bits)  # codes that fill a whole number of words
    padded = torch.zeros(out_f, math.ceil(in_f / step) * step, dtype=torch.uint8)
    padded[:, :in_f] = codes
    stream = pack_codes(padded, bits).reshape(out_f, -1)[:, : words * 4]  # rows start on word boundaries
    return stream.contiguous().view(torch.int32)  # little-endian words


def write_compressed_tensors(artifact: Path, out: Path, *, force: bool = False, **_: Any) -> Path:
    """Write `artifact` as a compressed-tensors checkpoint directory `out`; returns `out`."""
    header = read_header(artifact)
    schemes = {name: _scheme(name, e) for name, e in header["modules"].items()}
    if len(set(schemes.values())) > 1:
        kinds = ", ".join(f"int{b} {s}" + (f" g{g}" if g else "") for b, s, g in sorted(set(schemes.values()), key=str))
        raise ExportError(f"{artifact} mixes schemes ({kinds}); compressed-tensors exports here take one scheme for all layers")
    bits, strategy, group = next(iter(schemes.values()))
    out = Path(out)
    check_export_target(out, force)  # before the model is loaded
    model = load(artifact, verify=False)
    dense_dtype = getattr(torch, header["dense_dtype"])
    tensors: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if name in schemes and isinstance(module, QuantLinear):
            qw = module.quantized_weight()
            tensors[f"{name}.weight_packed"] = pack_rows(qw.codes, bits)
            scale = qw.params["scale"]  # [out, n_groups]; channel: [out, 1]; tensor: [1, 1]
            tensors[f"{name}.weight_scale"] = scale.float().contiguous()
            tensors[f"{name}.weight_shape"] = torch.tensor(list(qw.shape), dtype=torch.int64)
            if module.bias is not None:
                tensors[f"{name}.bias"] = module.bias.detach().to(dense_dtype).contiguous()
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    qprefix = tuple(f"{n}." for n in schemes)
    for key, value in model.state_dict().items():
        if key.startswith(qprefix) or (tied and key == "lm_head.weight"):
            continue
        tensors[key] = (value.detach().to(dense_dtype) if value.is_floating_point() else value).contiguous()
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in schemes]
    weights = {"num_bits": bits, "type": "int", "symmetric": True, "strategy": strategy, "group_size": group,
               "dynamic": False, "actorder": None, "observer": "minmax", "block_structure": None}
    qconfig = {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                      "output_activations": None, "format": "pack-quantized"}},
        "ignore": sorted(linears), "kv_cache_scheme": None, "sparsity_config": {}, "global_compression_ratio": None,
    }
    def fill(tmp: Path) -> None:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = json.loads((artifact / "config.json").read_text())
        config["quantization_config"] = qconfig
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for f in sorted(artifact.iterdir()):  # tokenizer and generation files
            if f.is_file() and f.name not in (HEADER, QUANTIZED, DENSE, "config.json"):
                shutil.copy2(f, tmp / f.name)

    return write_output(out, force, fill, what="compressed-tensors pack-quantized")
