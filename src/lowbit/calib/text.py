"""Text -> token windows, for calibration (random windows, seeded) and evaluation (consecutive).

Every window is framed with the special tokens the tokenizer itself adds around a text (BOS for
Llama-style tokenizers that use one, [CLS] ... [SEP] for BERT), so a model sees windows the way
it saw its training data.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import LowbitError


class CalibrationError(LowbitError):
    pass


def looks_binary(sample: bytes) -> bool:
    """A NUL byte, or more than 10% of the decoded characters undecodable or control characters
    (other than whitespace): not text a language model should be calibrated or evaluated on."""
    if b"\x00" in sample:
        return True
    decoded = sample.decode("utf-8", errors="replace")
    if not decoded:
        return False
    bad = sum(1 for c in decoded if c == "\ufffd" or (ord(c) < 32 and c not in "\n\r\t\f\v"))
    return bad > 0.1 * len(decoded)


def read_text(path: str | Path) -> str:
    p = Path(path)
    if not p.exists():
        raise CalibrationError(f"text file {p} not found")
    if not p.is_file():
        raise CalibrationError(f"{p} is not a text file")
    raw = p.read_bytes()
    if looks_binary(raw[: 1 << 16]):
        raise CalibrationError(f"{p} is a binary file, not text; give a UTF-8 text file like the model's real input")
    text = raw.decode("utf-8", errors="replace")
    if not text.strip():
        raise CalibrationError(f"text file {p} is empty")
    return text


@dataclass(frozen=True)
class Framing:
    prefix: list[int]
    suffix: list[int]


def framing(tokenizer) -> Framing:
    """The special tokens the tokenizer puts before and after a text."""
    probe = "hello"
    bare = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe)["input_ids"]
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return Framing(list(full[:start]), list(full[start + len(bare) :]))
    return Framing([], [])


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """[n_tokens] ids of the whole text, no special tokens."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def _frame(bodies: torch.Tensor, frame: Framing) -> torch.Tensor:
    n = bodies.shape[0]
    pre = torch.tensor(frame.prefix, dtype=torch.long).expand(n, -1)
    suf = torch.tensor(frame.suffix, dtype=torch.long).expand(n, -1)
    return torch.cat([pre, bodies, suf], dim=1)


def _body_len(seq_len: int, frame: Framing) -> int:
    body = seq_len - len(frame.prefix) - len(frame.suffix)
    if body < 1:
        raise CalibrationError(f"sequence length {seq_len} leaves no room for text")
    return body


def random_windows(tokenizer, text: str, seq_len: int, n_windows: int, seed: int = 0) -> torch.Tensor:
    """[n_windows, seq_len] windows at seeded random offsets (calibration)."""
    frame = framing(tokenizer)
    body = _body_len(seq_len, frame)
    ids = tokenize(tokenizer, text)
    if ids.numel() <= body:
        raise CalibrationError(
            f"the calibration text has {ids.numel()} tokens, fewer than one window of {body}; "
            "give a longer text or a shorter --seq-len"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - body, (n_windows,), generator=gen)
    bodies = torch.stack([ids[s : s + body] for s in starts.tolist()])
    return _frame(bodies, frame)


def consecutive_windows(tokenizer, text: str, seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """[n, seq_len] non-overlapping windows from the start of the text (evaluation).
    `max_tokens` caps the text tokens used (special tokens not counted)."""
    if seq_len < 2:
        raise CalibrationError(f"sequence length {seq_len} is too short: a window needs at least 2 tokens to predict one")
    if max_tokens is not None and max_tokens < 1:
        raise CalibrationError(f"max tokens must be at least 1, got {max_tokens}")
    frame = framing(tokenizer)
    body = _body_len(seq_len, frame)
    ids = tokenize(tokenizer, text)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n = ids.numel() // body
    if n == 0:
        raise CalibrationError(f"the text has {ids.numel()} tokens, fewer than one window of {body}")
    return _frame(ids[: n * body].reshape(n, body), frame)
