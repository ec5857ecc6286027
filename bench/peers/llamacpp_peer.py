"""llama.cpp's own K-quant mixes (llama-quantize's Q4_K_M, Q4_K_S, Q3_K_M, Q3_K_S, Q2_K), in process.

The float model is written as an F16 GGUF with lowbit's writer (`write_model_gguf`, no quantized
module: the file llama.cpp's quantizer starts from), quantized by llama-cpp-python's
`llama_model_quantize` with the mix's ftype (`LLAMA_FTYPE_MOSTLY_<ftype>`, no importance matrix,
nthread = torch's threads), and read back with `gguf.GGUFReader`. Each decoder-block linear tensor
is dequantized with `gguf.quants.dequantize`, its q/k rows are put back in the Hugging Face order
(lowbit's writer permutes them as llama.cpp's converter does for llama models) and the model
computes with those weights. The mix chooses a type per tensor (more bits for some attn_v /
ffn_down, and, where 256 does not divide the row length, the fallback of the llama.cpp that
llama-cpp-python 0.3.36 vendors (`tensor_type_fallback` in llama-quant.cpp): Q4_K -> Q5_0, Q5_K ->
Q5_1, Q6_K -> Q8_0, Q2_K/Q3_K -> Q4_0; F16 if 32 does not divide it either); the notes list the
types it chose, as read from the file.

Bits per weight: the bytes of the stored decoder-linear tensors (their GGML type's block size and
bytes per block, checked against the tensor's size in the file) over their weight count. The
embeddings and lm_head stay float32, as for every other peer; a real llama.cpp file of the mix
also quantizes token_embd (and output, when untied), which this row does not count or apply.
"""

from __future__ import annotations

import ctypes
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .common import PeerResult, PeerUnavailable, bpw_of, decoder_linears, require, set_weight


def _llama_cpp():
    """llama-cpp-python's bindings (built from source by make bench-setup), or PeerUnavailable."""
    try:
        import llama_cpp
    except (ImportError, OSError) as exc:  # OSError: the shared library failed to load
        raise PeerUnavailable(f"llama_cpp (llama-cpp-python) cannot be imported ({exc.__class__.__name__}: {exc}); "
                              "it is built from source by make bench-setup") from None
    return llama_cpp


def unpermute_rows(x: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of lowbit's `_permute_rows` (llama.cpp's q/k order, the two rotary halves of each
    head interleaved row by row): back to the Hugging Face row order."""
    rows = x.shape[0]
    return x.reshape(n_head, rows // n_head // 2, 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def write_f16(model: nn.Module, out: Path) -> Path:
    """The float model as an F16 GGUF (lowbit's writer), with the tokenizer from the model's directory."""
    from lowbit.export.gguf import write_model_gguf

    src = Path(getattr(model, "name_or_path", "") or model.config._name_or_path)
    if not (src / "tokenizer.json").is_file() and not (src / "tokenizer_config.json").is_file():
        raise ValueError(f"no tokenizer next to the model ({src}): the GGUF writer needs it")
    return write_model_gguf(model, src, out, {}, f"{src.name} f16")


def llama_quantize(src: Path, dst: Path, ftype: str, nthread: int) -> Path:
    """llama.cpp's quantizer (llama-quantize) in process, with its default tensor-type rules."""
    llama_cpp = _llama_cpp()
    name = f"LLAMA_FTYPE_MOSTLY_{ftype}"
    if not hasattr(llama_cpp, name):
        raise PeerUnavailable(f"llama-cpp-python has no {name}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, name)
    params.nthread = nthread
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({ftype}) failed ({rc})")
    return dst


def gguf_names(model: nn.Module, layers: dict[str, nn.Linear]) -> dict[str, str]:
    """GGUF tensor name -> HF module name for the decoder linears (as lowbit's writer names them)."""
    gguf = require("gguf")
    from lowbit.export.gguf import ARCHS

    config = model.config
    if config.model_type not in ARCHS:
        raise PeerUnavailable(f"lowbit's GGUF writer supports {', '.join(ARCHS)} models; this one is {config.model_type}")
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, ARCHS[config.model_type]), config.num_hidden_layers)
    out = {}
    for name in layers:
        mapped = names.get_name(name + ".weight", try_suffixes=(".weight",))
        if mapped is None:
            raise ValueError(f"{name} has no GGUF tensor name")
        out[mapped] = name
    return out


