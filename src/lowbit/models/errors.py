class ModelLoadError(RuntimeError):
    """A model could not be found or loaded; the message says what to pass instead."""
