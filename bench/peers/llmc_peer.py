"""llm-compressor GPTQ (GPTQModifier through oneshot), with compressed-tensors' int grid.

The calibration windows are the same token windows lowbit's GPTQ sees (same text, seed, count and
length), passed as a `datasets.Dataset`, with batch size 8 as lowbit uses. The scheme quantizes
every nn.Linear but lm_head (for a Llama these are exactly the decoder linears), group-wise along
in_features, llm-compressor's defaults otherwise (actorder static, damping 0.01, block 128,
min-max observer). After oneshot the model holds the quantized-dequantized weights and computes
with them (fake quant); those weights are taken out, the model is saved in compressed-tensors'
`pack-quantized` form (which compresses it in place) and every tensor stored for the quantized
layers (packed codes, scales, packed zero points, shapes) is counted; then the layers become plain
nn.Linear with GPTQ's weights again. Scales are stored in the model's dtype (float32 here).

llm-compressor 0.14.0.1 pins transformers<=5.17.0; it is installed with --no-deps next to
transformers 5.24.0 (see `make bench-setup`).
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import warnings

import torch
from torch import nn

from .common import PeerResult, bpw_of, decoder_linears, require, set_weight


def quantize(model: nn.Module, calib: torch.Tensor | None = None, bits: int = 4, group_size: int = 64,
             symmetric: bool = False, batch_size: int = 8) -> PeerResult:
    if calib is None:
        raise ValueError("GPTQ needs calibration windows")
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    datasets = require("datasets")
    require("llmcompressor")
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from safetensors import safe_open

    try:  # llm-compressor logs every layer through loguru
        from loguru import logger

        logger.remove()
    except ImportError:
        pass
    logging.getLogger("llmcompressor").setLevel(logging.ERROR)

    layers = decoder_linears(model)
    others = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in layers]
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=bits, type="int", symmetric=symmetric, strategy="group", group_size=group_size))
    recipe = GPTQModifier(config_groups={"group_0": scheme}, ignore=others)
    ds = datasets.Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    oneshot(model=model, recipe=recipe, dataset=ds, num_calibration_samples=calib.shape[0],
            max_seq_length=calib.shape[1], batch_size=batch_size)

    # The weights GPTQ left in the model, as the fake-quant layers compute with them.
    weights = {n: model.get_submodule(n).weight.detach().clone() for n in layers}
    n_weights = sum(w.numel() for w in weights.values())
    first = next(iter(layers))
    x = torch.randn(2, weights[first].shape[1], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        layer = model.get_submodule(first)
        if not torch.allclose(layer(x), torch.nn.functional.linear(x, weights[first], layer.bias), atol=1e-5, rtol=1e-4):
            raise RuntimeError(f"{first}: the fake-quant layer does not compute with its stored weight")

    # Save in compressed-tensors' packed form (this compresses the model in place) and count the bytes.
    total_bytes = scale_bytes = 0
    sizes = {"I32": 4, "I64": 8, "F32": 4, "F16": 2, "BF16": 2, "I8": 1, "U8": 1}
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, save_compressed=True)
        for fname in [f for f in os.listdir(tmp) if f.endswith(".safetensors")]:
            with safe_open(os.path.join(tmp, fname), "pt") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open is not a dict
                    layer, _, leaf = key.rpartition(".")
                    if layer not in layers or leaf == "bias":
                        continue
                    if leaf == "weight":
                        raise RuntimeError(f"{layer} was saved unquantized")
                    t = f.get_slice(key)
                    nbytes = math.prod(t.get_shape()) * sizes[t.get_dtype()]
                    total_bytes += nbytes
                    if leaf == "weight_scale" and t.get_dtype() == "F32":
                        scale_bytes += nbytes
    for name, w in weights.items():  # plain float layers computing with GPTQ's weights
        set_weight(model, name, w)
    notes = (f"GPTQ int{bits} g{group_size} {'sym' if symmetric else 'asym'}, {calib.shape[0]}x{calib.shape[1]} calib tokens, "
             f"batch {batch_size}, actorder static (default), float32 scales (16-bit: "
             f"{bpw_of(total_bytes - scale_bytes / 2, n_weights):.3f} bpw); GPTQ's weights")
    return PeerResult(model, bpw_of(total_bytes, n_weights), notes)
