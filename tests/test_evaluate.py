"""Sliding-window perplexity against independent loops: transformers on SmolLM2, and
`Model.logits` window by window on tiny random models."""

import math

import jax
import numpy as np
import pytest
import torch

import models
from jaxinfer import evaluate
from jaxinfer.bench import english_text
from jaxinfer.errors import InputError
from jaxinfer.evaluate import perplexity, perplexity_text
from jaxinfer.model import Model


def recipe_windows(n: int, context: int, stride: int):
    """(begin, end, trg_len) of each window of the Hugging Face guide's loop."""
    prev_end = 0
    for begin in range(0, n, stride):
        end = min(begin + context, n)
        yield begin, end, end - prev_end
        prev_end = end
        if end == n:
            break


def hf_perplexity(hf_model, ids: list[int], context: int, stride: int):
    """The guide's loop with transformers' own loss (labels -100 on the tokens scored already),
    summing exact per-token NLLs: returns (nll sum, tokens scored)."""
    nll_sum, n_scored = 0.0, 0
    for begin, end, trg_len in recipe_windows(len(ids), context, stride):
        input_ids = torch.tensor([ids[begin:end]])
        labels = input_ids.clone()
        labels[:, :-trg_len] = -100
        n_valid = int((labels[:, 1:] != -100).sum())  # after the model's one-token shift
        if n_valid == 0:
            continue
        with torch.no_grad():
            loss = hf_model(input_ids, labels=labels).loss  # mean over the valid labels
        nll_sum += float(loss) * n_valid
        n_scored += n_valid
    return nll_sum, n_scored


def test_smollm2_matches_transformers_sliding_window(smollm2, hf_smollm2):
    ids = smollm2.tokenizer.encode(english_text()[:8000])[:700]
    assert len(ids) == 700
    nll_sum, n_scored = hf_perplexity(hf_smollm2, ids, context=256, stride=128)
    ref = math.exp(nll_sum / n_scored)
    ours = perplexity(smollm2, ids, context=256, stride=128, batch_size=4, progress=False)
    rel = abs(ours["perplexity"] - ref) / ref
    print(f"\nSmolLM2 perplexity ours {ours['perplexity']:.6f} transformers {ref:.6f} "
          f"relative difference {rel:.2e}")
    assert ours["tokens"] == n_scored == len(ids) - 1
    assert rel < 5e-3, rel
    assert math.isclose(ours["nll"], math.log(ours["perplexity"]))
    assert 1.5 < ours["perplexity"] < 100  # real English text under a real model


def test_perplexity_text_encodes_like_the_tokenizer(smollm2):
    text = "The quick brown fox jumps over the lazy dog. " * 3
    ids = smollm2.tokenizer.encode(text)
    if smollm2.tokenizer.add_bos_token:
        ids = [smollm2.tokenizer.bos_token_id, *ids]
    got = perplexity_text(smollm2, text, context=16, stride=8, batch_size=2, progress=False)
    assert got == perplexity(smollm2, ids, context=16, stride=8, batch_size=2, progress=False)
    assert got["tokens"] == len(ids) - 1


TINY = {
    "llama": models.LlamaConfig.tiny(),
    "gpt2": models.GPT2Config.tiny(),
}


@pytest.fixture(scope="module", params=list(TINY))
def tiny(request):
    config = TINY[request.param]
    rng = np.random.default_rng(7)  # random weights without compiling the Flax init
    params = jax.tree.map(lambda s: (rng.standard_normal(s.shape) * 0.3).astype(np.float32),
                          models.abstract_params(config))
    return Model(config, params, None, source="tiny")


def reference_nll(model, ids: list[int], context: int, stride: int):
    """Direct loop: one `Model.logits` call per window, float64 log-softmax, score the tokens
    the previous window left unscored. Returns (nll sum, tokens scored)."""
    nll_sum, n_scored = 0.0, 0
    for begin, end, trg_len in recipe_windows(len(ids), context, stride):
        window = ids[begin:end]
        logits = model.logits(window)[0].astype(np.float64)
        shifted = logits - logits.max(-1, keepdims=True)
        logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
        for t in range(max(len(window) - trg_len, 1), len(window)):  # token t from column t - 1
            nll_sum -= logp[t - 1, window[t]]
            n_scored += 1
    return nll_sum, n_scored


