"""`prune_model`: the whole pruning pipeline behind `jaxinfer prune` and the benchmark script.

  1. masks      magnitude | wanda (calibrated) | nm (N:M, Wanda or magnitude score) |
                structured (FFN channels, and optionally heads; calibrated score when text is
                given)
  2. recovery   optional distillation from the dense model on the calibration text, masks fixed
                (`recover.distill`, optionally mixed precision)
  3. storage    N:M weights compressed into `NMSparseWeight`; optional int8 quantization on top
                (the projection values of N:M leaves, and everything the int8 recipe covers)
Every argument is checked (`check_prune_args`) before any model work starts.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxinfer.errors import InputError
from jaxinfer.quant.calibration import calibration_ids
from jaxinfer.quant.nm import check_nm
from jaxinfer.sparse.sparsify import (
    check_sparsity,
    compress_nm,
    sparsify,
    sparsity_report,
    wanda_sparsify,
)
from jaxinfer.sparse.structured import check_structured, prune_structured, structured_norms

METHODS = ("magnitude", "wanda", "nm", "structured")
SCORES = ("wanda", "magnitude")


@dataclasses.dataclass(frozen=True)
class PruneSettings:
    """What to prune and how (see `prune_model`)."""

    method: str
    sparsity: float = 0.5  # unstructured fraction, or FFN channel fraction (structured)
    n: int = 2
    m: int = 4
    score: str | None = None  # nm: "wanda" | "magnitude" (default: wanda when text is given)
    head_sparsity: float = 0.0  # structured: fraction of each GQA group's query heads
    calib_samples: int = 32
    calib_len: int = 256
    recover_steps: int = 0
    recover_samples: int = 256  # windows of recover_len tokens cut from the text for recovery
    recover_len: int = 128
    recover_batch: int = 2
    learning_rate: float = 5e-5
    mixed_precision: bool = False
    quant: str | None = None  # None | "int8"


def check_prune_args(s: PruneSettings, has_text: bool) -> str:
    """Validate settings; returns the score used ("wanda" or "magnitude")."""
    if s.method not in METHODS:
        raise InputError(f"unknown pruning method {s.method!r}; choose one of {', '.join(METHODS)}")
    if s.method == "nm":
        reason = check_nm(s.n, s.m)
        if reason:
            raise InputError(reason)
    else:
        check_sparsity(s.sparsity)
    check_sparsity(s.head_sparsity)
    if s.head_sparsity and s.method != "structured":
        raise InputError("head sparsity applies to --method structured only")
    if s.score:
        score = s.score
    elif s.method == "magnitude":
        score = "magnitude"
    else:
        score = "wanda" if has_text or s.method == "wanda" else "magnitude"
    if score not in SCORES:
        raise InputError(f"unknown score {score!r}; choose one of {', '.join(SCORES)}")
    if s.method == "magnitude" and score != "magnitude":
        raise InputError("--method magnitude uses the magnitude score")
    if (s.method == "wanda" or score == "wanda") and not has_text:
        raise InputError(f"--method {s.method} with the Wanda score needs calibration text "
                         "(--calibration-file)")
    if s.recover_steps < 0:
        raise InputError(f"recover steps must be >= 0, got {s.recover_steps}")
    if s.recover_steps and not has_text:
        raise InputError("recovery fine-tuning needs text to distil on (--calibration-file)")
    if s.recover_steps and not s.learning_rate > 0:
        raise InputError(f"learning rate must be > 0, got {s.learning_rate}")
    for name in ("calib_samples", "calib_len", "recover_samples", "recover_len", "recover_batch"):
        if getattr(s, name) < 1:
            raise InputError(f"{name.replace('_', ' ')} must be >= 1")
    if s.quant not in (None, "int8"):
        raise InputError(f"pruned models can be quantized with int8, not {s.quant!r}")
    return score


def prune_model(model, settings: PruneSettings, text: str | None = None, progress: bool = True):
    """(pruned Model, report dict). text: calibration / recovery text (UTF-8 string)."""
    s = settings
    score = check_prune_args(s, text is not None)
    if s.method == "structured":  # shape checks before the calibration pass
        check_structured(model.config, s.sparsity, s.head_sparsity)
    calib = (calibration_ids(model, text, s.calib_samples, s.calib_len)
             if score == "wanda" else None)
    recover_ids = (calibration_ids(model, text, s.recover_samples, s.recover_len)
                   if s.recover_steps else None)
    report: dict = {"method": s.method, "score": score}
    masks = None
    if s.method == "structured":
        norms = structured_norms(model, calib, progress=progress) if score == "wanda" else None
        pruned = prune_structured(model, ffn_sparsity=s.sparsity, head_sparsity=s.head_sparsity,
                                  norms=norms)
        report.update(d_ff=[model.config.d_ff, pruned.config.d_ff],
                      n_heads=[model.config.n_heads, pruned.config.n_heads])
    else:
        nm = dict(n=s.n, m=s.m) if s.method == "nm" else {}
        if score == "wanda":
            stats: dict = {}
            params, masks = wanda_sparsify(model, calib, sparsity=None if nm else s.sparsity,
                                           progress=progress, return_masks=True, stats=stats,
                                           **nm)
            if stats.get("unrouted"):  # MoE experts no calibration token reached
                report["unrouted_experts"] = stats["unrouted"]
        else:
            params, masks = sparsify(model.params, method="nm" if nm else "magnitude",
                                     sparsity=None if nm else s.sparsity, return_masks=True, **nm)
        pruned = dataclasses.replace(model, params=params)
    if s.recover_steps:
        from jaxinfer.sparse.recover import distill

        res = distill(model, pruned, recover_ids, masks=masks, steps=s.recover_steps,
                      learning_rate=s.learning_rate, batch_size=s.recover_batch,
                      mixed_precision=s.mixed_precision, progress=progress)
        pruned = res.model
        report["recover_loss"] = [round(float(res.losses[0]), 5), round(float(res.losses[-1]), 5)]
    zeros = sparsity_report(pruned.params)
    if zeros:
        report["sparsity"] = round(float(np.mean(list(zeros.values()))), 6)
    if s.method == "nm":
        pruned = dataclasses.replace(pruned, params=compress_nm(pruned.params, s.n, s.m))
    if s.quant:
        from jaxinfer.quant.recipes import quantize_model

        pruned = quantize_model(pruned, s.quant)
    report["weight_bytes"] = int(pruned.weight_bytes)
    return pruned, report
