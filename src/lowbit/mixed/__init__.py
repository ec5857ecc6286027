"""Mixed precision: the best model under a budget (`lowbit search`). `candidates`: what a layer
may get; `sensitivity`: what each choice costs the model; `budget`: bits per weight or a size on disk; `allocate`: the choice under a budget; `plot`: the report's figure; `surrogate`: a learned model of a configuration's KL (Quantune);
`run`: the search end to end, recipe, artifact and report."""

from .allocate import Allocation, allocate, feasible_range
from .budget import Budget, parse_budgets, parse_size
from .candidates import DEFAULT_CANDIDATES, Candidate, CandidateError, parse_candidates
from .run import run_search, searched_recipe
from .sensitivity import LayerCost, measure_sensitivities

__all__ = ["Allocation", "Budget", "Candidate", "CandidateError", "DEFAULT_CANDIDATES", "LayerCost", "allocate", "feasible_range",
           "measure_sensitivities", "parse_budgets", "parse_candidates", "parse_size", "run_search", "searched_recipe"]
