"""One family of errors, each message naming the file or value that was wrong."""


class Blip2Error(Exception):
    """Base of every error this package raises on purpose."""


class ImageError(Blip2Error):
    """An image could not be read or decoded (missing, corrupt, not an image, too large)."""


class CheckpointError(Blip2Error):
    """A checkpoint could not be found, read or mapped (missing or unexpected keys, wrong shapes)."""


class ConfigError(Blip2Error):
    """A configuration value is missing or invalid."""


class GenerationError(Blip2Error):
    """Generation options are invalid (e.g. num_beams < 1)."""
