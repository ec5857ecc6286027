"""Pick one candidate per layer so that the whole stays within a bit budget and the summed damage
is least: a multiple-choice knapsack over the layers, solved by dynamic programming over the
bits spent (ZeroQ's Pareto-frontier allocation).

The budget is cut into `UNITS` equal units and every candidate's bits are rounded up to whole
units, so a choice the program finds always fits; the rounding can leave at most one unit per
layer unspent, which a greedy pass then gives to the upgrades that remove the most damage per
extra bit. Deterministic: ties go to the candidate listed first for the layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .candidates import CandidateError
from .sensitivity import LayerCost

UNITS = 1 << 16


@dataclass
class Allocation:
    choice: dict[str, str]  # layer -> candidate name
    bits: float  # total stored bits of the searched layers
    weights: int
    damage: float  # summed estimated damage (nats per token)

    @property
    def bpw(self) -> float:
        return self.bits / self.weights


def allocation_of(costs: dict[str, LayerCost], choice: dict[str, str]) -> Allocation:
    """The allocation a choice (layer -> candidate) makes under `costs`: its bits and damage."""
    return Allocation(dict(choice), sum(costs[n].bits[c] for n, c in choice.items()), sum(c.weights for c in costs.values()),
                      sum(costs[n].damage[c] for n, c in choice.items()))


def feasible_range(costs: dict[str, LayerCost]) -> tuple[float, float]:
    """The least and the most bits per weight any allocation stores."""
    weights = sum(c.weights for c in costs.values())
    return (sum(min(c.bits.values()) for c in costs.values()) / weights,
            sum(max(c.bits.values()) for c in costs.values()) / weights)


def allocate(costs: dict[str, LayerCost], budget_bpw: float) -> Allocation:
    """The least-damage choice whose stored bits per weight (over the searched layers) are at most
    `budget_bpw`; a CandidateError names the feasible range if none is."""
    low, high = feasible_range(costs)
    if budget_bpw < low:
        raise CandidateError(f"a budget of {budget_bpw:g} bpw is below the least the candidates store "
                             f"({low:.3f} bpw): raise it to {low:.3f} or more, or add smaller candidates")
    names = list(costs)
    limit = budget_bpw * sum(c.weights for c in costs.values())
    if budget_bpw >= high:  # everything fits: each layer its least damage
        return allocation_of(costs, {n: min(costs[n].damage, key=costs[n].damage.get) for n in names})
    unit = limit / UNITS
    best = np.zeros(UNITS + 1)  # least damage of the layers so far within b units
    picks = np.empty((len(names), UNITS + 1), dtype=np.int16)
    for i, n in enumerate(names):
        cands = list(costs[n].damage)
        new = np.full(UNITS + 1, np.inf)
        pick = np.zeros(UNITS + 1, dtype=np.int16)
        for k, c in enumerate(cands):
            u = math.ceil(costs[n].bits[c] / unit - 1e-9)
            if u > UNITS:
                continue
            trial = np.full(UNITS + 1, np.inf)
            trial[u:] = best[: UNITS + 1 - u] + costs[n].damage[c]
            better = trial < new
            new[better], pick[better] = trial[better], k
        best, picks[i] = new, pick
    if not np.isfinite(best[UNITS]):  # rounding up left no room: the budget is at the very floor
        return _fill(costs, {n: min(costs[n].bits, key=costs[n].bits.get) for n in names}, limit)
    choice: dict[str, str] = {}
    b = UNITS
    for i in range(len(names) - 1, -1, -1):
        n = names[i]
        c = list(costs[n].damage)[picks[i, b]]
        choice[n] = c
        b -= math.ceil(costs[n].bits[c] / unit - 1e-9)
    return _fill(costs, {n: choice[n] for n in names}, limit)


def perturbed(costs: dict[str, LayerCost], rng, sigma: float) -> dict[str, LayerCost]:
    """`costs` with each damage times a log-normal factor exp(N(0, sigma^2)) (`rng`: random.Random):
    tables whose optima are realistic allocations other than the optimal one."""
    return {n: LayerCost(c.weights, dict(c.bits), {k: v * rng.lognormvariate(0.0, sigma) for k, v in c.damage.items()})
            for n, c in costs.items()}


def _fill(costs: dict[str, LayerCost], choice: dict[str, str], limit: float) -> Allocation:
    """Spend the bits left under `limit` on the best damage-per-bit upgrades that still fit."""
    spent = sum(costs[n].bits[c] for n, c in choice.items())
    while True:
        best: tuple[float, str, str] | None = None
        for n, cost in costs.items():
            now = choice[n]
            for c in cost.damage:
                extra = cost.bits[c] - cost.bits[now]
                gain = cost.damage[now] - cost.damage[c]
                if gain <= 0 or spent + extra > limit:
                    continue
                key = (-gain / max(extra, 1e-12), n, c)
                if best is None or key < best:
                    best = key
        if best is None:
            return allocation_of(costs, choice)
        _, n, c = best
        spent += costs[n].bits[c] - costs[n].bits[choice[n]]
        choice[n] = c
