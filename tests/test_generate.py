"""Generation tests: greedy parity with transformers, ragged batches, cached decode, sampling,
stop conditions, streaming, input validation and the repetition penalty.

Two kinds of model are used:
  * SmolLM2-135M-Instruct (the real Q4_1 GGUF, dequantised to float32), loaded once per module;
  * tiny random transformers checkpoints (Llama and GPT-2) saved with `save_pretrained`.

SmolLM2 runs reuse a few compiled shapes only: max_new_tokens 48 (token buffer 64), prompts of
at most 64 tokens, batches of 1, 2 and 3 (bucket 4).
"""

import contextlib
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import jaxinfer
import models
from jaxinfer import engine, generate, kernels, text
from jaxinfer.errors import CheckpointError, InputError
from jaxinfer.generate import Engine, Request, engine_for, generate_ids
from jaxinfer.model import Model
from jaxinfer.sampling import Sampling, SamplingArrays, filter_logits, first_argmax

MAX_NEW = 48
CHAT_PROMPTS = [
    "Hi",  # short prompt, short answer: ends with EOS well before MAX_NEW
    "Write a short story about a robot",
    "Explain how photosynthesis works in detail. Cover the light-dependent reactions, the "
    "Calvin cycle, and why leaves are green.",
]
LOGPROB_TOL = 1e-4


# --------------------------------------------------------------------------------------------
# Fixtures and helpers
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smol(smollm2_gguf_path):
    return jaxinfer.load(smollm2_gguf_path, dtype="float32", progress=False)


@pytest.fixture(scope="module")
def smol_batch(smol):
    """Greedy completions of CHAT_PROMPTS run as one ragged batch (with logprobs)."""
    return text.generate(smol, CHAT_PROMPTS, chat=True, max_new_tokens=MAX_NEW, logprobs=True)


def _save_tiny(path, family: str):
    """A tiny random transformers checkpoint in `path`; returns the float32 torch model."""
    torch.manual_seed(0)
    if family == "llama":
        config = transformers.LlamaConfig(
            hidden_size=64, intermediate_size=96, num_hidden_layers=2, vocab_size=128,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            initializer_range=0.1)
        hf = transformers.LlamaForCausalLM(config).eval()
        with torch.no_grad():  # sharper next-token distributions than the default init
            hf.lm_head.weight.mul_(3.0)
    else:
        config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                         vocab_size=128, initializer_range=0.3)
        hf = transformers.GPT2LMHeadModel(config).eval()
    hf.save_pretrained(path, safe_serialization=True)
    return hf


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """(jaxinfer model, transformers model) of a tiny random Llama (vocab 128)."""
    path = tmp_path_factory.mktemp("tiny_llama")
    hf = _save_tiny(path, "llama")
    return jaxinfer.load(path, dtype="float32", progress=False), hf


@pytest.fixture(scope="module")
def tiny(tiny_pair):
    return tiny_pair[0]


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_gpt2")
    _save_tiny(path, "gpt2")
    return jaxinfer.load(path, dtype="float32", progress=False)


@pytest.fixture(scope="module")
def tiny_ctx32():
    """A tiny random Llama with a 32-token context (built directly from `models`)."""
    config = models.LlamaConfig.tiny(max_seq_len=32)
    return Model(config=config, params=models.init_params(config, jax.random.key(0)),
                 tokenizer=None, source="tiny-ctx32", eos_token_ids=())


def _prompts(lengths, vocab=128, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, size=n).tolist() for n in lengths]


RAGGED = _prompts([3, 11, 7])  # one batch of 3 (bucket 4, prompt bucket 16)


def run_ids(model, prompts, *, max_new=16, stop=(), sampling=None, logprobs=False,
            chunk=None, params=None, **kwargs):
    """generate_ids over token-id prompts; `sampling` (one per row) or kwargs for all rows."""
    rows = sampling if sampling is not None else [Sampling(**kwargs)]
    req = Request(prompts=[list(p) for p in prompts], sampling=rows, max_new_tokens=max_new,
                  stop_token_ids=tuple(stop))
    return generate_ids(model, req, logprobs=logprobs, chunk=chunk, params=params)


def step_logits(model, prompts, completions, *, batch=4, length=48):
    """Full-forward logits [n_i, V] of the steps that drew each row's generated tokens.

    Rows are padded (after their last token, which causal attention never looks past) to at
    least `batch` x `length`, so most calls reuse one compiled shape of `model.logits`.
    """
    rows = [list(p) + c.token_ids for p, c in zip(prompts, completions, strict=True)]
    length = max(length, *(len(r) for r in rows))
    padded = [r + [0] * (length - len(r)) for r in rows]
    padded += [padded[0]] * (batch - len(padded))
    full = model.logits(padded)
    return [full[i, len(p) - 1: len(p) - 1 + len(c.token_ids)]
            for i, (p, c) in enumerate(zip(prompts, completions, strict=True))]


def log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def cache_sizes():
    return tuple(f._cache_size() for f in (engine.init_state, engine.admit, engine.decode,
                                           engine.release))


