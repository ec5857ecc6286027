"""What a quantized KV cache does to a model: the KL of its next-token distributions to those of the
same model with a full-precision cache, on positions decoded one at a time through the cache.

Teacher-forced: the first `prefill` tokens of each window go in as one call, then each of the next
`decode` tokens is fed alone, with the cache, the true token each time. So every measured
position reads its keys and values through the cache, as generation would. The reference runs
the same calls with transformers' DynamicCache.
"""

from __future__ import annotations

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
