"""Write a lowbit artifact as a GGUF file that llama.cpp (llama-cpp-python, ollama) loads and runs.

Quantized modules become raw GGUF blocks of their exact type (`targets`, `gguf_blocks`): the
file decodes, in gguf-py's own `dequantize`, to lowbit's dequantized weights bit for bit. A
module's type is its recorded target's (`--target`, or the fallback its width was quantized
for), else the one its grid is made for (int4/int5/int8 sym -> Q4_0/Q5_0/Q8_0, int4_min/int5_min
-> Q4_1/Q5_1, mxfp4 -> MXFP4, ternary2/ternary -> TQ2_0/TQ1_0); `to="gguf:q5_0"` asks for one type
for all, which also writes lossless wider mappings (int4 asym -> Q5_0). Anything else is refused
with the reason, what it would fit and the `--target` that fits it. Modules
kept in float (the recipe's `ignore`, widths without a block layout) are written as F16, the
embeddings and output as F16 or (`embeddings="q8_0"`) Q8_0 quantized here (round to nearest,
llama.cpp's reference rule), norms and biases as F32. Llama-family, Qwen2 and Gemma 3 text
models (`Gemma3ForCausalLM`), tied embeddings (no `output.weight`: llama.cpp reuses
`token_embd`). Llama's q/k rows are permuted the way llama.cpp's converter does (whole rows
move, so blocks move intact); Qwen2 and Gemma 3 use NEOX rope and are written as they are.
Gemma 3: RMSNorm weights are written as 1 + w (HF applies (1 + w), llama.cpp the stored
weight), the sliding window with the per-layer pattern and both rope bases are written; what
llama.cpp computes itself (the query scale) is checked against the config and refused if it
would differ.

The tokenizer: byte-level BPE tokenizers (GPT-2 style: SmolLM, Qwen2, Llama 3) with their merges,
special tokens and chat template; the pre-tokenizer name llama.cpp needs is looked up by model
family (`_PRE`), else "default" (llama.cpp then warns and uses its default splitting).
SentencePiece-style BPE tokenizers (byte fallback, "▁" spaces: Llama 2, Gemma, Mistral) are
written in llama.cpp's "llama" form, with scores from the merge ranks (`_add_sentencepiece_tokenizer`).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..artifact import load, read_header
from ..nn import QuantLinear
from ..validation.paths import check_output_file
from .errors import ExportError
from .gguf_blocks import pack_blocks
from .targets import TARGETS, get_target, gguf_type_for, why_not_gguf

ARCHS = {"llama": "LLAMA", "qwen2": "QWEN2", "gemma3_text": "GEMMA3"}
# pre-tokenizer names llama.cpp knows, by (model_type, vocab size) and then by model_type
_PRE = {("llama", 49152): "smollm", ("llama", 128256): "llama-bpe", ("qwen2", None): "qwen2"}
FILE_TYPES = {
    "Q4_0": "MOSTLY_Q4_0", "Q4_1": "MOSTLY_Q4_1", "Q5_0": "MOSTLY_Q5_0", "Q5_1": "MOSTLY_Q5_1", "Q8_0": "MOSTLY_Q8_0",
    "MXFP4": "MOSTLY_MXFP4_MOE", "TQ1_0": "MOSTLY_TQ1_0", "TQ2_0": "MOSTLY_TQ2_0", "Q4_K": "MOSTLY_Q4_K_S",
    "Q5_K": "MOSTLY_Q5_K_S", "Q6_K": "MOSTLY_Q6_K",
}


def _permute_rows(x: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order: within each head, the two rotary halves interleaved."""
    rows = x.shape[0]
    return x.reshape(n_head, 2, rows // n_head // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def unpermute_rows(x: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of `_permute_rows` (for readers that compare with the Hugging Face layout)."""
    rows = x.shape[0]
    return x.reshape(n_head, rows // n_head // 2, 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def _head_dim(config) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def _rope_params(config, layer_type: str | None = None) -> dict:
    """The rope parameters (rope_theta, rope_type, factor ...) of all layers, or of one layer type
    (Gemma 3: "full_attention" / "sliding_attention")."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if layer_type is not None and isinstance(params.get(layer_type), dict):
        params = dict(params[layer_type])
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    return params


def _gemma3_hparams(w, config) -> None:
    """Gemma 3 keys beyond the common ones, as llama.cpp's converter writes them and its loader reads
    them: global-layer rope base (and linear scaling) in rope.*, local-layer base in rope.freq_base_swa,
    the sliding window and which layers use it, the final logit softcap. What llama.cpp has no key
    for and computes itself is checked instead, and refused if it would differ."""
    import gguf

    if getattr(config, "attn_logit_softcapping", None):
        raise ExportError("Gemma 3 with attn_logit_softcapping: llama.cpp's gemma3 graph has no attention softcap")
    n_embd_head = _head_dim(config)
    # llama.cpp scales queries by 1/sqrt(head_dim), by 1/sqrt(hidden/heads) for the 62-layer (27B) model
    implied = config.hidden_size // config.num_attention_heads if config.num_hidden_layers == 62 else n_embd_head
    if getattr(config, "query_pre_attn_scalar", implied) != implied:
        raise ExportError(
            f"Gemma 3 with query_pre_attn_scalar {config.query_pre_attn_scalar}: llama.cpp scales queries by "
            f"1/sqrt({implied}) for this shape (it reads no key for it), so the file would not run this model"
        )
    full, local = _rope_params(config, "full_attention"), _rope_params(config, "sliding_attention")
    for which, p in (("full_attention", full), ("sliding_attention", local)):
        kind = p.get("rope_type", "default")
        if kind not in ("default", "linear") or (which == "sliding_attention" and kind != "default"):
            raise ExportError(f"Gemma 3 {which} rope type {kind!r}: the GGUF writer handles default rope, and linear "
                              "scaling on the global layers (as the 4B-27B models use)")
    w.add_rope_freq_base(float(full["rope_theta"]))
    if full.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(full["factor"]))
    layer_types = list(getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers)
    if getattr(config, "sliding_window", None) and "sliding_attention" in layer_types:
        w.add_sliding_window(int(config.sliding_window))
        w.add_sliding_window_pattern([t == "sliding_attention" for t in layer_types])  # True: a local layer
        w.add_rope_freq_base_swa(float(local["rope_theta"]))
    if getattr(config, "final_logit_softcapping", None):
        w.add_final_logit_softcapping(float(config.final_logit_softcapping))


def _add_hparams(w, config, name: str, file_type: str) -> None:
    import gguf

    w.add_name(name)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_rope_dimension_count(_head_dim(config))
    w.add_vocab_size(config.vocab_size)
    if getattr(config, "head_dim", None):
        w.add_key_length(config.head_dim)
        w.add_value_length(config.head_dim)
    if config.model_type == "gemma3_text":
        _gemma3_hparams(w, config)
    else:
        w.add_rope_freq_base(float(_rope_params(config)["rope_theta"]))
    w.add_file_type(getattr(gguf.LlamaFileType, file_type))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_tokenizer(w, root: Path, config) -> None:
    """Byte-level BPE vocabulary, merges, special tokens and chat template from the artifact."""
    import gguf
    from transformers import AutoTokenizer

    tj = root / "tokenizer.json"
    spec = json.loads(tj.read_text(encoding="utf-8")) if tj.is_file() else {}
    kind = (spec.get("model") or {}).get("type")
    byte_level = "ByteLevel" in json.dumps([spec.get("pre_tokenizer"), spec.get("decoder")])
    if kind == "BPE" and not byte_level and spec["model"].get("byte_fallback"):
        _add_sentencepiece_tokenizer(w, root, spec, config)
        return
    if kind != "BPE" or not byte_level:
        raise ExportError(
            f"{root}: GGUF export writes BPE tokenizers, byte-level (GPT-2 style: SmolLM, Qwen2, Llama 3) or "
            f"SentencePiece-style with byte fallback (Llama 2, Gemma, Mistral); this artifact's tokenizer is "
            f"{kind or 'missing'}. Nothing was written"
        )
    tok = AutoTokenizer.from_pretrained(root)
    vocab = tok.get_vocab()  # token -> id, added tokens included
    n = max(config.vocab_size, max(vocab.values()) + 1)
    by_id = {i: t for t, i in vocab.items()}
    added = tok.get_added_vocab()
    special = {t.content for t in tok.added_tokens_decoder.values() if t.special}
    tokens, types = [], []
    for i in range(n):
        t = by_id.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif t in added:
            tokens.append(t)
            types.append(gguf.TokenType.CONTROL if t in special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(t)
            types.append(gguf.TokenType.NORMAL)
    w.add_tokenizer_model("gpt2")
    pre = _PRE.get((config.model_type, config.vocab_size)) or _PRE.get((config.model_type, None)) or "default"
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    gguf.SpecialVocab(root, load_merges=True, n_vocab=n).add_to_gguf(w, quiet=True)


def _add_sentencepiece_tokenizer(w, root: Path, spec: dict, config) -> None:
    """A SentencePiece BPE vocabulary (Llama 2, Gemma, Mistral: "▁" for spaces, <0xNN> byte
    pieces) in llama.cpp's form, tokenizer model "llama": tokens, scores and token types. llama.cpp
    merges the adjacent pair whose joined piece scores highest; SentencePiece's own BPE scores a
    merged piece minus its merge rank, which is also the order of tokenizer.json's merges (the
    Hugging Face conversion derives them from the scores), so score = -rank gives the same
    tokenization without the original tokenizer.model. Pieces no merge makes (characters, bytes,
    specials) score 0, as in SentencePiece's models; llama.cpp never ranks them."""
    import gguf
    from transformers import AutoTokenizer

    model = spec["model"]
    rank: dict[str, int] = {}
    for r, m in enumerate(model.get("merges") or []):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        rank.setdefault(a + b, r)
    tok = AutoTokenizer.from_pretrained(root)
    vocab = tok.get_vocab()
    n = max(config.vocab_size, max(vocab.values()) + 1)
    by_id = {i: t for t, i in vocab.items()}
    added = tok.get_added_vocab()
    special = {t.content for t in tok.added_tokens_decoder.values() if t.special}
    unk = model.get("unk_token")
    tokens, scores, types = [], [], []
    for i in range(n):
        t = by_id.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            scores.append(-1e9)
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(t)
        scores.append(-float(rank[t]) if t in rank else 0.0)
        if t == unk:
            types.append(gguf.TokenType.UNKNOWN)
        elif t in special:
            types.append(gguf.TokenType.CONTROL)
        elif t in added:
            types.append(gguf.TokenType.USER_DEFINED)
        elif len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    # whether a "▁" is put before the text: Metaspace's prepend scheme, or a Prepend normalizer (older conversions)
    shape = json.dumps([spec.get("pre_tokenizer"), spec.get("normalizer")])
    w.add_add_space_prefix('"prepend_scheme": "first"' in shape or '"prepend_scheme": "always"' in shape
                           or '"type": "Prepend"' in shape)
    gguf.SpecialVocab(root, load_merges=False, n_vocab=n).add_to_gguf(w, quiet=True)


def plan(header: dict, to: str | None = None) -> tuple[dict[str, str], list[str]]:
    """(module -> GGUF type) for every quantized module, or the reasons some have none. `to`: a
    target (gguf:q5_0) whose type every module is written as (`targets.gguf_type_for`)."""
    types, problems = {}, []
    for name, entry in header["modules"].items():
        t = gguf_type_for(entry, to)
        if t is None:
            problems.append(why_not_gguf(name, entry, to))
        else:
            types[name] = t
    return types, problems


def write_gguf(artifact: Path, out: Path, *, force: bool = False, embeddings: str = "f16", to: str | None = None) -> Path:
    """Write `artifact` as the GGUF file `out` (temporary file, then rename); returns `out`. Each
    quantized module is written as its recorded target's type, else its grid's own type; with `to`
    (a target such as gguf:q5_0), as that target's type (a lossless wider one: int4 asym -> Q5_0)."""
    if embeddings not in ("f16", "q8_0"):
        raise ExportError(f"embeddings type {embeddings!r}: use f16 or q8_0")
    if to is not None:
        t = get_target(to)
        if t.ggml_type is None:
            raise ExportError(f"{t.name} is not a GGUF type; give one of {', '.join(n for n in TARGETS)} "
                              f"(or export with --to {t.name.split(':')[0].replace('ct', 'compressed-tensors')})")
        to = t.name
    check_output_file(out, force=force)
    header = read_header(artifact)
    types, problems = plan(header, to)
    if problems:
        shown = "; ".join(problems[:3]) + (f" (+{len(problems) - 3} more)" if len(problems) > 3 else "")
        raise ExportError(f"{artifact} cannot be written as GGUF exactly: {shown}")
    model = load(artifact, verify=False)
    return write_model_gguf(model, artifact, out, types, header["source"].get("model") or artifact.name, embeddings)


def write_model_gguf(model: torch.nn.Module, tokenizer_dir: Path, out: Path, types: dict[str, str], name: str,
                     embeddings: str = "f16") -> Path:
    """The GGUF writer proper: `types` names the GGUF type of each QuantLinear of `model` (all of
    them); every other tensor is written in float (F16 matrices, F32 vectors). With no quantized
    module this writes the float model (the F16 GGUF that llama.cpp's own quantizer starts from)."""
    import gguf

    config = model.config
    if config.model_type not in ARCHS:
        raise ExportError(f"GGUF export supports {', '.join(ARCHS)} models; this one is {config.model_type}")
    arch = getattr(gguf.MODEL_ARCH, ARCHS[config.model_type])
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    n_head, n_kv = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    permute = config.model_type == "llama"  # llama.cpp's llama graph uses the interleaved rope order; qwen2 and gemma3 NEOX
    norm_plus_one = config.model_type == "gemma3_text"  # HF Gemma applies (1 + w); llama.cpp multiplies by the stored w
    main_type = max(set(types.values()), key=list(types.values()).count) if types else "F16"

    def gguf_name(hf: str) -> str:
        mapped = names.get_name(hf, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise ExportError(f"tensor {hf} has no GGUF name for {config.model_type}")
        return mapped

    def head_permute(hf: str, x: np.ndarray) -> np.ndarray:
        if permute and hf.endswith(("q_proj.weight", "q_proj.bias")):
            return _permute_rows(x, n_head)
        if permute and hf.endswith(("k_proj.weight", "k_proj.bias")):
            return _permute_rows(x, n_kv)
        return x

    tensors: list[tuple[str, np.ndarray, Any]] = []  # (name, data, raw ggml type or None)
    qnames = set(types)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for mname, module in model.named_modules():
        if mname in qnames:
            if type(module) is not QuantLinear:  # a rotated layer needs its inputs rotated: no GGUF type holds it
                raise ExportError(f"{mname} is not a QuantLinear; it cannot be written as {types[mname]}")
            raw = head_permute(mname + ".weight", pack_blocks(module.quantized_weight(), types[mname], mname))
            tensors.append((gguf_name(mname + ".weight"), raw, getattr(gguf.GGMLQuantizationType, types[mname])))
    for key, value in model.state_dict().items():
        if key.rsplit(".", 1)[0] in qnames and not key.endswith(".bias"):
            continue
        if tied and key == "lm_head.weight":
            continue  # llama.cpp reuses token_embd
        x = head_permute(key, value.detach().float().numpy())
        if norm_plus_one and key.endswith("norm.weight"):
            x = x + np.float32(1.0)  # as convert_hf_to_gguf: exact in float32, as HF computes 1 + w
        if key.endswith(("embed_tokens.weight", "lm_head.weight")) and embeddings == "q8_0" and x.shape[-1] % 32 == 0:
            tensors.append((gguf_name(key), gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0),
                            gguf.GGMLQuantizationType.Q8_0))
        elif x.ndim >= 2:
            tensors.append((gguf_name(key), x.astype(np.float16), None))
        else:
            tensors.append((gguf_name(key), x.astype(np.float32), None))

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        w = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch])
        _add_hparams(w, config, name, FILE_TYPES.get(main_type, "MOSTLY_F16"))
        _add_tokenizer(w, Path(tokenizer_dir), config)
        for tname, data, raw_type in tensors:
            w.add_tensor(tname, data, raw_dtype=raw_type)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        tmp.chmod(0o666 & ~_umask())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
