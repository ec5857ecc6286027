"""Export a lowbit artifact as a Hugging Face GPTQ checkpoint (transformers + optimum + gptqmodel,
vLLM, TGI, llama.cpp's converter).

Per quantized Linear (research notes, section 3; GPTQModel's `_register_gptq_buffers` layout):
    qweight  int32   [ceil(in*b/32), out]   codes packed along `in`: a dense LSB-first bit stream
                                            per output column (3-bit: 32 codes in 3 words)
    qzeros   int32   [n_groups, ceil(out*b/32)]   zero points packed along `out`, same bit order
    scales   float16 [n_groups, out]        lowbit's fp16 scales as they are
    g_idx    int32   [in]                   i // group_size (lowbit's groups are contiguous; a shorter
                                            last group is the last index covering fewer rows)
decode: W^T[i, o] = scales[g_idx[i], o] * (q[i, o] - zero[g_idx[i], o]).

Zero points: `checkpoint_format: gptq` (v1) stores zero - 1 and is written when every zero is >= 1
(all symmetric grids: zero 2^(b-1)); a zero of 0 would borrow into its neighbour for readers that
unpack nibble-wise, so such an artifact is written as `gptq_v2` (zeros as they are, read by
GPTQModel and recent vLLM).

One `bits` and one `group_size` for the whole model (GPTQConfig is global): layers quantized per
channel in a grouped model, or with a larger group size that the common one divides, get their
scales repeated (exact); different bit widths are refused (use compressed-tensors).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .. import __version__
from ._common import (
    INT_MAPPABLE, ExportError, IntegerView, copy_side_files, dense_state, integer_view, linear_module_names, pack_int32,
    read_artifact, regroup, write_config, write_output,
)

__all__ = ["ExportError", "export_hf_gptq", "gptq_tensors"]

GPTQ_BITS = (2, 3, 4, 8)  # what transformers' GPTQConfig accepts


def gptq_tensors(view: IntegerView, v1: bool) -> dict[str, torch.Tensor]:
    """qweight / qzeros / scales / g_idx of one layer (`view` already on the model's group size)."""
    out_f, in_f = view.shape
    stored_zero = view.zero - 1 if v1 else view.zero  # [out, G]; v1 keeps zero - 1 (>= 0 by the caller's check)
    return {
        "qweight": pack_int32(view.u, view.bits).T.contiguous(),  # [ceil(in*b/32), out]
        "qzeros": pack_int32(stored_zero.T, view.bits).contiguous(),  # [G, ceil(out*b/32)]
        "scales": view.scale.T.to(torch.float16).contiguous(),  # [G, out]
        "g_idx": (torch.arange(in_f) // view.group_size).to(torch.int32),  # [in]
    }


def _views(weights: dict) -> dict[str, IntegerView]:
    views = {}
    for name in sorted(weights):
        try:
            views[name] = integer_view(name, weights[name])
        except ExportError as exc:
            raise ExportError(f"{exc}. HF GPTQ holds only integer grids; for nvfp4/mxfp4 export to compressed-tensors") from None
    return views


def _block_modules(quantized: set[str], linears: list[str]) -> list[list[str]] | None:
    """`modules_in_block_to_quantize` when some Linear inside the decoder blocks is left
    unquantized (None when all are); ExportError when the blocks differ."""
    per_block: dict[str, set[str]] = {}
    for name in linears:
        m = re.match(r"^(.*?\.\d+)\.(.+)$", name)
        if m is None:
            if name in quantized:
                raise ExportError(f"module {name} lies outside the decoder blocks (GPTQ quantizes block layers only; lm_head is not exported quantized): re-quantize with it ignored")
            continue
        per_block.setdefault(m.group(1), set())
        if name in quantized:
            per_block[m.group(1)].add(m.group(2))
    sets = {frozenset(s) for s in per_block.values()}
    if len(sets) > 1:
        raise ExportError("the decoder blocks have different sets of quantized layers; GPTQ's config names one set for every block")
    inside = {m.group(2) for n in linears if (m := re.match(r"^(.*?\.\d+)\.(.+)$", n))}
    chosen = next(iter(sets), frozenset())
    return None if chosen == inside else [sorted(chosen)]


def export_hf_gptq(artifact_dir: str | Path, out_dir: str | Path, force: bool = False, **_: Any) -> Path:
    """Write the artifact at `artifact_dir` as a GPTQ checkpoint directory `out_dir`
    (model.safetensors, config.json with a GPTQConfig quantization_config, tokenizer files)."""
    art = read_artifact(artifact_dir)
    views = _views(art.weights)
    bits = sorted({v.bits for v in views.values()})
    if len(bits) != 1:
        raise ExportError(f"layers use {len(bits)} bit widths ({bits}); a GPTQ checkpoint has one: export to compressed-tensors instead")
    b = bits[0]
    if b not in GPTQ_BITS:
        raise ExportError(f"{b}-bit weights: transformers' GPTQConfig takes {GPTQ_BITS} bits only (what maps: {INT_MAPPABLE} at those widths)")
    grouped = [v.group_size for v in views.values() if v.group_size < v.shape[1]]
    group_size = math.gcd(*grouped) if grouped else -1
    views = {n: regroup(v, group_size if group_size > 0 else v.shape[1]) for n, v in views.items()}
    if b == 3:
        odd = [n for n, v in views.items() if v.shape[0] % 32 or v.shape[1] % 32]
        if odd:
            raise ExportError(f"3-bit GPTQ packs 32 values into 3 words: module {odd[0]} has shape {list(views[odd[0]].shape)}, not multiples of 32")
    v1 = all(int(v.zero.min()) >= 1 for v in views.values())
    fmt = "gptq" if v1 else "gptq_v2"
    quantized, linears = set(views), linear_module_names(art)
    block_modules = _block_modules(quantized, linears)
    damp = (art.header.get("recipe") or {}).get("gptq", {}).get("damp", 0.01)
    qc: dict[str, Any] = {
        "quant_method": "gptq",
        "bits": b,
        "group_size": group_size,
        "desc_act": False,  # lowbit's act-order keeps groups contiguous: g_idx = i // group_size
        "sym": all(v.symmetric for v in views.values()),
        "lm_head": False,
        "format": fmt,
        "checkpoint_format": fmt,
        "pack_dtype": "int32",
        "true_sequential": True,
        "damp_percent": damp,
        "meta": {"quantizer": [f"lowbit:{__version__}"]},
    }
    if block_modules is not None:
        qc["modules_in_block_to_quantize"] = block_modules

    def fill(tmp: Path) -> None:
        state = dense_state(art)
        for name, view in views.items():
            state.update({f"{name}.{k}": t for k, t in gptq_tensors(view, v1).items()})
            if name in art.biases:
                state[f"{name}.bias"] = art.biases[name].to(art.dtype)
        save_file(dict(sorted(state.items())), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        write_config(art, tmp, qc)
        copy_side_files(art, tmp)

    return write_output(out_dir, force, fill, what=f"hf gptq {fmt}")
