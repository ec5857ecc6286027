"""Peer quantizers for the side-by-side quality benchmark (bench.quality).

Each adapter module exposes `quantize(model, calib=None, **options) -> PeerResult` (see
common.py); PEERS lists the configurations the benchmark runs, in order. A configuration whose
package is missing or whose method cannot run on this machine yields a row with status
"unavailable" and the reason; one that raises yields "failed".
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class PeerConfig:
    tool: str  # the project's name, as shown in the tables
    method: str
    module: str  # adapter module in bench.peers
    dist: str  # the pip distribution that provides it (for its version)
    bits: int | None
    group_size: int | None
    grid: str  # a short description of the storage grid
    options: dict = field(default_factory=dict)
    needs_calib: bool = False
    variant: str = ""  # tells apart configurations of one method in the id
    symmetric: bool | None = None  # integer grid without a zero point? (for the source-grid guard; None: not an integer grid)

    @property
    def id(self) -> str:
        return f"{self.tool}:{self.method}" + (f"-{self.variant}" if self.variant else "")


def _gguf(qtype: str, bits: int, block: int, grid: str) -> PeerConfig:
    # the legacy block types are plain integer grids: Qn_0 symmetric, Qn_1 with a min; the others are not
    legacy = re.fullmatch(r"Q\d_([01])", qtype)
    symmetric = None if legacy is None else legacy.group(1) == "0"
    return PeerConfig("llama.cpp", qtype, "gguf_ref", "gguf", bits, block, grid, {"qtype": qtype}, symmetric=symmetric)


PEERS: list[PeerConfig] = [
    # llama.cpp formats via the gguf package's reference quantizer (numpy)
    _gguf("Q8_0", 8, 32, "int8 sym, fp16 scale / 32"),
    _gguf("Q6_K", 6, 256, "6-bit K-quant, super-blocks of 256"),
    _gguf("Q5_1", 5, 32, "int5 asym, fp16 scale+min / 32"),
    _gguf("Q5_0", 5, 32, "int5 sym, fp16 scale / 32"),
    _gguf("Q5_K", 5, 256, "5-bit K-quant, super-blocks of 256"),
    _gguf("Q4_1", 4, 32, "int4 asym, fp16 scale+min / 32"),
    _gguf("Q4_0", 4, 32, "int4 sym, fp16 scale / 32"),
    _gguf("Q4_K", 4, 256, "4-bit K-quant, super-blocks of 256"),
    _gguf("IQ4_NL", 4, 32, "non-linear 4-bit grid, fp16 scale / 32"),
    _gguf("MXFP4", 4, 32, "FP4 E2M1, E8M0 scale / 32"),
    _gguf("Q3_K", 3, 256, "3-bit K-quant, super-blocks of 256"),
    _gguf("Q2_K", 2, 256, "2-bit K-quant, super-blocks of 256"),
    _gguf("TQ2_0", 2, 256, "ternary in 2 bits, fp16 scale / 256"),
    _gguf("TQ1_0", 2, 256, "ternary 1.6 bits, fp16 scale / 256"),
    # HQQ, no data
    *[PeerConfig("hqq", "hqq", "hqq_peer", "hqq", b, g, f"int{b} asym, fp16 scale+zero / {g}", {"nbits": b, "group_size": g}, variant=f"int{b}-g{g}",
                 symmetric=False)
      for b, g in ((8, 64), (4, 64), (4, 32), (3, 64), (3, 32), (2, 64), (2, 32))],
    # optimum-quanto, no data
    PeerConfig("optimum-quanto", "qint8", "quanto_peer", "optimum-quanto", 8, None, "int8 sym per channel", {"weights": "qint8"}),
    PeerConfig("optimum-quanto", "qint4", "quanto_peer", "optimum-quanto", 4, None, "int4 asym, quanto groups (96/128)", {"weights": "qint4"}),
    PeerConfig("optimum-quanto", "qint2", "quanto_peer", "optimum-quanto", 2, None, "int2 asym, quanto groups (96/128)", {"weights": "qint2"}),
    # torchao on the CPU
    PeerConfig("torchao", "int8_weight_only", "torchao_peer", "torchao", 8, None, "int8 per channel", {"kind": "int8_weight_only"}),
    PeerConfig("torchao", "int4_weight_only", "torchao_peer", "torchao", 4, 64, "int4 asym / 64", {"kind": "int4_weight_only", "group_size": 64}, variant="g64",
               symmetric=False),
    PeerConfig("torchao", "int4_opaque", "torchao_peer", "torchao", 4, 64, "int4 asym / 64 (CPU int4pack)", {"kind": "int4_opaque", "group_size": 64}, variant="g64",
               symmetric=False),
    PeerConfig("torchao", "int4_opaque", "torchao_peer", "torchao", 4, 32, "int4 asym / 32 (CPU int4pack)", {"kind": "int4_opaque", "group_size": 32}, variant="g32",
               symmetric=False),
    PeerConfig("torchao", "intx_int4", "torchao_peer", "torchao", 4, 64, "int4 / 64, unpacked int8 storage",
               {"kind": "intx_weight_only", "group_size": 64, "bits": 4}, variant="g64"),
    # bitsandbytes on the CPU
    PeerConfig("bitsandbytes", "int8", "bnb_peer", "bitsandbytes", 8, None, "int8 absmax per row", {"quant_type": "int8"}),
    PeerConfig("bitsandbytes", "nf4", "bnb_peer", "bitsandbytes", 4, 64, "NF4, fp32 absmax / 64", {"quant_type": "nf4", "blocksize": 64}, variant="g64"),
    PeerConfig("bitsandbytes", "nf4-dq", "bnb_peer", "bitsandbytes", 4, 64, "NF4, 8-bit absmax / 64 (double quant)",
               {"quant_type": "nf4", "blocksize": 64, "double_quant": True}, variant="g64"),
    PeerConfig("bitsandbytes", "nf4", "bnb_peer", "bitsandbytes", 4, 32, "NF4, fp32 absmax / 32", {"quant_type": "nf4", "blocksize": 32}, variant="g32"),
    PeerConfig("bitsandbytes", "fp4", "bnb_peer", "bitsandbytes", 4, 64, "FP4, fp32 absmax / 64", {"quant_type": "fp4", "blocksize": 64}, variant="g64"),
    # llm-compressor GPTQ, same calibration windows as lowbit's GPTQ
    *[PeerConfig("llm-compressor", "gptq", "llmc_peer", "llmcompressor", b, g, f"int{b} {'sym' if s else 'asym'} / {g}",
                 {"bits": b, "group_size": g, "symmetric": s}, needs_calib=True,
                 variant=f"int{b}-g{g}" + ("-sym" if s else ""))
      for b, g, s in ((4, 64, False), (4, 32, False), (3, 64, False), (3, 32, False), (2, 64, False), (2, 32, False), (4, 64, True))],
    # groups of 128 (llm-compressor has no shorter last group: unavailable where 128 does not divide a width)
    *[PeerConfig("llm-compressor", "gptq", "llmc_peer", "llmcompressor", b, g, f"int{b} asym / {g}",
                 {"bits": b, "group_size": g, "symmetric": False}, needs_calib=True, variant=f"int{b}-g{g}")
      for b, g in ((4, 128), (3, 128))],
    # llm-compressor AWQ (default Llama mappings), then RTN (QuantizationModifier) or GPTQ with the same scheme
    *[PeerConfig("llm-compressor", m, "llmc_peer", "llmcompressor", b, g, f"int{b} asym / {g}, AWQ scales",
                 {"bits": b, "group_size": g, "symmetric": False, "method": m}, needs_calib=True, variant=f"int{b}-g{g}")
      for m, b, g in (("awq", 4, 64), ("awq", 4, 128), ("awq", 3, 64), ("awq", 3, 128),
                      ("awq-gptq", 4, 64), ("awq-gptq", 4, 128), ("awq-gptq", 3, 64))],
    # llama.cpp's own K-quant mixes (llama-quantize in process, from lowbit's F16 GGUF; types per tensor in the notes)
    *[PeerConfig("llama.cpp", f, "llamacpp_peer", "llama-cpp-python", b, 256, f"llama-quantize {f} mix of K-quants",
                 {"ftype": f}, variant="mix")
      for f, b in (("Q4_K_M", 4), ("Q4_K_S", 4), ("Q3_K_M", 3), ("Q3_K_S", 3), ("Q2_K", 2))],
    # GPTQModel's GPTQ and Intel's AutoRound, each in a venv of its own (run as a child process, checkpoint read back
    # by lowbit; interpreters: LOWBIT_GPTQMODEL_PYTHON, LOWBIT_AUTOROUND_PYTHON). Install, torch pinned to the local CPU wheel:
    #   echo torch==2.13.0 > /tmp/c.txt
    #   python3 -m venv /work/venvs/gptqmodel && /work/venvs/gptqmodel/bin/pip install torch==2.13.0 \
    #     && /work/venvs/gptqmodel/bin/pip install -c /tmp/c.txt gptqmodel        (7.6.0; ~3 min)
    #   python3 -m venv /work/venvs/autoround && /work/venvs/autoround/bin/pip install torch==2.13.0 \
    #     && /work/venvs/autoround/bin/pip install -c /tmp/c.txt auto-round       (0.16.1; ~2 min)
    *[PeerConfig("gptqmodel", "gptq", "gptqmodel_peer", "gptqmodel", b, g, f"int{b} asym / {g}, fp16 scales, GPTQ v1",
                 {"bits": b, "group_size": g, "symmetric": False}, needs_calib=True, variant=f"int{b}-g{g}")
      for b, g in ((4, 64), (4, 128), (3, 64))],
    # AutoRound with its "light" recipe (50 iters, lr 5e-3): its default 200 iters is ~4x slower on 2 cores (about
    # 1-4 min per block of the bench's default model, hours for SmolLM2's 30 blocks); {"iters": 200, "lr": None} for it
    *[PeerConfig("auto-round", "signround", "autoround_peer", "auto-round", b, g,
                 f"int{b} asym / {g}, fp16 scales, light recipe (50 iters)",
                 {"bits": b, "group_size": g, "symmetric": False, "iters": 50, "lr": 5e-3}, needs_calib=True,
                 variant=f"int{b}-g{g}")
      for b, g in ((4, 64), (4, 128), (3, 64))],
]


def get(peer_id: str) -> PeerConfig:
    for p in PEERS:
        if p.id == peer_id:
            return p
    raise KeyError(peer_id)
