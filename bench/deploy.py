"""Where a quantized SmolLM2 runs, and what it costs there: the same model, text and windows in
every runtime, each row measured in its own process (so its peak RSS is its own).

Rows: (e) the fp32 transformers model; (d) lowbit's own runtime (`lowbit.load`); (a) lowbit's GGUF
export (`lowbit quantize --method gptq --target gguf:q4_0`, then `lowbit export --to gguf`) run
in llama.cpp (llama-cpp-python, built from source: `pip install llama-cpp-python`); (b) llama.cpp's
own Q4_0 and Q4_K_M, made by llama.cpp's quantizer from an F16 GGUF of the same model, once with
its default tensor types and once with F16 embeddings and output, which is lowbit's file type;
(c) the compressed-tensors export (`lowbit export --to compressed-tensors`) in plain transformers.

Columns: KL to the fp32 model on the evaluation windows (from each runtime's own logits), batch-1
greedy decode and prefill tokens per second (best of 3, 2 threads), peak RSS, file size, and the
answer to the demo's question. SmolLM2's published weights are GGUF Q4_1 (asymmetric, blocks of
32): Q4_0 and Q4_K are other grids, so no row wins by reproducing the source grid.

    python -m bench.deploy [--rows fp32,lowbit,...] [--max-tokens 4096]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .common import RESULTS, machine, markdown_table, write_results

PROMPT = "What is the capital of France?"
MODEL = "smollm2-135m"
WORK = Path("out/deploy")
THREADS = 2
DECODE_TOKENS = 64
PREFILL_TOKENS = 256


def _peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM: per address space, so unlike ru_maxrss it does not carry the
    parent's peak across fork and exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _import_baseline_mb() -> float:
    """RSS once torch, transformers and the Llama modeling code are imported, before any weight:
    the floor every transformers-based row stands on (about 390 MB here)."""
    import transformers.models.llama.modeling_llama  # noqa: F401

    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _held_bytes(model) -> int:
    """Bytes of every parameter and buffer the model holds (tied tensors once)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def _windows(max_tokens: int):
    from lowbit.calib.sources import default_text
    from lowbit.calib.text import consecutive_windows
    from lowbit.models import load_model

    ref = load_model(MODEL)
    text, _ = default_text("eval")
    return ref, consecutive_windows(ref.tokenizer, text, 512, max_tokens)


def _kl_from_logits(ref_model, windows: torch.Tensor, logits_of) -> float:
    """Mean KL(fp32 || runtime) over every position; `logits_of(ids [seq]) -> [seq, vocab]`."""
    import torch.nn.functional as F

    total, n = 0.0, 0
    with torch.inference_mode():
        for ids in windows:
            lr = F.log_softmax(ref_model(input_ids=ids[None]).logits[0].float(), -1)
            lq = F.log_softmax(torch.as_tensor(np.asarray(logits_of(ids)), dtype=torch.float32), -1)
            total += (lr.exp() * (lr - lq)).sum().item()
            n += ids.numel()
    return total / n


# transformers-style runtimes (fp32, lowbit.load) --------------------------------------------------

def _hf_speed(model, tokenizer) -> dict:
    from lowbit.demo import _answer

    prompt = torch.randint(100, 20000, (1, PREFILL_TOKENS), generator=torch.Generator().manual_seed(0))
    short = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    prefill, decode = [], []
    with torch.inference_mode():
        for _ in range(3):
            t = time.perf_counter()
            model(input_ids=prompt, use_cache=False)
            prefill.append(PREFILL_TOKENS / (time.perf_counter() - t))
            t = time.perf_counter()
            model.generate(short, attention_mask=torch.ones_like(short), max_new_tokens=DECODE_TOKENS, min_new_tokens=DECODE_TOKENS,
                           do_sample=False, pad_token_id=tokenizer.eos_token_id)
            decode.append(DECODE_TOKENS / (time.perf_counter() - t))
    return {"prefill_tokens_per_s": max(prefill), "decode_tokens_per_s": max(decode), "answer": _answer(model, tokenizer, PROMPT)}


