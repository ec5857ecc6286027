"""What a quantized KV cache does to a model: the KL of its next-token distributions to those of the
same model with a full-precision cache, on positions decoded one at a time through the cache.

Teacher-forced: the first `prefill` tokens of each window go in as one call, then each of the next
`decode` tokens is fed alone, with the cache, the true token each time. So every measured
position reads its keys and values through the cache, as generation would. The reference runs
the same calls with transformers' DynamicCache.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache


def _decode_logits(model: nn.Module, ids: torch.Tensor, prefill: int, cache) -> torch.Tensor:
    """[decode, vocab] float32 logits of positions prefill .. len-1 (each predicting the next token)."""
    out = model(input_ids=ids[:, :prefill], cache=cache, use_cache=True)
    rows = [out.logits[:, -1].float()]
    for t in range(prefill, ids.shape[1] - 1):
        out = model(input_ids=ids[:, t:t + 1], cache=cache, use_cache=True)
        rows.append(out.logits[:, -1].float())
    return torch.cat(rows)


@torch.inference_mode()
def decoded_fidelity(model: nn.Module, windows: torch.Tensor, prefill: int,
                     caches: dict[str, Callable[[], object]]) -> dict[str, dict]:
    """windows: [n, length] token ids; caches: name -> a function making a fresh cache. Per cache,
    KL(full-precision cache || that cache) and top-1 agreement over the decoded positions of every
    window, with the reference's perplexity there. The reference runs once per window."""
    sums = {name: {"kl": 0.0, "agree": 0} for name in caches}
    nll, count = 0.0, 0
    for ids in windows:
        ids = ids.unsqueeze(0)
        ref = _decode_logits(model, ids, prefill, DynamicCache())
        p = F.log_softmax(ref, -1)
        for name, make in caches.items():
            got = _decode_logits(model, ids, prefill, make())
            q = F.log_softmax(got, -1)
            sums[name]["kl"] += float((p.exp() * (p - q)).sum())
            sums[name]["agree"] += int((ref.argmax(-1) == got.argmax(-1)).sum())
        targets = ids[0, prefill:]
        nll += float(F.cross_entropy(ref[: targets.numel()], targets, reduction="sum"))
        count += ref.shape[0]
    ppl = float(torch.exp(torch.tensor(nll / count)))
    return {name: {"kl": v["kl"] / count, "top1": v["agree"] / count, "positions": count, "ppl_reference": ppl}
            for name, v in sums.items()}


def kv_report(model: nn.Module, tokenizer, text: str, bits: int, context: int = 1024, decode: int = 64,
              windows: int = 4, residual: int = 128, group: int = 32) -> dict:
    """The KIVI cache at `bits` on `model`, measured on the first `windows` windows of `text`
    (`context` tokens prefilled, `decode` decoded through the cache): KL and top-1 against the
    same model with a full-precision cache, and the cache's bits per value."""
    from ..errors import LowbitError
    from .kivi import KIVICache, kivi_bits_per_value

    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    length = context + decode
    if ids.numel() < length:
        raise LowbitError(f"the text has {ids.numel()} tokens; one window of {context} + {decode} needs more "
                          "(a longer --text, or a smaller --kv-context)")
    n = min(windows, ids.numel() // length)
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    group = math.gcd(group, head_dim)  # value groups tile the head: 32, or what of it divides head_dim
    layers = cfg.num_hidden_layers
    got = decoded_fidelity(model, ids[: n * length].view(n, length), context,
                           {"kivi": lambda: KIVICache(layers, bits, residual, group)})["kivi"]
    return {"kv_bits": bits, "kv_bits_per_value": kivi_bits_per_value(bits, residual, group)["mean"], "kv_group": group,
            "kv_context": context, "kv_positions": got["positions"], "kv_kl": got["kl"], "kv_top1": got["top1"]}
