"""Fixtures: tiny random-init models built from configs (fast), and the real reference assets."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LOWBIT_SHARED", ROOT.parent / "shared"))
ASSETS = SHARED / "assets"
SHAKESPEARE = ASSETS / "shakespeare-llama"
CALIB = ASSETS / "calib.txt"
EVAL = ASSETS / "eval.txt"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def require_assets() -> None:
    if not SHAKESPEARE.is_dir():
        pytest.fail(f"reference assets not found at {ASSETS} (set LOWBIT_SHARED)")


def require_llama_cpp():
    """llama-cpp-python, or a skip where it is not installed (a ~15 min source build); CI builds it
    and sets LOWBIT_REQUIRE_LLAMA_CPP=1, so there a missing llama_cpp fails instead of skipping."""
    if os.environ.get("LOWBIT_REQUIRE_LLAMA_CPP") == "1":
        import llama_cpp

        return llama_cpp
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python)")


def save_tiny(model, out: Path) -> Path:
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        shutil.copy(SHAKESPEARE / name, out / name)
    return out


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A 2-layer Llama with the reference tokenizer (vocab 4096); MLP width 96 is not a multiple of 64."""
    require_assets()
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=4096, max_position_embeddings=128, tie_word_embeddings=False,
    )
    return save_tiny(LlamaForCausalLM(cfg).eval(), tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> Path:
    """Another decoder family, with tied embeddings and biased q/k/v projections."""
    require_assets()
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(1)
    cfg = Qwen2Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=4096, max_position_embeddings=128, tie_word_embeddings=True,
    )
    return save_tiny(Qwen2ForCausalLM(cfg).eval(), tmp_path_factory.mktemp("tiny-qwen2"))


@pytest.fixture(scope="session")
def calib_text() -> Path:
    require_assets()
    return CALIB


@pytest.fixture(scope="session")
def eval_text() -> Path:
    require_assets()
    return EVAL


def correlated_layer(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A [256, 512] weight and the Hessian 2 X^T X / n of correlated inputs with 6 loud channels:
    the layer the vector-format tests (VQ, PVQ) compare quantizers on."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(256, 512, generator=g) * 0.02
    x = torch.randn(4096, 512, generator=g) @ (torch.randn(512, 512, generator=g) / 512**0.5 + torch.eye(512))
    x[:, :6] *= 10
    return w, 2 * x.T @ x / x.shape[0]