def _first_forward_rss(model) -> float:
    """Peak RSS after one decode-sized forward: stored tensors read lazily (mmap) are resident by then."""
    with torch.inference_mode():
        model(input_ids=torch.tensor([[1, 2, 3]]))
    return _peak_rss_mb()


def row_fp32(max_tokens: int) -> dict:
    from lowbit.models import load_model

    base = _import_baseline_mb()
    ref = load_model(MODEL)
    loaded = _first_forward_rss(ref.model)
    speed = _hf_speed(ref.model, ref.tokenizer)
    rss = _peak_rss_mb()
    weights = sum(p.numel() * 4 for p in ref.model.parameters())
    return {"tool": "transformers", "method": "fp32", "bits": 32, "runtime": "transformers", **speed,
            "import_rss_mb": base, "load_peak_rss_mb": loaded, "peak_rss_mb": rss, "weight_bytes_held": _held_bytes(ref.model),
            "kl": 0.0, "file_bytes": weights}


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def _transformers_row(load, path: Path, max_tokens: int, **fields) -> dict:
    """Speed, memory and KL of a transformers-style model `load()` returns (tokenizer from `path`)."""
    from transformers import AutoTokenizer

    base = _import_baseline_mb()
    model = load()
    loaded = _first_forward_rss(model)
    speed = _hf_speed(model, AutoTokenizer.from_pretrained(path))
    rss = _peak_rss_mb()
    ref, windows = _windows(max_tokens)
    with torch.inference_mode():
        kl = _kl_from_logits(ref.model, windows, lambda ids: model(input_ids=ids[None]).logits[0].float())
    return {**fields, "bits": 4, **speed, "import_rss_mb": base, "load_peak_rss_mb": loaded, "peak_rss_mb": rss,
            "weight_bytes_held": _held_bytes(model), "kl": kl, "file_bytes": _dir_bytes(path)}


def row_lowbit(max_tokens: int) -> dict:
    import lowbit

    art = WORK / "smol-gptq-q4_0"
    return _transformers_row(lambda: lowbit.load(art), art, max_tokens, tool="lowbit", method="gptq q4_0 g32",
                             runtime="lowbit (lowbit.load)")


def row_compressed_tensors(max_tokens: int) -> dict:
    """The compressed-tensors export in plain transformers (no lowbit import in this process's model path)."""
    from transformers import AutoModelForCausalLM

    ct = WORK / "smol-gptq-q4_0-ct"
    return _transformers_row(lambda: AutoModelForCausalLM.from_pretrained(ct, dtype=torch.float32).eval(), ct, max_tokens,
                             tool="lowbit", method="gptq q4_0 g32 (lowbit export)", runtime="transformers (compressed-tensors)")


# llama.cpp -------------------------------------------------------------------------------------

def _llama_speed(path: Path) -> dict:
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=1024, n_batch=512, n_threads=THREADS, logits_all=False, verbose=False)
    prompt = torch.randint(100, 20000, (PREFILL_TOKENS,), generator=torch.Generator().manual_seed(0)).tolist()
    short = llm.tokenize(PROMPT.encode(), add_bos=False)
    prefill, decode = [], []
    for _ in range(3):
        llm.reset()
        t = time.perf_counter()
        llm.eval(prompt)
        prefill.append(PREFILL_TOKENS / (time.perf_counter() - t))
        llm.reset()
        llm.eval(short)
        t = time.perf_counter()
        for _ in range(DECODE_TOKENS):
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            llm.eval([nxt])
        decode.append(DECODE_TOKENS / (time.perf_counter() - t))
    llm.reset()
    answer = llm.create_chat_completion(messages=[{"role": "user", "content": PROMPT}], max_tokens=24, temperature=0.0)
    rss = _peak_rss_mb()
    del llm
    return {"prefill_tokens_per_s": max(prefill), "decode_tokens_per_s": max(decode),
            "answer": answer["choices"][0]["message"]["content"].strip(), "peak_rss_mb": rss}


def _llama_kl(path: Path, max_tokens: int) -> float:
    from llama_cpp import Llama

    ref, windows = _windows(max_tokens)
    llm = Llama(model_path=str(path), n_ctx=windows.shape[1], n_batch=512, n_threads=THREADS, logits_all=True, verbose=False)

    def logits_of(ids: torch.Tensor) -> np.ndarray:
        llm.reset()
        llm.eval(ids.tolist())
        return np.array(llm.scores[: ids.numel()])

    return _kl_from_logits(ref.model, windows, logits_of)


