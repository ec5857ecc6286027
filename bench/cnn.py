"""Convolutional networks: MobileNetV2 (torchvision's ImageNet weights) quantized by lowbit and by
PyTorch's own `torch.ao.quantization` (FX graph mode, x86 backend, static W8A8 per-channel), all
measured the same way in one run: top-1 / top-5 agreement with the float model and mean KL of the
class distributions on seeded random crops of the bundled evaluation photos, calibrated on crops
of the disjoint calibration photos (`lowbit.vision.images`). bpw counts everything a layer stores
(codes, fp16 scales and zero points, activation ranges); torch.ao's is int8 weights plus its
per-channel float scale and int zero point.

    python -m bench.cnn [--n-eval 1000] [--n-calib 128] [--only ID,...] [--out cnn-mobilenet-v2]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from .common import machine, markdown_table, write_results

THREADS = 2
# id -> (recipe keys, activations, calibration: "photos" crops or "zeroq" distilled inputs)
ROWS = {
    "lowbit:rtn-w8a8": ({"method": "rtn", "format": "int8"}, "int8", "photos"),
    "lowbit:gptq-w8": ({"method": "gptq", "format": "int8"}, "none", "photos"),
    "lowbit:gptq-w8a8": ({"method": "gptq", "format": "int8"}, "int8", "photos"),
    "lowbit:gptq-w8a8-zeroq": ({"method": "gptq", "format": "int8"}, "int8", "zeroq"),
    "lowbit:rtn-w4a8": ({"method": "rtn", "format": "int4"}, "int8", "photos"),
    "lowbit:gptq-w4a8": ({"method": "gptq", "format": "int4"}, "int8", "photos"),
    "lowbit:gptq-w4a8-bc": ({"method": "gptq", "format": "int4", "bias_correction": True}, "int8", "photos"),
    "lowbit:gptq-w4a8-zeroq": ({"method": "gptq", "format": "int4"}, "int8", "zeroq"),
    # ZeroQ's mixed precision at uniform int4's size (per-channel int4 stores 4.105 bpw on MobileNetV2)
    "lowbit:gptq-mixed4.105-a8-zeroq": ({"method": "gptq", "format": "int4", "budget": 4.105}, "int8", "zeroq"),
}


MIXED_BITS = (2, 4, 8)  # ZeroQ's own choices


def _lowbit_row(model, inputs: dict, row_id: str):
    from lowbit.recipe import Recipe
    from lowbit.vision.mixed import allocate_bits, mixed_recipe, sensitivities
    from lowbit.vision.quantize import quantize_vision

    keys, act, data = ROWS[row_id]
    m = copy.deepcopy(model)
    recipe = Recipe(group_size=-1, act=act, **keys)
    calib = inputs[data]
    start = time.perf_counter()
    mixed = {}
    if recipe.budget is not None:
        allocation = allocate_bits(sensitivities(m, recipe, calib, bits=MIXED_BITS), recipe.budget)
        recipe = mixed_recipe(recipe.model_copy(update={"budget": None}), allocation)
        counts: dict[str, int] = {}
        for c in allocation.choice.values():
            counts[c] = counts.get(c, 0) + 1
        mixed = {"predicted_kl": allocation.damage, "layers_per_format": dict(sorted(counts.items()))}
    report = quantize_vision(m, recipe, calib, act, "mse", bias_correction=recipe.bias_correction)
    seconds = time.perf_counter() - start
    numel = sum(e["shape"][0] * e["shape"][1] for e in report.modules.values())
    bpw = sum(e["bpw"] * e["shape"][0] * e["shape"][1] for e in report.modules.values()) / numel
    weights = (f"mixed int2/4/8 ({keys['budget']} bpw)" if "budget" in keys else f"{keys['format']} per channel"
               + (" + bias correction" if keys.get("bias_correction") else ""))
    return m, {"tool": "lowbit", "method": keys["method"], "weights": weights, "acts": f"{act} per tensor (mse)" if act != "none" else "float",
               "calibration": "ZeroQ distilled" if data == "zeroq" else "photo crops", "bpw": bpw, "quantize_s": seconds, **mixed}


def _torch_ao_row(model, calib):
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "x86"
    start = time.perf_counter()
    prepared = prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping("x86"), example_inputs=(calib[:1],))
    with torch.no_grad():
        for i in range(0, calib.shape[0], 16):
            prepared(calib[i:i + 16])
    q = convert_fx(prepared)
    seconds = time.perf_counter() - start
    numel = sum(p.numel() for n, p in model.named_parameters() if n.endswith("weight") and p.dim() > 1)
    out_ch = sum(p.shape[0] for n, p in model.named_parameters() if n.endswith("weight") and p.dim() > 1)
    bpw = (8 * numel + out_ch * (32 + 32)) / numel  # int8 weights + per-channel fp32 scale and int zero point
    return q, {"tool": "torch.ao", "method": "fx static ptq (x86)", "weights": "int8 per channel", "acts": "uint8 per tensor (histogram)",
               "calibration": "photo crops", "bpw": bpw, "quantize_s": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-eval", type=int, default=1000, help="evaluation crops (photos-eval)")
    ap.add_argument("--n-calib", type=int, default=128, help="calibration crops (photos-calib)")
    ap.add_argument("--only", help="comma-separated row ids (torch.ao:w8a8 and the lowbit ids)")
    ap.add_argument("--out", default="cnn-mobilenet-v2", help="results name under bench/results")
    args = ap.parse_args()
    torch.set_num_threads(THREADS)
    from lowbit.vision.eval import fidelity, logits
    from lowbit.vision.images import random_crops
    from lowbit.vision.models import load_vision_model
    from lowbit.vision.run import EVAL_SEED

    model, _ = load_vision_model("mobilenet-v2")
    calib = random_crops(args.n_calib, 0, "photos-calib")
    ids = args.only.split(",") if args.only else ["torch.ao:w8a8", *ROWS]
    inputs = {"photos": calib}
    if any(ROWS.get(i, (None, None, ""))[2] == "zeroq" for i in ids):
        from lowbit.calib.zeroq import distill_images

        start = time.perf_counter()
        inputs["zeroq"], zeroq_info = distill_images(model, args.n_calib, seed=0)
        zeroq_info["seconds"] = time.perf_counter() - start
        print("zeroq", zeroq_info, flush=True)
    crops = random_crops(args.n_eval, EVAL_SEED, "photos-eval")
    start = time.perf_counter()
    ref = logits(model, crops, what="float model")
    float_s = time.perf_counter() - start
    rows = []
    for row_id in ids:
        q, row = _torch_ao_row(model, calib) if row_id == "torch.ao:w8a8" else _lowbit_row(model, inputs, row_id)
        start = time.perf_counter()
        out = logits(q, crops, what=row_id)
        row.update({"id": row_id, "eval_s": time.perf_counter() - start, "eval_vs_float": (time.perf_counter() - start) / float_s,
                    **fidelity(ref, out)})
        rows.append(row)
        print(row, flush=True)
    payload = {"machine": machine(), "model": "mobilenet-v2 (torchvision IMAGENET1K_V1)", "n_eval": args.n_eval,
               "n_calib": args.n_calib, "eval_images": "photos-eval", "calib_images": "photos-calib", "float_eval_s": float_s,
               **({"zeroq": zeroq_info} if "zeroq" in inputs else {}),
               "rows": rows}
    write_results(args.out, payload)
    cols = [("id", "row", ""), ("weights", "weights", ""), ("acts", "activations", ""), ("calibration", "calibration", ""), ("bpw", "bpw", ".3f"),
            ("top1_agreement", "top-1 agree", ".3f"), ("top5_agreement", "top-5 agree", ".3f"), ("kl", "KL", ".4f"),
            ("quantize_s", "quantize s", ".1f"), ("eval_vs_float", "eval time / float", ".2f")]
    table = markdown_table(rows, cols)
    from .common import RESULTS

    (RESULTS / f"{args.out}.md").write_text(
        f"# MobileNetV2: fidelity to the float model, {args.n_eval} crops of the evaluation photos, "
        f"{args.n_calib} calibration crops of the disjoint calibration photos (or as many ZeroQ-distilled inputs)\n\n{table}\n\n"
        "lowbit's activations are simulated integer inference (float kernels on quantized values); torch.ao runs real "
        "int8 kernels (fbgemm/x86), hence its evaluation time.\n")
    print(table)


if __name__ == "__main__":
    main()
