"""One family of errors, each message naming the file or value that was wrong."""


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (whitespace runs folded), or its type's name when it has none."""
    return " ".join(str(exc).split()) or type(exc).__name__


class Blip2Error(Exception):
    """Base of every error this package raises on purpose."""


class ImageError(Blip2Error):
    """An image could not be read or decoded. `kind` says why, in one word a program can act on: missing,
    unreadable, empty, not_an_image, unsupported, truncated, corrupt or too_large (see `blip2.images`)."""

    def __init__(self, message: str, kind: str = "corrupt") -> None:
        super().__init__(message)
        self.kind = kind

    def __reduce__(self):  # keep `kind` across processes (decoding workers pickle their errors)
        return type(self), (str(self), self.kind)


class CheckpointError(Blip2Error):
    """A checkpoint could not be found, read or mapped (missing or unexpected keys, wrong shapes)."""


class ConfigError(Blip2Error):
    """A configuration value is missing or invalid."""


class GenerationError(Blip2Error):
    """Generation options are invalid (e.g. num_beams < 1)."""


class TrainingError(Blip2Error):
    """Training cannot go on (e.g. the loss stays inf or NaN); the message says what to change."""