@contextlib.contextmanager
def torch_threads(n: int):
    """Run torch on n threads (one thread is far faster when the CPU is oversubscribed)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def chat_ids(model, prompt):
    return model.tokenizer.encode(model.apply_chat_template([{"role": "user", "content": prompt}]))


# --------------------------------------------------------------------------------------------
# 1. Greedy parity with transformers on SmolLM2
# --------------------------------------------------------------------------------------------

def test_smollm2_greedy_matches_transformers(smol, smol_batch, smollm2_gguf_path):
    path = smollm2_gguf_path
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    hf_eos = hf.generation_config.eos_token_id
    hf_eos = {hf_eos} if isinstance(hf_eos, int) else set(hf_eos)
    assert hf_eos == set(smol.eos_token_ids) == {2}  # <|im_end|>: both stop on the same ids
    assert smol.tokenizer.id_to_token(2) == "<|im_end|>"

    lengths = set()
    for prompt, ours in zip(CHAT_PROMPTS, smol_batch, strict=True):
        ids = chat_ids(smol, prompt)
        assert ours.prompt_token_ids == ids
        lengths.add(len(ids))
        with torch.no_grad(), torch_threads(1):
            out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              do_sample=False, max_new_tokens=MAX_NEW,
                              eos_token_id=list(smol.eos_token_ids), pad_token_id=0)
        ref = out[0, len(ids):].tolist()
        assert ours.token_ids == ref, prompt
        assert ours.finish_reason == ("stop" if ref[-1] in smol.eos_token_ids else "length")
    assert len(lengths) == len(CHAT_PROMPTS)  # prompts of different lengths
    # Two answers run to the full budget; one ends early on EOS.
    assert [c.finish_reason for c in smol_batch] == ["stop", "length", "length"]
    assert [len(c.token_ids) for c in smol_batch][1:] == [MAX_NEW, MAX_NEW]


# --------------------------------------------------------------------------------------------
# 2. A ragged batch equals each prompt alone
# --------------------------------------------------------------------------------------------

def test_smollm2_ragged_batch_equals_each_prompt_alone(smol, smol_batch):
    for prompt, batched in zip(CHAT_PROMPTS, smol_batch, strict=True):
        (alone,) = text.generate(smol, prompt, chat=True, max_new_tokens=MAX_NEW)
        assert alone.token_ids == batched.token_ids, prompt
        assert alone.text == batched.text
        assert alone.finish_reason == batched.finish_reason
        assert alone.prompt == prompt


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_tiny_ragged_batch_equals_each_prompt_alone(family, tiny, tiny_gpt2):
    model = tiny if family == "llama" else tiny_gpt2
    prompts = _prompts([2, 13, 6, 9], seed=1)
    batched = run_ids(model, prompts, max_new=16)
    for p, b in zip(prompts, batched, strict=True):
        (alone,) = run_ids(model, [p], max_new=16)
        assert alone.token_ids == b.token_ids
        assert len(b.token_ids) == 16 and b.finish_reason == "length"
        assert b.prompt_token_ids == p
    # A mixed batch: sampled rows do not disturb the greedy rows.
    mixed = run_ids(model, prompts, max_new=16, sampling=[
        Sampling(), Sampling(temperature=1.0, seed=1), Sampling(), Sampling(temperature=0.5, seed=2)])
    assert mixed[0].token_ids == batched[0].token_ids
    assert mixed[2].token_ids == batched[2].token_ids


# --------------------------------------------------------------------------------------------
# 3. Cached incremental decode equals the full forward pass at every step
# --------------------------------------------------------------------------------------------

def test_smollm2_cached_logprobs_match_full_forward(smol, smol_batch):
    prompts = [c.prompt_token_ids for c in smol_batch]
    logits_rows = step_logits(smol, prompts, smol_batch, batch=len(prompts), length=0)
    for c, logits in zip(smol_batch, logits_rows, strict=True):
        lp = log_softmax(logits)
        ref = lp[np.arange(len(c.token_ids)), c.token_ids]
        assert len(c.logprobs) == len(c.token_ids)
        np.testing.assert_allclose(c.logprobs, ref, atol=LOGPROB_TOL, rtol=0)
        # Greedy: every chosen token is the argmax of the full-forward logits (up to ties).
        best = lp.max(axis=-1)
        assert np.all(ref >= best - LOGPROB_TOL)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_tiny_cached_logprobs_match_full_forward(family, temperature, tiny, tiny_gpt2):
    model = tiny if family == "llama" else tiny_gpt2
    outs = run_ids(model, RAGGED, max_new=16, logprobs=True, temperature=temperature, seed=7)
    for c, logits in zip(outs, step_logits(model, RAGGED, outs), strict=True):
        lp = log_softmax(logits)
        ref = lp[np.arange(len(c.token_ids)), c.token_ids]
        np.testing.assert_allclose(c.logprobs, ref, atol=LOGPROB_TOL, rtol=0)
        if temperature == 0:
            assert np.all(ref >= lp.max(axis=-1) - LOGPROB_TOL)
    if temperature:  # sampling really drew tokens other than the argmax
        assert any(np.any(np.asarray(c.logprobs) < log_softmax(lg).max(-1) - 0.1)
                   for c, lg in zip(outs, step_logits(model, RAGGED, outs), strict=True))


def test_top_logprobs_match_full_forward(tiny):
    """Rows asking for top_logprobs get, at each token, that many ids with the largest
    full-forward log-probs, most likely first; a row asking for none gets None, and asking
    changes no token (the same rows without them)."""
    rows = [Sampling(temperature=1.0, seed=7, top_logprobs=5), Sampling(seed=1),
            Sampling(top_logprobs=2)]
    outs = run_ids(tiny, RAGGED, max_new=16, logprobs=True, sampling=rows)
    plain = run_ids(tiny, RAGGED, max_new=16, sampling=[
        dataclasses.replace(r, top_logprobs=0) for r in rows])
    assert [c.token_ids for c in outs] == [c.token_ids for c in plain]
    assert outs[1].top_logprobs is None and plain[0].top_logprobs is None
    for c, row, logits in zip(outs, rows, step_logits(tiny, RAGGED, outs), strict=True):
        if not row.top_logprobs:
            continue
        lp = log_softmax(logits)
        assert len(c.top_logprobs) == len(c.token_ids)
        for i, alts in enumerate(c.top_logprobs):
            ids, values = [t for t, _ in alts], [v for _, v in alts]
            assert len(alts) == row.top_logprobs and values == sorted(values, reverse=True)
            np.testing.assert_allclose(values, lp[i, ids], atol=LOGPROB_TOL, rtol=0)
            np.testing.assert_allclose(values, np.sort(lp[i])[::-1][:len(ids)],
                                       atol=LOGPROB_TOL, rtol=0)
    with pytest.raises(InputError, match="top_logprobs must be an integer in"):
        Sampling(top_logprobs=21).validate()


@pytest.mark.parametrize("chunk", [1, 5])
def test_decode_in_chunks_equals_one_call(tiny, chunk):
    """engine.decode continues where the last call stopped: chunking changes nothing."""
    whole = run_ids(tiny, RAGGED, max_new=16, logprobs=True, temperature=1.0, seed=3)
    parts = run_ids(tiny, RAGGED, max_new=16, logprobs=True, temperature=1.0, seed=3,
                    chunk=chunk)
    assert [c.token_ids for c in parts] == [c.token_ids for c in whole]
    for a, b in zip(parts, whole, strict=True):
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-6)


def test_admit_then_decode_state(tiny):
    """engine.admit draws one token per request; each decode call adds `steps` more."""
    ref = run_ids(tiny, RAGGED, max_new=16, logprobs=True)
    req = Request(prompts=RAGGED, sampling=[Sampling()], max_new_tokens=16, stop_token_ids=())
    eng = engine_for(tiny, req)
    handles = [eng.submit(p, Sampling(), 16) for p in RAGGED]
    eng.advance(0)
    state = jax.device_get(eng.state)
    assert state.tokens.shape == (4, 16)  # 4 slots (3 used), token buffer 16
    assert list(state.length) == [1, 1, 1, 0] and list(state.done) == [False] * 3 + [True]
    assert list(state.cache.end) == [len(p) for p in RAGGED] + [0]  # no padding in the cache
    assert int(state.step) == 0
    eng.advance(4)
    tokens, lengths, done, hit_stop, lps = eng.snapshot()
    assert list(lengths[:3]) == [5, 5, 5] and not hit_stop.any()
    assert not any(eng.finished(h) for h in handles)
    for i, c in enumerate(ref):
        assert tokens[i, :5].tolist() == c.token_ids[:5]
        np.testing.assert_allclose(lps[i, :5], c.logprobs[:5], atol=1e-6)
    eng.advance(100)
    assert all(eng.finished(h) for h in handles) and list(eng.snapshot()[1][:3]) == [16] * 3


def _alone(model, prompt, sampling, max_new):
    c = generate_ids(model, Request(prompts=[prompt], sampling=[sampling], max_new_tokens=max_new,
                                    stop_token_ids=()), logprobs=True)[0]
    return c.token_ids, c.logprobs


def _expect(eng, h, want, want_lp):
    """Run eng until request h finishes; its tokens and log-probs must be want / want_lp.
    Returns h."""
    while not eng.finished(h):
        eng.advance(3)
    ids, lps, _ = eng.result(h)
    assert ids == want
    np.testing.assert_allclose(lps, want_lp, atol=1e-5)
    return h


@pytest.mark.parametrize("sampling", [Sampling(), Sampling(temperature=1.0, top_p=0.9, seed=7)])
def test_request_joining_a_running_batch_gets_its_own_tokens(tiny, sampling):
    """Whatever runs beside it, whichever slot it gets and whenever it joins, a request's
    tokens are the ones it gets alone; finished slots are reused; no recompiles."""
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    want, want_lp = _alone(tiny, prompt, sampling, 12)
    eng = Engine(tiny, slots=4, cache_len=64, buf_len=16)
    others = [eng.submit(p, Sampling(temperature=0.8, seed=i), 16) for i, p in enumerate(RAGGED)]
    eng.advance(3)
    h = eng.submit(prompt, sampling, 12)  # joins mid-run, in the last free slot
    while not eng.finished(h):
        eng.advance(2)
    eng.warm_up_decode()  # every decode row bucket
    before = cache_sizes()  # admits of 1 and of 4 requests compiled: group sizes are bucketed
    assert eng.entries[h].slot == 3
    ids, lps, _ = eng.result(h)
    assert ids == want
    np.testing.assert_allclose(lps, want_lp, atol=1e-5)
    eng.forget(others[0])  # its slot is given back (finished or not) and reused
    h2 = eng.submit(prompt, sampling, 12)
    while not eng.finished(h2):
        eng.advance(4)
    assert eng.entries[h2].slot == 0 and eng.result(h2)[0] == want
    assert cache_sizes() == before


LAYOUTS = {"native kernels": {}, "native per layer": dict(unstack=True),
           "xla": dict(native=False), "stacked": dict(unstack=False, native=False),
           "int8 cache": {}}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_decode_over_the_first_rows_equals_decode_over_all(tiny, layout):
    """engine.decode(rows=r) runs the first r slots alone (the others done) and leaves the
    state a decode over every slot leaves: tokens, log-probs, positions and cache contents."""
    params = generate.run_layout(tiny.params, tiny.config, **LAYOUTS[layout])
    eng = Engine(tiny, slots=8, cache_len=64, buf_len=16, params=params,
                 kv_cache="int8" if layout == "int8 cache" else "float")
    if layout.startswith("native") and kernels.available():  # the attention kernel on
        per_layer = layout == "native per layer"  # stacked buffers (or per-layer ones)
        assert eng.state.cache.per_layer == per_layer and eng.state.cache.attention is not None
    if layout == "stacked":  # stacked buffers: the model's own attention
        assert not eng.state.cache.per_layer
    for i, p in enumerate(RAGGED[:3]):
        eng.submit(p, Sampling(temperature=1.0, seed=i), 16 if i != 1 else 2)  # slot 1 ends
    eng.advance(0)
    limit = jnp.int32(int(eng.state.step) + 6)
    copy = jax.tree.map(jnp.copy, eng.state)
    head = engine.decode(eng.params, eng.state, limit, jnp.bool_(False), **eng.static, rows=4)
    whole = engine.decode(eng.params, copy, limit, jnp.bool_(False), **eng.static)
    assert int(head.step) == int(whole.step) == int(limit)
    _assert_same_state(head, whole)


def _assert_same_state(a, b, atol=1e-5):
    """Two DecodeStates hold the same tokens, positions and cache contents (float leaves within
    atol). The cache's empty slots (position -1) are not compared: padding is written there
    (where a row's next token goes) and is no token."""
    np.testing.assert_array_equal(a.cache.pos, b.cache.pos)
    held = np.asarray(b.cache.pos) >= 0  # [B, S]

    def held_only(state):
        def mask(x, ax):
            if "sequence" not in ax:
                return x
            return jnp.where(held.reshape([held.shape[0] if n == "batch" else held.shape[1]
                                           if n == "sequence" else 1 for n in ax]), x, 0)

        return state.replace(cache=models.cache._map_rows(mask, state.cache))

    for x, y in zip(jax.tree.leaves(held_only(a)), jax.tree.leaves(held_only(b)), strict=True):
        if jnp.issubdtype(x.dtype, jnp.floating):
            np.testing.assert_allclose(x, y, atol=atol)
        else:
            np.testing.assert_array_equal(x, y)


def test_first_chunk_in_its_window_equals_admit_over_the_whole_row(tiny):
    """engine.admit with kv_len (a first chunk prefilled in a window of its own length) into
    a slot that held a longer request leaves the state an admit over the whole row leaves:
    the old tokens beyond the window are emptied."""
    eng = Engine(tiny, slots=2, cache_len=64, buf_len=16)
    old = eng.submit(list(range(3, 40)), Sampling(), 8)
    while not eng.finished(old):
        eng.advance(4)
    prompt = [5, 7, 11, 13, 17]
    args = (np.asarray([eng.entries[old].slot], np.int32), np.zeros((1, 16), np.int32),
            np.full((1, 16), -1, np.int32), np.ones((1,), bool), np.ones((1,), bool),
            SamplingArrays.from_rows([Sampling(temperature=1.0, seed=3)], 1),
            np.full((1, engine.MAX_STOP_IDS), -1, np.int32), np.full((1,), 8, np.int32))
    args[1][0, :5], args[2][0, :5] = prompt, np.arange(5)
    copy = jax.tree.map(jnp.copy, eng.state)
    windowed = engine.admit(eng.params, eng.state, *args, **eng.static, kv_len=16)
    whole = engine.admit(eng.params, copy, *args, **eng.static)
    assert int(windowed.cache.end[0]) == 5 and (np.asarray(windowed.cache.pos[0, 5:]) == -1).all()
    _assert_same_state(windowed, whole)


def test_later_chunk_in_half_the_cache_equals_admit_over_the_whole_row(tiny):
    """A later prompt chunk whose row fits in half the cache is prefilled in that window
    (Engine._window) and leaves the state an admit over the whole row leaves."""
    eng = Engine(tiny, slots=2, cache_len=64, buf_len=16)
    assert [eng._window(p, c) for p, c in ((0, 16), (16, 16), (16, 32), (0, 64))] == \
        [16, 32, None, None]
    prompt = list(range(3, 23))  # 16 tokens, then 4

    def chunk(part, start, first, last):
        tokens, positions = np.zeros((1, 16), np.int32), np.full((1, 16), -1, np.int32)
        tokens[0, :len(part)], positions[0, :len(part)] = part, start + np.arange(len(part))
        return (np.asarray([1], np.int32), tokens, positions, np.asarray([first]),
                np.asarray([last]), SamplingArrays.from_rows([Sampling(temperature=1.0, seed=3)],
                                                             1),
                np.full((1, engine.MAX_STOP_IDS), -1, np.int32), np.full((1,), 8, np.int32))

    state = engine.admit(eng.params, eng.state, *chunk(prompt[:16], 0, True, False),
                         **eng.static, kv_len=16)
    copy = jax.tree.map(jnp.copy, state)
    windowed = engine.admit(eng.params, state, *chunk(prompt[16:], 16, False, True),
                            **eng.static, kv_len=32)
    whole = engine.admit(eng.params, copy, *chunk(prompt[16:], 16, False, True), **eng.static)
    assert int(windowed.cache.end[1]) == 20 and int(windowed.length[1]) == 1
    _assert_same_state(windowed, whole)


def test_engine_gives_the_lowest_free_slot_and_decodes_a_row_bucket(tiny):
    """Requests take the lowest free slot, so the decode call runs the smallest row bucket
    (1, 2, 4, 8, ...) holding every unfinished request."""
    eng = Engine(tiny, slots=8, cache_len=64, buf_len=16)
    a = eng.submit(RAGGED[0], Sampling(), 16)
    eng.advance(0)
    assert eng.entries[a].slot == 0 and eng._rows() == 1
    others = [eng.submit(p, Sampling(), 16) for p in RAGGED[1:3]]
    eng.advance(0)
    assert [eng.entries[h].slot for h in others] == [1, 2] and eng._rows() == 4
    eng.forget(a)
    b = eng.submit(RAGGED[0], Sampling(), 16)
    eng.advance(0)
    assert eng.entries[b].slot == 0
    assert generate.rows_bucket(5) == 8 and generate.rows_bucket(16) == 16
    assert [generate.chunk_bucket(n, 256) for n in (16, 17, 100, 143, 200, 256, 300)] == \
        [16, 32, 128, 128, 256, 256, 256]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_swap_exchanges_two_slots_whole(tiny, layout):
    """engine.swap(a, b) exchanges every per-slot value of two slots, cache rows included
    (keys, values, int8 scales, positions, ends), and leaves the other slots as they were."""
    params = generate.run_layout(tiny.params, tiny.config, **LAYOUTS[layout])
    eng = Engine(tiny, slots=4, cache_len=64, buf_len=16, params=params,
                 kv_cache="int8" if layout == "int8 cache" else "float")
    for i, p in enumerate(RAGGED):
        eng.submit(p, Sampling(temperature=1.0, seed=i), 16)
    eng.advance(3)
    before = jax.device_get(eng.state)
    after = jax.device_get(engine.swap(eng.state, jnp.asarray([0]), jnp.asarray([3])))
    order = np.asarray([3, 1, 2, 0])

    def rows(x, ax):  # the rows of x in `order`
        return jnp.take(x, order, axis=ax.index("batch"))

    moved = before.replace(cache=models.cache._map_rows(rows, before.cache), **{
        n: jax.tree.map(lambda x: x[order], getattr(before, n)) for n in engine._row_fields()})
    for x, y in zip(jax.tree.leaves(after), jax.tree.leaves(moved), strict=True):
        np.testing.assert_array_equal(x, y)


def test_engine_moves_running_requests_into_the_lowest_slots(tiny):
    """When the low slots finish first, a request still running in a high slot moves down
    (engine.swap) before the next decode call, which then runs one row, not the bucket of the
    highest slot. Its tokens are the ones it gets alone, and a finished request's result
    stays readable after its slot was swapped."""
    sampling = Sampling(temperature=1.0, top_p=0.9, seed=5)
    want, want_lp = _alone(tiny, RAGGED[1], sampling, 14)
    eng = Engine(tiny, slots=8, cache_len=64, buf_len=16)
    short = [eng.submit(p, Sampling(), 2) for p in (RAGGED * 2)[:5]]
    late = eng.submit(RAGGED[1], sampling, 14)
    eng.advance(0)
    assert eng.entries[late].slot == 5 and eng._rows() is None  # all 8 slots
    while not all(eng.finished(h) for h in short):
        eng.advance(1)
    kept = eng.result(short[0])
    for h in short[1:]:
        eng.forget(h)
    eng.advance(1)  # slot 5 moves to slot 0 (short[0]'s finished result goes to slot 5)
    assert eng.entries[late].slot == 0 and eng.entries[short[0]].slot == 5
    assert eng._rows() == 1 and sorted(eng.free) == [1, 2, 3, 4, 6, 7]
    assert eng.result(short[0]) == kept
    while not eng.finished(late):
        eng.advance(3)
    ids, lps, _ = eng.result(late)
    assert ids == want
    np.testing.assert_allclose(lps, want_lp, atol=1e-5)


def test_one_advance_admits_requests_until_the_prefill_budget_is_spent(tiny):
    """admit_group 1 (the server's engine): one advance runs one admit call after another,
    one prompt chunk each, until prefill_tokens is spent; what is left goes in at the next
    advance. A new prompt that one chunk holds is not split to fit the budget's rest: it goes
    in whole. Every request still gives the tokens it gives alone."""
    eng = Engine(tiny, slots=8, cache_len=64, buf_len=16, admit_group=1, prefill_tokens=32)
    prompts = [RAGGED[0], RAGGED[1], RAGGED[2], [5] * 20, [6] * 40]  # 20: one chunk of 32
    assert [len(p) <= 16 for p in prompts] == [True, True, True, False, False]
    handles = [eng.submit(p, Sampling(), 6) for p in prompts]
    eng.advance(0)
    assert [eng.live(h) for h in handles] == [True, True, False, False, False]
    eng.advance(0)  # 16 tokens left, then all 20 of the next prompt (not 16 of them)
    assert [eng.live(h) for h in handles] == [True, True, True, True, False]
    assert eng.entries[handles[4]].slot is None
    eng.advance(0)  # 40 tokens: one chunk holds none, so chunks of the budget
    assert eng.entries[handles[4]].prefilled == 32 and not eng.live(handles[4])
    while not all(eng.finished(h) for h in handles):
        eng.advance(4)
    for p, h in zip(prompts, handles, strict=True):
        assert eng.result(h)[0] == _alone(tiny, p, Sampling(), 6)[0]


def test_shortest_first_admits_short_prompts_first_and_ages_long_ones(tiny):
    """shortest_first: a short prompt that comes later gets the free slot before a long one
    that waits; once the long one has waited long enough (rate x seconds > the length
    difference) it goes before a new short one; every request keeps its own tokens."""
    with pytest.raises(InputError, match="shortest_first must be None or a rate >= 0"):
        Engine(tiny, slots=1, cache_len=64, buf_len=16, shortest_first=-1.0)
    eng = Engine(tiny, slots=1, cache_len=64, buf_len=16, shortest_first=10.0)
    prompts = {"busy": RAGGED[0], "long": [5] * 30, "short": [7] * 4, "short2": [9] * 3}
    h = {"busy": eng.submit(prompts["busy"], Sampling(), 2)}
    eng.advance(0)
    h["long"] = eng.submit(prompts["long"], Sampling(), 3)
    h["short"] = eng.submit(prompts["short"], Sampling(), 3)

    got = {}

    def finish_and_admit_next(k):
        while not eng.finished(h[k]):
            eng.advance(1)
        got[k] = eng.result(h[k])[0]
        eng.forget(h[k])
        eng.advance(0)

    finish_and_admit_next("busy")
    assert eng.live(h["short"]) and not eng.live(h["long"])
    h["short2"] = eng.submit(prompts["short2"], Sampling(), 3)
    eng.entries[h["long"]].submitted -= 10.0  # it waited 10 s: 30 - 10 * 10 < 3
    finish_and_admit_next("short")
    assert eng.live(h["long"]) and not eng.live(h["short2"])
    finish_and_admit_next("long")
    finish_and_admit_next("short2")
    for k in ("long", "short", "short2"):
        assert got[k] == _alone(tiny, prompts[k], Sampling(), 3)[0]


def test_released_request_frees_its_slot_and_others_continue(tiny):
    eng = Engine(tiny, slots=2, cache_len=64, buf_len=16)
    a, b = eng.submit(RAGGED[0], Sampling(), 16), eng.submit(RAGGED[1], Sampling(), 16)
    eng.advance(2)
    eng.release([a])
    assert eng.finished(a) and len(eng.result(a)[0]) == 3
    eng.forget(a)
    c = eng.submit(RAGGED[2], Sampling(), 5)
    while not (eng.finished(b) and eng.finished(c)):
        eng.advance(3)
    assert eng.result(b)[0] == _alone(tiny, RAGGED[1], Sampling(), 16)[0]
    assert eng.result(c)[0] == _alone(tiny, RAGGED[2], Sampling(), 5)[0]


def test_decode_ends_when_a_slot_frees_for_a_waiting_request(tiny):
    """With every slot taken and a request waiting, a decode call ends as soon as a running
    request finishes (not at the end of its chunk), so the waiting one gets the slot at the
    next call; without a waiting request the chunk runs whole. Tokens are unchanged."""
    eng = Engine(tiny, slots=2, cache_len=64, buf_len=16)
    a, b = eng.submit(RAGGED[0], Sampling(), 3), eng.submit(RAGGED[1], Sampling(), 12)
    c = eng.submit(RAGGED[2], Sampling(temperature=1.0, seed=3), 5)
    eng.advance(0)
    assert eng.live(a) and eng.live(b) and not eng.live(c)
    step = int(eng.state.step)
    eng.advance(8)  # a has 1 of its 3 tokens: two steps, then its slot is free
    assert int(eng.state.step) == step + 2 and eng.finished(a) and not eng.finished(b)
    eng.advance(8)  # a's slot is not given back yet: nothing new frees, the chunk runs whole
    assert int(eng.state.step) == step + 10 and not eng.finished(b)
    eng.forget(a)
    while not (eng.finished(b) and eng.finished(c)):
        eng.advance(8)
    assert eng.result(b)[0] == _alone(tiny, RAGGED[1], Sampling(), 12)[0]
    assert eng.result(c)[0] == _alone(tiny, RAGGED[2], Sampling(temperature=1.0, seed=3), 5)[0]


def test_chunked_prefill_equals_one_prefill(tiny):
    """A prompt longer than the step's prefill budget (prefill_tokens) is prefilled in chunks
    between decode steps of the other slots, with the same tokens and log-probs as in one
    piece."""
    prompt = [int(t) for t in np.random.default_rng(0).integers(3, 120, 45)]
    sampling = Sampling(temperature=1.0, seed=11, repetition_penalty=1.3)
    want, want_lp = _alone(tiny, prompt, sampling, 10)
    eng = Engine(tiny, slots=2, cache_len=64, buf_len=16, prefill_tokens=16)
    other = eng.submit(RAGGED[0], Sampling(), 16)
    eng.advance(1)
    h = eng.submit(prompt, sampling, 10)
    steps = 0
    while not eng.finished(h):
        eng.advance(1)
        steps += 1
    assert steps >= 3 and len(eng.result(other)[0]) >= 4  # the other slot kept decoding
    ids, lps, _ = eng.result(h)
    assert ids == want
    np.testing.assert_allclose(lps, want_lp, atol=1e-5)


def test_prefill_budget_is_shared_by_the_requests_admitted_together(tiny):
    """Two long prompts admitted in one call split the budget (32 tokens: 16 each per call), so
    no call prefills more than the budget; a budget that is not a power of two in [16, 512]
    is one InputError."""
    rng = np.random.default_rng(2)
    prompts = [[int(t) for t in rng.integers(3, 120, 40)] for _ in range(2)]
    eng = Engine(tiny, slots=2, cache_len=64, buf_len=8, prefill_tokens=32)
    hs = [eng.submit(p, Sampling(), 4) for p in prompts]
    done = []
    while not all(eng.live(h) for h in hs):
        before = sum(eng.entries[h].prefilled for h in hs)
        eng.advance(1)
        done.append(sum(eng.entries[h].prefilled for h in hs) - before)
    assert max(done) <= 32 and len(done) == 3  # 16 + 16 + 8 tokens of each prompt
    while not all(eng.finished(h) for h in hs):
        eng.advance(4)
    for h, p in zip(hs, prompts, strict=True):
        assert eng.result(h)[0] == _alone(tiny, p, Sampling(), 4)[0]
    for bad in (8, 24, 1024):
        with pytest.raises(InputError, match="prefill_tokens must be a power of two"):
            Engine(tiny, slots=1, cache_len=32, buf_len=8, prefill_tokens=bad)


def test_output_rules_match_their_definition():
    """presence / frequency penalties and min_tokens (sampling.apply_output_rules) against a
    numpy reference: counts over each row's generated tokens only, stop ids masked while fewer
    than min_tokens are generated; rows without the rules keep their logits."""
    from jaxinfer.sampling import apply_output_rules

    rng = np.random.default_rng(0)
    b, v, n = 4, 50, 6
    logits = rng.standard_normal((b, v)).astype(np.float32)
    generated = rng.integers(0, 8, (b, n)).astype(np.int32)  # repeats likely
    counter = np.array([6, 3, 0, 2], np.int32)
    stop_ids = np.array([[1, -1], [2, 3], [4, -1], [-1, -1]], np.int32)
    rows = [Sampling(presence_penalty=0.5, frequency_penalty=1.25),
            Sampling(frequency_penalty=-0.75, min_tokens=4), Sampling(min_tokens=1), Sampling()]
    s = SamplingArrays.from_rows(rows, b)
    got = np.asarray(apply_output_rules(jnp.asarray(logits), s, jnp.asarray(counter),
                                        jnp.asarray(stop_ids), jnp.asarray(generated)))
    want = logits.copy()
    for i, r in enumerate(rows):
        counts = np.bincount(generated[i, :counter[i]], minlength=v).astype(np.float32)
        want[i] -= counts * np.float32(r.frequency_penalty) + (counts > 0) * np.float32(
            r.presence_penalty)
        if counter[i] < r.min_tokens:
            want[i, stop_ids[i][stop_ids[i] >= 0]] = -np.inf
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert np.array_equal(got[3], logits[3])
    # only finished or free rows hold the knobs: nothing runs (their tokens are not kept)
    idle = apply_output_rules(jnp.asarray(logits), s, jnp.asarray(counter), jnp.asarray(stop_ids),
                              jnp.asarray(generated), jnp.asarray([False, False, False, True]))
    assert np.array_equal(np.asarray(idle), logits)


def test_min_tokens_and_penalties_in_the_engine(tiny):
    """min_tokens keeps a stop id from being drawn early (greedy would stop at its first
    token); penalties change greedy's tokens and, like every knob, give a request the same
    tokens in a running batch as alone."""
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    plain, _ = _alone(tiny, prompt, Sampling(), 12)
    stop = plain[0]
    cut = generate_ids(tiny, Request(prompts=[prompt], sampling=[Sampling()], max_new_tokens=12,
                                     stop_token_ids=(stop,)))[0]
    assert cut.token_ids == plain[:1] and cut.finish_reason == "stop"
    held = generate_ids(tiny, Request(prompts=[prompt], sampling=[Sampling(min_tokens=4)],
                                      max_new_tokens=12, stop_token_ids=(stop,)))[0].token_ids
    assert len(held) >= 4 and stop not in held[:3]
    penalised = Sampling(frequency_penalty=2.0, presence_penalty=1.0)
    want, want_lp = _alone(tiny, prompt, penalised, 12)
    assert want != plain
    eng = Engine(tiny, slots=3, cache_len=64, buf_len=16)
    others = [eng.submit(p, Sampling(temperature=0.8, seed=i), 16)
              for i, p in enumerate(RAGGED[:2])]
    eng.advance(2)
    _expect(eng, eng.submit(prompt, penalised, 12), want, want_lp)
    assert others


def test_prefix_cache_hit_equals_a_fresh_prefill(tiny):
    """A request sharing whole blocks of an earlier prompt starts from its cached KV and gets
    the tokens and log-probs of a fresh prefill; the cache evicts by size (LRU)."""
    rng = np.random.default_rng(1)
    system = [int(t) for t in rng.integers(3, 120, 37)]
    first, second = system + [5, 6, 7], system[:35] + [9, 8, 7, 6]
    sampling = Sampling(temperature=1.0, seed=5, repetition_penalty=1.2)
    eng = Engine(tiny, slots=2, cache_len=96, buf_len=16, prefix_cache_bytes=1 << 24)
    for prompt in (first, second, first):
        want, want_lp = _alone(tiny, prompt, sampling, 8)
        eng.forget(_expect(eng, eng.submit(prompt, sampling, 8), want, want_lp))
    assert (eng.prefixes.hits, eng.prefixes.misses) == (2, 1)  # 32 shared tokens, twice
    small = generate.PrefixCache(max_bytes=eng.prefixes.bytes)
    kv = next(iter(eng.prefixes.entries.values()))[0]
    small.add([1] * 16, kv)
    small.add([2] * 16, kv)
    assert list(small.entries) == [(2,) * 16]  # the older entry was evicted


def test_engine_refuses_what_does_not_fit(tiny):
    eng = Engine(tiny, slots=1, cache_len=32, buf_len=16)
    with pytest.raises(InputError, match="exceeds the engine's 32 cache slots"):
        eng.submit(list(range(1, 30)), Sampling(), 8)
    with pytest.raises(InputError, match=r"max_new_tokens must be in \[1, 16\]"):
        eng.submit([1, 2], Sampling(), 17)
    with pytest.raises(InputError, match="at most 8 stop token ids"):
        eng.submit([1, 2], Sampling(), 4, stop_ids=tuple(range(9)))


# --------------------------------------------------------------------------------------------
# 4. Sampling
# --------------------------------------------------------------------------------------------

def test_seeds_reproducible_and_distinct(tiny):
    prompt = RAGGED[1]
    rows = [Sampling(temperature=1.0, seed=s) for s in (0, 1, 2, 3)]
    first = run_ids(tiny, [prompt] * 4, sampling=rows)
    again = run_ids(tiny, [prompt] * 4, sampling=rows)
    assert [c.token_ids for c in first] == [c.token_ids for c in again]
    seqs = {tuple(c.token_ids) for c in first}
    assert len(seqs) == 4  # different seeds: different samples (16 draws from ~flat dists)
    # A row's draws depend on its own seed only, not on the rest of the batch.
    (alone,) = run_ids(tiny, [prompt], temperature=1.0, seed=2)
    assert alone.token_ids == first[2].token_ids


def test_top_k_1_equals_greedy(tiny):
    greedy = run_ids(tiny, RAGGED)
    for seed in (0, 5):
        top1 = run_ids(tiny, RAGGED, temperature=1.0, top_k=1, seed=seed)
        assert [c.token_ids for c in top1] == [c.token_ids for c in greedy]
    sampled = run_ids(tiny, RAGGED, temperature=1.0, seed=0)
    assert [c.token_ids for c in sampled] != [c.token_ids for c in greedy]


def allowed_tokens(logits, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, tol=1e-4):
    """Mask of tokens a correct sampler may draw from logits [V] (Hugging Face semantics:
    temperature, then top-k, then top-p over the survivors, then min-p). Boundaries get a
    slack of `tol` so cached-vs-full float noise cannot flip a decision."""
    x = np.asarray(logits, np.float64) / temperature
    keep = np.ones(x.shape, bool)
    if top_k:
        kth = np.sort(x)[::-1][top_k - 1]
        strict = x >= kth
        keep &= x >= kth - tol
    else:
        strict = keep.copy()
    probs = np.where(strict, np.exp(x - x.max()), 0.0)
    probs /= probs.sum()
    if top_p < 1:
        order = np.argsort(-probs)
        cum = np.cumsum(probs[order])
        n = int(np.searchsorted(cum, top_p)) + 1  # smallest prefix whose mass reaches top_p
        boundary = probs[order[n - 1]]
        keep &= probs >= boundary * (1 - 1e-3) - 1e-9
    if min_p:
        keep &= probs >= min_p * probs.max() * (1 - 1e-3)
    return keep


FILTERS = {
    "top_k": dict(top_k=4),
    "top_p": dict(top_p=0.5),
    "top_p_cold": dict(temperature=0.6, top_p=0.7),
    "min_p": dict(min_p=0.3),
    "top_k_top_p_min_p": dict(temperature=1.3, top_k=8, top_p=0.8, min_p=0.05),
}


@pytest.mark.parametrize("name", list(FILTERS))
def test_sampled_tokens_lie_in_filtered_support(tiny, name):
    opts = dict(temperature=1.0) | FILTERS[name]
    prompts = [RAGGED[0], RAGGED[1], RAGGED[2], RAGGED[0]]

    def draws(**kw):  # 2 batches x 4 rows x 16 steps = 128 draws, one compiled shape
        pairs = []
        for seeds in ((11, 12, 13, 14), (21, 22, 23, 24)):
            outs = run_ids(tiny, prompts, max_new=16, sampling=[Sampling(seed=s, **kw) for s in seeds])
            for c, lg in zip(outs, step_logits(tiny, prompts, outs), strict=True):
                pairs += list(zip(c.token_ids, lg, strict=True))
        return pairs

    pairs = draws(**opts)
    assert len(pairs) == 128
    for tok, step in pairs:
        assert allowed_tokens(step, **opts)[tok], (name, tok)
    # The check has teeth: without the filters some draws fall outside that support.
    outside = sum(not allowed_tokens(step, **opts)[tok]
                  for tok, step in draws(temperature=opts["temperature"]))
    assert outside > 0


def test_sampling_settings_do_not_recompile(tiny):
    run_ids(tiny, RAGGED, max_new=16)  # compile these shapes
    before = cache_sizes()
    settings = [
        dict(temperature=1.0, seed=1),
        dict(temperature=0.3, top_k=3, seed=2),
        dict(temperature=2.0, top_p=0.4, seed=3),
        dict(temperature=1.0, min_p=0.2, repetition_penalty=1.5, seed=99),
        dict(temperature=0.7, top_k=50, top_p=0.9, min_p=0.01, seed=2**31),
        dict(repetition_penalty=0.8),
    ]
    for kw in settings:
        run_ids(tiny, RAGGED, max_new=16, **kw)
    run_ids(tiny, RAGGED, max_new=9, stop=(5, 6, 7))  # same token-buffer bucket
    run_ids(tiny, RAGGED, max_new=16, sampling=[Sampling(temperature=0.5, seed=i) for i in range(3)])
    run_ids(tiny, RAGGED, max_new=16, chunk=4)
    assert cache_sizes() == before


# --------------------------------------------------------------------------------------------
# 5. Stop conditions
# --------------------------------------------------------------------------------------------

def test_smollm2_eos_and_length(smol, smol_batch):
    hi, story, photo = smol_batch
    assert hi.finish_reason == "stop" and hi.token_ids[-1] in smol.eos_token_ids
    assert not any(t in smol.eos_token_ids for t in hi.token_ids[:-1])
    assert len(hi.token_ids) < MAX_NEW
    assert "<|im_end|>" not in hi.text and hi.text.strip()
    for c in (story, photo):
        assert c.finish_reason == "length" and len(c.token_ids) == MAX_NEW
        assert not any(t in smol.eos_token_ids for t in c.token_ids)
    for c in smol_batch:
        assert c.text == smol.tokenizer.decode(c.token_ids, skip_special_tokens=True)


def test_tiny_stop_token_and_length(tiny):
    full = run_ids(tiny, RAGGED, max_new=16)
    a, b, c = (x.token_ids for x in full)
    # A stop id that row 0 draws at step >= 2 and the other rows never draw.
    stop_tok = next(t for t in a[2:] if t not in b + c)
    k = a.index(stop_tok)
    out = run_ids(tiny, RAGGED, max_new=16, stop=(stop_tok,), logprobs=True)
    assert out[0].token_ids == a[: k + 1] and out[0].token_ids[-1] == stop_tok
    assert out[0].finish_reason == "stop" and len(out[0].logprobs) == k + 1
    for row, ref in zip(out[1:], (b, c), strict=True):  # rows finish independently
        assert row.token_ids == ref and row.finish_reason == "length"
    for n in (1, 5):
        short = run_ids(tiny, RAGGED, max_new=n)
        assert [x.token_ids for x in short] == [a[:n], b[:n], c[:n]]
        assert all(x.finish_reason == "length" for x in short)
    # A stop id drawn on the very first (prefill) step.
    first = run_ids(tiny, RAGGED, max_new=16, stop=(a[0],))
    assert first[0].token_ids == [a[0]] and first[0].finish_reason == "stop"


def test_smollm2_stop_strings(smol, smol_batch):
    hi, story, photo = (c.text for c in smol_batch)
    stop_story = story[40:52]  # mid-text, spanning token boundaries
    stop_photo = photo[70:79]
    stops = [stop_story, stop_photo]
    assert not any(s in hi for s in stops)
    out = text.generate(smol, CHAT_PROMPTS, chat=True, max_new_tokens=MAX_NEW, stop=stops)
    assert out[0].text == hi and out[0].token_ids == smol_batch[0].token_ids
    assert out[0].finish_reason == "stop"
    for full, got in zip(smol_batch[1:], out[1:], strict=True):
        cut = min(i for i in (full.text.find(s) for s in stops) if i >= 0)
        assert got.text == full.text[:cut]
        assert got.finish_reason == "stop"
        assert not any(s in got.text for s in stops)
        n = len(got.token_ids)
        assert 0 < n < MAX_NEW and got.token_ids == full.token_ids[:n]
        # The last kept token is the one that completed the stop string.
        assert any(s in smol.tokenizer.decode(got.token_ids) for s in stops)
        assert not any(s in smol.tokenizer.decode(got.token_ids[:-1]) for s in stops)


# --------------------------------------------------------------------------------------------
# 6. Streaming
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("with_stop", [False, True])
def test_smollm2_stream_matches_generate(smol, smol_batch, with_stop):
    prompts = CHAT_PROMPTS[:2]
    kw = dict(chat=True, max_new_tokens=MAX_NEW)
    if with_stop:
        kw["stop"] = [smol_batch[1].text[30:37], "\n\nZZZ"]
        ref = text.generate(smol, prompts, **kw)
        assert ref[0].finish_reason == "stop" and ref[0].text == smol_batch[0].text
        assert ref[1].finish_reason == "stop" and len(ref[1].token_ids) < MAX_NEW
        chunks = (1, 8)
    else:  # the non-streaming batch of 3 (a ragged batch equals its rows alone: tested above)
        ref = smol_batch[:2]
        chunks = (8,)
    for chunk in chunks:
        results = []
        events = list(text.stream(smol, prompts, chunk=chunk, results=results, **kw))
        for i, c in enumerate(ref):
            mine = [e for e in events if e.index == i]
            assert "".join(e.text for e in mine) == c.text
            assert [e.finish_reason is not None for e in mine] == [False] * (len(mine) - 1) + [True]
            assert mine[-1].finish_reason == c.finish_reason
        assert [(r.token_ids, r.text, r.finish_reason) for r in results] == [
            (c.token_ids, c.text, c.finish_reason) for c in ref]


MULTIBYTE_PROMPTS = [
    "Continue this Japanese text: 東京は日本の首都です。京都は",
    "Reply with only emoji: 😀 😃 😄 😁 😆",
    "Translate to Chinese: I love my cat.",
]


def test_smollm2_stream_multibyte_text(smol):
    """Characters split across byte-level tokens stream intact; multi-byte stop strings cut."""
    full = text.generate(smol, MULTIBYTE_PROMPTS, chat=True, max_new_tokens=MAX_NEW)
    assert all(sum(ord(ch) > 127 for ch in c.text) >= 5 for c in full)
    for c in full:
        assert c.text == smol.tokenizer.decode(c.token_ids, skip_special_tokens=True)
    events = list(text.stream(smol, MULTIBYTE_PROMPTS, chat=True, max_new_tokens=MAX_NEW, chunk=1))
    for i, c in enumerate(full):
        assert "".join(e.text for e in events if e.index == i) == c.text
        assert all("\ufffd" not in e.text for e in events)
    # Stop strings taken from the middle of the Japanese and Chinese answers.
    stops = [full[0].text[2:4], full[2].text[4:6]]
    assert not any(s in full[1].text for s in stops)
    results = []
    events = list(text.stream(smol, MULTIBYTE_PROMPTS, chat=True, max_new_tokens=MAX_NEW, chunk=1,
                              stop=stops, results=results))
    for i, c in enumerate(full):
        cuts = [j for j in (c.text.find(s) for s in stops) if j >= 0]
        expected = c.text[:min(cuts)] if cuts else c.text
        assert "".join(e.text for e in events if e.index == i) == expected == results[i].text
        assert results[i].finish_reason == ("stop" if cuts else c.finish_reason)


# --------------------------------------------------------------------------------------------
# 7. Bad input: InputError before anything is compiled
# --------------------------------------------------------------------------------------------

BAD_SAMPLING = [
    dict(max_new_tokens=0),
    dict(temperature=-1.0),
    dict(top_p=0.0),
    dict(top_p=1.5),
    dict(top_k=-1),
    dict(min_p=1.5),
    dict(min_p=-0.1),
    dict(repetition_penalty=0.0),
]


@pytest.mark.parametrize("kwargs", BAD_SAMPLING, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_bad_sampling_raises_input_error(smol, tiny, kwargs):
    before = cache_sizes()
    with pytest.raises(InputError):
        text.generate(smol, "Hi", **kwargs)
    with pytest.raises(InputError):  # stream raises at the latest on the first event
        list(text.stream(smol, ["Hi", "Hello"], **kwargs))
    kw = dict(kwargs)
    max_new = kw.pop("max_new_tokens", 16)
    with pytest.raises(InputError):
        run_ids(tiny, RAGGED, max_new=max_new, **kw)
    assert cache_sizes() == before


def test_bad_prompts_raise_input_error(smol, tiny, tiny_ctx32):
    before = cache_sizes()
    for prompts in ("", [], ["Hi", ""]):
        with pytest.raises(InputError):
            text.generate(smol, prompts)
        with pytest.raises(InputError):
            list(text.stream(smol, prompts))
    with pytest.raises(InputError):
        run_ids(tiny, [])
    with pytest.raises(InputError):
        run_ids(tiny, [[1, 2], []])
    with pytest.raises(InputError):  # token id outside the vocabulary
        run_ids(tiny, [[1, 128]])
    with pytest.raises(InputError):  # one seed per prompt, or one for all
        text.generate(smol, ["Hi", "Hello"], seed=[1, 2, 3])
    with pytest.raises(InputError):
        text.generate(smol, "Hi", stop=[""])
    with pytest.raises(InputError):
        text.generate(smol, "Hi", stop_token_ids=list(range(9)))
    # Context of 32: a prompt longer than the context, or prompt + max_new_tokens beyond it.
    with pytest.raises(InputError):
        run_ids(tiny_ctx32, [list(range(40))], max_new=1)
    with pytest.raises(InputError):
        run_ids(tiny_ctx32, [list(range(1, 21)), [5]], max_new=16)
    assert cache_sizes() == before
    (ok,) = run_ids(tiny_ctx32, [list(range(1, 17))], max_new=16)  # exactly fills the context
    assert len(ok.token_ids) == 16


@pytest.mark.parametrize("seed", [-1, 2**32])
def test_out_of_range_seed_raises_input_error(smol, seed):
    with pytest.raises(InputError, match="seed"):
        text.generate(smol, "Hi", temperature=1.0, seed=seed)


def test_stream_validates_when_called(smol):
    with pytest.raises(InputError, match="temperature"):
        text.stream(smol, "Hi", temperature=-1)  # no next() needed


def test_sampling_rows_must_match_prompts(tiny):
    req = Request(prompts=[[1, 2], [3], [4, 5]], sampling=[Sampling(), Sampling()],
                  max_new_tokens=2, stop_token_ids=())
    with pytest.raises(InputError, match="sampling settings"):
        generate_ids(tiny, req)


def test_top_p_one_is_off():
    logits = jax.random.normal(jax.random.key(0), (2, 4096)) * 3
    arrays = SamplingArrays.from_rows([Sampling(temperature=1.0, top_p=1.0)] * 2, 2)
    assert bool(jnp.all(jnp.isfinite(filter_logits(logits, arrays))))


def _filter_by_numpy(logits: np.ndarray, row: Sampling) -> np.ndarray:
    """The filters' definition on one row, with a full sort (float64)."""
    x = logits.astype(np.float64) / max(row.temperature, 1e-6)
    order = -np.sort(-x)
    k = min(row.top_k, x.size) if row.top_k > 0 else x.size
    keep = x >= order[k - 1]
    p = np.exp(order[:k] - order[0])
    p /= p.sum()
    before = np.cumsum(p) - p
    n = max(int(np.sum(before < row.top_p)), 1)
    if row.top_p < 1.0:
        keep &= x >= order[n - 1]
    keep &= x >= order[0] + np.log(max(row.min_p, 1e-30))
    return keep


@pytest.mark.parametrize("scale", [0.5, 3.0, 12.0])  # flat to peaked distributions
def test_filter_logits_candidates_equal_the_full_sort(scale):
    """top-k / top-p / min-p from the CANDIDATES largest logits keep the same tokens as the
    definition with a full sort, for rows where the candidates suffice and rows where they do
    not (top_k above CANDIDATES, flat rows with top-p alone), mixed in one batch."""
    from jaxinfer.sampling import CANDIDATES

    rows = [Sampling(temperature=0.8, top_p=0.95, min_p=0.05, seed=1),
            Sampling(temperature=1.0, top_k=40, top_p=0.9),
            Sampling(temperature=1.0, top_p=0.5),
            Sampling(temperature=0.7, top_k=CANDIDATES + 50),
            Sampling(temperature=1.2, min_p=0.1),
            Sampling(temperature=1.0, top_k=5)]
    logits = np.asarray(jax.random.normal(jax.random.key(7), (len(rows), 49152)) * scale)
    for batch in ([rows[0]], rows[:3], rows):  # the fast path alone, and with the sort
        got = np.isfinite(np.asarray(filter_logits(jnp.asarray(logits[:len(batch)]),
                                                   SamplingArrays.from_rows(batch, len(batch)))))
        for i, row in enumerate(batch):
            want = _filter_by_numpy(logits[i], row)
            assert (got[i] != want).sum() <= 1, (scale, i)  # float32 vs float64 at the edge


def test_first_argmax_equals_jnp_argmax():
    """Ties resolve to the first index and NaN counts as the maximum, as jnp.argmax does."""
    x = jnp.round(jax.random.normal(jax.random.key(1), (64, 3000)) * 2)  # many ties
    x = x.at[3, 17].set(jnp.nan).at[5, :].set(-jnp.inf).at[6, 2999].set(100.0)
    np.testing.assert_array_equal(first_argmax(x), jnp.argmax(x, axis=-1))
    assert first_argmax(x).dtype == jnp.int32


def test_load_missing_path_raises_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError):
        jaxinfer.load(tmp_path / "no-such-model.gguf", progress=False)
    with pytest.raises(CheckpointError):
        jaxinfer.load(str(tmp_path / "missing-dir"), progress=False)


# --------------------------------------------------------------------------------------------
# 8. Repetition penalty
# --------------------------------------------------------------------------------------------

def test_repetition_penalty_follows_hf_rule(tiny):
    """Each greedy token is the argmax of the full-forward logits after the Hugging Face
    penalty over prompt + tokens generated so far; rows of one batch use different penalties."""
    penalties = [1.0, 1.3, 0.7, 3.0]
    prompts = [RAGGED[1]] * 4
    outs = run_ids(tiny, prompts, max_new=16,
                   sampling=[Sampling(repetition_penalty=p) for p in penalties])
    assert len({tuple(c.token_ids) for c in outs}) > 1  # the penalty changes the output
    for pen, c, logits in zip(penalties, outs, step_logits(tiny, prompts, outs), strict=True):
        proc = transformers.RepetitionPenaltyLogitsProcessor(pen) if pen != 1.0 else None
        for t, tok in enumerate(c.token_ids):
            scores = torch.tensor(logits[t][None])
            if proc is not None:
                seen = torch.tensor([list(prompts[0]) + c.token_ids[:t]])
                scores = proc(seen, scores)
            scores = scores[0].numpy()
            assert scores[tok] >= scores.max() - 1e-4, (pen, t)


def test_huge_repetition_penalty_never_repeats(tiny):
    prompt = RAGGED[1]
    (plain,) = run_ids(tiny, [prompt], max_new=16)
    assert len(set(plain.token_ids)) < len(plain.token_ids)  # greedy alone repeats itself
    (c,) = run_ids(tiny, [prompt], max_new=16, repetition_penalty=1e6)
    (logits,) = step_logits(tiny, [prompt], [c])
    seen = set(prompt)
    for tok, step in zip(c.token_ids, logits, strict=True):
        # Premise: some unseen token has a clearly positive logit, so every seen token
        # (positive logit / 1e6, or negative logit * 1e6) scores below it.
        assert max(v for i, v in enumerate(step) if i not in seen) > 1e-2
        assert tok not in seen
        seen.add(tok)


@pytest.mark.parametrize("penalty", [1.0, 1.3, 0.7])
def test_greedy_with_repetition_penalty_matches_transformers(tiny_pair, penalty):
    model, hf = tiny_pair
    eos = list(model.eos_token_ids)
    assert eos == [hf.generation_config.eos_token_id]
    outs = run_ids(model, RAGGED, max_new=16, stop=eos, repetition_penalty=penalty)
    for p, c in zip(RAGGED, outs, strict=True):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              do_sample=False, max_new_tokens=16, repetition_penalty=penalty,
                              eos_token_id=eos, pad_token_id=0)
        assert c.token_ids == ref[0, len(p):].tolist()


