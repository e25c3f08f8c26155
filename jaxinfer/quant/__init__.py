"""Quantization as functional transforms over the params pytree (the models never change).

Leaf types (registered pytrees; replace a float parameter in place, stacked or per layer):
  Int8Weight       int8 per-output-channel symmetric, weight-only
  Int4Weight       4-bit group-wise (32/64/128) along the input dim, symmetric or with a minimum,
                   two values per byte
  W8A8Weight       int8 weights x dynamic per-token int8 activations, int32 accumulation
  GGUFBlockWeight  ggml Q8_0 / Q4_0 / Q4_1 blocks kept packed as in a GGUF file
  NMSparseWeight   N:M (e.g. 2:4) sparse projection stored compressed (values + 4-bit indices),
                   float or int8 values (made by jaxinfer.sparse; int8 via quantize(..., Int8))
Each has matmul(x), matmul_transposed(x), take_rows(tokens), dequantize(), nbytes, shape.

Transforms: quantize(params, rules | scheme=...), dequantize_params, weight_bytes.
Schemes: Int8(), Int4(group_size, symmetric), W8A8(), parse_scheme(name, group_size).
Checkpoints of transformed models and GGUF files with their blocks kept packed are read and
written by `jaxinfer.loading` (save_quantized, load(..., keep_packed=True)); quant never imports
loading.
"""

from jaxinfer.quant.base import IN_OUT, OUT_IN, QuantizedWeight, is_quantized, stack_leaves
from jaxinfer.quant.gguf_blocks import GGUFBlockWeight, qk_row_order
from jaxinfer.quant.int4 import Int4Weight
from jaxinfer.quant.int8 import Int8Weight, W8A8Weight
from jaxinfer.quant.nm import NMSparseWeight
from jaxinfer.quant.packing import pack_nibbles, unpack_nibbles
from jaxinfer.quant.schemes import W8A8, Int4, Int8, Scheme, parse_scheme
from jaxinfer.quant.transform import (
    DEFAULT_PATTERNS,
    dequantize_params,
    describe,
    plan,
    quantize,
    weight_bytes,
)

__all__ = [
    "DEFAULT_PATTERNS", "IN_OUT", "OUT_IN", "W8A8", "GGUFBlockWeight", "Int4", "Int4Weight",
    "Int8", "Int8Weight", "NMSparseWeight", "QuantizedWeight", "Scheme", "W8A8Weight", "dequantize_params",
    "describe", "is_quantized", "pack_nibbles", "parse_scheme", "plan", "qk_row_order", "quantize",
    "stack_leaves", "unpack_nibbles", "weight_bytes",
]
