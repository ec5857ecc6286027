"""Format names, as recipes and the CLI spell them, and how to build a grid from one."""

from __future__ import annotations

import re
from typing import Any, Callable

from .base import Grid
from .int import IntGrid


class UnknownFormatError(ValueError):
    pass


# name pattern -> (builder from the regex match and options, a one-line description)
_FORMATS: list[tuple[re.Pattern[str], Callable[[re.Match[str], dict[str, Any]], Grid], str]] = [
    (
        re.compile(r"int([2-8])"),
        lambda m, o: IntGrid(int(m.group(1)), symmetric=bool(o.get("symmetric", False))),
        "uniform integer grid, 2-8 bits; options: symmetric (default false: asymmetric with a zero point)",
    ),
]

EXAMPLE_NAMES = ["int8", "int4", "int3", "int2"]


def get_grid(name: str, **options: Any) -> Grid:
    """Build the grid that `name` names (`int4`, ...) with its options (`symmetric=True`)."""
    for pattern, build, _ in _FORMATS:
        match = pattern.fullmatch(name.strip().lower())
        if match:
            return build(match, options)
    raise UnknownFormatError(
        f"unknown format {name!r}; known formats: {', '.join(EXAMPLE_NAMES)} (int2 ... int8)"
    )


def grid_from_spec(spec: dict[str, Any]) -> Grid:
    """Rebuild a grid from `Grid.spec()` (as stored in an artifact header)."""
    options = {k: v for k, v in spec.items() if k != "format"}
    return get_grid(spec["format"], **options)


def describe_formats() -> list[dict[str, str]]:
    return [{"pattern": p.pattern, "description": d} for p, _, d in _FORMATS]