def test_cpu_generation_layouts_give_the_same_tokens(tiny):
    """On CPU, the engine runs kernel stacks read in place by the scan over the layers where
    the native kernels run (else one buffer per layer; made once per params); per-layer
    kernel weights and XLA on stacked weights give the same tokens."""
    from jaxinfer import generate

    params = generate.run_params(tiny)
    assert generate.run_params(tiny) is params
    eng = Engine(tiny, slots=2, cache_len=32, buf_len=16)
    if kernels.available():
        assert isinstance(params["layers"]["attn"]["q"], kernels.NativeWeight)
        assert not eng.state.cache.per_layer and eng.state.cache.attention is not None
    else:
        assert isinstance(params["layers"], tuple)
        assert eng.state.cache.per_layer and len(eng.state.cache.k) == tiny.config.n_layers
    runs = run_ids(tiny, RAGGED, max_new=12, logprobs=True, temperature=1.0, seed=5)
    stacked_params = generate.run_layout(tiny.params, tiny.config, unstack=False, native=False)
    assert all(a is b for a, b in zip(jax.tree.leaves(stacked_params["layers"]),  # stacked,
                                      jax.tree.leaves(tiny.params["layers"]), strict=True))
    assert generate.run_params(tiny) is params  # the model's own layout is kept
    per_layer_params = generate.run_layout(tiny.params, tiny.config, unstack=True)
    assert isinstance(per_layer_params["layers"], tuple)
    for other in (stacked_params, per_layer_params):
        got = run_ids(tiny, RAGGED, max_new=12, logprobs=True, temperature=1.0, seed=5,
                      params=other)
        assert [c.token_ids for c in runs] == [c.token_ids for c in got]
        for a, b in zip(runs, got, strict=True):
            np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
    # prepare: the model holds the run layout alone (no reference to the stacked weights: the
    # kernel stacks replace them; per-layer vectors kept as they are are shared, not copied),
    # the layout is its own (run_layout idempotent: no leaf copied) and the tokens are the same.
    prepared = generate.prepare(tiny)
    assert type(prepared.params["layers"]) is type(params["layers"])
    assert not {id(x) for x in jax.tree.leaves(tiny.params["layers"]) if x.ndim > 2} & {
        id(x) for x in jax.tree.leaves(prepared.params)}
    again = generate.run_layout(prepared.params, prepared.config)
    assert all(a is b for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(prepared.params),
                                      strict=True))
    assert generate.run_params(prepared) is prepared.params
    ids = run_ids(prepared, RAGGED, max_new=12, logprobs=True, temperature=1.0, seed=5)
    assert [c.token_ids for c in ids] == [c.token_ids for c in runs]
