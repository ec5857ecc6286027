"""`lowbit search`: the best model under a budget (bits per weight or a size on disk; several: the
frontier), end to end.

1. Sensitivity (`sensitivity`): every layer under every candidate, its damage and stored bits,
   from one Fisher pass and one float walk over the calibration windows; cached in
   `OUT/sensitivity.json` per candidate and reused by a later search of the same model, base
   recipe and calibration (another budget costs only its quantization, another candidate only its
   own column).
2. Allocation (`allocate`): per budget, the least summed damage within the budget (a size is
   first turned into bits per weight of the searched layers, `budget`).
3. The recipe: the base recipe with the most-chosen candidate as its format and an exact-name
   override for every layer given another; an ordinary recipe (`lowbit quantize --recipe`).
4. Verification: the recipe quantized for real (the base method, layers in sequence) and its KL
   to the original measured on held-out text, next to the predicted damage.

One budget writes `OUT/recipe.yaml` and the artifact `OUT/model`; several write `OUT/bpw-B/` or
`OUT/size-S/` each (and `--frontier` `OUT/uniform-C/` for the uniform recipes). `OUT/report.md`,
`report.json` and `report.png` hold the choices, predictions, measurements, per-phase times, the
frontier plot and the per-layer bit map.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..errors import LowbitError
from ..models.loading import LoadedModel
from ..recipe import Recipe
from .allocate import Allocation, allocate, feasible_range
from .budget import Budget, artifact_overhead, size_range
from .candidates import Candidate, CandidateError
from .plot import write_plot
from .sensitivity import LayerCost, candidate_recipe, measure_sensitivities

CACHE = "sensitivity.json"


@dataclass
class BudgetResult:
    budget: Budget
    allocation: Allocation
    recipe_path: Path
    artifact: Path | None = None
    measured: dict = field(default_factory=dict)  # KL, ppl, top-1, bpw, size of the real artifact
    seconds: dict = field(default_factory=dict)  # per phase: allocate, quantize, evaluate


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _fingerprint(loaded: LoadedModel, base: Recipe, calib: dict) -> str:
    """What a sensitivity column depends on besides its candidate: model, base recipe, calibration
    and lowbit's version."""
    from .. import __version__

    blob = json.dumps({"model": loaded.source, "path": loaded.path, "recipe": base.to_dict(), "calib": calib,
                       "lowbit": __version__}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _read_cache(path: Path, key: str) -> dict | None:
    if not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text())
        if stored.get("fingerprint") == key:
            return {"seconds": float(stored["seconds"]), "candidates": list(stored["candidates"]),
                    "layers": {n: LayerCost.from_dict(d) for n, d in stored["layers"].items()}}
    except (ValueError, KeyError, TypeError):
        pass  # unreadable or from another version: measured again and replaced
    return None


def sensitivities(loaded: LoadedModel, base: Recipe, candidates: list[Candidate], batches, calib: dict, out: Path,
                  show_progress: bool = True) -> tuple[dict[str, LayerCost], float, list[str]]:
    """The table for `candidates`: the columns `out/sensitivity.json` holds for the same model, base
    recipe and calibration are read, the others measured (one Fisher pass and one walk for all of
    them) and added to the cache. Returns (table, seconds spent measuring its columns, in this
    run or the earlier ones, the candidates read from the cache)."""
    key = _fingerprint(loaded, base, calib)
    cache = out / CACHE
    stored = _read_cache(cache, key) or {"seconds": 0.0, "candidates": [], "layers": {}}
    table: dict[str, LayerCost] = stored["layers"]
    missing = [c for c in candidates if c.name not in stored["candidates"]]
    if missing:
        start = time.perf_counter()
        new = measure_sensitivities(loaded.model, loaded.kind, base, missing, batches, show_progress, require_fit=False)
        for name, cost in new.items():
            row = table.setdefault(name, LayerCost(cost.weights))
            row.bits.update(cost.bits)
            row.damage.update(cost.damage)
        stored["seconds"] += time.perf_counter() - start
        stored["candidates"] += [c.name for c in missing]
        _write_text(cache, json.dumps({"fingerprint": key, "seconds": stored["seconds"], "candidates": stored["candidates"],
                                       "layers": {n: table[n].to_dict() for n in sorted(table)}}, indent=1))
    wanted = {c.name for c in candidates}
    costs = {}
    for name in sorted(table):
        row = table[name]
        costs[name] = LayerCost(row.weights, {k: v for k, v in row.bits.items() if k in wanted},
                                {k: v for k, v in row.damage.items() if k in wanted})
        if not costs[name].damage:
            raise CandidateError(f"{name}: none of the candidates fits this layer; add one that does")
    return costs, stored["seconds"], [c.name for c in candidates if c not in missing]


