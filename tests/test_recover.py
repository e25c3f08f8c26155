"""Tests for jaxinfer.sparse.recover: distillation recovery of a magnitude-pruned tiny Llama.

The teacher is a random tiny Llama whose weights are rescaled so its next-token distributions
are far from uniform (random init at std 0.02 gives near-uniform logits and nothing to learn).
The student is the teacher with half of every projection's weights zeroed per output column.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from jaxinfer.errors import InputError
from jaxinfer.model import Model
from jaxinfer.paths import iter_leaves
from jaxinfer.quant import quantize
from jaxinfer.sparse import recover, wanda_sparsify

CONFIG = models.LlamaConfig.tiny(vocab_size=64, d_model=32, d_ff=64, max_seq_len=32)
PROJECTIONS = ("layers/attn/q", "layers/attn/k", "layers/attn/v", "layers/attn/o",
               "layers/mlp/gate", "layers/mlp/up", "layers/mlp/down")
T = 16  # window length
LR = 3e-3


def leaf(params, path):
    for key in path.split("/"):
        params = params[key]
    return params


def replace_leaves(params, new: dict):
    """A copy of the nested dict params with new[path] at the given paths."""
    out = jax.tree.map(lambda x: x, params)
    for path, value in new.items():
        *parents, last = path.split("/")
        node = out
        for key in parents:
            node = node[key]
        node[last] = value
    return out


def make_teacher(config, seed=0) -> Model:
    """Random params rescaled to unit-variance activations and peaked logits (std ~3)."""
    params = models.init_params(config, jax.random.key(seed))

    def rescale(path, x):
        if x.ndim == 1 or path.endswith("_norm"):
            return x
        fan_in = x.shape[-1] if path == "embed" else x.shape[-2]
        gain = 3.0 if path == "lm_head" else 1.0
        return x * (gain / (0.02 * np.sqrt(1.0 if path == "embed" else fan_in)))

    params = replace_leaves(params, {p: rescale(p, x) for p, x in iter_leaves(params)})
    return Model(config=config, params=params, tokenizer=None, source="tiny-teacher")


def magnitude_masks(params, paths=PROJECTIONS, sparsity=0.5) -> dict:
    """path -> bool [L, in, out]: keep the largest-|w| (1 - sparsity) of each output column."""
    masks = {}
    for path in paths:
        w = np.abs(np.asarray(leaf(params, path)))
        ranks = np.argsort(np.argsort(w, axis=-2), axis=-2)  # 0 = smallest in its column
        masks[path] = ranks >= int(w.shape[-2] * sparsity)
    return masks


def pruned(model: Model, masks: dict) -> Model:
    new = {p: jnp.where(m, leaf(model.params, p), 0.0) for p, m in masks.items()}
    return dataclasses.replace(model, params=replace_leaves(model.params, new), source="pruned")


def windows(n, seed, length=T, vocab=CONFIG.vocab_size):
    return np.random.default_rng(seed).integers(0, vocab, (n, length)).astype(np.int32)


TRAIN = windows(256, seed=1)
HELD_OUT = windows(8, seed=2)


@pytest.fixture(scope="module")
def teacher():
    return make_teacher(CONFIG)


@pytest.fixture(scope="module")
def masks(teacher):
    return magnitude_masks(teacher.params)


@pytest.fixture(scope="module")
def student(teacher, masks):
    return pruned(teacher, masks)


@pytest.fixture(scope="module")
def recovered(teacher, student, masks):
    return recover.distill(teacher, student, TRAIN, masks=masks, steps=40, learning_rate=LR,
                           batch_size=8, eval_windows=HELD_OUT, progress=False,
                           weight_decay=0.1)


# ----------------------------------------------------------------------------- training


def test_recovery_lowers_held_out_distillation_loss(recovered):
    assert len(recovered.losses) == 40
    assert recovered.eval_before > 0.05  # pruning really changed the model
    assert recovered.eval_after < 0.6 * recovered.eval_before, (
        recovered.eval_before, recovered.eval_after)
    assert np.mean(recovered.losses[-5:]) < 0.6 * np.mean(recovered.losses[:5])


def test_masks_stay_fixed_and_everything_else_trains(recovered, student, masks):
    params = recovered.model.params
    for path, m in masks.items():
        w, w0 = np.asarray(leaf(params, path)), np.asarray(leaf(student.params, path))
        assert np.all(w[~m] == 0.0), path  # exactly zero, despite AdamW weight decay
        assert np.mean(w[m] != w0[m]) > 0.9, path  # the kept entries did train
    # Unmasked leaves (norms, embeddings, head) train freely.
    for path in ("embed", "lm_head", "final_norm", "layers/attn_norm"):
        assert not np.array_equal(leaf(params, path), leaf(student.params, path)), path
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    # The caller's arrays are intact (the train step donates a copy).
    assert np.all(np.asarray(leaf(student.params, "layers/mlp/up"))[~masks["layers/mlp/up"]] == 0)


def test_distill_loss_is_zero_for_the_teacher_itself(teacher):
    tokens = jnp.asarray(HELD_OUT)
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), tokens.shape)
    logits = jax.jit(models.forward, static_argnums=0)(CONFIG, teacher.params, tokens,
                                                       positions)[0]
    loss = jax.jit(recover.distill_loss, static_argnums=0)(CONFIG, teacher.params, tokens,
                                                           positions, logits)
    assert loss.dtype == jnp.float32 and abs(float(loss)) < 1e-5


def dot_inputs(jaxpr) -> list[tuple]:
    """(dtype, ndim) of both inputs of every dot_general in a jaxpr, sub-jaxprs (scan, pjit,
    ...) included."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            out.append(tuple((v.aval.dtype, v.aval.ndim) for v in eqn.invars))
        for p in eqn.params.values():
            for sub in p if isinstance(p, tuple | list) else (p,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    out.extend(dot_inputs(inner))
    return out


@pytest.mark.parametrize("compute_dtype", [None, jnp.dtype(jnp.bfloat16)])
def test_loss_and_gradient_compute_in_the_requested_dtype(teacher, compute_dtype):
    tokens = jnp.asarray(HELD_OUT[:2])
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), tokens.shape)
    logits = jnp.zeros((2, T, CONFIG.vocab_size), jnp.float32)
    args = (teacher.params, tokens, positions, logits)
    loss_fn = functools.partial(recover.distill_loss, CONFIG, compute_dtype=compute_dtype)
    want = compute_dtype or jnp.dtype(jnp.float32)
    forward = dot_inputs(jax.make_jaxpr(loss_fn)(*args).jaxpr)
    assert len(forward) == 7 + 2 + 1  # the scanned layer: 7 projections, 2 attention dots; head
    assert {dtype for dot in forward for dtype, _ in dot} == {want}
    grad_fn = jax.value_and_grad(loss_fn)
    both = dot_inputs(jax.make_jaxpr(grad_fn)(*args).jaxpr)
    # Projections and the head ([B, T, *] x weight) run in the compute dtype backwards too; only
    # the gradient of the attention scores, which the model keeps in float32 by design
    # (layers.attend), enters two 5-D dots in float32.
    projection = [dot for dot in both if max(ndim for _, ndim in dot) <= 3]
    assert len(projection) == 3 * 8  # forward, d(input) and d(weight) of 7 projections + head
    assert {dtype for dot in projection for dtype, _ in dot} == {want}
    loss, grads = jax.eval_shape(grad_fn, *args)
    assert loss.dtype == jnp.float32  # the loss is float32 whatever the compute dtype
    assert {g.dtype for g in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}


