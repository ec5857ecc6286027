"""Build (once, cached) and call the C kernels in `csrc/qgemv.c` through ctypes.

The library is compiled with `-O3 -march=native -fopenmp` for the machine it runs on (AVX-512
kernels where it has them, portable C elsewhere); the cache
key is the source, the flags and the CPU's model and flags, so a different machine builds its
own. Plain C through ctypes rather than a PyTorch extension: it compiles in about a second (no
PyTorch headers), and each call costs microseconds, small against a layer's product.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from functools import lru_cache
from pathlib import Path

SOURCE = Path(__file__).parent / "csrc" / "qgemv.c"
FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC", "-std=c11"]


def _arch_flag() -> str:
    """-march for the build: the machine's own by default; LOWBIT_KERNEL_ARCH=x86-64 (say) builds
    the portable paths, as a CPU without AVX-512 would run them (the tests use it)."""
    return f"-march={os.environ.get('LOWBIT_KERNEL_ARCH', 'native')}"
MAX_BATCH = 8  # rows the product kernels take at once (decode); more rows go through dequantize + matmul


def _cpu_id() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(lines)))


def _cache_dir() -> Path:
    return Path(os.environ.get("LOWBIT_CACHE", Path.home() / ".cache" / "lowbit")) / "kernels"


def _build() -> Path:
    src = SOURCE.read_bytes()
    flags = [_arch_flag(), *FLAGS]
    key = hashlib.sha256(src + " ".join(flags).encode() + _cpu_id().encode()).hexdigest()[:16]
    lib = _cache_dir() / f"libqgemv-{key}.so"
    if lib.is_file():
        return lib
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler found (set CC)")
    lib.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)
    os.close(fd)
    try:
        subprocess.run([cc, *flags, str(SOURCE), "-o", tmp], check=True, capture_output=True, text=True)
        os.replace(tmp, lib)  # atomic: concurrent builders agree
    except subprocess.CalledProcessError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise RuntimeError(f"compiling {SOURCE.name} failed: {exc.stderr.strip()[:500]}") from None
    return lib


@lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None (disabled by LOWBIT_NO_EXT=1, or the build failed: warned once)."""
    if os.environ.get("LOWBIT_NO_EXT") == "1":
        return None
    try:
        lib = ctypes.CDLL(str(_build()))
    except (OSError, RuntimeError) as exc:
        warnings.warn(f"lowbit's fast kernels are unavailable ({exc}); layers dequantize in PyTorch instead", stacklevel=2)
        return None
    p, i64, f32, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    lib.lowbit_gemv_int4.argtypes = [p, p, p, p, f32, p, i64, i64, i64, i64, i64, p]
    lib.lowbit_gemv_bits.argtypes = [p, i32, p, p, p, f32, p, i64, i64, i64, i64, i64, p]
    lib.lowbit_gemv_half.argtypes = [p, i32, p, p, i64, i64, i64]
    lib.lowbit_dequant.argtypes = [p, i32, p, p, f32, p, i64, i64, i64, i64]
    for f in (lib.lowbit_gemv_int4, lib.lowbit_gemv_bits, lib.lowbit_gemv_half, lib.lowbit_dequant):
        f.restype = None
    return lib
