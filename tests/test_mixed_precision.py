"""Mixed-precision search (`lowbit search`): candidates, the loss-aware sensitivity table, the
budgeted allocation and the end-to-end run on a tiny Llama."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lowbit.cli import app
from lowbit.recipe import Recipe
from lowbit.errors import LowbitError
from lowbit.mixed import (Candidate, CandidateError, LayerCost, allocate, feasible_range, parse_budgets, parse_candidates,
                          parse_size, searched_recipe)
from lowbit.mixed.allocate import Allocation
from lowbit.mixed.budget import header_allowance
from lowbit.mixed.plot import bit_map

runner = CliRunner(env={"COLUMNS": "200"})


def safe_open_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return list(f.keys())


def test_candidates_parse_and_refuse_clearly():
    assert [c.name for c in parse_candidates("int4-g64, INT3-g128,int4-g64,vq2-row")] == ["int4-g64", "int3-g128", "vq2-row"]
    assert Candidate.parse("nf4-g-1") == Candidate("nf4", -1)
    with pytest.raises(CandidateError, match="FORMAT-gGROUP"):
        Candidate.parse("int4")
    with pytest.raises(CandidateError, match="at least two"):
        parse_candidates("int4-g64")


def _random_costs(rng: random.Random, layers: int) -> dict[str, LayerCost]:
    costs = {}
    for i in range(layers):
        n = rng.choice([10, 20, 30])
        bits = {c: b * n + rng.random() for c, b in zip("abcd", (2, 3, 4, 8))}
        damage = {c: rng.random() * 2.0**-b * n * rng.choice([1, 5, 20]) for c, b in zip("abcd", (2, 3, 4, 8))}
        costs[f"l{i}"] = LayerCost(n, bits, damage)
    return costs


def test_allocation_is_the_exhaustive_optimum_within_the_budget():
    """The dynamic program finds the least summed damage among all choices that fit (checked
    against every one of the 4^5 choices on 200 random tables), and never exceeds the budget."""
    rng = random.Random(0)
    for _ in range(200):
        costs = _random_costs(rng, 5)
        low, high = feasible_range(costs)
        budget = rng.uniform(low, high)
        got = allocate(costs, budget)
        limit = budget * sum(c.weights for c in costs.values())
        best = min(sum(costs[n].damage[c] for n, c in zip(costs, choice))
                   for choice in itertools.product("abcd", repeat=5)
                   if sum(costs[n].bits[c] for n, c in zip(costs, choice)) <= limit)
        assert got.bits <= limit + 1e-9
        assert got.damage <= best * (1 + 1e-9)


def test_an_impossible_budget_names_the_feasible_range():
    costs = _random_costs(random.Random(1), 3)
    low, high = feasible_range(costs)
    with pytest.raises(CandidateError, match=f"{low:.3f}"):
        allocate(costs, low - 0.01)
    top = allocate(costs, high + 1)  # everything fits: each layer its least damage
    assert top.damage == pytest.approx(sum(min(c.damage.values()) for c in costs.values()))


def test_the_searched_recipe_gives_each_layer_its_choice():
    base = Recipe.from_dict({"method": "gptq", "format_options": {"mse_fit": True}, "ignore": ["lm_head"]})
    cands = parse_candidates("int3-g64,int4-g128,int8-g128")
    choice = {"model.layers.0.mlp.up_proj": "int8-g128", "model.layers.0.mlp.down_proj": "int3-g64",
              "model.layers.1.mlp.up_proj": "int4-g128", "model.layers.1.mlp.down_proj": "int4-g128"}
    recipe = searched_recipe(base, cands, Allocation(choice, 0.0, 1, 0.0))
    assert (recipe.format, recipe.group_size) == ("int4", 128)  # the most chosen is the default
    for name, cname in choice.items():
        scheme = recipe.scheme_for(name)
        assert f"{scheme.format}-g{scheme.group_size}" == cname and scheme.format_options == {"mse_fit": True}
    assert recipe.scheme_for("lm_head") is None
    assert recipe.scheme_for("model.layers.10.mlp.up_proj").format == "int4"  # no prefix match of layers.1


def test_search_end_to_end(tiny_llama, calib_text, eval_text, tmp_path):
    """Damage falls with bits on every layer; the allocation fits the budget; the recipe it writes
    quantizes to the very artifact the search wrote; the predicted damages of uniform recipes
    rank like their measured KL; a second search reuses the sensitivities."""
    out = tmp_path / "search"
    args = ["search", str(tiny_llama), "--budget", "3,4.5", "-o", str(out), "--candidates", "int2-g32,int3-g32,int4-g32,int8-g32",
            "--calib", str(calib_text), "--n-samples", "8", "--seq-len", "64", "--text", str(eval_text), "--max-tokens", "512"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    table = json.loads((out / "sensitivity.json").read_text())["layers"]
    for name, row in table.items():
        d = row["damage"]
        assert d["int2-g32"] > d["int3-g32"] > d["int4-g32"] > d["int8-g32"] >= 0, (name, d)
    for b in report["budgets"]:
        assert b["kind"] == "bpw" and b["bpw"] <= b["value"] + 1e-9 and b["measured"]["bpw"] <= b["value"] + 1e-9
        assert b["measured"]["kl"] >= 0
    low, high = report["budgets"]
    assert high["predicted_damage"] < low["predicted_damage"] and high["measured"]["kl"] < low["measured"]["kl"]

    written = Recipe.from_file(out / "bpw-3" / "recipe.yaml")
    assert written.overrides and all(o.method is None and o.format for o in written.overrides)
    again = tmp_path / "again"
    res = runner.invoke(app, ["quantize", str(tiny_llama), "-o", str(again), "--recipe", str(out / "bpw-3" / "recipe.yaml")])
    assert res.exit_code == 0, res.output
    for f in (out / "bpw-3" / "model").iterdir():
        assert (again / f.name).read_bytes() == f.read_bytes(), f.name

    res = runner.invoke(app, args[:3] + ["2.8"] + args[4:] + ["--no-verify"])
    assert res.exit_code == 0, res.output
    second = json.loads((out / "report.json").read_text())
    assert second["sensitivity_cached"] == ["int2-g32", "int3-g32", "int4-g32", "int8-g32"]
    assert second["budgets"][0]["measured"] == {}

    # one more candidate: only its column is measured; the others are read back unchanged
    more = list(args)
    more[more.index("--candidates") + 1] += ",int6-g32"
    res = runner.invoke(app, more[:3] + ["2.8"] + more[4:] + ["--no-verify"])
    assert res.exit_code == 0, res.output
    third = json.loads((out / "report.json").read_text())
    assert third["sensitivity_cached"] == second["sensitivity_cached"]
    grown = json.loads((out / "sensitivity.json").read_text())
    assert grown["candidates"] == ["int2-g32", "int3-g32", "int4-g32", "int8-g32", "int6-g32"]
    for name, row in table.items():
        assert {k: v for k, v in grown["layers"][name]["damage"].items() if k != "int6-g32"} == row["damage"]
        d = grown["layers"][name]["damage"]
        assert d["int4-g32"] > d["int6-g32"] > d["int8-g32"], (name, d)


def test_search_refuses_bad_budgets_before_any_work(tiny_llama, tmp_path):
    res = runner.invoke(app, ["search", str(tiny_llama), "--budget", "three", "-o", str(tmp_path / "s")])
    assert res.exit_code == 2 and "bits per weight" in res.output
    res = runner.invoke(app, ["search", str(tiny_llama), "--budget", "0.5", "-o", str(tmp_path / "s")])
    assert res.exit_code == 2 and "between 1 and 32" in res.output
    res = runner.invoke(app, ["search", str(tiny_llama), "--budget", "3", "-o", str(tmp_path / "s"), "--candidates", "int4"])
    assert res.exit_code == 2 and "FORMAT-gGROUP" in res.output
    assert not (tmp_path / "s").exists()
    res = runner.invoke(app, ["search", str(tiny_llama), "--size", "12 parsecs", "-o", str(tmp_path / "s")])
    assert res.exit_code == 2 and "60MB" in res.output
    res = runner.invoke(app, ["search", str(tiny_llama), "-o", str(tmp_path / "s")])
    assert res.exit_code == 2 and "--size" in res.output
    res = runner.invoke(app, ["search", str(tiny_llama), "--budget", "3", "-o", str(tiny_llama)])  # a model directory
    assert res.exit_code == 2 and "holds files of its own" in res.output
    assert not (tiny_llama / "recipe.yaml").exists() and not (tiny_llama / "sensitivity.json").exists()


def test_sizes_and_budgets_parse():
    assert parse_size("60MB") == 60_000_000 and parse_size("1.5 GiB") == 3 * 2**29 and parse_size("123") == 123
    assert parse_size(".5kb") == 500
    for bad in ("60 M", "MB", "-3MB", "1e6"):
        with pytest.raises(LowbitError, match="60MB"):
            parse_size(bad)
    budgets = parse_budgets("3,4.25", "7MB")
    assert [(b.kind, b.value, b.label) for b in budgets] == [("bpw", 3.0, "bpw-3"), ("bpw", 4.25, "bpw-4.25"),
                                                             ("size", 7e6, "size-7MB")]
    assert budgets[2].bpw_for(1_000_000, 8_000_000) == pytest.approx(6.0)  # (7 MB - 1 MB) * 8 bits / 8M weights


def test_bit_map_places_each_layer_by_block_and_kind():
    choice = {"model.layers.0.self_attn.q_proj": "a", "model.layers.0.mlp.down_proj": "b",
              "model.layers.2.mlp.down_proj": "a", "lm_head": "b"}
    bits = {n: {"a": 3.0, "b": 4.5} for n in choice}
    grid, blocks, kinds = bit_map(choice, bits)
    assert blocks == [0, 2] and kinds == ["self_attn.q_proj", "mlp.down_proj"]
    assert grid[0].tolist() == [3.0, 4.5] and grid[1, 1] == 3.0 and torch.isnan(torch.tensor(grid[1, 0]))


def test_search_under_a_size_budget_fits_it(tiny_llama, calib_text, eval_text, tmp_path):
    """A size budget: the artifact the search writes is no larger than the size asked for, and
    spends nearly all of it on the searched layers; the report gives the feasible sizes, and a
    size below them is refused with them. --frontier measures the uniform recipes too and the
    report's figure is written."""
    out = tmp_path / "search"
    common = ["-o", str(out), "--candidates", "int2-g32,int3-g32,int4-g32,int8-g32", "--calib", str(calib_text),
              "--n-samples", "4", "--seq-len", "64", "--text", str(eval_text), "--max-tokens", "256"]
    res = runner.invoke(app, ["search", str(tiny_llama), "--budget", "4", "--no-verify"] + common)
    assert res.exit_code == 0, res.output
    first = json.loads((out / "report.json").read_text())
    least, most = first["feasible_size_bytes"]
    target = int(least + 0.4 * (most - least))
    res = runner.invoke(app, ["search", str(tiny_llama), "--size", str(target), "--frontier"] + common)
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    (b,) = report["budgets"]
    size = b["measured"]["size_bytes"]
    assert size == sum(f.stat().st_size for f in Path(b["artifact"]).iterdir())
    assert size <= target
    # what is left unspent: at most the header allowance (the headers' real size is part of `size`)
    # plus the smallest upgrade that no longer fits
    table = json.loads((out / "sensitivity.json").read_text())["layers"]
    layer_names = sorted(table)
    dense_keys = [k for k in safe_open_keys(Path(b["artifact"]) / "dense.safetensors")]
    upgrade = max(max(r["bits"].values()) - min(r["bits"].values()) for r in table.values()) / 8
    assert target - size <= header_allowance(layer_names, dense_keys) + upgrade, (target, size)
    assert (out / f"size-{target}" / "recipe.yaml").is_file()  # --frontier: one directory per budget
    kls = {u["candidate"]: u["measured"]["kl"] for u in report["uniform"]}
    assert kls["int2-g32"] > kls["int3-g32"] > kls["int4-g32"] > kls["int8-g32"]
    assert report["plot"] == "report.png" and (out / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert "report.png" in (out / "report.md").read_text()

    res = runner.invoke(app, ["search", str(tiny_llama), "--size", str(least - 1000), "--no-verify"] + common)
    assert res.exit_code == 2 and f"{least / 1e6:.2f} MB" in res.output


def _skewed_problem():
    """Twelve layers whose true cost is not the table's sum: down_proj's damage counts five times."""
    rng = random.Random(3)
    costs = {}
    for i in range(6):
        for kind in ("self_attn.q_proj", "mlp.down_proj"):
            n = rng.choice([64, 128])
            costs[f"model.layers.{i}.{kind}"] = LayerCost(
                n, {c: b * n for c, b in zip("abcd", (2, 3, 4, 8))},
                {c: rng.uniform(0.5, 2.0) * 4.0**-b * n for c, b in zip("abcd", (2, 3, 4, 8))})

    def true_kl(choice):
        return sum(costs[n].damage[c] * (5.0 if n.endswith("down_proj") else 1.0) for n, c in choice.items())
    return costs, true_kl


def test_the_surrogate_learns_what_the_sum_misses():
    """Fitted on measured configurations whose KL weighs one module kind more than the table
    does, the surrogate ranks unseen configurations better than the additive estimate (leave one
    out) and proposes an allocation within the budget that is truly better than the additive optimum."""
    from scipy.stats import spearmanr

    from lowbit.mixed.surrogate import Surrogate, leave_one_out, propose

    costs, true_kl = _skewed_problem()
    rng = random.Random(0)
    low, high = feasible_range(costs)
    samples = []
    for _ in range(40):
        noisy = {n: LayerCost(c.weights, c.bits, {k: v * rng.lognormvariate(0, 1.0) for k, v in c.damage.items()})
                 for n, c in costs.items()}
        samples.append(allocate(noisy, rng.uniform(low + 0.1, low + 0.6 * (high - low))).choice)
    kls = [true_kl(c) for c in samples]
    additive = [sum(costs[n].damage[c] for n, c in ch.items()) for ch in samples]
    loo = leave_one_out(samples, kls, costs)
    assert spearmanr(loo, kls).statistic > spearmanr(additive, kls).statistic

    budget = low + 0.3 * (high - low)
    plain = allocate(costs, budget)
    proposed = propose(costs, budget, Surrogate.fit(samples, kls, costs))
    assert proposed.bpw <= budget + 1e-9
    assert true_kl(proposed.choice) < true_kl(plain.choice)
