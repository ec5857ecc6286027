from ..errors import LowbitError
class ModelLoadError(LowbitError):
    """A model could not be found or loaded; the message says what to pass instead."""
