"""jaxinfer: a JAX/Flax compiled inference runtime for large language models.

Main entry points: `load(source, dtype=None) -> Model`; `sparsify(params, ...)` (pruning,
see jaxinfer.sparse); quantization lives in jaxinfer.quant.
"""

from jaxinfer import profile  # noqa: F401  (first: its clock starts the "imports" phase)
from jaxinfer.errors import CheckpointError, ConfigError, FetchError, InputError, JaxinferError
from jaxinfer.loading import load
from jaxinfer.model import Model

__all__ = ["CheckpointError", "ConfigError", "FetchError", "InputError", "JaxinferError",
           "Model", "load", "sparsify"]
__version__ = "0.1.0"


def __getattr__(name):
    """`jaxinfer.sparsify`, imported on first use (it pulls in the calibration machinery)."""
    if name == "sparsify":
        from jaxinfer.sparse import sparsify

        return sparsify
    raise AttributeError(f"module 'jaxinfer' has no attribute {name!r}")
