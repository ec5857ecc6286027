"""Models bigger than the machine: peak RSS and wall time of streamed quantization
(`lowbit quantize --stream`) and of `lowbit.load` + a forward pass, on random-initialised
Llama-shaped bf16 checkpoints this bench writes to disk (0.1B to 7B parameters; the last is
Llama-2-7B's shape: 13.5 GB in bf16, 27 GB in float32, more than this machine's 24 GB), and on
the real Qwen2.5-Coder-1.5B.

Every row runs in its own process, so its peak RSS (VmHWM) is its own; the import floor (torch +
transformers + lowbit imported, nothing loaded) is measured the same way and reported beside it.

    python -m bench.scale [--sizes 0.1b,0.5b,1.5b,7b] [--methods rtn] [--work out/scale]
    python -m bench.scale --data-parallel smollm2-135m --n-samples 16   # 1 process vs 2 (torchrun, gloo)
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from .common import RESULTS, machine, markdown_table, write_results

THREADS = 2
# Llama-shaped configs: (hidden, intermediate, layers, heads, kv heads); vocab 32000 throughout
SIZES = {
    "0.1b": (768, 2048, 12, 12, 12),
    "0.5b": (1024, 2816, 24, 16, 16),
    "1.5b": (2048, 5632, 24, 16, 16),
    "7b": (4096, 11008, 32, 32, 32),  # Llama-2-7B
}
LAYERS_PER_SHARD = 4


def _vm_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def write_checkpoint(size: str, out: Path) -> Path:
    """A random-initialised bf16 Llama of `size`, written tensor by tensor in shards with an index
    (weights ~ N(0, 0.02), norms 1): never more than one tensor in memory."""
    from accelerate import init_empty_weights
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lowbit.stream.safetensors_io import INDEX, SafetensorsWriter

    if (out / INDEX).exists():
        return out
    hidden, inter, layers, heads, kv = SIZES[size]
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False,
                      dtype="bfloat16", architectures=["LlamaForCausalLM"])
    with init_empty_weights():
        model = LlamaForCausalLM(cfg)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    shard_of = lambda key: int(key.split(".")[2]) // LAYERS_PER_SHARD + 1 if key.startswith("model.layers.") else 0  # noqa: E731
    keys = list(model.state_dict())
    n_shards = max(shard_of(k) for k in keys) + 1
    weight_map: dict[str, str] = {}
    for s in range(n_shards):
        name = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        w = SafetensorsWriter(tmp / name)
        for key in [k for k in keys if shard_of(k) == s]:
            shape = model.state_dict()[key].shape
            t = torch.ones(shape) if key.endswith("norm.weight") else torch.randn(shape, generator=gen) * 0.02
            w.add(key, t.to(torch.bfloat16))
            weight_map[key] = name
        w.finish({"format": "pt"})
    (tmp / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    cfg.save_pretrained(tmp)
    # a real tokenizer for the directory's completeness; random weights make the text irrelevant
    AutoTokenizer.from_pretrained(_tokenizer_source()).save_pretrained(tmp)
    tmp.rename(out)
    return out


def _tokenizer_source() -> str:
    from lowbit.models.aliases import ALIASES

    return str(ALIASES["smollm2-135m"].materialize())


def row_import() -> dict:
    import transformers.models.llama.modeling_llama  # noqa: F401

    import lowbit  # noqa: F401
    import lowbit.stream.quantize  # noqa: F401

    return {"peak_rss_mb": _vm_hwm_mb()}


def row_quantize(ckpt: str, out: str, method: str, n_samples: int) -> dict:
    from lowbit.recipe import Recipe
    from lowbit.stream.quantize import stream_quantize

    spec = {"method": method, "format": "int4", "group_size": 128}
    if method == "gptq":
        spec["calib"] = {"n_samples": n_samples, "seq_len": 512}
        spec["gptq"] = {"act_order": False}
    t = time.perf_counter()
    path, report = stream_quantize(ckpt, Recipe.from_dict(spec), out, force=True, show_progress=False)
    seconds = time.perf_counter() - t
    header = json.loads((Path(path) / "lowbit.json").read_text())
    return {"seconds": seconds, "peak_rss_mb": _vm_hwm_mb(), "bpw": header["summary"]["bpw"],
            "artifact_bytes": sum(p.stat().st_size for p in Path(path).iterdir())}


def row_load(art: str) -> dict:
    import lowbit

    t = time.perf_counter()
    model = lowbit.load(art)
    with torch.inference_mode():
        logits = model(input_ids=torch.arange(100, 108)[None]).logits
    return {"seconds": time.perf_counter() - t, "peak_rss_mb": _vm_hwm_mb(), "finite": bool(torch.isfinite(logits).all())}


def _run(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, "-m", "bench.scale", "--row", *args], capture_output=True, text=True)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("ROW ")), None)
    if line is None:
        raise RuntimeError(f"{args}: failed\n{proc.stderr[-3000:]}")
    return json.loads(line[4:])


def data_parallel(work: Path, model: str, n_samples: int) -> list[dict]:
    """GPTQ int4 g128 of `model` in one process (2 threads) and under torchrun in 2 processes (1
    thread each): wall time, and whether the artifacts are the same bytes."""
    import os

    rows, arts = [], {}
    base = ["quantize", model, "--method", "gptq", "--bits", "4", "--group-size", "128", "--n-samples", str(n_samples),
            "--seq-len", "512", "--no-act-order", "--force"]
    for procs in (1, 2):
        art = work / f"dp-{procs}"
        env = {**os.environ, "OMP_NUM_THREADS": str(THREADS // procs)}
        launcher = [sys.executable, "-m", "lowbit"] if procs == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}", "-m", "lowbit"]
        t = time.perf_counter()
        proc = subprocess.run([*launcher, *base, "-o", str(art)], capture_output=True, text=True, env=env)
        if proc.returncode:
            raise RuntimeError(proc.stderr[-3000:])
        arts[procs] = art
        rows.append({"model": model, "processes": procs, "threads_each": THREADS // procs, "wall_seconds": time.perf_counter() - t})
    same = all((arts[1] / f).read_bytes() == (arts[2] / f).read_bytes() for f in ("quantized.safetensors", "dense.safetensors"))
    for r in rows:
        r["wall_vs_1_process"] = r["wall_seconds"] / rows[0]["wall_seconds"]
        r["same_bytes_as_1_process"] = same
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated: {', '.join(SIZES)}, qwen2.5-coder-1.5b")
    ap.add_argument("--methods", default="rtn", help="comma-separated: rtn, gptq")
    ap.add_argument("--n-samples", type=int, default=32, help="GPTQ calibration windows of 512 tokens")
    ap.add_argument("--work", default="out/scale", help="where the checkpoints and artifacts go")
    ap.add_argument("--keep", action="store_true", help="keep the written checkpoints and artifacts")
    ap.add_argument("--out", default="scale", help="results name under bench/results (NAME.json, NAME.md)")
    ap.add_argument("--data-parallel", metavar="MODEL", help="instead: GPTQ of MODEL in 1 process vs 2 (torchrun)")
    ap.add_argument("--row", nargs="+", help=argparse.SUPPRESS)  # internal: one measurement in this process
    args = ap.parse_args()
    torch.set_num_threads(THREADS)
    if args.row:
        kind, *rest = args.row
        fn = {"import": row_import, "quantize": lambda c, o, m, n: row_quantize(c, o, m, int(n)), "load": row_load}[kind]
        print("ROW " + json.dumps(fn(*rest)))
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.data_parallel:
        rows = data_parallel(work, args.data_parallel, args.n_samples)
        write_results("scale-dp", {"machine": machine(), "n_samples": args.n_samples, "rows": rows})
        print(markdown_table(rows, [("model", "model", ""), ("processes", "processes", ""), ("threads_each", "threads each", ""),
                                    ("wall_seconds", "wall s", ".1f"), ("wall_vs_1_process", "vs 1 process", ".2f"),
                                    ("same_bytes_as_1_process", "same bytes", "")]))
        return
    floor = _run(["import"])["peak_rss_mb"]
    rows = []
    for size in args.sizes.split(","):
        if size in SIZES:
            t = time.perf_counter()
            ckpt = write_checkpoint(size, work / f"llama-{size}")
            print(f"{size}: checkpoint written in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        else:
            from lowbit.models.aliases import ALIASES

            ckpt = ALIASES[size].materialize()
        ckpt_bytes = sum(p.stat().st_size for p in Path(ckpt).glob("*.safetensors"))
        for method in args.methods.split(","):
            art = work / f"{Path(ckpt).name}-{method}-int4-g128"
            q = _run(["quantize", str(ckpt), str(art), method, str(args.n_samples)])
            ld = _run(["load", str(art)])
            row = {"model": size, "checkpoint_bytes": ckpt_bytes, "fp32_bytes": ckpt_bytes * 2 if size in SIZES else None,
                   "method": method, "quantize_seconds": q["seconds"], "quantize_peak_rss_mb": q["peak_rss_mb"],
                   "bpw": q["bpw"], "artifact_bytes": q["artifact_bytes"], "load_forward_seconds": ld["seconds"],
                   "load_forward_peak_rss_mb": ld["peak_rss_mb"], "forward_finite": ld["finite"], "import_floor_mb": floor}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
            if not args.keep:
                shutil.rmtree(art, ignore_errors=True)
        if not args.keep and size in SIZES:
            shutil.rmtree(ckpt, ignore_errors=True)
    write_results(args.out, {"machine": machine(), "n_samples": args.n_samples, "rows": rows})
    render(rows, args.out)


def render(rows: list[dict], name: str = "scale") -> None:
    cols = [("model", "model", ""), ("method", "method", ""), ("checkpoint_bytes", "checkpoint bytes (bf16)", ","),
            ("fp32_bytes", "float32 bytes", ","), ("quantize_seconds", "quantize s", ".0f"),
            ("quantize_peak_rss_mb", "quantize peak RSS MB", ".0f"), ("artifact_bytes", "artifact bytes", ","),
            ("bpw", "bpw", ".3f"), ("load_forward_seconds", "load + forward s", ".1f"),
            ("load_forward_peak_rss_mb", "load + forward peak RSS MB", ".0f"), ("import_floor_mb", "import floor MB", ".0f")]
    table = markdown_table(rows, cols)
    print(table)
    (RESULTS / f"{name}.md").write_text("# Scale: streamed quantization (`--stream`), int4 g128, each row in its own process\n\n"
                                      f"{table}\n\nPeak RSS is the process's VmHWM, import floor included.\n")


if __name__ == "__main__":
    main()
