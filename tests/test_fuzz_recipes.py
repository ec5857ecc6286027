"""Random recipe documents (seeded): each one is a Recipe or a RecipeError naming a key, never
another exception; the same for recipe files that are not YAML, nested past any limit, or huge."""

import random

import pytest

from lowbit.recipe import Recipe, RecipeError

KEYS = ["method", "format", "format_options", "group_size", "symmetric", "ragged", "gptq", "ptq161", "calib",
        "preprocess", "ignore", "overrides", "pattern", "skip", "damp", "act_order", "block_size", "seq_len",
        "n_samples", "levels", "alpha", "clip", "steps", "typo"]
VALUES = [None, True, False, 0, 1, -1, 7, 128, 2**70, 0.5, 1.5, -2.0, float("nan"), float("inf"), "", "int4", "int9",
          "gptq", "rtn", "ptq161", "nf4", "lut", "fp4_search", "mxfp4", "ternary", "auto", "[", "(?", ".*", [],
          [0.1, 0.2], [-1, 0, 1], ["lm_head"], {}, {"clip": 0.9}, {"symmetric": "yes"}, {"levels": [1, 1]}]


def random_doc(rng: random.Random, depth: int = 0):
    doc = {}
    for _ in range(rng.randrange(1, 6)):
        key = rng.choice(KEYS)
        if depth < 2 and rng.random() < 0.3:
            value = random_doc(rng, depth + 1)
        elif depth < 2 and rng.random() < 0.15:
            value = [random_doc(rng, depth + 1) for _ in range(rng.randrange(3))]
        else:
            value = rng.choice(VALUES)
        doc[key] = value
    return doc


def test_random_recipe_documents():
    rng = random.Random(0)
    outcomes = {"ok": 0, "refused": 0}
    for _ in range(3000):
        doc = random_doc(rng)
        try:
            Recipe.from_dict(doc)
            outcomes["ok"] += 1
        except RecipeError:
            outcomes["refused"] += 1
    assert outcomes["ok"] > 10 and outcomes["refused"] > 1000, outcomes


@pytest.mark.parametrize("text", [
    "[" * 100000 + "]" * 100000, "{a: [" * 5000, "- - - - - -\n" * 10, "method: [gptq", "\x00\x01\x02", "12",
    "format: int4\nformat_options: {symmetric: 3}",
])
def test_bad_recipe_files(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError):
        Recipe.from_file(path)
