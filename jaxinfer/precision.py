"""Default parameter/compute precision per backend.

XLA:CPU runs bfloat16 matmuls several times slower than float32, so CPU defaults to float32;
GPUs and TPUs default to bfloat16. Users override with an explicit dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def default_dtype(backend: str | None = None):
    """float32 on CPU, bfloat16 elsewhere."""
    backend = backend or jax.default_backend()
    return jnp.float32 if backend == "cpu" else jnp.bfloat16


def resolve_dtype(dtype=None):
    """A jnp dtype from None (backend default), a name ("float32") or a dtype."""
    if dtype is None:
        return default_dtype()
    if isinstance(dtype, str):
        from jaxinfer.errors import InputError

        if dtype not in DTYPES:
            raise InputError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        return DTYPES[dtype]
    return jnp.dtype(dtype).type
