"""Number formats (grids). See `base.Grid` for the interface every format implements."""

from .base import Grid, ParamField, Params, round_to_fp16
from .binary import BinaryGrid
from .int import IntGrid
from .layout import GroupLayout
from .log import LogGrid
from .lookup import LookupGrid, NormalFloatGrid
from .minifloat import MinifloatGrid, MXFP4Grid, NVFP4Grid
from .power import PowerGrid
from .registry import FormatOptionError, UnknownFormatError, describe_formats, get_grid, grid_from_spec
from .ternary import TernaryGrid

__all__ = [
    "BinaryGrid", "FormatOptionError", "Grid", "GroupLayout", "IntGrid", "LogGrid", "LookupGrid", "MXFP4Grid",
    "MinifloatGrid", "NVFP4Grid", "NormalFloatGrid", "ParamField", "Params", "PowerGrid", "TernaryGrid",
    "UnknownFormatError", "describe_formats", "get_grid", "grid_from_spec", "round_to_fp16",
]