def searched_recipe(base: Recipe, candidates: list[Candidate], allocation: Allocation) -> Recipe:
    """The base recipe laid out as the allocation chose: the candidate holding the most weights
    is the default, every other layer an exact-name override (placed before the base's own)."""
    by_name = {c.name: c for c in candidates}
    counts = Counter(allocation.choice.values())
    default = by_name[max(counts, key=lambda c: (counts[c], c))]
    main = candidate_recipe(base, default)
    overrides = []
    for name, cname in sorted(allocation.choice.items()):
        if cname == default.name:
            continue
        scheme = candidate_recipe(base, by_name[cname])
        overrides.append({"pattern": f"^{re.escape(name)}$", "format": scheme.format, "group_size": scheme.group_size,
                          "format_options": dict(scheme.format_options)})
    data = base.to_dict()
    data.update(format=main.format, group_size=main.group_size, format_options=dict(main.format_options),
                overrides=overrides + [o for o in data.get("overrides", [])])
    return Recipe.from_dict(data)


def _readable(recipe: Recipe) -> dict:
    """The recipe's keys with each override's unset ones left out (the same recipe when read back)."""
    data = recipe.to_dict()
    data["overrides"] = [{k: v for k, v in o.items() if v is not None and not (k == "skip" and v is False)}
                         for o in data.get("overrides", [])]
    return data


def budget_dir(out: Path, budget: Budget, single: bool) -> Path:
    return out if single else out / budget.label


def _checked_bpw(budget: Budget, overhead: int, weights: int, low: float, high: float) -> float:
    """The budget as bits per weight of the searched layers; a size no allocation fits is refused
    with the sizes that do."""
    bpw = budget.bpw_for(overhead, weights)
    if budget.kind == "size" and bpw < low:
        least, most = size_range(overhead, weights, low, high)
        raise CandidateError(f"--size {budget.text}: the smallest artifact these candidates make is {least / 1e6:.2f} MB "
                             f"({overhead / 1e6:.2f} MB of it dense tensors, tokenizer and headers; every searched layer "
                             f"at {low:.3f} bpw); sizes up to {most / 1e6:.2f} MB are searched (above it the largest "
                             "candidates fit everywhere). Raise the size or add smaller candidates")
    return bpw


def _measure(source: str, recipe: Recipe, where: Path, loaded: LoadedModel, eval_text: str | None, max_tokens: int,
             seq_len: int, force: bool, allow_pickle: bool, show_progress: bool, seconds: dict) -> tuple[Path, dict]:
    """Quantize `recipe` for real into `where/model` and measure its KL; phase times into `seconds`."""
    from ..pipeline import evaluate, quantize, save_job

    t = time.perf_counter()
    job = quantize(source, recipe, show_progress=show_progress, allow_pickle=allow_pickle)
    artifact = save_job(job, recipe, where / "model", force=force)
    del job
    seconds["quantize"] = time.perf_counter() - t
    t = time.perf_counter()
    m = evaluate(artifact, eval_text, reference=loaded, max_tokens=max_tokens, seq_len=seq_len)
    seconds["evaluate"] = time.perf_counter() - t
    return artifact, {k: m[k] for k in ("kl", "ppl", "ppl_reference", "top1", "bpw", "size_bytes") if k in m}


