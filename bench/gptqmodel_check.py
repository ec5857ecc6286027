"""Does GPTQModel itself read lowbit's HF GPTQ export as lowbit's weights? A check run with two
interpreters, since GPTQModel lives in its own environment (`pip install torch==2.13.0 gptqmodel optimum`,
and GPTQMODEL_CPU_WORKERS=2 on a 2-core machine, as bench/peers notes):

    python -m bench.gptqmodel_check prepare                 # lowbit's venv: artifacts, exports, reference weights
    GPTQMODEL_CPU_WORKERS=2 PATH_TO_GPTQ_VENV/bin/python bench/gptqmodel_check.py check
    python -m bench.gptqmodel_check render                  # the table, from the results file

`prepare` quantizes the tiny test Llama with GPTQ for several HF GPTQ targets, exports each with
`lowbit export --to gptq`, and writes lowbit's dequantized weights and logits on fixed tokens.
`check` loads every export with `GPTQModel.load(..., backend=BACKEND.TORCH)`, compares each
quantized layer's `dequantize_weight()` with lowbit's (bit for bit: GPTQModel's torch kernels
compute in fp16 only, so the comparison is with lowbit's exact fp32 value rounded once to fp16,
which is what an IEEE fp16 product of the stored scale and integer gives) and the logits, and
writes bench/results/gptqmodel_check.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

WORK = Path("out/gptqmodel_check")
RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = ["gptq:int4-g32", "gptq:int4-g32-asym", "gptq:int8-g64", "gptq:int2-g32", "gptq:int3-g32"]
IDS = list(range(10, 42))


def prepare() -> None:
    import shutil

    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    import lowbit
    from lowbit.artifact import quantized_modules
    from lowbit.export.hf_gptq import export_hf_gptq
    from lowbit.pipeline import quantize, save_job
    from lowbit.recipe import Recipe

    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=49152, max_position_embeddings=256, tie_word_embeddings=False)
    src = WORK / "tiny"
    LlamaForCausalLM(cfg).eval().save_pretrained(src)
    from lowbit.models.aliases import ALIASES
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(ALIASES["smollm2-135m"].materialize())).save_pretrained(src)
    for target in TARGETS:
        name = target.replace(":", "-")
        recipe = Recipe.from_dict({"method": "gptq", "target": target, "calib": {"n_samples": 8, "seq_len": 128}})
        art = save_job(quantize(str(src), recipe, show_progress=False), recipe, WORK / f"{name}-art")
        export_hf_gptq(art, WORK / f"{name}-gptq")
        model = lowbit.load(art)
        ref = {f"{n}.weight": m.dequantize().contiguous() for n, m in quantized_modules(model).items()}
        with torch.no_grad():
            ref["logits"] = model(input_ids=torch.tensor([IDS])).logits[0].float().contiguous()
        save_file(ref, str(WORK / f"{name}-ref.safetensors"))
    print(f"prepared {len(TARGETS)} exports in {WORK}")


def _compare(model, ref, loader: str, target: str) -> dict:
    import torch

    modules = dict(model.named_modules())
    exact, worst = 0, 0.0
    layers = [k.removesuffix(".weight") for k in ref if k != "logits"]
    for layer in layers:
        got = modules[layer].dequantize_weight().T  # GPTQModel modules: [in, out], in their fp16 compute dtype
        # lowbit's fp32 weight is exactly scale * (q - zero); an fp16 product of the same numbers is it rounded once
        want = ref[f"{layer}.weight"].to(got.dtype)
        exact += int(torch.equal(got, want))
        worst = max(worst, float((got.float() - want.float()).abs().max()))
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([IDS])).logits[0].float()
    rel = float((logits - ref["logits"]).norm() / ref["logits"].norm())
    return {"target": target, "loader": loader, "layers": len(layers), "bit_exact_layers": exact, "max_abs_diff": worst,
            "logits_rel_err": rel, "module": type(modules[layers[0]]).__name__, "dtype": str(got.dtype)}


def check() -> None:
    import torch
    from gptqmodel import BACKEND, GPTQModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    rows = []
    for target in TARGETS:
        name = target.replace(":", "-")
        ref = load_file(str(WORK / f"{name}-ref.safetensors"))
        path = str(WORK / f"{name}-gptq")
        try:
            model = GPTQModel.load(path, backend=BACKEND.TORCH, device="cpu", dtype=torch.float16).model
            rows.append(_compare(model, ref, "GPTQModel.load (BACKEND.TORCH)", target))
        except ValueError as exc:  # its own policy for v1 asymmetric checkpoints of other quantizers
            rows.append({"target": target, "loader": "GPTQModel.load (BACKEND.TORCH)", "refused": str(exc).splitlines()[0]})
        print(rows[-1])
        model = AutoModelForCausalLM.from_pretrained(path, device_map="cpu", dtype=torch.float16)
        rows.append(_compare(model, ref, "transformers from_pretrained", target))
        print(rows[-1])
    import gptqmodel
    import transformers

    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "gptqmodel_check.json").write_text(json.dumps(
        {"gptqmodel": gptqmodel.__version__, "transformers": transformers.__version__, "rows": rows}, indent=2) + "\n")


def render() -> None:
    saved = json.loads((RESULTS / "gptqmodel_check.json").read_text())
    lines = [f"# lowbit's HF GPTQ export read by GPTQModel {saved['gptqmodel']} and transformers {saved['transformers']} (CPU)",
             "", "| target | loader | layers | bit-exact layers (fp16) | max abs diff | logits rel. err | module |",
             "|---|---|---|---|---|---|---|"]
    for r in saved["rows"]:
        if "refused" in r:
            lines.append(f"| {r['target']} | {r['loader']} | refused: {r['refused']} | | | | |")
            continue
        lines.append(f"| {r['target']} | {r['loader']} | {r['layers']} | {r['bit_exact_layers']} | {r['max_abs_diff']:.3g} | "
                     f"{r['logits_rel_err']:.2e} | {r['module']} |")
    (RESULTS / "gptqmodel_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    {"prepare": prepare, "check": check, "render": render}[sys.argv[1] if len(sys.argv) > 1 else "prepare"]()
