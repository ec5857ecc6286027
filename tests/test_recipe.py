import pytest

from lowbit.cli import build_recipe
from lowbit.recipe import Recipe, RecipeError


def test_defaults_and_scheme_lookup():
    r = Recipe()
    assert r.scheme_for("model.layers.0.mlp.down_proj").format == "int4"
    assert r.scheme_for("lm_head") is None


def test_overrides_first_match_wins_and_skip():
    r = Recipe.from_dict({
        "format": "int3",
        "overrides": [
            {"pattern": r"layers\.0\.mlp\.down_proj", "format": "int8", "group_size": -1},
            {"pattern": r"\.k_proj$", "skip": True},
            {"pattern": r"layers\.0\.", "method": "rtn"},
        ],
    })
    s = r.scheme_for("model.layers.0.mlp.down_proj")
    assert (s.format, s.group_size, s.method) == ("int8", -1, "gptq")
    assert r.scheme_for("model.layers.3.self_attn.k_proj") is None
    assert r.scheme_for("model.layers.0.self_attn.q_proj").method == "rtn"
    assert r.scheme_for("model.layers.1.self_attn.q_proj").format == "int3"


@pytest.mark.parametrize("data,key", [
    ({"format": "int9"}, "'format': unknown format 'int9'"),
    ({"fromat": "int4"}, "'fromat': unknown key"),
    ({"method": "awq"}, "'method': unknown method 'awq'"),
    ({"group_size": -5}, "'group_size'"),
    ({"overrides": [{"pattern": "(", "format": "int4"}]}, "'overrides.0.pattern'"),
    ({"overrides": [{"pattern": "x", "bits": 4}]}, "'overrides.0.bits': unknown key"),
    ({"gptq": {"damp": -1}}, "'gptq.damp'"),
    ({"calib": {"n_samples": 0}}, "'calib.n_samples'"),
])
def test_bad_recipes_name_the_key(data, key):
    with pytest.raises(RecipeError, match="recipe key " + key.replace("(", r"\(").replace(")", r"\)")):
        Recipe.from_dict(data)


def test_yaml_and_json_files(tmp_path):
    y = tmp_path / "r.yaml"
    y.write_text("method: rtn\nformat: int3\ngroup_size: 64\nignore: [lm_head, 'q_proj']\n")
    r = Recipe.from_file(y)
    assert (r.method, r.format, r.group_size) == ("rtn", "int3", 64)
    j = tmp_path / "r.json"
    j.write_text(Recipe(format="int8").model_dump_json())
    assert Recipe.from_file(j).format == "int8"
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(RecipeError, match="must hold a mapping"):
        Recipe.from_file(bad)
    with pytest.raises(RecipeError, match="not found"):
        Recipe.from_file(tmp_path / "none.yaml")


def test_cli_flags_build_the_same_recipe(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("method: rtn\nformat: int3\ngroup_size: 64\n")
    r = build_recipe(f, None, None, 4, None, True, None, 16, None, True, None, None)
    assert (r.method, r.format, r.group_size, r.symmetric, r.calib.n_samples, r.gptq.act_order) == ("rtn", "int4", 64, True, 16, True)
    with pytest.raises(RecipeError, match="disagree"):
        build_recipe(None, None, "int3", 4, None, None, None, None, None, None, None, None)