def _llama_row(path: Path, max_tokens: int, **fields) -> dict:
    speed = _llama_speed(path)
    return {**fields, "runtime": "llama.cpp", **speed, "kl": _llama_kl(path, max_tokens), "file_bytes": path.stat().st_size}


def row_llamacpp_lowbit(max_tokens: int) -> dict:
    return _llama_row(WORK / "smol-gptq-q4_0.gguf", max_tokens, tool="lowbit", method="gptq q4_0 g32 (lowbit export)", bits=4)


def row_llamacpp_lowbit_q4_k(max_tokens: int) -> dict:
    """lowbit's GPTQ onto the Q4_K lattice; SmolLM2's 576-wide layers take llama.cpp's Q5_0 fallback,
    as in llama.cpp's own Q4_K_M."""
    return _llama_row(WORK / "smol-gptq-q4_k.gguf", max_tokens, tool="lowbit",
                      method="gptq q4_k (Q5_0 where 256 does not divide; lowbit export)", bits=4)


def _llama_quantized(ftype: str, f16_embeddings: bool) -> Path:
    """llama.cpp's own quantizer, in process, from the F16 GGUF."""
    import llama_cpp

    src = WORK / "smol-f16.gguf"
    out = WORK / f"smol-llamacpp-{ftype.lower()}{'-f16emb' if f16_embeddings else ''}.gguf"
    if out.exists():
        return out
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = THREADS
    if f16_embeddings:
        params.token_embedding_type = llama_cpp.GGML_TYPE_F16
        params.output_tensor_type = llama_cpp.GGML_TYPE_F16
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize failed ({rc})")
    return out


def _llama_own(ftype: str, f16_embeddings: bool, max_tokens: int) -> dict:
    emb = "F16 embeddings/output" if f16_embeddings else "default tensor types"
    return _llama_row(_llama_quantized(ftype, f16_embeddings), max_tokens, tool="llama.cpp",
                      method=f"{ftype} (llama-quantize, {emb})", bits=4)


# SmolLM2's weights here are dequantized GGUF Q4_1 (asymmetric 4-bit, fp16 scale and min per 32).
# Q4_K stores asymmetric 4-bit sub-blocks of 32 with 6-bit scales and mins: close to that grid, so
# re-quantizing onto it nearly reproduces the source and its KL says little about the method.
SOURCE_GRID = {"llama.cpp:q4_k_m": True, "llama.cpp:lowbit-gguf-q4_k": True}

ROWS = {
    "fp32": row_fp32,
    "lowbit": row_lowbit,
    "transformers:lowbit-ct": row_compressed_tensors,
    "llama.cpp:lowbit-gguf": row_llamacpp_lowbit,
    "llama.cpp:lowbit-gguf-q4_k": row_llamacpp_lowbit_q4_k,
    "llama.cpp:q4_0-f16emb": lambda m: _llama_own("Q4_0", True, m),
    "llama.cpp:q4_0": lambda m: _llama_own("Q4_0", False, m),
    "llama.cpp:q4_k_m": lambda m: _llama_own("Q4_K_M", False, m),
}