def test_mixed_precision_keeps_float32_master_state(teacher, masks):
    bf16 = pruned(teacher, masks)
    bf16 = dataclasses.replace(bf16, params=jax.tree.map(lambda x: x.astype(jnp.bfloat16),
                                                         bf16.params))
    result = recover.distill(teacher, bf16, TRAIN, masks=masks, steps=30, learning_rate=LR,
                             batch_size=8, mixed_precision=True, eval_windows=HELD_OUT,
                             progress=False)
    # Master weights and Adam moments are float32; the model comes back in its own dtype.
    state = [x for x in jax.tree.leaves(result.opt_state) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert state and all(x.dtype == jnp.float32 for x in state)
    adam = result.opt_state[0]
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(adam.mu))
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(result.model.params))
    for path, m in masks.items():
        assert np.all(np.asarray(leaf(result.model.params, path), np.float32)[~m] == 0.0), path
    assert result.eval_after < 0.6 * result.eval_before, (result.eval_before, result.eval_after)


def test_structurally_smaller_student_trains(teacher):
    config = dataclasses.replace(CONFIG, d_ff=32, n_heads=2, n_kv_heads=1)
    params = models.init_params(config, jax.random.key(3))
    student = Model(config=config, params=params, tokenizer=None, source="small")
    result = recover.distill(teacher, student, TRAIN, steps=30, learning_rate=1e-2, batch_size=8,
                             eval_windows=HELD_OUT, progress=False, seed=1)
    assert result.eval_after < 0.8 * result.eval_before, (result.eval_before, result.eval_after)
    assert np.mean(result.losses[-5:]) < np.mean(result.losses[:5])
    assert jax.tree.map(jnp.shape, result.model.params) == jax.tree.map(jnp.shape, params)


