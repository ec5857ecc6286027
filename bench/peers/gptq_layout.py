"""Reading GPTQ-layout checkpoints back into float weights, in lowbit's environment (torch and
safetensors only), for the peers that run in an environment of their own (GPTQModel, auto-round).

The layout (AutoGPTQ's, kept by GPTQModel and by auto-round's `auto_round:gptqmodel` export), per
quantized nn.Linear of out x in weights in groups of g along in_features:

    qweight  int32 [in * bits / 32, out]   codes, packed along in_features
    qzeros   int32 [ceil(in / g), out * bits / 32]   zero points, packed along out_features
    scales   fp16  [ceil(in / g), out]
    g_idx    int32 [in]   the group of each input column

Codes and zero points are a little-endian bit stream over the int32 words: value i sits at bits
[i * bits, (i + 1) * bits) of the stream, so a 3-bit value may straddle two words (32 values in 3
words) while 2/4/8-bit values never do. The weight is W[o, i] = scales[g_idx[i], o] *
(q[i, o] - z[g_idx[i], o]). GPTQ "v1" checkpoints (checkpoint_format `gptq`, AutoGPTQ's) store
each zero point minus one; the reader adds the one back field by field, modulo 2^bits, as
GPTQModel's own safetensors dequantizer does. "v2" checkpoints store the zero point itself.

Bytes are counted from the safetensors header: every tensor stored for a layer (qweight, qzeros,
scales, g_idx), at its stored dtype and shape.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .common import layer_tensors

QUANT_LEAVES = ("qweight", "qzeros", "scales", "g_idx")


@dataclass
class GptqLayer:
    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor | None
    stored_bytes: int


def unpack(packed: torch.Tensor, bits: int, n: int, dim: int) -> torch.Tensor:
    """The first n `bits`-wide values of the little-endian bit stream that the int32 words of
    `packed` form along `dim`, as int64, laid along that dim."""
    words = packed.to(torch.int64) & 0xFFFFFFFF
    if dim == 1:
        return unpack(packed.t(), bits, n, 0).t()
    pos = torch.arange(n, dtype=torch.int64) * bits
    first, shift = pos // 32, pos % 32
    lo = words[first] >> shift[:, None]
    spill = (shift + bits > 32).nonzero().flatten()  # 3-bit values that run into the next word
    if spill.numel():
        lo[spill] |= words[first[spill] + 1] << (32 - shift[spill])[:, None]
    return lo & ((1 << bits) - 1)


def dequantize(layer: GptqLayer, bits: int, in_features: int, out_features: int, group_size: int,
               v1_zeros: bool) -> tuple[torch.Tensor, int]:
    """float32 [out, in] weight of one GPTQ layer, and how many zero points were stored as
    2^bits - 1 in a v1 checkpoint (a zero point of 0 that underflowed: readers that add one to the
    packed word rather than to the field disagree there)."""
    q = unpack(layer.qweight, bits, in_features, dim=0)  # [in, out]
    z = unpack(layer.qzeros, bits, out_features, dim=1)  # [groups, out]
    maxq = (1 << bits) - 1
    underflows = int((z == maxq).sum()) if v1_zeros else 0
    if v1_zeros:
        z = (z + 1) & maxq
    g = layer.g_idx.long() if layer.g_idx is not None else torch.arange(in_features) // group_size
    if g.numel() != in_features or int(g.max()) >= layer.scales.shape[0]:
        raise ValueError(f"g_idx of {in_features} columns does not fit {layer.scales.shape[0]} groups")
    s = layer.scales.to(torch.float32)
    w = (q.to(torch.float32) - z.to(torch.float32)[g]) * s[g]  # exact: integers times an fp16 value
    return w.t().contiguous(), underflows


def read_layers(ckpt: Path, names: set[str]) -> dict[str, GptqLayer]:
    """The GPTQ tensors of the given layers from a saved checkpoint directory; raises if one of
    them was saved unquantized or incomplete."""
    found: dict[str, dict] = {n: {} for n in names}
    nbytes = dict.fromkeys(names, 0)
    if not any(f.endswith(".safetensors") for f in os.listdir(ckpt)):
        raise FileNotFoundError(f"no .safetensors file in {ckpt}")
    for layer, leaf, _dtype, size, load in layer_tensors(ckpt, found):
        nbytes[layer] += size
        found[layer][leaf] = load()
    out = {}
    for name, leaves in found.items():
        missing = [leaf for leaf in ("qweight", "qzeros", "scales") if leaf not in leaves]
        if missing:
            raise RuntimeError(f"{name}: no {', '.join(missing)} in the checkpoint")
        out[name] = GptqLayer(leaves["qweight"], leaves["qzeros"], leaves["scales"], leaves.get("g_idx"), nbytes[name])
    return out


def quantization_config(ckpt: Path) -> dict:
    """The checkpoint's quantization config (config.json's quantization_config, else
    quantize_config.json)."""
    cfg = json.loads((ckpt / "config.json").read_text()).get("quantization_config")
    if not cfg and (ckpt / "quantize_config.json").is_file():
        cfg = json.loads((ckpt / "quantize_config.json").read_text())
    if not cfg:
        raise RuntimeError(f"{ckpt} holds no quantization config")
    return cfg


def check_saved_config(tool: str, cfg: dict, bits: int, group_size: int, symmetric: bool) -> None:
    """Refuse a checkpoint whose quantization config is not the one asked for."""
    got = (cfg.get("bits"), cfg.get("group_size"), cfg.get("sym"))
    if got != (bits, group_size, symmetric):
        raise RuntimeError(f"{tool} saved bits/group_size/sym {got}, asked for {(bits, group_size, symmetric)}")


def verify_dequantized(tool: str, kernel: str, path: Path, weights: dict[str, torch.Tensor]) -> str:
    """Every layer's weight, rounded once to fp16, against the peer's own dequantized weight
    (safetensors at `path`, written by the peer's child)."""
    from safetensors.torch import load_file

    ref = load_file(str(path))
    missing = set(weights) - set(ref)
    if missing:
        raise RuntimeError(f"{tool}'s reload has no quantized module for {sorted(missing)[:3]}")
    bad = [n for n, w in weights.items() if not torch.equal(w.half().float(), ref[n].float())]
    if bad:
        worst = max(float((weights[n] - ref[n].float()).abs().max()) for n in bad)
        raise RuntimeError(f"dequantization differs from {tool}'s on {len(bad)}/{len(weights)} layers (max {worst:.3g})")
    return f"{len(weights)}/{len(weights)} layers bit-exact (fp16) against {kernel}"
