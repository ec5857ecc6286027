"""The Python entry point for any PyTorch model with Conv2d and Linear layers, in the way
torchao's `quantize_(model, config)` and llm-compressor's `oneshot(model, recipe)` work:

    import lowbit
    report = lowbit.quantize(model, lowbit.Recipe(format="int4", method="gptq", act="int8"), calib=images)
    report = lowbit.quantize(model, lowbit.Recipe(format="int4", act="int8", data_free="zeroq"))   # no data
    lowbit.save(model, "out/", source=model.lowbit_source)      # what was done, for the header
    model = lowbit.load("out/", model=MyNet())                   # your skeleton (its batch norms folded for you)
    # a factory lowbit builds (MobileNetV2) needs no skeleton:
    lowbit.save(model, "out/", source={**model.lowbit_source, "kind": "image-classifier", "factory": "mobilenet-v2"})

The same Recipe object the CLI builds; its public keys here are `format`, `method`, `group_size`,
`act`, `data_free`, `budget`. Language models go through `lowbit quantize` / `lowbit.pipeline`,
which calibrate on token windows.
"""

from __future__ import annotations

import torch
from torch import nn

from .recipe import Recipe


def quantize(model: nn.Module, recipe: Recipe | None = None, calib: torch.Tensor | None = None, **keys):
    """Quantize `model`'s Conv2d and Linear layers in place (batch norms folded first) and return the
    report. `calib`: input batches stacked ([n, ...], what the model's forward takes) for GPTQ,
    activation ranges and budgets; none with `data_free="zeroq"` (inputs distilled from the model's
    BatchNorm statistics; image-shaped, 3 x 224 x 224). `keys` build a Recipe when none is given."""
    from .vision.run import quantize_cnn

    recipe = recipe if recipe is not None else Recipe(**keys)
    if "group_size" not in recipe.model_fields_set and not keys.get("group_size"):
        recipe = Recipe.from_dict({**recipe.model_dump(mode="json", exclude_unset=True), "group_size": -1})
    _, report, record = quantize_cnn(model, recipe, calib)
    model.lowbit_source = record  # what `lowbit.save(model, dir, source=model.lowbit_source)` should record
    return report
