"""Mixed precision: the best model under a budget (`lowbit search`). `candidates`: what a layer
may get; `sensitivity`: what each choice costs the model; `allocate`: the choice under a budget;
`run`: the search end to end, recipe, artifact and report."""

from .allocate import Allocation, allocate, feasible_range
from .candidates import DEFAULT_CANDIDATES, Candidate, CandidateError, parse_candidates
from .run import run_search, searched_recipe
from .sensitivity import LayerCost, measure_sensitivities

__all__ = ["Allocation", "Candidate", "CandidateError", "DEFAULT_CANDIDATES", "LayerCost", "allocate", "feasible_range",
           "measure_sensitivities", "parse_candidates", "run_search", "searched_recipe"]