def run_search(source: str, base: Recipe, candidates: list[Candidate], budgets: list[Budget], out: Path, *,
               verify: bool = True, frontier: bool = False, eval_text: str | None = None, max_tokens: int = 4096,
               seq_len: int = 512, force: bool = False, allow_pickle: bool = False, show_progress: bool = True) -> dict:
    """Search every budget (see the module docstring); returns the report (also written to `out`).
    `frontier`: also quantize every uniform recipe of the candidates and measure its KL, so the
    report compares searched and uniform models measured alike."""
    from ..pipeline import calibration_batches, load_model
    from ..validation.finite import check_finite_model

    if not budgets:
        raise LowbitError("give at least one budget (--budget or --size)")
    if out.exists() and not out.is_dir():
        raise LowbitError(f"{out} is a file; the search writes a directory (give another -o)")
    if out.is_dir() and any(out.iterdir()) and not ((out / CACHE).exists() or (out / "report.json").exists()):
        raise LowbitError(f"{out} holds files of its own; the search writes into a new or empty directory, or into an "
                          "earlier search's (whose sensitivities it reuses): give another -o")
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    loaded = load_model(source, allow_pickle=allow_pickle)
    check_finite_model(loaded.model, f"model {source}")
    batches, calib = calibration_batches(loaded, base)
    costs, sens_seconds, cached = sensitivities(loaded, base, candidates, batches, calib, out, show_progress)
    low, high = feasible_range(costs)
    weights = sum(c.weights for c in costs.values())
    overhead = artifact_overhead(loaded, list(costs))
    allocations = []
    for b in budgets:  # every budget checked before any quantization
        t = time.perf_counter()
        allocations.append((allocate(costs, _checked_bpw(b, overhead, weights, low, high)), time.perf_counter() - t))
    single = len(budgets) == 1 and not frontier
    results: list[BudgetResult] = []
    for budget, (alloc, alloc_seconds) in zip(budgets, allocations):
        where = budget_dir(out, budget, single)
        where.mkdir(parents=True, exist_ok=True)
        recipe = searched_recipe(base, candidates, alloc)
        recipe_path = where / "recipe.yaml"
        _write_text(recipe_path, f"# lowbit search: budget {budget.text}{' bpw' if budget.kind == 'bpw' else ''}, "
                    f"{alloc.bpw:.4f} bpw allocated, predicted damage {alloc.damage:.4g} nats/token\n"
                    + yaml.safe_dump(_readable(recipe), sort_keys=False))
        result = BudgetResult(budget, alloc, recipe_path, seconds={"allocate": alloc_seconds})
        if verify:
            result.artifact, result.measured = _measure(source, recipe, where, loaded, eval_text, max_tokens, seq_len, force,
                                                        allow_pickle, show_progress, result.seconds)
        results.append(result)
    uniform = _uniform(costs, candidates)
    if frontier:
        for row in uniform:
            where = out / f"uniform-{row['candidate']}"
            where.mkdir(parents=True, exist_ok=True)
            recipe = candidate_recipe(base, next(c for c in candidates if c.name == row["candidate"]))
            recipe = Recipe.from_dict({**recipe.to_dict(), "ignore": base.to_dict().get("ignore", []),
                                       "overrides": base.to_dict().get("overrides", [])})
            row["seconds"] = {}
            _, row["measured"] = _measure(source, recipe, where, loaded, eval_text, max_tokens, seq_len, force,
                                          allow_pickle, show_progress, row["seconds"])
    report = {
        "model": source, "candidates": [c.name for c in candidates], "base_recipe": base.to_dict(), "calibration": calib,
        "feasible_bpw": [low, high], "searched_weights": weights, "overhead_bytes": overhead,
        "feasible_size_bytes": list(size_range(overhead, weights, low, high)),
        "sensitivity_seconds": sens_seconds, "sensitivity_cached": cached, "uniform": uniform,
        "budgets": [{"budget": r.budget.text, "kind": r.budget.kind, "value": r.budget.value, "bpw": r.allocation.bpw,
                     "predicted_damage": r.allocation.damage, "choices": Counter(r.allocation.choice.values()),
                     "recipe": str(r.recipe_path), "artifact": str(r.artifact) if r.artifact else None,
                     "measured": r.measured, "seconds": r.seconds, "layers": r.allocation.choice} for r in results],
        "seconds": time.perf_counter() - started,
    }
    bits = {n: {c: cost.bits[c] / cost.weights for c in cost.bits} for n, cost in costs.items()}
    plot = write_plot(report, bits, out / "report.png")
    report["plot"] = plot.name if plot else None
    _write_text(out / "report.json", json.dumps(report, indent=1, default=dict))
    _write_text(out / "report.md", render_report(report))
    return report


