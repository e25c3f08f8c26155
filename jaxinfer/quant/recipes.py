"""Named quantization recipes used by the command line (`--quant`, `jaxinfer quantize`).

A recipe quantizes the attention and MLP projections with the chosen scheme and, unless asked
not to, the embedding table (which is also the tied LM head) and an untied LM head with int8:
the embedding is a fifth of SmolLM2's weights, and int8 costs it almost nothing in quality.
"""

from __future__ import annotations

import dataclasses

from jaxinfer import paths
from jaxinfer.errors import InputError
from jaxinfer.quant.schemes import Int4, Int8, parse_scheme
from jaxinfer.quant.transform import DEFAULT_PATTERNS, quantize

SCHEMES = ("int8", "int4", "w8a8")
METHODS = ("rtn", "gptq")


def default_group_size(params) -> int:
    """The largest of 128, 64, 32 dividing the input dim of every projection, MoE expert
    stacks included (32 if none)."""
    dims = set()
    for path, leaf in paths.iter_leaves(params):
        if paths.is_stacked(path) and getattr(leaf, "ndim", 0) - paths.matrix_lead(path) == 2:
            dims.add(leaf.shape[-2])
    for g in (128, 64, 32):
        if all(d % g == 0 for d in dims):
            return g
    return 32


def recipe_rules(params, scheme: str, group_size: int | None, symmetric: bool, embed: str):
    """(pattern, scheme) rules for a recipe. embed: "int8", "same" or "none"."""
    if scheme not in SCHEMES:
        raise InputError(f"unknown quantization scheme {scheme!r}; choose one of "
                         f"{', '.join(SCHEMES)} (or 'native' for GGUF blocks)")
    if scheme == "int4":
        main = Int4(group_size=group_size or default_group_size(params), symmetric=symmetric)
    elif group_size is not None:
        raise InputError(f"--group-size applies to int4 only, not {scheme}")
    else:
        main = parse_scheme(scheme)
    rules = [(p, main) for p in DEFAULT_PATTERNS]
    tables = [p for p, _ in paths.iter_leaves(params) if paths.is_vocab_matrix(p)]
    if embed != "none":
        extra = Int8() if (embed == "int8" or scheme == "w8a8") else main
        rules += [(t, extra) for t in tables]
    return rules


def quantize_model(model, scheme: str, *, group_size: int | None = None, symmetric: bool = True,
                   embed: str = "int8", method: str = "rtn", calibration_text: str | None = None,
                   calib_samples: int = 64, calib_len: int = 512):
    """A new Model whose params are quantized by the recipe (round-to-nearest or GPTQ)."""
    if method not in METHODS:
        raise InputError(f"unknown quantization method {method!r}; choose one of "
                         f"{', '.join(METHODS)}")
    rules = recipe_rules(model.params, scheme, group_size, symmetric, embed)
    if method == "rtn":
        return dataclasses.replace(model, params=quantize(model.params, rules))
    if scheme != "int4":
        raise InputError("--method gptq applies to int4 only")
    if not calibration_text:
        raise InputError("--method gptq needs calibration text (--calibration-file)")
    from jaxinfer.quant.calibration import calibration_ids
    from jaxinfer.quant.gptq import gptq_quantize

    main = rules[0][1]
    ids = calibration_ids(model, calibration_text, calib_samples, calib_len)
    # act_order + clip search: measured to close 72-83% of RTN int4 g64's perplexity gap on
    # SmolLM2, against 41% without (docs/QUANT_RESULTS.md).
    params = gptq_quantize(model, ids, group_size=main.group_size, symmetric=main.symmetric,
                           act_order=True, clip_search=10)
    rest = [(p, s) for p, s in rules if p not in DEFAULT_PATTERNS]
    if rest:
        params = quantize(params, rest)
    return dataclasses.replace(model, params=params)
