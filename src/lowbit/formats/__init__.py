"""Number formats (grids). See `base.Grid` for the interface every format implements."""

from .base import Grid, ParamField, Params, round_to_fp16
from .int import IntGrid
from .layout import GroupLayout
from .registry import UnknownFormatError, describe_formats, get_grid, grid_from_spec

__all__ = [
    "Grid", "GroupLayout", "IntGrid", "ParamField", "Params", "UnknownFormatError",
    "describe_formats", "get_grid", "grid_from_spec", "round_to_fp16",
]
