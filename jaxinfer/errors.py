"""Error types raised for bad input.

Every user-facing failure (a bad checkpoint, a bad argument) is one of these, with a message
that names the file or field and says what was expected. The CLI prints the message alone.
"""


class JaxinferError(Exception):
    """Base class of every error jaxinfer raises on purpose for bad input."""


class CheckpointError(JaxinferError):
    """A checkpoint file or directory is missing, corrupt, unsafe or unsupported."""


class ConfigError(JaxinferError):
    """A model configuration is missing a field or has an unsupported value."""


class FetchError(JaxinferError):
    """A built-in model could not be fetched or failed verification."""


class InputError(JaxinferError):
    """A user argument (prompt, sampling parameter, flag) is invalid."""
