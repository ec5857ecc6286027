"""lowbit: quantize neural networks to a bit budget, store them packed, load and measure them."""

__version__ = "0.1.0"

from .artifact import load, read_header, save  # noqa: E402
from .recipe import Recipe  # noqa: E402

__all__ = ["Recipe", "__version__", "load", "read_header", "save"]