def prepare(n_samples: int) -> None:
    """The artifacts the rows read: lowbit's GPTQ q4_0 and q4_k artifacts and their GGUFs; the F16 GGUF."""
    from lowbit.export.compressed_tensors import write_compressed_tensors
    from lowbit.export.gguf import write_gguf, write_model_gguf
    from lowbit.models import load_model
    from lowbit.pipeline import quantize, save_job
    from lowbit.recipe import Recipe

    WORK.mkdir(parents=True, exist_ok=True)
    for kind in ("q4_0", "q4_k"):  # GPTQ onto each GGUF target, and its GGUF export
        art = WORK / f"smol-gptq-{kind}"
        if not art.exists():
            recipe = Recipe.from_dict({"method": "gptq", "target": f"gguf:{kind}",
                                       "calib": {"n_samples": n_samples, "seq_len": 512}})
            save_job(quantize(MODEL, recipe), recipe, art)
        if not art.with_suffix(".gguf").exists():
            write_gguf(art, art.with_suffix(".gguf"))
    art = WORK / "smol-gptq-q4_0"
    if not (WORK / "smol-gptq-q4_0-ct").exists():
        write_compressed_tensors(art, WORK / "smol-gptq-q4_0-ct")
    if not (WORK / "smol-f16.gguf").exists():
        ref = load_model(MODEL)
        write_model_gguf(ref.model, Path(ref.path), WORK / "smol-f16.gguf", {}, "SmolLM2-135M-Instruct f16")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated: {', '.join(ROWS)}")
    ap.add_argument("--max-tokens", type=int, default=4096, help="evaluation tokens for KL")
    ap.add_argument("--n-samples", type=int, default=32, help="GPTQ calibration windows of 512 tokens")
    ap.add_argument("--row", help=argparse.SUPPRESS)  # internal: measure one row in this process
    ap.add_argument("--render", action="store_true", help="rewrite deploy.md from deploy.json (no measuring)")
    args = ap.parse_args()
    torch.set_num_threads(THREADS)
    if args.row:
        print("ROW " + json.dumps(ROWS[args.row](args.max_tokens)))
        return
    if args.render:
        saved = json.loads((RESULTS / "deploy.json").read_text())
        render(saved["rows"], saved["max_tokens"])
        return
    prepare(args.n_samples)
    rows = []
    for name in args.rows.split(","):
        proc = subprocess.run([sys.executable, "-m", "bench.deploy", "--row", name, "--max-tokens", str(args.max_tokens)],
                              capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("ROW ")), None)
        if line is None:
            print(f"{name}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append({"row": name, **json.loads(line[4:])})
        print(f"{name}: {rows[-1]}", file=sys.stderr)
    write_results("deploy", {"machine": machine(), "model": MODEL, "max_tokens": args.max_tokens, "rows": rows})
    render(rows, args.max_tokens)


def render(rows: list[dict], max_tokens: int) -> None:
    fp32 = next((r for r in rows if r["method"] == "fp32"), None)
    for r in rows:
        r["decode_vs_fp32"] = r["decode_tokens_per_s"] / fp32["decode_tokens_per_s"] if fp32 else None
        r["source_grid"] = SOURCE_GRID.get(r["row"], False)
        held, full = r.get("weight_bytes_held"), fp32.get("weight_bytes_held") if fp32 else None
        r["weights_vs_fp32"] = held / full if held and full else None
        r["load_over_import_mb"] = r["load_peak_rss_mb"] - r["import_rss_mb"] if "import_rss_mb" in r else None
    cols = [("tool", "tool", ""), ("method", "method", ""), ("runtime", "runtime", ""), ("kl", "KL", ".4f"),
            ("decode_tokens_per_s", "decode tok/s", ".1f"), ("decode_vs_fp32", "decode / fp32", ".2f"),
            ("prefill_tokens_per_s", "prefill tok/s", ".0f"), ("weights_vs_fp32", "weights held / fp32", ".3f"),
            ("load_over_import_mb", "load RSS over import MB", ".0f"), ("peak_rss_mb", "peak RSS MB", ".0f"),
            ("file_bytes", "file bytes", ","), ("source_grid", "≈ source grid", ""), ("answer", "answer", "")]
    table = markdown_table(rows, cols)
    print(table)
    note = (f"KL over the first {max_tokens} tokens of the evaluation text (windows of 512). ≈ source grid: the format nearly "
            "contains the Q4_1 grid SmolLM2's weights were published in, so its KL is not evidence for the method. "
            "Weights held: bytes of every parameter and buffer in memory, over the fp32 model's. Load RSS over import: peak RSS "
            "after loading and one forward, minus the RSS of the same process once torch and transformers' modeling code "
            "are imported (transformers rows only; llama.cpp rows load no Python model code).")
    (RESULTS / "deploy.md").write_text(f"# Deploy: {MODEL}, same windows and machine, each row in its own process\n\n{table}\n\n{note}\n")


if __name__ == "__main__":
    main()
