"""`quantize(params, rules)`: a functional transform of the params tree (models never change).

Paths are those of `jaxinfer.paths`: "embed", "layers/attn/q", "layers/mlp/down", "lm_head",
"wte", ... Leaves under "layers" are stacked [L, ...] (or per layer, "layers/3/attn/q"): they are
quantized per layer slice (a scale or group never spans layers) and stay stacked, so `nn.scan`
slices the quantized leaf like the float one.

Rules are (pattern, scheme) pairs; the first rule whose pattern matches a weight matrix decides
its scheme (None keeps it float). Patterns are globs over whole paths: `*` and `?` stay within one
path segment, `**` crosses segments, `[abc]` is a character class and `{a,b}` an alternative.
Only weight matrices (2-D per layer, and per expert) are ever quantized: biases and norms never
are, and a rule that matches no weight matrix is an error. Quantized leaves are never quantized
again, with one exception: an Int8 rule on an N:M sparse leaf with float values gives it int8
values (2:4 + int8).

Matrix layouts: lookup tables (the embeddings, whose first logical axis is "vocab" or
"positions") are [rows, dim] and quantized per row (OUT_IN: rows are gathered, and the tied LM
head contracts their dim); every other matrix is a [in, out] projection (IN_OUT).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer import paths
from jaxinfer.errors import InputError
from jaxinfer.quant.base import IN_OUT, OUT_IN, QuantizedWeight
from jaxinfer.quant.nm import NMSparseWeight
from jaxinfer.quant.schemes import Int8, Scheme, as_scheme

# Attention and MLP projections of every family (Llama: q k v o gate up down; GPT-2: qkv o fc
# proj; a MoE layer's experts: moe/gate up down, each expert's matrix on its own). Biases,
# norms, embeddings, the LM head and the MoE router (its top-k choice) are left alone.
DEFAULT_PATTERNS = ("layers/attn/{q,k,v,o,qkv}", "layers/{mlp,moe}/{gate,up,down,fc,proj}")


# ----------------------------------------------------------------------------- leaf kinds


def matrix_layout(path: str) -> str:
    """OUT_IN for lookup tables (embeddings: rows are gathered), IN_OUT for everything else."""
    return OUT_IN if paths.is_lookup_table(path) else IN_OUT


def is_matrix(path: str, leaf) -> bool:
    """A float array that is a 2-D matrix (per layer for stacked leaves, per expert for a MoE
    layer's experts: `paths.matrix_lead`)."""
    if not isinstance(leaf, jax.Array | np.ndarray) or not jnp.issubdtype(leaf.dtype, jnp.floating):
        return False
    stacked = int(paths.is_stacked(path))
    if leaf.ndim == 2 + stacked:  # the common case, without asking the declared axes
        return True
    return leaf.ndim > 2 + stacked and leaf.ndim == 2 + paths.matrix_lead(path)


def _in_dim(path: str, leaf) -> int:
    return leaf.shape[-2] if matrix_layout(path) == IN_OUT else leaf.shape[-1]


# ----------------------------------------------------------------------------- patterns


def glob_regex(pattern: str) -> re.Pattern:
    """Compile a path glob (see the module docstring) to a regex matched against whole paths."""
    if not isinstance(pattern, str) or not pattern:
        raise InputError(f"a rule pattern must be a non-empty string, got {pattern!r}")
    try:
        return re.compile(_translate(pattern) + r"\Z")
    except (ValueError, re.error) as e:
        raise InputError(f"bad rule pattern {pattern!r}: {e}") from None


def _translate(p: str, in_braces: bool = False) -> str:
    out, i = [], 0
    while i < len(p):
        c = p[i]
        if p.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            j = p.find("]", i + 2 if p[i + 1:i + 2] in ("!", "]") else i + 1)
            if j < 0:
                raise ValueError("unclosed '['")
            body = p[i + 1:j]
            body = "^" + body[1:] if body.startswith("!") else body
            out.append("[" + body.replace("\\", "\\\\") + "]")
            i = j
        elif c == "{":
            if in_braces:
                raise ValueError("nested '{' is not supported")
            j = p.find("}", i)
            if j < 0:
                raise ValueError("unclosed '{'")
            alts = [_translate(a, True) for a in p[i + 1:j].split(",")]
            out.append("(?:" + "|".join(alts) + ")")
            i = j
        elif c == "}":
            raise ValueError("unmatched '}'")
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


def _rules(rules, scheme) -> list[tuple[str, re.Pattern, Scheme | None]]:
    if rules is None:
        if scheme is None:
            raise InputError("quantize needs rules or a scheme")
        s = as_scheme(scheme)
        return [(p, glob_regex(p), s) for p in DEFAULT_PATTERNS]
    if scheme is not None:
        raise InputError("pass either rules or scheme to quantize, not both")
    if isinstance(rules, Mapping):
        rules = list(rules.items())
    if isinstance(rules, str | bytes) or not hasattr(rules, "__iter__"):
        raise InputError(f"rules must be a list of (pattern, scheme) pairs, got {rules!r:.80}")
    out = []
    for rule in rules:
        if not isinstance(rule, tuple | list) or len(rule) != 2:
            raise InputError(f"a rule must be a (pattern, scheme) pair, got {rule!r:.80}")
        pattern, s = rule
        out.append((pattern, glob_regex(pattern), as_scheme(s)))
    if not out:
        raise InputError("rules is empty")
    return out


# ----------------------------------------------------------------------------- the transforms


def _int8_over_nm(leaf, s) -> bool:
    """An Int8 rule on an N:M leaf with float values: quantizes its kept values (2:4 + int8)."""
    return isinstance(leaf, NMSparseWeight) and leaf.scales is None and isinstance(s, Int8)


def plan(params, rules=None, *, scheme=None) -> dict[str, Scheme]:
    """path -> scheme for every weight matrix `quantize` would quantize; validates everything.

    InputError (naming the path or rule and the reason) for an unknown scheme, a group size
    that does not divide a matrix's input dimension, a rule that matches no weight matrix, or
    a rule that selects an already-quantized leaf.
    """
    compiled = _rules(rules, scheme)
    default = rules is None
    used = [False] * len(compiled)
    chosen: dict[str, Scheme] = {}
    matrices = []
    for path, leaf in paths.iter_leaves(params):
        quantized = isinstance(leaf, QuantizedWeight)
        if not quantized and not is_matrix(path, leaf):
            continue
        matrices.append(path)
        hits = [i for i, (_, rx, _) in enumerate(compiled) if rx.match(path)]
        for i in hits:
            used[i] = True
        if not hits or compiled[hits[0]][2] is None:
            continue
        pattern, _, s = compiled[hits[0]]
        if _int8_over_nm(leaf, s):
            chosen[path] = s
            continue
        if quantized:
            raise InputError(f"{path}: already quantized ({type(leaf).__name__}); rule "
                             f"{pattern!r} cannot quantize it again")
        reason = s.check(_in_dim(path, leaf))
        if reason:
            raise InputError(f"{path}: {reason}")
        chosen[path] = s
    unused = [compiled[i][0] for i in range(len(compiled)) if not used[i]]
    if default and not chosen:
        raise InputError("the default rules (attention and MLP projections: "
                         f"{', '.join(DEFAULT_PATTERNS)}) match no weight matrix of these params")
    if not default and unused:
        listing = ", ".join(matrices[:12]) + (", ..." if len(matrices) > 12 else "")
        raise InputError(f"rule pattern(s) {', '.join(map(repr, unused))} match no weight matrix "
                         f"(weight matrices: {listing or 'none'})")
    return chosen


def quantize(params, rules=None, *, scheme=None):
    """A new params tree with the selected weight matrices replaced by quantized leaves.

    rules: list of (glob pattern, scheme | scheme name | None), or a dict pattern -> scheme;
        the first matching rule wins.
    scheme: shorthand for the default rules (attention + MLP projections, see DEFAULT_PATTERNS).
    Example: quantize(params, [("layers/**", Int4(32)), ("embed", Int8())]).
    Leaves not selected are returned as they are (not copied). Raises InputError (see `plan`).
    """
    chosen = plan(params, rules, scheme=scheme)

    def fn(path, leaf):
        s = chosen.get(path)
        if s is None:
            return leaf
        try:
            if _int8_over_nm(leaf, s):
                return leaf.to_int8()
            return s.apply(leaf, matrix_layout(path))
        except ValueError as e:
            raise InputError(f"{path}: cannot quantize with {s}: {e}") from None

    return paths.map_leaves(fn, params)


def dequantize_params(params):
    """The params tree with every quantized leaf replaced by its float array (original dtype)."""
    return paths.map_leaves(lambda _, leaf: leaf.dequantize()
                            if isinstance(leaf, QuantizedWeight) else leaf, params)


def weight_bytes(params) -> int:
    """Bytes held by all parameter buffers (quantized leaves count their packed children)."""
    total = 0
    for _, leaf in paths.iter_leaves(params):
        total += int(leaf.nbytes)
    return total


def describe(params) -> dict[str, str]:
    """path -> short human description ("float32 [30, 576, 576]", "int4 g32 sym", ...)."""
    out = {}
    for path, leaf in paths.iter_leaves(params):
        if isinstance(leaf, QuantizedWeight):
            sd = leaf.scheme_dict()
            extra = " ".join(f"{k}={v}" for k, v in sd.items() if k != "name")
            out[path] = f"{sd['name']} {extra} {list(leaf.shape)}".replace("  ", " ")
        else:
            out[path] = f"{jnp.dtype(leaf.dtype).name} {list(leaf.shape)}"
    return out
