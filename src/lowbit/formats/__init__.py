"""Number formats (grids). See `base.Grid` for the interface every format implements."""

from .base import Grid, ParamField, Params, round_to_fp16
from .binary import BinaryGrid
from .clip import ClippedGrid
from .int import IntGrid, IntMinGrid
from .kquant import KQuantGrid
from .layout import GroupLayout
from .log import LogGrid
from .lookup import LookupGrid, NormalFloatGrid
from .minifloat import MinifloatGrid, MXFP4Grid, NVFP4Grid
from .nested import NestedIntGrid
from .power import PowerGrid
from .registry import (
    FormatOptionError, MissingFormatOptionError, UnknownFormatError, describe_formats, get_format, get_grid, grid_from_spec,
)
from .search import SearchSpace
from .ternary import TernaryGrid

__all__ = [
    "BinaryGrid", "ClippedGrid", "FormatOptionError", "Grid", "GroupLayout", "IntGrid", "IntMinGrid", "KQuantGrid", "LogGrid",
    "LookupGrid", "MXFP4Grid", "MinifloatGrid", "MissingFormatOptionError", "NVFP4Grid", "NestedIntGrid", "NormalFloatGrid",
    "ParamField", "Params", "PowerGrid", "SearchSpace", "TernaryGrid", "UnknownFormatError", "describe_formats",
    "get_format", "get_grid", "grid_from_spec", "round_to_fp16",
]