def _uniform(costs: dict[str, LayerCost], candidates: list[Candidate]) -> list[dict]:
    """Every candidate on every layer it fits: its bpw and predicted damage, for comparison."""
    rows = []
    for c in candidates:
        if all(c.name in cost.damage for cost in costs.values()):
            w = sum(cost.weights for cost in costs.values())
            rows.append({"candidate": c.name, "bpw": sum(cost.bits[c.name] for cost in costs.values()) / w,
                         "predicted_damage": sum(cost.damage[c.name] for cost in costs.values()), "measured": {}})
    return rows


def _num(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _phases(seconds: dict) -> str:
    return ", ".join(f"{k} {v:.0f} s" if v >= 1 else f"{k} {v:.2f} s" for k, v in seconds.items())


def render_report(report: dict) -> str:
    base = report["base_recipe"]
    low, high = report["feasible_bpw"]
    lines = [f"# lowbit search: {report['model']}", "",
             f"Candidates: {', '.join(report['candidates'])}; base recipe method {base.get('method')}"
             f"{', hessian ' + base['hessian'] if base.get('hessian') else ''}. Feasible: {low:.3f} to {high:.3f} bpw over "
             f"{report['searched_weights']:,} searched weights; artifacts of {report['feasible_size_bytes'][0] / 1e6:.2f} to "
             f"{report['feasible_size_bytes'][1] / 1e6:.2f} MB ({report['overhead_bytes'] / 1e6:.2f} MB of dense tensors, "
             "tokenizer and headers). bpw counts everything stored for the searched layers; size is the whole artifact "
             "directory; predicted damage is the summed second-order loss estimate (nats per token), KL the measured mean "
             "KL(original || quantized) on held-out text.", "",
             "Time: sensitivity " + (f"{report['sensitivity_seconds']:.0f} s"
                                     + (f" (of it, {', '.join(report['sensitivity_cached'])} measured by an earlier search, "
                                        "read from the cache)" if report["sensitivity_cached"] else ""))
             + f"; whole run {report['seconds']:.0f} s.", "",
             "| budget | bpw | size MB | predicted damage | KL | ppl | top-1 | layers per candidate | time |",
             "|---|---|---|---|---|---|---|---|---|"]
    for b in report["budgets"]:
        m = b["measured"]
        choices = ", ".join(f"{k} {v}" for k, v in sorted(b["choices"].items(), key=lambda kv: -kv[1]))
        size = m.get("size_bytes")
        asked = f"{b['budget']} bpw" if b["kind"] == "bpw" else f"{b['value'] / 1e6:.2f} MB"
        lines.append(f"| {asked} | {m.get('bpw', b['bpw']):.3f} | "
                     f"{_num(size / 1e6 if size else None, '.2f')} | {b['predicted_damage']:.4g} | {_num(m.get('kl'), '.4g')} | "
                     f"{_num(m.get('ppl'), '.2f')} | {_num(m.get('top1'), '.3f')} | {choices} | {_phases(b['seconds'])} |")
    measured = any(u.get("measured") for u in report["uniform"])
    lines += ["", "Uniform recipes (every searched layer on one candidate)" + (", quantized and measured alike:" if measured
                                                                              else ", predicted only:"), "",
              "| candidate | bpw | predicted damage | KL | top-1 | time |", "|---|---|---|---|---|---|"]
    for u in report["uniform"]:
        m = u.get("measured") or {}
        lines.append(f"| {u['candidate']} | {m.get('bpw', u['bpw']):.3f} | {u['predicted_damage']:.4g} | {_num(m.get('kl'), '.4g')} | "
                     f"{_num(m.get('top1'), '.3f')} | {_phases(u.get('seconds') or {}) or '-'} |")
    if report.get("plot"):
        lines += ["", f"![searched and uniform recipes; bits per weight of every layer]({report['plot']})"]
    return "\n".join(lines) + "\n"
