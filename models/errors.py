"""Errors users see: each message is one line naming the problem and what to do."""


class HalflabelError(Exception):
    """Base for errors shown to users as one clear line (no traceback)."""


class ModelNotFoundError(HalflabelError):
    """No such model name or version in the repository."""


class TamperedArtifactError(HalflabelError):
    """An artifact's files do not match the checksums in its manifest."""


class InvalidArtifactError(HalflabelError):
    """An artifact is missing files or its manifest does not parse."""


class InvalidImageError(HalflabelError):
    """Bytes that are not a decodable image, or an image over the pixel limit."""


class UnknownClassError(HalflabelError):
    """A label that is not one of the model's classes."""
