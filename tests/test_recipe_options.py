"""Format options in recipes and on the command line: they reach the grid, a bad one is refused
at load naming `format_options`, overrides inherit or reset them, and artifacts record them."""

import pytest
from typer.testing import CliRunner

from lowbit.artifact import read_header
from lowbit.cli import app, build_recipe, parse_format_options
from lowbit.formats import ClippedGrid, SearchSpace
from lowbit.recipe import Recipe, RecipeError


def test_options_reach_the_grid():
    assert Recipe(format="power4", format_options={"alpha": 1.5}).grid().alpha == 1.5
    assert Recipe(format="lut", format_options={"levels": [-1, 0, 0.5, 1]}).grid().levels.tolist() == [-1, 0, 0.5, 1]
    assert Recipe(format="fp4_e2m1", format_options={"subnormals": False}).grid().subnormals is False
    clipped = Recipe(format="nf4", format_options={"clip": 0.9}).grid()
    assert isinstance(clipped, ClippedGrid) and clipped.spec() == {"format": "nf4", "clip": 0.9}
    assert Recipe(format="int4", symmetric=True, format_options={"clip": 0.8}).grid().spec()["clip"] == 0.8
    space = Recipe(format="fp4_search", format_options={"clips": [1.0, 0.8], "splits": ["e2m1"]}).grid()
    assert isinstance(space, SearchSpace) and [g.spec().get("clip", 1.0) for g in space.candidates] == [1.0, 0.8]


@pytest.mark.parametrize("data,message", [
    ({"format": "power4", "format_options": {"alpah": 2}}, "'format_options': format 'power4' does not take option(s) alpah"),
    ({"format": "lut"}, "'format_options': format 'lut' needs its table"),
    ({"format": "lut", "format_options": {"levels": [0, 1, 1]}}, "'format_options': .*distinct"),
    ({"format": "int4", "format_options": {"clip": 0.9}}, "'format_options': .*clip .*--sym"),
    ({"format": "nf4", "format_options": {"clip": 1.5}}, "'format_options': .*clip is a number in"),
    ({"format": "fp4_search", "format_options": {"splits": ["e2m2"]}}, "'format_options': .*e2m2"),
    ({"format": "power4", "overrides": [{"pattern": "q_proj", "format_options": {"beta": 1}}]}, "'overrides': override 0 .*format_options: .*beta"),
    ({"format": "power4", "format_options": {"alpha": 1.5}, "overrides": [{"pattern": "q", "format": "int4"}], "symmetric": True}, None),
    ({"method": "ptq161", "format": "fp4_search"}, "'format_options': method ptq161 .*not a search"),
])
def test_bad_options_are_refused_naming_the_key(data, message):
    if message is None:  # a new format in an override drops the base's options: valid
        Recipe.from_dict(data)
        return
    with pytest.raises(RecipeError, match="recipe key " + message.replace("(", r"\(").replace(")", r"\)")):
        Recipe.from_dict(data)


def test_overrides_inherit_or_reset_options():
    r = Recipe.from_dict({
        "format": "power4", "format_options": {"alpha": 1.5},
        "overrides": [
            {"pattern": r"q_proj", "format_options": {"alpha": 2.0}},
            {"pattern": r"k_proj", "format": "int8"},
            {"pattern": r"v_proj", "method": "rtn"},
        ],
    })
    assert r.scheme_for("model.layers.0.self_attn.q_proj").grid().alpha == 2.0
    assert r.scheme_for("model.layers.0.self_attn.k_proj").format_options == {}
    assert r.scheme_for("model.layers.0.self_attn.v_proj").grid().alpha == 1.5
    assert r.scheme_for("model.layers.0.mlp.up_proj").grid().alpha == 1.5


def test_calibration_need():
    assert Recipe(method="gptq").needs_calibration
    assert not Recipe(method="rtn").needs_calibration
    assert Recipe(method="rtn", format="fp4_search").needs_calibration
    assert Recipe(method="ptq161").needs_calibration
    assert Recipe(method="rtn", overrides=[{"pattern": "x", "format": "power3_search"}]).needs_calibration


def test_yaml_round_trip(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("method: rtn\nformat: lut\nformat_options: {levels: [-1, 0, 1]}\n")
    r = Recipe.from_file(f)
    assert r.grid().levels.tolist() == [-1, 0, 1]
    assert Recipe.from_dict(r.to_dict()) == r


def test_cli_option_parsing(tmp_path):
    opts = parse_format_options(["alpha=1.5", "levels=[-1,0,1]", "scale_rule=mse", "subnormals=false", "name=a=b"])
    assert opts == {"alpha": 1.5, "levels": [-1, 0, 1], "scale_rule": "mse", "subnormals": False, "name": "a=b"}
    with pytest.raises(RecipeError, match="KEY=VALUE"):
        parse_format_options(["alpha"])
    r = build_recipe(None, "rtn", "power3", None, None, None, None, None, None, None, None, None, ["alpha=2"])
    assert r.grid().alpha == 2.0
    f = tmp_path / "r.yaml"
    f.write_text("format: power4\nformat_options: {alpha: 1.5}\n")
    assert build_recipe(f, None, None, None, None, None, None, None, None, None, None, None).grid().alpha == 1.5
    assert build_recipe(f, None, None, None, None, None, None, None, None, None, None, None, ["alpha=1.75"]).grid().alpha == 1.75
    assert build_recipe(f, None, "nf4", None, None, None, None, None, None, None, None, None).format_options == {}
    with pytest.raises(RecipeError, match="format_options"):
        build_recipe(None, None, "power4", None, None, None, None, None, None, None, None, None, ["alpah=2"])


def test_cli_quantize_with_format_options(tiny_llama, tmp_path):
    out = tmp_path / "out"
    res = CliRunner(env={"COLUMNS": "200"}).invoke(app, [
        "quantize", str(tiny_llama), "--method", "rtn", "--format", "power3", "--format-option", "alpha=2.0",
        "--group-size", "32", "-o", str(out),
    ])
    assert res.exit_code == 0, res.output
    header = read_header(out)
    assert header["recipe"]["format_options"] == {"alpha": 2.0}
    assert {m["grid"]["alpha"] for m in header["modules"].values()} == {2.0}
    res = CliRunner().invoke(app, ["quantize", str(tiny_llama), "--format", "power3", "--format-option", "alpah=2", "-o", str(tmp_path / "x")])
    assert res.exit_code == 2 and "format_options" in res.output


def test_preprocess_steps_flag_sets_the_recipe_section(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("method: ptq161\nformat: int4\npreprocess: {steps: 5, rank: 8}\n")
    r = build_recipe(f, None, None, None, None, None, None, None, None, None, None, None, None, 100)
    assert (r.preprocess.steps, r.preprocess.rank) == (100, 8)  # the flag wins, the file's other keys stay
    assert build_recipe(f, None, None, None, None, None, None, None, None, None, None, None).preprocess.steps == 5
    with pytest.raises(RecipeError, match="steps"):
        build_recipe(None, None, None, None, None, None, None, None, None, None, None, None, None, -1)
