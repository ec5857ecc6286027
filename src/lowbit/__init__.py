"""lowbit: quantize neural networks to a bit budget, store them packed, load and measure them."""

__version__ = "0.1.0"

# the submodule lowbit.quantize is loaded first, so that binding the function `quantize` below is
# final (a submodule loaded later would rebind the package attribute to itself)
from . import quantize as _quantize_module  # noqa: E402,F401
from .api import quantize  # noqa: E402
from .artifact import load, read_header, save  # noqa: E402
from .recipe import Recipe  # noqa: E402

__all__ = ["Recipe", "__version__", "load", "quantize", "read_header", "save"]
