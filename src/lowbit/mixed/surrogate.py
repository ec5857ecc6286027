"""A learned model of what a configuration costs the model (Quantune's gradient-boosted
surrogate), next to the additive estimate.

The additive estimate sums each layer's damage measured alone; it cannot see interactions (two
neighbouring layers quantized coarsely hurt more than the sum) or the saturation of the KL at
large damage. A surrogate learns the measured KL of whole configurations from a few real ones:
its features are the configuration's bits per weight and the log of its additive damage, overall
and per module kind (q_proj, down_proj, ...), so it can reweigh what the sum gets wrong. It is
fitted on log KL with scikit-learn's gradient boosting (shallow trees, as Quantune's XGBoost).

`leave_one_out` says whether it ranks unseen configurations better than the sum does;
`propose` picks, among allocations that fit a budget, the one it expects to be best.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass

import numpy as np

from .allocate import Allocation, allocate, allocation_of, perturbed
from .sensitivity import LayerCost

_KIND = re.compile(r"(?:^|\.)(?P<kind>[^.]+)$")
_FLOOR = 1e-12  # damages and KLs are logged; this keeps an exact zero finite


def module_kind(name: str) -> str:
    """The layer's last name part: model.layers.3.mlp.down_proj -> down_proj."""
    return _KIND.search(name)["kind"]


def features(choice: dict[str, str], costs: dict[str, LayerCost], kinds: list[str]) -> np.ndarray:
    """[2 + 2 * len(kinds)]: bpw and log damage overall, then per module kind."""
    out = []
    groups = [list(costs)] + [[n for n in costs if module_kind(n) == k] for k in kinds]
    for names in groups:
        weights = sum(costs[n].weights for n in names)
        out.append(sum(costs[n].bits[choice[n]] for n in names) / max(weights, 1))
        out.append(math.log(sum(costs[n].damage[choice[n]] for n in names) + _FLOOR))
    return np.asarray(out)


@dataclass
class Surrogate:
    """log KL of a configuration, learned from measured ones."""

    kinds: list[str]
    model: object  # a fitted sklearn regressor

    @classmethod
    def fit(cls, choices: list[dict[str, str]], kls: list[float], costs: dict[str, LayerCost], seed: int = 0) -> "Surrogate":
        try:
            from sklearn.ensemble import GradientBoostingRegressor
        except ImportError as exc:  # a dependency of lowbit; only a broken install lacks it
            raise ImportError("the surrogate needs scikit-learn: pip install scikit-learn") from exc
        kinds = sorted({module_kind(n) for n in costs})
        x = np.stack([features(c, costs, kinds) for c in choices])
        y = np.log(np.asarray(kls) + _FLOOR)
        model = GradientBoostingRegressor(n_estimators=300, max_depth=2, learning_rate=0.05, subsample=0.8,
                                          random_state=seed).fit(x, y)
        return cls(kinds, model)

    def predict(self, choices: list[dict[str, str]], costs: dict[str, LayerCost]) -> np.ndarray:
        """Expected KL of each configuration."""
        x = np.stack([features(c, costs, self.kinds) for c in choices])
        return np.exp(self.model.predict(x)) - _FLOOR


def leave_one_out(choices: list[dict[str, str]], kls: list[float], costs: dict[str, LayerCost]) -> list[float]:
    """Each configuration's KL as predicted by a surrogate fitted on all the others."""
    preds = []
    for i in range(len(choices)):
        rest = [j for j in range(len(choices)) if j != i]
        model = Surrogate.fit([choices[j] for j in rest], [kls[j] for j in rest], costs)
        preds.append(float(model.predict([choices[i]], costs)[0]))
    return preds


def propose(costs: dict[str, LayerCost], budget_bpw: float, surrogate: Surrogate, trials: int = 64,
            sigma: float = 0.7, seed: int = 0) -> Allocation:
    """The allocation within the budget the surrogate expects to be best: the additive optimum
    and `trials` optima of randomly reweighted tables (each damage times a log-normal factor), so
    every proposal fits the budget and is a sensible allocation, ranked by the surrogate."""
    rng = random.Random(seed)
    pool = [allocate(costs, budget_bpw)]
    pool += [allocation_of(costs, allocate(perturbed(costs, rng, sigma), budget_bpw).choice) for _ in range(trials)]
    scores = surrogate.predict([a.choice for a in pool], costs)
    return pool[int(np.argmin(scores))]
