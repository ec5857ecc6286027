"""The one error type for bad input: every refusal lowbit makes (a model, recipe, artifact, path,
text or flag it cannot use) is a `LowbitError` whose message names the file or key and the fix.
The CLI prints it as one line and exits with code 2; anything else is a bug (exit 1)."""


class LowbitError(ValueError):
    """Bad input, explained: what is wrong, where, and what to pass instead."""


class ArtifactError(LowbitError):
    """An artifact (or an output path for one) that lowbit refuses: the message names the file."""
