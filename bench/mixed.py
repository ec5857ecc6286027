"""Does the mixed-precision search's estimate rank configurations as the model does?

    python -m bench.mixed [--model smollm2-135m] [--preset fast] [--configs 24]

Measures the sensitivity table once (`lowbit.mixed`), then quantizes several configurations for
real and measures each one's KL to the original on held-out text: every uniform recipe of the
candidates, and mixed ones the allocator finds at random budgets on a randomly perturbed copy of
the table (each damage times a log-normal factor: realistic allocations, not only the optimal
ones). Reports the Spearman rank correlation between the predicted damage (the sum of the
layers' damages under the true table) and the measured KL, and the KL / damage ratio; and the
same for a gradient-boosted surrogate (`lowbit.mixed.surrogate`, Quantune) fitted on the other
configurations (leave one out). Each measured configuration is kept in WORK/rows.json (by its
choice), so a re-run measures only new ones. Writes bench/results/mixed-<model>-<preset>.json and .md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import tempfile
import time
from pathlib import Path

from scipy.stats import spearmanr

from lowbit.mixed import allocate, feasible_range, parse_candidates, searched_recipe
from lowbit.mixed.allocate import Allocation, allocation_of, perturbed
from lowbit.mixed.run import sensitivities
from lowbit.mixed.surrogate import leave_one_out
from lowbit.pipeline import calibration_batches, evaluate, load_model, quantize, save_job
from lowbit.recipe import Recipe, preset

from .common import ASSETS, RESULTS, machine, markdown_table, write_results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--preset", default="fast", help="base recipe: fast (RTN) or quality (GPTQ, Fisher, mse_fit)")
    ap.add_argument("--candidates", default="int3-g128,int3-g64,int4-g128,int4-g64,int5-g64,int6-g64,int8-g128")
    ap.add_argument("--configs", type=int, default=24, help="configurations in all (the uniform ones included)")
    ap.add_argument("--calib", default=str(ASSETS / "calib.txt"))
    ap.add_argument("--text", default=str(ASSETS / "eval.txt"))
    ap.add_argument("--n-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="out/mixed", help="the sensitivity cache")
    args = ap.parse_args()

    base = Recipe.from_dict({**preset(args.preset), "calib": {"path": args.calib, "n_samples": args.n_samples,
                                                             "seq_len": args.seq_len}})
    cands = parse_candidates(args.candidates)
    work = Path(args.work) / f"{Path(args.model).name}-{args.preset}"
    work.mkdir(parents=True, exist_ok=True)
    loaded = load_model(args.model)
    batches, calib = calibration_batches(loaded, base)
    costs, sens_seconds, cached = sensitivities(loaded, base, cands, batches, calib, work)
    low, high = feasible_range(costs)
    configs: list[tuple[str, Allocation]] = []
    for c in cands:  # the uniform recipes
        if all(c.name in cost.damage for cost in costs.values()):
            configs.append((f"uniform {c.name}", allocation_of(costs, {n: c.name for n in costs})))
    rng = random.Random(args.seed)
    while len(configs) < args.configs:
        budget = rng.uniform(low + 0.05 * (high - low), low + 0.7 * (high - low))
        noisy = allocate(perturbed(costs, rng, 1.0), budget)
        configs.append((f"mixed at {budget:.2f}", noisy))
    store = work / "rows.json"
    measured = json.loads(store.read_text()) if store.is_file() else {}
    rows = []
    for label, alloc in configs:
        key = hashlib.sha256(json.dumps(alloc.choice, sort_keys=True).encode()).hexdigest()[:16]
        damage = sum(costs[n].damage[c] for n, c in alloc.choice.items())
        bits = sum(costs[n].bits[c] for n, c in alloc.choice.items())
        if key not in measured:
            recipe = searched_recipe(base, cands, alloc)
            t = time.perf_counter()
            job = quantize(args.model, recipe, show_progress=False)
            with tempfile.TemporaryDirectory() as tmp:
                path = save_job(job, recipe, Path(tmp) / "model")
                m = evaluate(path, args.text, reference=loaded, max_tokens=args.max_tokens, seq_len=args.seq_len)
            del job
            measured[key] = {"bpw": m["bpw"], "kl": m["kl"], "top1": m["top1"], "seconds": time.perf_counter() - t}
            store.write_text(json.dumps(measured, indent=1))
        m = measured[key]
        rows.append({"config": label, "bpw": m["bpw"], "bpw_predicted": bits / alloc.weights, "predicted_damage": damage,
                     "kl": m["kl"], "top1": m["top1"], "kl_over_damage": m["kl"] / damage if damage else None,
                     "seconds": m["seconds"], "choice": alloc.choice})
        print(f"{label}: bpw {m['bpw']:.3f} predicted {damage:.4g} KL {m['kl']:.4g}", flush=True)
    rho = float(spearmanr([r["predicted_damage"] for r in rows], [r["kl"] for r in rows]).statistic)
    loo = leave_one_out([r["choice"] for r in rows], [r["kl"] for r in rows], costs)
    for r, p in zip(rows, loo):
        r["surrogate_loo"] = p
    rho_surrogate = float(spearmanr(loo, [r["kl"] for r in rows]).statistic)
    payload = {"machine": machine(), "model": args.model, "preset": args.preset, "candidates": [c.name for c in cands],
               "calibration": calib, "max_tokens": args.max_tokens, "sensitivity_seconds": sens_seconds,
               "sensitivity_cached": cached, "spearman": rho, "spearman_surrogate_loo": rho_surrogate, "rows": rows}
    name = f"mixed-{Path(args.model).name}-{args.preset}"
    write_results(name, payload)
    table = markdown_table(rows, [("config", "configuration", ""), ("bpw", "bpw", ".3f"), ("predicted_damage", "predicted", ".4g"),
                                  ("kl", "KL", ".4g"), ("kl_over_damage", "KL / predicted", ".2f"),
                                  ("surrogate_loo", "surrogate (leave one out)", ".4g"), ("top1", "top-1", ".3f"),
                                  ("seconds", "quantize + eval s", ".0f")])
    md = (f"# Mixed precision: predicted damage against measured KL ({args.model}, preset {args.preset})\n\n"
          f"Candidates {', '.join(c.name for c in cands)}; calibration {args.n_samples} x {args.seq_len} tokens; KL on "
          f"{args.max_tokens} tokens of `{Path(args.text).name}`. Sensitivity table: {sens_seconds:.0f} s"
          f"{' (cached)' if cached else ''}. **Spearman rank correlation, predicted vs measured, over {len(rows)} "
          f"configurations: {rho:.3f}** (the additive estimate); {rho_surrogate:.3f} for the gradient-boosted surrogate, "
          "each configuration predicted by one fitted on the others.\n\n"
          f"{table}\n")
    (RESULTS / f"{name}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