def read_weights(path: Path, model: nn.Module, layers: dict[str, nn.Linear]) -> tuple[dict[str, torch.Tensor], dict[str, str], int]:
    """The decoder linears of a GGUF file, dequantized in the HF layout: (HF name -> weight,
    HF name -> GGML type name, bytes stored for them)."""
    gguf = require("gguf")
    from gguf.quants import dequantize

    config = model.config
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    permuted = config.model_type == "llama"  # lowbit's writer permutes llama's q/k rows only
    wanted = gguf_names(model, layers)
    weights: dict[str, torch.Tensor] = {}
    types: dict[str, str] = {}
    total_bytes = 0
    for t in gguf.GGUFReader(path).tensors:
        name = wanted.get(t.name)
        if name is None:
            continue
        block, type_size = gguf.GGML_QUANT_SIZES[t.tensor_type]
        nbytes = int(t.n_elements) // block * type_size
        if nbytes != int(t.n_bytes):
            raise RuntimeError(f"{t.name}: {t.n_bytes} bytes in the file, {nbytes} from its type {t.tensor_type.name}")
        lin = layers[name]
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(lin.out_features, lin.in_features)
        if permuted and name.endswith("q_proj"):
            w = unpermute_rows(w, n_head)
        elif permuted and name.endswith("k_proj"):
            w = unpermute_rows(w, n_kv)
        weights[name] = torch.from_numpy(np.ascontiguousarray(w))
        types[name] = t.tensor_type.name
        total_bytes += nbytes
    missing = sorted(set(layers) - set(weights))
    if missing:
        raise RuntimeError(f"{len(missing)} decoder linears not in the quantized GGUF, e.g. {missing[0]}")
    return weights, types, total_bytes


def type_summary(types: dict[str, str]) -> str:
    """'Q4_K x15 (ffn_down), Q5_0 x180 (attn_q, ...)': how many tensors of each type, and of which roles."""
    roles: dict[str, set[str]] = defaultdict(set)
    count: dict[str, int] = defaultdict(int)
    for name, t in types.items():
        count[t] += 1
        roles[t].add(name.rsplit(".", 1)[-1])
    return ", ".join(f"{t} x{count[t]} ({', '.join(sorted(roles[t]))})" for t in sorted(count, key=lambda t: -count[t]))


def quantize(model: nn.Module, calib: torch.Tensor | None = None, ftype: str = "Q4_K_M") -> PeerResult:
    _llama_cpp()
    require("gguf")
    layers = decoder_linears(model)
    with tempfile.TemporaryDirectory(prefix="lowbit-llamacpp-") as tmp:
        src = write_f16(model, Path(tmp) / "model-f16.gguf")
        dst = llama_quantize(src, Path(tmp) / f"model-{ftype.lower()}.gguf", ftype, torch.get_num_threads())
        weights, types, total_bytes = read_weights(dst, model, layers)
    n_weights = sum(lin.weight.numel() for lin in layers.values())
    for name, w in weights.items():
        set_weight(model, name, w)
    odd = sorted({lin.in_features for lin in layers.values() if lin.in_features % 256})
    notes = (f"llama-quantize {ftype} (in process, llama-cpp-python; no imatrix) from lowbit's F16 GGUF; "
             f"decoder linears: {type_summary(types)}")
    if odd:
        notes += f"; rows of {odd} weights are not multiples of 256 (K-quant super-block): llama.cpp's fallback types"
    notes += "; embeddings/lm_head kept float32 here (a real llama.cpp file of this mix also quantizes them)"
    return PeerResult(model, bpw_of(total_bytes, n_weights), notes)
