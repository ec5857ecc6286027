"""Fidelity of a quantized model to its original, from the same forward passes.

Causal LMs (on the same token windows): mean KL(P_original || P_quantized) of next-token
distributions over every position, perplexity of both models on the text, and top-1 agreement
(how often both models rank the same next token first). Encoders: cosine similarity of
mean-pooled sentence embeddings.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..validation.finite import check_finite_logits


@torch.inference_mode()
def causal_lm_fidelity(reference: nn.Module, quantized: nn.Module, windows: torch.Tensor, batch_size: int = 1) -> dict:
    """`windows: [n, seq]` token ids. Returns kl, ppl, ppl_reference, top1 and what was measured."""
    kl_sum = nll_q = nll_r = 0.0
    agree = positions = targets = 0
    for start in range(0, windows.shape[0], batch_size):
        ids = windows[start : start + batch_size]
        logits_r = reference(input_ids=ids, use_cache=False).logits.float()
        logits_q = quantized(input_ids=ids, use_cache=False).logits.float()
        check_finite_logits(logits_r, "reference")
        check_finite_logits(logits_q, "quantized")
        logp_r = F.log_softmax(logits_r, dim=-1)
        logp_q = F.log_softmax(logits_q, dim=-1)
        kl_sum += (logp_r.exp() * (logp_r - logp_q)).sum(-1).sum().item()
        agree += (logp_r.argmax(-1) == logp_q.argmax(-1)).sum().item()
        positions += ids.numel()
        nxt = ids[:, 1:].unsqueeze(-1)
        nll_q -= logp_q[:, :-1].gather(-1, nxt).sum().item()
        nll_r -= logp_r[:, :-1].gather(-1, nxt).sum().item()
        targets += nxt.numel()
    return {
        "kl": kl_sum / positions,
        "ppl": _exp(nll_q / targets),
        "ppl_reference": _exp(nll_r / targets),
        "top1": agree / positions,
        "windows": int(windows.shape[0]),
        "seq_len": int(windows.shape[1]),
        "tokens": positions,
    }


def _exp(x: float) -> float:
    """exp that saturates to inf instead of raising (a perplexity beyond 1e308 is still an answer)."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1)


@torch.inference_mode()
def encoder_fidelity(reference: nn.Module, quantized: nn.Module, tokenizer, sentences: list[str], batch_size: int = 32) -> dict:
    """Cosine similarity between the mean-pooled embeddings of the two models, per sentence."""
    cos = []
    for start in range(0, len(sentences), batch_size):
        enc = tokenizer(sentences[start : start + batch_size], padding=True, truncation=True, max_length=128, return_tensors="pt")
        e_r = mean_pool(reference(**enc).last_hidden_state, enc["attention_mask"])
        e_q = mean_pool(quantized(**enc).last_hidden_state, enc["attention_mask"])
        check_finite_logits(e_r, "reference")
        check_finite_logits(e_q, "quantized")
        cos.append(F.cosine_similarity(e_r, e_q, dim=-1))
    c = torch.cat(cos)
    return {"cosine": c.mean().item(), "cosine_min": c.min().item(), "sentences": len(sentences)}