# One context and two batch sizes, so that few shapes compile.
CASES = [  # (length, context, stride, batch_size)
    (50, 16, 8, 4),  # overlapping windows, a partial last batch
    (50, 16, 5, 1),  # stride not dividing context
    (50, 16, 16, 4),  # stride == context: non-overlapping windows
    (48, 16, 16, 1),  # non-overlapping, text a multiple of the context
    (10, 16, 8, 4),  # text shorter than the context: one window
    (16, 16, 4, 4),  # text exactly one context long: one window
    (17, 16, 8, 4),  # one token more than the context: the last window scores one token
    (17, 16, 16, 1),  # ... non-overlapping: the last window is one token and scores nothing
    (25, 16, 8, 1),  # one token more than the second window's start + context
    (2, 16, 8, 4),  # the shortest text
]


@pytest.mark.parametrize(("length", "context", "stride", "batch_size"), CASES)
def test_tiny_matches_direct_loop(tiny, length, context, stride, batch_size):
    ids = np.random.default_rng(length * 1000 + stride).integers(
        0, tiny.config.vocab_size, length).tolist()
    got = perplexity(tiny, ids, context=context, stride=stride, batch_size=batch_size,
                     progress=False)
    nll_sum, n_scored = reference_nll(tiny, ids, context, stride)
    assert got["tokens"] == n_scored and math.isfinite(got["nll"]) and got["nll"] > 0
    if stride < context or length <= context:
        assert n_scored == length - 1  # every token but the first, each once
    else:  # each non-overlapping window's first token has no context inside its window
        assert n_scored == length - math.ceil(length / context)
    np.testing.assert_allclose(got["nll"], nll_sum / n_scored, rtol=1e-5)
    np.testing.assert_allclose(got["perplexity"], math.exp(nll_sum / n_scored), rtol=1e-5)


def test_compiles_once_per_batch_and_context(tiny):
    rng = np.random.default_rng(0)
    perplexity(tiny, rng.integers(0, 100, 40).tolist(), context=16, stride=8, batch_size=4,
               progress=False)
    size = evaluate._window_nll._cache_size()
    for length, stride in ((2, 8), (9, 3), (23, 16), (61, 5)):
        perplexity(tiny, rng.integers(0, 100, length).tolist(), context=16, stride=stride,
                   batch_size=4, progress=False)
    assert evaluate._window_nll._cache_size() == size


def test_windows_and_batches_do_not_change_the_result(tiny):
    ids = np.random.default_rng(3).integers(0, 100, 40).tolist()
    a = perplexity(tiny, ids, context=16, stride=6, batch_size=1, progress=False)
    b = perplexity(tiny, np.array(ids), context=16, stride=6, batch_size=4, progress=False)
    assert a["tokens"] == b["tokens"] == 39
    np.testing.assert_allclose(a["nll"], b["nll"], rtol=1e-6)


@pytest.mark.parametrize(("ids", "kw", "match"), [
    ([1, 2, 3], dict(context=1), "context"),
    ([1, 2, 3], dict(context=0, stride=1), "context"),
    ([1, 2, 3], dict(context=8, stride=0), "stride"),
    ([1, 2, 3], dict(context=8, stride=9), "stride"),
    ([1, 2, 3], dict(context=100_000, stride=8), "exceeds"),
    ([1, 2, 3], dict(context=8, stride=4, batch_size=0), "batch_size"),
    ([1], dict(context=8, stride=4), "at least 2"),
    ([], dict(context=8, stride=4), "at least 2"),
    ([[1, 2], [3, 4]], dict(context=8, stride=4), "one sequence"),
    ([1, 2, 10_000], dict(context=8, stride=4), r"\[0, "),
    ([1, -2, 3], dict(context=8, stride=4), r"\[0, "),
])
def test_bad_input_raises(tiny, ids, kw, match):
    with pytest.raises(InputError, match=match):
        perplexity(tiny, ids, progress=False, **kw)


def test_bad_text_raises(smollm2, tiny):
    with pytest.raises(InputError, match="at least 2"):
        perplexity_text(smollm2, "", context=8, stride=4, progress=False)
    if not smollm2.tokenizer.add_bos_token:
        with pytest.raises(InputError, match="at least 2"):
            perplexity_text(smollm2, "a", context=8, stride=4, progress=False)
    with pytest.raises(InputError, match="no tokenizer"):
        perplexity_text(tiny, "some text", context=8, stride=4, progress=False)
