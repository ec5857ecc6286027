"""llm-compressor (oneshot) with compressed-tensors' int grid: GPTQ, AWQ, and AWQ followed by GPTQ.

The calibration windows are the same token windows lowbit's GPTQ sees (same text, seed, count and
length), passed as a `datasets.Dataset`, with batch size 8 as lowbit uses. The scheme quantizes
every nn.Linear but lm_head (for a Llama these are exactly the decoder linears), group-wise along
in_features, with llm-compressor's defaults otherwise. The recipe is one of:

- "gptq": GPTQModifier (actorder static, damping 0.01, block 128, min-max observer);
- "awq": AWQModifier (llm-compressor's default Llama mappings: input_layernorm -> q/k/v, v_proj ->
  o_proj (skipped where grouped-query attention makes the shapes differ), post_attention_layernorm
  -> gate/up, up_proj -> down_proj; duo_scaling True, n_grid 20, the default), then
  QuantizationModifier with the same scheme (round to nearest with the min-max observer), as
  llm-compressor's AWQ examples do;
- "awq-gptq": the same AWQModifier, then GPTQModifier with the same scheme (llm-compressor's
  stacked AWQ + GPTQ example).

After oneshot the model holds float weights (smoothed by AWQ, or already quantized-dequantized by
GPTQ) that its fake-quant layers quantize in their forward pass; the weights they compute with are
taken out (`forward_quantize` with the layer's scale and zero point), the model is saved in
compressed-tensors' `pack-quantized` form (which compresses it in place) and every tensor stored for
the quantized layers (packed codes, scales, packed zero points, shapes) is counted; then the layers
become plain nn.Linear with those weights again (AWQ's scales stay folded into the norms and
v_proj / up_proj rows). Scales are stored in the model's dtype (float32 here).

A group that does not divide a layer's in_features: llm-compressor 0.14.0.1 refuses it before
calibrating (`validate_group_size_divisibility`: ValueError listing the layers, advising to add them
to `ignore`); `bypass_divisibility_checks=True` only skips that check, and the min-max observer
then fails the first time it observes such a weight (`_flatten_weight`: `weight.unflatten(-1, (-1,
group_size))`, RuntimeError; in AWQ's grid search or GPTQ's qparams), as compressed-tensors' group
fake quant would ("tensor column shape must be divisble by the given group_size"). There is no
shorter last group: such a configuration is reported unavailable, with the widths, before anything
runs (SmolLM2-135M: 576 % 128 = 64 for q/k/v/o/gate/up, only down_proj's 1536 divides; the
shakespeare model: 192 % 128).

Without an accelerator AWQModifier fails while pinning its cached batches (`pin_memory`: "Cannot
access accelerator device when none is available"); the pinning is made a no-op on such a machine
(`cpu_pinning_off`), which changes no value.

llm-compressor 0.14.0.1 pins transformers<=5.17.0; it is installed with --no-deps next to
transformers 5.24.0 (see `make bench-setup`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from .common import PeerResult, PeerUnavailable, bpw_of, decoder_linears, layer_tensors, require, set_weight

METHODS = ("gptq", "awq", "awq-gptq")
#: safetensors dtype -> bytes per element


def _quiet() -> None:
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:  # llm-compressor logs every layer through loguru
        from loguru import logger

        logger.remove()
    except ImportError:
        pass
    logging.getLogger("llmcompressor").setLevel(logging.ERROR)


@contextlib.contextmanager
def cpu_pinning_off() -> Iterator[None]:
    """Without an accelerator, make AWQ's pinning of its cached batches a no-op. AWQModifier pins
    them for faster host-to-device copies during its grid search (`IntermediatesCache.pin_memory`),
    which on a machine without one raises "Cannot access accelerator device when none is available";
    pinning changes no value."""
    from llmcompressor.pipelines.cache import IntermediatesCache

    if torch.accelerator.is_available():
        yield
        return
    original = IntermediatesCache.pin_memory
    IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None
    try:
        yield
    finally:
        IntermediatesCache.pin_memory = original


def check_groups(layers: dict[str, nn.Linear], group_size: int) -> None:
    """PeerUnavailable where the group does not divide a layer's in_features (llm-compressor refuses
    it, and its fake quant cannot run it even with bypass_divisibility_checks)."""
    odd = sorted({lin.in_features for lin in layers.values() if lin.in_features >= group_size and lin.in_features % group_size})
    if odd:
        n = sum(1 for lin in layers.values() if lin.in_features in odd)
        raise PeerUnavailable(
            f"group {group_size} does not divide in_features {odd} ({n} of {len(layers)} decoder linears): "
            "llm-compressor 0.14.0.1 refuses it (validate_group_size_divisibility: ValueError, 'add these layer names "
            "to the modifier's ignore'), and with bypass_divisibility_checks=True its min-max observer fails on the "
            "first such weight (unflatten(-1, (-1, group_size)): RuntimeError); it has no shorter last group")


def recipe(method: str, bits: int, group_size: int, symmetric: bool, ignore: list[str]) -> list:
    """The oneshot recipe for one method, one scheme for every targeted Linear."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform import AWQModifier

    if method not in METHODS:
        raise ValueError(f"unknown llm-compressor method {method!r} (one of {', '.join(METHODS)})")
    groups = {"group_0": QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=bits, type="int", symmetric=symmetric, strategy="group", group_size=group_size))}
    if method == "gptq":
        return [GPTQModifier(config_groups=groups, ignore=ignore)]
    quant = GPTQModifier if method == "awq-gptq" else QuantizationModifier
    return [AWQModifier(), quant(config_groups=groups, ignore=ignore)]


