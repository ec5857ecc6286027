"""`lowbit search`: the best model under a bit budget (or several: the frontier), end to end.

1. Sensitivity (`sensitivity`): every layer under every candidate, its damage and stored bits,
   from one Fisher pass and one float walk over the calibration windows; cached in
   `OUT/sensitivity.json` and reused by a later search of the same model, recipe, candidates and
   calibration (another budget costs only its quantization).
2. Allocation (`allocate`): per budget, the least summed damage within the budget.
3. The recipe: the base recipe with the most-chosen candidate as its format and an exact-name
   override for every layer given another; an ordinary recipe (`lowbit quantize --recipe`).
4. Verification: the recipe quantized for real (the base method, layers in sequence) and its KL
   to the original measured on held-out text, next to the predicted damage.

One budget writes `OUT/recipe.yaml` and the artifact `OUT/model`; several write `OUT/bpw-B/` each.
`OUT/report.md` and `OUT/report.json` hold the choices, predictions, measurements and times.
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
from .candidates import Candidate
from .sensitivity import LayerCost, candidate_recipe, measure_sensitivities

CACHE = "sensitivity.json"


@dataclass
class BudgetResult:
    budget: float
    allocation: Allocation
    recipe_path: Path
    artifact: Path | None = None
    measured: dict = field(default_factory=dict)  # KL, ppl, top-1, bpw of the real artifact
    seconds: float = 0.0


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _fingerprint(loaded: LoadedModel, base: Recipe, candidates: list[Candidate], calib: dict) -> str:
    from .. import __version__

    blob = json.dumps({"model": loaded.source, "path": loaded.path, "recipe": base.to_dict(),
                       "candidates": [c.name for c in candidates], "calib": calib, "lowbit": __version__},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def sensitivities(loaded: LoadedModel, base: Recipe, candidates: list[Candidate], batches, calib: dict, out: Path,
                  show_progress: bool = True) -> tuple[dict[str, LayerCost], float, bool]:
    """The table, from `out/sensitivity.json` when it was made for the same inputs, else measured
    (and cached). Returns (table, seconds spent measuring it, whether it came from the cache)."""
    key = _fingerprint(loaded, base, candidates, calib)
    cache = out / CACHE
    if cache.is_file():
        try:
            stored = json.loads(cache.read_text())
            if stored.get("fingerprint") == key:
                return {n: LayerCost.from_dict(d) for n, d in stored["layers"].items()}, float(stored["seconds"]), True
        except (ValueError, KeyError, TypeError):
            pass  # unreadable or from another version: measured again and replaced
    start = time.perf_counter()
    costs = measure_sensitivities(loaded.model, loaded.kind, base, candidates, batches, show_progress)
    seconds = time.perf_counter() - start
    _write_text(cache, json.dumps({"fingerprint": key, "seconds": seconds, "candidates": [c.name for c in candidates],
                                   "layers": {n: c.to_dict() for n, c in costs.items()}}, indent=1))
    return costs, seconds, False


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


def budget_dir(out: Path, budget: float, single: bool) -> Path:
    return out if single else out / f"bpw-{budget:g}"


def run_search(source: str, base: Recipe, candidates: list[Candidate], budgets: list[float], out: Path, *,
               verify: bool = True, eval_text: str | None = None, max_tokens: int = 4096, seq_len: int = 512,
               force: bool = False, allow_pickle: bool = False, show_progress: bool = True) -> dict:
    """Search every budget (see the module docstring); returns the report (also written to `out`)."""
    from ..pipeline import calibration_batches, evaluate, load_model, quantize, save_job
    from ..validation.finite import check_finite_model

    if not budgets:
        raise LowbitError("give at least one --budget")
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
    allocations = [allocate(costs, b) for b in budgets]  # every budget checked before any quantization
    single = len(budgets) == 1
    results: list[BudgetResult] = []
    for budget, alloc in zip(budgets, allocations):
        t = time.perf_counter()
        where = budget_dir(out, budget, single)
        where.mkdir(parents=True, exist_ok=True)
        recipe = searched_recipe(base, candidates, alloc)
        recipe_path = where / "recipe.yaml"
        _write_text(recipe_path, f"# lowbit search: {budget:g} bpw budget, {alloc.bpw:.4f} bpw allocated, predicted damage "
                    f"{alloc.damage:.4g} nats/token\n" + yaml.safe_dump(_readable(recipe), sort_keys=False))
        result = BudgetResult(budget, alloc, recipe_path)
        if verify:
            job = quantize(source, recipe, show_progress=show_progress, allow_pickle=allow_pickle)
            result.artifact = save_job(job, recipe, where / "model", force=force)
            m = evaluate(result.artifact, eval_text, reference=loaded, max_tokens=max_tokens, seq_len=seq_len)
            result.measured = {k: m[k] for k in ("kl", "ppl", "ppl_reference", "top1", "bpw", "size_bytes") if k in m}
        result.seconds = time.perf_counter() - t
        results.append(result)
    report = {
        "model": source, "candidates": [c.name for c in candidates], "base_recipe": base.to_dict(), "calibration": calib,
        "feasible_bpw": [low, high], "sensitivity_seconds": sens_seconds, "sensitivity_cached": cached,
        "uniform_predicted": _uniform(costs, candidates),
        "budgets": [{"budget": r.budget, "bpw": r.allocation.bpw, "predicted_damage": r.allocation.damage,
                     "choices": Counter(r.allocation.choice.values()), "recipe": str(r.recipe_path),
                     "artifact": str(r.artifact) if r.artifact else None, "measured": r.measured, "seconds": r.seconds,
                     "layers": r.allocation.choice} for r in results],
        "seconds": time.perf_counter() - started,
    }
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
                         "predicted_damage": sum(cost.damage[c.name] for cost in costs.values())})
    return rows


def render_report(report: dict) -> str:
    lines = [f"# lowbit search: {report['model']}", "",
             f"Candidates: {', '.join(report['candidates'])}; base recipe method {report['base_recipe'].get('method')}"
             f"{', hessian ' + report['base_recipe']['hessian'] if report['base_recipe'].get('hessian') else ''}. "
             f"Feasible: {report['feasible_bpw'][0]:.3f} to {report['feasible_bpw'][1]:.3f} bpw. Sensitivity: "
             f"{report['sensitivity_seconds']:.0f} s{' (cached)' if report['sensitivity_cached'] else ''}; total "
             f"{report['seconds']:.0f} s. bpw counts everything stored for the quantized layers; predicted damage is the "
             "summed second-order loss estimate (nats per token), KL the measured mean KL(original || quantized).", "",
             "| budget | bpw | predicted damage | KL | ppl | top-1 | layers per candidate | seconds |", "|---|---|---|---|---|---|---|---|"]
    for b in report["budgets"]:
        m = b["measured"]
        choices = ", ".join(f"{k} {v}" for k, v in sorted(b["choices"].items(), key=lambda kv: -kv[1]))
        fmt = (lambda k, f: format(m[k], f) if m.get(k) is not None else "-")
        lines.append(f"| {b['budget']:g} | {m.get('bpw', b['bpw']):.3f} | {b['predicted_damage']:.4g} | {fmt('kl', '.4f')} | "
                     f"{fmt('ppl', '.2f')} | {fmt('top1', '.3f')} | {choices} | {b['seconds']:.0f} |")
    lines += ["", "Uniform recipes (every layer on one candidate), predicted:", "", "| candidate | bpw | predicted damage |",
              "|---|---|---|"]
    lines += [f"| {u['candidate']} | {u['bpw']:.3f} | {u['predicted_damage']:.4g} |" for u in report["uniform_predicted"]]
    return "\n".join(lines) + "\n"
