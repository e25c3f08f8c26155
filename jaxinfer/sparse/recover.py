"""Recovery fine-tuning after pruning: distil a dense teacher into a pruned student.

Pruning (zeroing weights, or removing heads / MLP columns) costs accuracy; a short fine-tune
recovers much of it. The method here is logit distillation: on windows of token ids, the
student's next-token distributions are pulled towards the dense teacher's, minimising

    loss = mean over every token of KL(softmax(teacher logits) || softmax(student logits))

computed in float32 (no labels are needed, and every position of a window contributes a full
distribution, not one target token). The teacher runs a jitted forward pass with no gradient;
the teacher and the student may have different configs (a structurally pruned student) but
must share the vocabulary.

Sparsity masks (path -> bool array, True = keep) are held fixed: masked-out entries are set to
zero before training, their gradients are zeroed, and the mask is re-applied to the params
after every optimizer update, so neither Adam's moments nor weight decay can move them. Every
float leaf of the student is trained (norms and embeddings included); a student with
compressed or quantized leaves is refused (recover first, then compress or quantize).

Optimizer: optax.adamw with a linear warmup over the first 10% of the steps (at least one),
then a cosine decay to a tenth of the learning rate (see `make_optimizer`).

Mixed precision: master weights and optimizer state are float32; the forward and backward
passes run in bfloat16 (float leaves are cast inside the loss function); logits and the loss
are float32. Without it everything runs in the student's own dtype. The returned model's
float leaves always have the student's original dtypes.

Shapes: windows [n, T] int32 token ids (every window the same length T); a batch is
tokens/positions [B, T] with B = batch_size; logits [B, T, V].
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import models
from jaxinfer.errors import InputError
from jaxinfer.model import Model
from jaxinfer.paths import from_key_path, iter_leaves
from jaxinfer.sparse.masks import apply_mask

WARMUP_FRACTION = 0.1  # of the steps, for the linear learning-rate warmup


@dataclasses.dataclass
class RecoveryResult:
    """What `distill` returns."""

    # The student with recovered params (float leaves in their original dtypes).
    model: Model = dataclasses.field(repr=False)
    losses: list[float]  # training loss (mean token KL) of each step
    eval_before: float | None  # mean distillation loss on eval_windows before training
    eval_after: float | None  # ... and after (None without eval_windows)
    # The final optax state (float32 under mixed precision).
    opt_state: Any = dataclasses.field(default=None, repr=False)


# ----------------------------------------------------------------------------- the loss


def token_kl(teacher_logits: jax.Array, student_logits: jax.Array) -> jax.Array:
    """KL(softmax(teacher) || softmax(student)) per token, float32: [B, T, V] x2 -> [B, T]."""
    log_p = jax.nn.log_softmax(teacher_logits.astype(jnp.float32), axis=-1)
    log_q = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
    return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def _cast(params, dtype):
    """params with every leaf cast to dtype (None keeps them as they are)."""
    return params if dtype is None else jax.tree.map(lambda x: x.astype(dtype), params)


def row_losses(config, params, tokens, positions, teacher_logits, compute_dtype=None):
    """Mean token KL per window: [B] float32.

    config: the student's model config; params: its (all-float) params tree; tokens, positions
    [B, T] int32; teacher_logits [B, T, V]. compute_dtype (e.g. jnp.bfloat16) casts the params
    before the forward pass, so every matmul runs in that dtype; the KL is float32.
    """
    logits, _ = models.forward(config, _cast(params, compute_dtype), tokens, positions)
    return jnp.mean(token_kl(teacher_logits, logits), axis=-1)


def distill_loss(config, params, tokens, positions, teacher_logits, compute_dtype=None):
    """The training objective: mean token KL over the batch, a float32 scalar (see row_losses)."""
    return jnp.mean(row_losses(config, params, tokens, positions, teacher_logits, compute_dtype))


@functools.partial(jax.jit, static_argnums=0)
def _teacher_logits(config, params, tokens, positions):
    """Teacher logits [B, T, V] float32 (a forward pass only: no gradient is ever taken)."""
    return models.forward(config, params, tokens, positions)[0]


_eval_rows = jax.jit(row_losses, static_argnums=(0, 5))


# ----------------------------------------------------------------------------- masks, optimizer


def apply_masks(params, masks: dict[str, jax.Array]):
    """params with the entries where masks[path] is False set to 0 (paths not in masks unchanged).

    Works on any tree shaped like params (gradients, updates).
    """
    def fn(key_path, x):
        m = masks.get(from_key_path(key_path))
        return x if m is None else apply_mask(x, m)

    return jax.tree_util.tree_map_with_path(fn, params)


def make_optimizer(learning_rate: float, steps: int, weight_decay: float = 0.0):
    """optax.adamw whose learning rate ramps linearly over the first 10% of the steps (at
    least one), from learning_rate / warmup to learning_rate, then follows a cosine down to
    learning_rate / 10 at the last step."""
    warmup = max(1, int(steps * WARMUP_FRACTION))
    decay = max(1, steps - warmup)

    def schedule(count):
        ramp = jnp.minimum(1.0, (count + 1) / warmup)
        t = jnp.clip((count - warmup) / decay, 0.0, 1.0)
        cosine = 0.1 + 0.9 * 0.5 * (1.0 + jnp.cos(jnp.pi * t))
        return learning_rate * ramp * jnp.where(count < warmup, 1.0, cosine)

    return optax.adamw(schedule, weight_decay=weight_decay)


def _train_step(config, optimizer, compute_dtype, params, opt_state, masks, tokens, positions,
                teacher_logits):
    """One AdamW step on the distillation loss with masked gradients and re-masked params.

    (params, opt_state, masks {path: bool}, tokens/positions [B, T], teacher_logits [B, T, V])
    -> (params, opt_state, loss). The masks are an argument (not closed over) so they never
    become constants of the compiled program.
    """
    loss, grads = jax.value_and_grad(distill_loss, argnums=1)(
        config, params, tokens, positions, teacher_logits, compute_dtype)
    grads = apply_masks(grads, masks)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = apply_masks(optax.apply_updates(params, updates), masks)
    return params, opt_state, loss


# ----------------------------------------------------------------------------- validation


def _float_dtypes(params) -> dict[str, Any]:
    """path -> dtype of every leaf; InputError unless every leaf is a float array."""
    dtypes = {}
    for path, leaf in iter_leaves(params):
        is_array = isinstance(leaf, jax.Array | np.ndarray)
        if not is_array or not jnp.issubdtype(leaf.dtype, jnp.floating):
            kind = f"{leaf.dtype} array" if is_array else type(leaf).__name__
            raise InputError(f"student param {path} is a {kind}, not a float array: recover "
                             "before compressing or quantizing")
        dtypes[path] = leaf.dtype
    return dtypes


def _check_masks(masks, params) -> dict[str, jax.Array]:
    """Validated masks as {path: bool jax.Array}; InputError naming the first bad path."""
    if masks is None:
        return {}
    if not isinstance(masks, Mapping):
        raise InputError(f"masks must be a dict path -> bool array, got {type(masks).__name__}")
    shapes = {path: leaf.shape for path, leaf in iter_leaves(params)}
    out = {}
    for path, m in masks.items():
        if path not in shapes:
            known = ", ".join(list(shapes)[:8]) + (", ..." if len(shapes) > 8 else "")
            raise InputError(f"mask path {path!r} is not a student param (params: {known})")
        m = np.asarray(m)
        if m.dtype != np.bool_:
            raise InputError(f"mask {path} must be a bool array, got {m.dtype}")
        if m.shape != shapes[path]:
            raise InputError(f"mask {path} has shape {list(m.shape)}, the param has "
                             f"{list(shapes[path])}")
        out[path] = jnp.asarray(m)
    return out


def _as_windows(windows, name: str, vocab: int, max_len: int) -> np.ndarray:
    """list[list[int]] | int array [n, T] -> int32 [n, T]; InputError if empty, ragged, not
    integer, out of [0, vocab) or longer than max_len."""
    if windows is None or len(windows) == 0:
        raise InputError(f"{name} is empty: give at least one window of token ids")
    if not isinstance(windows, np.ndarray | jax.Array):
        lengths = {len(np.atleast_1d(w)) for w in windows}
        if len(lengths) > 1:
            raise InputError(f"{name} are ragged (lengths {sorted(lengths)}): give windows "
                             "of one length")
    arr = np.asarray(windows)
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise InputError(f"{name} must be [n, T] token ids with T >= 1, got shape {list(arr.shape)}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise InputError(f"{name} must hold integer token ids, got {arr.dtype}")
    if arr.min() < 0 or arr.max() >= vocab:
        raise InputError(f"{name}: token ids must lie in [0, {vocab})")
    if arr.shape[1] > max_len:
        raise InputError(f"{name} of {arr.shape[1]} tokens exceed the context of {max_len}")
    return arr.astype(np.int32)


def _check_args(teacher: Model, student: Model, steps, learning_rate, batch_size):
    if teacher.config.vocab_size != student.config.vocab_size:
        raise InputError(f"teacher and student vocabularies differ ({teacher.config.vocab_size} "
                         f"vs {student.config.vocab_size} tokens)")
    if steps < 0 or batch_size < 1 or not learning_rate > 0:
        raise InputError("need steps >= 0, batch_size >= 1 and learning_rate > 0 (got "
                         f"{steps}, {batch_size}, {learning_rate})")


# ----------------------------------------------------------------------------- driver


def _batch(windows: np.ndarray, rows: np.ndarray):
    """(tokens, positions) [B, T] int32 of the given window rows."""
    tokens = windows[rows]
    positions = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)
    return jnp.asarray(tokens), jnp.asarray(positions)


def _evaluate(teacher: Model, config, params, windows, batch_size, compute_dtype) -> float:
    """Mean distillation loss over all windows [n, T]; batches of batch_size (the last one
    padded with repeats, which are dropped) so it compiles once per shape."""
    n = len(windows)
    total = 0.0
    for start in range(0, n, batch_size):
        rows = np.arange(start, start + batch_size) % n
        tokens, positions = _batch(windows, rows)
        t_logits = _teacher_logits(teacher.config, teacher.params, tokens, positions)
        per_row = _eval_rows(config, params, tokens, positions, t_logits, compute_dtype)
        total += float(np.sum(np.asarray(per_row)[:min(batch_size, n - start)]))
    return total / n


def distill(teacher: Model, student: Model, windows, *, masks=None, steps: int = 50,
            learning_rate: float = 1e-4, batch_size: int = 2, mixed_precision: bool = False,
            eval_windows=None, progress: bool = True, seed: int = 0,
            weight_decay: float = 0.0) -> RecoveryResult:
    """Fine-tune `student` to match `teacher`'s logits on `windows`, masks held fixed.

    windows, eval_windows: list[list[int]] or int array [n, T] of token ids (one length T per
        set, T <= both models' max_seq_len). Step s trains on batch_size windows taken
        cyclically from a fixed order shuffled by `seed`.
    masks: {path: bool array shaped like the student leaf (stacked leaves included)}, True =
        keep; masked-out entries are 0 in the result. Other float leaves train freely.
    mixed_precision: float32 master weights and optimizer state, bfloat16 forward/backward.
    Returns a RecoveryResult (the student with new params, per-step losses, eval losses before
    and after training when eval_windows is given, the final optimizer state).
    Raises InputError for mismatched vocabularies, non-float student leaves, bad masks or
    windows.
    """
    _check_args(teacher, student, steps, learning_rate, batch_size)
    dtypes = _float_dtypes(student.params)
    mask_tree = _check_masks(masks, student.params)
    max_len = min(teacher.config.max_seq_len, student.config.max_seq_len)
    vocab = student.config.vocab_size
    train = _as_windows(windows, "windows", vocab, max_len)
    held_out = None if eval_windows is None else _as_windows(eval_windows, "eval_windows", vocab,
                                                             max_len)
    master = jnp.float32 if mixed_precision else None
    compute_dtype = jnp.dtype(jnp.bfloat16) if mixed_precision else None
    # A fresh copy (the step donates its params; the caller's arrays must survive).
    params = apply_masks(jax.tree.map(lambda x: jnp.array(x, dtype=master, copy=True),
                                      student.params), mask_tree)
    evaluate = functools.partial(_evaluate, teacher, student.config, batch_size=batch_size,
                                 compute_dtype=compute_dtype)
    eval_before = None if held_out is None else evaluate(params, held_out)
    optimizer = make_optimizer(learning_rate, steps, weight_decay)
    params, opt_state, losses = _train(teacher, student.config, optimizer, compute_dtype, params,
                                       mask_tree, train, steps, batch_size, seed, progress)
    eval_after = None if held_out is None else evaluate(params, held_out)
    params = jax.tree_util.tree_map_with_path(
        lambda kp, x: x.astype(dtypes[from_key_path(kp)]), params)
    return RecoveryResult(model=dataclasses.replace(student, params=params), losses=losses,
                          eval_before=eval_before, eval_after=eval_after, opt_state=opt_state)


def _train(teacher: Model, config, optimizer, compute_dtype, params, masks, windows, steps,
           batch_size, seed, progress):
    """The training loop: -> (params, opt_state, per-step losses)."""
    step = jax.jit(functools.partial(_train_step, config, optimizer, compute_dtype),
                   donate_argnums=(0, 1))
    opt_state = optimizer.init(params)
    order = np.random.default_rng(seed).permutation(len(windows))
    losses = []
    with tqdm(total=steps, desc="recover", unit="step", disable=not progress) as bar:
        for s in range(steps):
            rows = order[np.arange(s * batch_size, (s + 1) * batch_size) % len(windows)]
            tokens, positions = _batch(windows, rows)
            t_logits = _teacher_logits(teacher.config, teacher.params, tokens, positions)
            params, opt_state, loss = step(params, opt_state, masks, tokens, positions, t_logits)
            losses.append(float(loss))
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            bar.update()
    return params, opt_state, losses
