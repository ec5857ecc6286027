"""Models in: built-in aliases, local directories, .gguf files, hub ids; and their parts."""

from .aliases import ALIASES, Alias, cache_dir
from .discovery import find_blocks, find_linears, is_linear, linear_weight, tied_parameter_names
from .errors import ModelLoadError
from .loading import LoadedModel, ModelKind, auto_class, checkpoint_dtype, load_model, model_kind, resolve

__all__ = [
    "ALIASES", "Alias", "LoadedModel", "ModelKind", "ModelLoadError", "auto_class", "cache_dir",
    "checkpoint_dtype", "find_blocks", "find_linears", "is_linear", "linear_weight", "load_model",
    "model_kind", "resolve", "tied_parameter_names",
]
