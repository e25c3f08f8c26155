"""Quantization schemes: small frozen descriptions of how to quantize one weight matrix.

  Int8()                               per-output-channel symmetric int8, weight only
  Int4(group_size=128, symmetric=True) group-wise 4-bit along the input dim, float16 scales
  W8A8()                               int8 weights x dynamic per-token int8 activations

`scheme.apply(w, layout)` returns the quantized leaf; `scheme.check(n_in)` returns the reason a
matrix with n_in inputs cannot take the scheme (or None). `parse_scheme` builds one from a name.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from jaxinfer.errors import InputError
from jaxinfer.quant.base import IN_OUT
from jaxinfer.quant.int4 import GROUP_SIZES, Int4Weight
from jaxinfer.quant.int8 import Int8Weight, W8A8Weight


@dataclasses.dataclass(frozen=True)
class Int8:
    """int8 weight-only, one float32 scale per output channel."""

    name: ClassVar[str] = "int8"

    def check(self, n_in: int) -> str | None:
        return None

    def apply(self, w, layout: str = IN_OUT) -> Int8Weight:
        return Int8Weight.from_float(w, layout=layout)


@dataclasses.dataclass(frozen=True)
class W8A8:
    """int8 weights (per output channel) and int8 activations (per token), int32 accumulation."""

    name: ClassVar[str] = "w8a8"

    def check(self, n_in: int) -> str | None:
        return None

    def apply(self, w, layout: str = IN_OUT) -> W8A8Weight:
        return W8A8Weight.from_float(w, layout=layout)


@dataclasses.dataclass(frozen=True)
class Int4:
    """4-bit, groups of `group_size` along the input dim; symmetric ([-8, 7]) or with a minimum."""

    group_size: int = 128
    symmetric: bool = True
    name: ClassVar[str] = "int4"

    def __post_init__(self):
        g = self.group_size
        if isinstance(g, bool) or not isinstance(g, int) or g <= 0 or g % 2:
            raise InputError(f"int4 group size must be a positive even integer (usually one of "
                             f"{', '.join(map(str, GROUP_SIZES))}), got {g!r}")
        if not isinstance(self.symmetric, bool):
            raise InputError(f"int4 'symmetric' must be True or False, got {self.symmetric!r}")

    def check(self, n_in: int) -> str | None:
        if n_in % self.group_size == 0:
            return None
        fits = [str(g) for g in GROUP_SIZES if n_in % g == 0]
        hint = f" (group sizes that fit: {', '.join(fits)})" if fits else ""
        return (f"int4 group size {self.group_size} does not divide the input dimension "
                f"{n_in}{hint}")

    def apply(self, w, layout: str = IN_OUT) -> Int4Weight:
        return Int4Weight.from_float(w, self.group_size, self.symmetric, layout=layout)


Scheme = Int8 | Int4 | W8A8
SCHEME_NAMES = ("int8", "int4", "w8a8")


def parse_scheme(name: str, group_size: int | None = None, symmetric: bool = True) -> Scheme:
    """"int8" | "int4" | "w8a8" (case-insensitive) -> a scheme. group_size applies to int4 only
    (default 128); `symmetric=False` gives asymmetric int4. InputError for anything else."""
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in SCHEME_NAMES:
        raise InputError(f"unknown quantization scheme {name!r}; choose one of "
                         f"{', '.join(SCHEME_NAMES)}")
    if key == "int4":
        return Int4(128 if group_size is None else group_size, symmetric)
    if group_size is not None:
        raise InputError(f"a group size applies to int4 only, not to {key}")
    if not symmetric:
        raise InputError(f"{key} is symmetric only")
    return Int8() if key == "int8" else W8A8()


def as_scheme(value) -> Scheme | None:
    """A scheme, a scheme name (see `parse_scheme`) or None ("keep float") -> scheme or None."""
    if value is None or isinstance(value, Int8 | Int4 | W8A8):
        return value
    if isinstance(value, str):
        return parse_scheme(value)
    raise InputError(f"not a quantization scheme: {value!r} (use Int8(), Int4(...), W8A8(), a "
                     "scheme name or None)")