def effective_weights(model: nn.Module, layers: dict[str, nn.Linear]) -> dict[str, torch.Tensor]:
    """The weights the fake-quant layers compute with (their stored weight through their own
    quantize-dequantize), checked against one layer's output."""
    from compressed_tensors.quantization import forward_quantize

    weights = {}
    with torch.no_grad():
        for name in layers:
            layer = model.get_submodule(name)
            scheme = getattr(layer, "quantization_scheme", None)
            if scheme is None or scheme.weights is None:
                raise RuntimeError(f"{name} was not quantized by llm-compressor")
            weights[name] = forward_quantize(layer, layer.weight.detach(), "weight", scheme.weights).detach().clone()
        first = next(iter(layers))
        layer = model.get_submodule(first)
        x = torch.randn(2, weights[first].shape[1], generator=torch.Generator().manual_seed(0))
        if not torch.allclose(layer(x), torch.nn.functional.linear(x, weights[first], layer.bias), atol=1e-5, rtol=1e-4):
            raise RuntimeError(f"{first}: the fake-quant layer does not compute with the weight taken out")
    return weights


def saved_bytes(model: nn.Module, layers: dict[str, nn.Linear]) -> tuple[int, int]:
    """Save the model in compressed-tensors' packed form (this compresses it in place) and count
    every tensor stored for `layers` but their biases: (all bytes, bytes of float32 scales)."""
    total_bytes = scale_bytes = 0
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, save_compressed=True)
        for _layer, leaf, dtype, nbytes, _load in layer_tensors(tmp, layers):
            total_bytes += nbytes
            if leaf == "weight_scale" and dtype == "F32":
                scale_bytes += nbytes
    return total_bytes, scale_bytes


def _method_notes(method: str, layers: dict[str, nn.Linear]) -> str:
    gptq = "GPTQ (actorder static, damping 0.01, block 128, min-max observer)"
    if method == "gptq":
        return gptq
    v = next(lin for n, lin in layers.items() if n.endswith("v_proj"))
    o = next(lin for n, lin in layers.items() if n.endswith("o_proj"))
    vo = "v_proj->o_proj" if v.out_features == o.in_features else "v_proj->o_proj skipped (GQA: shapes differ)"
    awq = ("AWQ (default Llama mappings: input_layernorm->q/k/v, " + vo +
           ", post_attention_layernorm->gate/up, up_proj->down_proj; duo_scaling True, n_grid 20, memoryless min-max "
           "during the search)")
    then = gptq if method == "awq-gptq" else "QuantizationModifier (RTN, min-max observer)"
    return f"{awq} then {then}"


def quantize(model: nn.Module, calib: torch.Tensor | None = None, bits: int = 4, group_size: int = 64,
             symmetric: bool = False, batch_size: int = 8, method: str = "gptq") -> PeerResult:
    if calib is None:
        raise ValueError(f"llm-compressor {method} needs calibration windows")
    _quiet()
    datasets = require("datasets")
    require("llmcompressor")
    from llmcompressor import oneshot

    layers = decoder_linears(model)
    check_groups(layers, group_size)
    others = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in layers]
    ds = datasets.Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    with cpu_pinning_off():
        oneshot(model=model, recipe=recipe(method, bits, group_size, symmetric, others), dataset=ds,
                num_calibration_samples=calib.shape[0], max_seq_length=calib.shape[1], batch_size=batch_size)

    weights = effective_weights(model, layers)
    n_weights = sum(w.numel() for w in weights.values())
    total_bytes, scale_bytes = saved_bytes(model, layers)
    for name, w in weights.items():  # plain float layers computing with the quantized weights
        set_weight(model, name, w)
    half = bpw_of(total_bytes - scale_bytes / 2, n_weights)
    notes = (f"{_method_notes(method, layers)}, int{bits} g{group_size} {'sym' if symmetric else 'asym'}, "
             f"{calib.shape[0]}x{calib.shape[1]} calib tokens, batch {batch_size}, float32 scales (16-bit: "
             f"{half:.3f} bpw); the quantized weights")
    return PeerResult(model, bpw_of(total_bytes, n_weights), notes, bpw_16bit=half)
