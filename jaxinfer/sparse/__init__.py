"""Sparsity and pruning as functional transforms over the params pytree (models never change).

  sparsify(params, rules, method, sparsity | n, m)  magnitude / Wanda / N:M masks, zeros in place
  wanda_sparsify(model, calib_ids, ...)             Wanda with norms recorded layer by layer
  compress_nm(params, n, m)                         N:M zeros -> compressed `NMSparseWeight` leaves
  prune_structured(model, ffn_sparsity, head_sparsity)  a smaller dense model (new config)
  distill(teacher, student, windows, masks=...)     recovery fine-tuning (optax), masks fixed
  prune_model(model, PruneSettings, text)           the pipeline behind `jaxinfer prune`
"""

from jaxinfer.quant.nm import NMSparseWeight
from jaxinfer.sparse.recipes import PruneSettings, prune_model
from jaxinfer.sparse.recover import RecoveryResult, distill
from jaxinfer.sparse.sparsify import compress_nm, sparsify, sparsity_report, wanda_sparsify
from jaxinfer.sparse.structured import prune_structured, structured_norms

__all__ = ["NMSparseWeight", "PruneSettings", "RecoveryResult", "compress_nm", "distill",
           "prune_model", "prune_structured", "sparsify", "sparsity_report", "structured_norms",
           "wanda_sparsify"]
