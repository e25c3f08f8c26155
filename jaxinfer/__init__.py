"""jaxinfer: a JAX/Flax compiled inference runtime for large language models.

Main entry points: `load(source, dtype=None) -> Model`.
"""

from jaxinfer.errors import CheckpointError, ConfigError, FetchError, InputError, JaxinferError
from jaxinfer.loading import load
from jaxinfer.model import Model

__all__ = ["CheckpointError", "ConfigError", "FetchError", "InputError", "JaxinferError",
           "Model", "load"]
__version__ = "0.1.0"
