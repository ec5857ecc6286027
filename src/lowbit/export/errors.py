from ..errors import LowbitError


class ExportError(LowbitError):
    """An artifact (or part of one) that the requested export format cannot hold exactly."""