def test_gpt2_student_pruned_by_wanda_recovers():
    """Recovery is family-agnostic: a tiny GPT-2 (fused qkv, tied head) pruned by Wanda on
    calibration windows recovers with its masks held fixed."""
    config = models.GPT2Config.tiny(vocab_size=64, max_seq_len=32)
    params = models.init_params(config, jax.random.key(0))
    # Peaked logits (tied head: the token table) and unit-variance projections, as make_teacher.
    gains = {"wte": 0.5 / 0.02, "wpe": 0.5 / 0.02}
    gains |= {f"layers/{p}": 1 / (0.02 * np.sqrt(leaf(params, f"layers/{p}").shape[-2]))
              for p in ("attn/qkv", "attn/o", "mlp/fc", "mlp/proj")}
    params = replace_leaves(params, {p: leaf(params, p) * g for p, g in gains.items()})
    teacher = Model(config=config, params=params, tokenizer=None, source="tiny-gpt2")
    pruned_params, masks = wanda_sparsify(teacher, TRAIN[:8], sparsity=0.5, progress=False,
                                          return_masks=True)
    assert set(masks) == {"layers/attn/qkv", "layers/attn/o", "layers/mlp/fc", "layers/mlp/proj"}
    student = dataclasses.replace(teacher, params=pruned_params)
    result = recover.distill(teacher, student, TRAIN, masks=masks, steps=30, learning_rate=LR,
                             batch_size=8, eval_windows=HELD_OUT, progress=False)
    assert result.eval_before > 0.05  # pruning really changed the model
    assert result.eval_after < 0.6 * result.eval_before, (result.eval_before, result.eval_after)
    for path, m in masks.items():
        assert np.all(np.asarray(leaf(result.model.params, path))[~m] == 0.0), path


# ----------------------------------------------------------------------------- bad input


def test_refuses_quantized_student(teacher):
    q = dataclasses.replace(teacher, params=quantize(teacher.params, scheme="int8"))
    with pytest.raises(InputError, match=r"layers/attn/\w+ is a Int8Weight.*recover before "
                                         r"compressing or quantizing"):
        recover.distill(teacher, q, TRAIN, steps=1, progress=False)


def test_refuses_vocab_mismatch(teacher):
    other = dataclasses.replace(teacher, config=dataclasses.replace(CONFIG, vocab_size=96))
    with pytest.raises(InputError, match=r"vocabularies differ \(64 vs 96"):
        recover.distill(teacher, other, TRAIN, steps=1, progress=False)


@pytest.mark.parametrize("masks, match", [
    ({"layers/mlp/nope": np.ones((2, 32, 64), bool)}, r"mask path 'layers/mlp/nope' is not a "),
    ({"layers/mlp/up": np.ones((32, 64), bool)}, r"mask layers/mlp/up has shape \[32, 64\], "
                                                 r"the param has \[2, 32, 64\]"),
    ({"layers/mlp/up": np.ones((2, 32, 64), np.float32)}, r"must be a bool array, got float32"),
    ([np.ones((2, 32, 64), bool)], r"masks must be a dict path -> bool array, got list"),
])
def test_refuses_bad_masks(teacher, masks, match):
    with pytest.raises(InputError, match=match):
        recover.distill(teacher, teacher, TRAIN, masks=masks, steps=1, progress=False)


@pytest.mark.parametrize("bad, match", [
    ([], r"windows is empty"),
    (np.zeros((0, T), np.int32), r"windows is empty"),
    ([[1, 2, 3], [4, 5]], r"windows are ragged \(lengths \[2, 3\]\)"),
    ([[1, 2, 64]], r"token ids must lie in \[0, 64\)"),
    ([[1, -1]], r"token ids must lie in \[0, 64\)"),
    ([[0.5, 1.0]], r"must hold integer token ids"),
    (windows(2, seed=0, length=33), r"windows of 33 tokens exceed the context of 32"),
    ([1, 2, 3], r"must be \[n, T\] token ids"),
])
def test_refuses_bad_windows(teacher, bad, match):
    with pytest.raises(InputError, match=match):
        recover.distill(teacher, teacher, bad, steps=1, progress=False)


def test_refuses_bad_eval_windows_and_settings(teacher):
    with pytest.raises(InputError, match=r"eval_windows is empty"):
        recover.distill(teacher, teacher, TRAIN, eval_windows=[], steps=1, progress=False)
    with pytest.raises(InputError, match=r"batch_size >= 1"):
        recover.distill(teacher, teacher, TRAIN, batch_size=0, progress=False)
