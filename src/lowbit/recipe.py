"""A declarative quantization recipe: which layers, which grid, which algorithm.

    method: gptq            # rtn | gptq
    format: int4            # a grid name (see `lowbit formats`)
    group_size: 128         # > 0 groups along in_features, -1 per output channel, 0 per tensor
    symmetric: false
    ragged: short-last      # a width the group size does not divide: shorter last group, or "error"
    gptq: {damp: 0.01, block_size: 128, act_order: false}
    calib: {seq_len: 512, n_samples: 128, seed: 0}
    ignore: [lm_head]       # regexes (re.search on the module name): keep these layers unquantized
    overrides:              # first matching pattern wins; unset keys keep the defaults above
      - {pattern: "layers\\.0\\.mlp\\.down_proj", format: int8}

YAML or JSON; CLI flags build the same object. Unknown keys are refused with their name.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .algos import METHODS
from .formats import UnknownFormatError, get_grid


class RecipeError(ValueError):
    pass


def _check_format(name: str) -> str:
    try:
        get_grid(name)
    except UnknownFormatError as exc:
        raise ValueError(str(exc)) from None
    return name.lower()


def _check_method(name: str) -> str:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(METHODS)}")
    return name


def _check_group_size(g: int) -> int:
    if g < -1:
        raise ValueError("group_size must be > 0, -1 (per output channel) or 0 (per tensor)")
    return g


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Scheme(_Strict):
    """How one layer is quantized."""

    method: str = "gptq"
    format: str = "int4"
    group_size: int = 128
    symmetric: bool = False

    _format = field_validator("format")(classmethod(lambda cls, v: _check_format(v)))
    _method = field_validator("method")(classmethod(lambda cls, v: _check_method(v)))
    _group = field_validator("group_size")(classmethod(lambda cls, v: _check_group_size(v)))

    def grid(self):
        return get_grid(self.format, symmetric=self.symmetric)


class Override(_Strict):
    pattern: str
    skip: bool = False
    method: str | None = None
    format: str | None = None
    group_size: int | None = None
    symmetric: bool | None = None

    @field_validator("pattern")
    @classmethod
    def _regex(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as exc:
            raise ValueError(f"pattern {v!r} is not a valid regular expression: {exc}") from None
        return v

    _format = field_validator("format")(classmethod(lambda cls, v: None if v is None else _check_format(v)))
    _method = field_validator("method")(classmethod(lambda cls, v: None if v is None else _check_method(v)))
    _group = field_validator("group_size")(classmethod(lambda cls, v: None if v is None else _check_group_size(v)))


class GPTQOptions(_Strict):
    damp: float = Field(0.01, gt=0, le=1)
    block_size: int = Field(128, ge=1)
    act_order: bool = False


class CalibOptions(_Strict):
    path: str | None = None  # a text file; None: the default calibration text
    seq_len: int = Field(512, ge=8)
    n_samples: int = Field(128, ge=1)
    batch_size: int = Field(8, ge=1)
    seed: int = 0


class Recipe(Scheme):
    ragged: Literal["short-last", "error"] = "short-last"
    gptq: GPTQOptions = GPTQOptions()
    calib: CalibOptions = CalibOptions()
    ignore: list[str] = ["lm_head"]
    overrides: list[Override] = []

    @field_validator("ignore")
    @classmethod
    def _regexes(cls, v: list[str]) -> list[str]:
        for p in v:
            try:
                re.compile(p)
            except re.error as exc:
                raise ValueError(f"ignore pattern {p!r} is not a valid regular expression: {exc}") from None
        return v

    @model_validator(mode="after")
    def _defaults_build(self) -> "Recipe":
        get_grid(self.format, symmetric=self.symmetric)
        return self

    def scheme_for(self, module_name: str) -> Scheme | None:
        """The scheme for one module, or None if it stays unquantized."""
        base = Scheme(method=self.method, format=self.format, group_size=self.group_size, symmetric=self.symmetric)
        for o in self.overrides:
            if re.search(o.pattern, module_name):
                if o.skip:
                    return None
                changes = {k: v for k, v in o.model_dump(exclude={"pattern", "skip"}).items() if v is not None}
                return base.model_copy(update=changes)
        if any(re.search(p, module_name) for p in self.ignore):
            return None
        return base

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, data: dict) -> "Recipe":
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise RecipeError(describe_validation_error(exc)) from None

    @classmethod
    def from_file(cls, path: str | Path) -> "Recipe":
        p = Path(path)
        if not p.is_file():
            raise RecipeError(f"recipe file {p} not found")
        text = p.read_text(encoding="utf-8")
        try:
            data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as exc:
            raise RecipeError(f"recipe file {p} is not valid {'JSON' if p.suffix == '.json' else 'YAML'}: {exc}") from None
        if not isinstance(data, dict):
            raise RecipeError(f"recipe file {p} must hold a mapping of keys (method, format, ...)")
        return cls.from_dict(data)


def describe_validation_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(part) for part in err["loc"]) or "(recipe)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check its spelling; see `lowbit quantize --help`)"
        lines.append(f"recipe key '{key}': {msg}")
    return "invalid recipe:\n  " + "\n  ".join(lines)
