"""`jaxinfer serve`: a real uvicorn server on 127.0.0.1 serving SmolLM2, called with the official
`openai` client (and raw HTTP for malformed input)."""

import concurrent.futures
import json
import time

import httpx2 as httpx  # the HTTP client the openai package is built on
import openai
import pytest

from jaxinfer.serve.app import BackgroundServer, create_app
from jaxinfer.text import generate

KEY = "test-key"
PROMPTS = ["What is the capital of France?", "Name a color.", "Say hello.", "Count to three."]


class Served(BackgroundServer):
    def client(self, key=KEY, **kw):
        return openai.OpenAI(base_url=self.base + "/v1", api_key=key, max_retries=0, **kw)


@pytest.fixture(scope="module")
def served(smollm2):
    s = Served(create_app(smollm2, model_name="smollm2", slots=4, max_len=512, max_queue=64,
                          api_key=KEY))
    yield s
    s.stop()


def _metric(served, name: str) -> float:
    text = httpx.get(served.base + "/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith(name + " ") or line.startswith(name + "_total "))


def test_chat_greedy_equals_generate_and_reports_usage(served, smollm2):
    want = generate(smollm2, PROMPTS[0], chat=True, max_new_tokens=12, temperature=0.0)[0]
    r = served.client().chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": PROMPTS[0]}], max_tokens=12,
        temperature=0)
    assert r.choices[0].message.content == want.text
    assert r.choices[0].finish_reason == want.finish_reason
    assert r.usage.completion_tokens == len(want.token_ids)
    assert r.usage.prompt_tokens == len(want.prompt_token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streaming_chat_and_usage_in_the_stream(served):
    client = served.client()
    messages = [{"role": "user", "content": PROMPTS[1]}]
    whole = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=10,
                                           temperature=0)
    chunks = list(client.chat.completions.create(
        model="smollm2", messages=messages, max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == \
        whole.usage.completion_tokens


def test_completions_n_and_seeded_sampling_reproducible(served):
    client = served.client()
    kw = dict(model="smollm2", prompt="Once upon a time", max_tokens=8, temperature=1.0,
              top_p=0.9, seed=1234, n=3, extra_body={"ignore_eos": True, "top_k": 40})
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert sorted(c.index for c in a.choices) == [0, 1, 2]
    assert len({c.text for c in a.choices}) > 1  # each choice draws with its own seed
    assert a.usage.completion_tokens == 3 * 8 and all(c.finish_reason == "length"
                                                      for c in a.choices)


def test_penalties_and_min_tokens_equal_the_library(served, smollm2):
    """presence_penalty / frequency_penalty and min_tokens through the openai client give the
    library's greedy answer with the same knobs; min_tokens holds the end of an answer back."""
    client = served.client()
    prompt, knobs = "Count: one, two, three,", dict(presence_penalty=0.8, frequency_penalty=1.5)
    r = client.completions.create(model="smollm2", prompt=prompt, max_tokens=12, temperature=0,
                                  **knobs)
    want = generate(smollm2, prompt, max_new_tokens=12, temperature=0.0, **knobs)[0]
    plain = generate(smollm2, prompt, max_new_tokens=12, temperature=0.0)[0]
    assert r.choices[0].text == want.text and want.text != plain.text
    messages = [{"role": "user", "content": PROMPTS[0]}]
    short = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=40,
                                           temperature=0)
    assert short.choices[0].finish_reason == "stop"  # ends on EOS before 40 tokens
    n = short.usage.completion_tokens
    held = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=40,
                                          temperature=0, extra_body={"min_tokens": n + 3})
    assert held.usage.completion_tokens >= n + 3


def test_logprobs_of_the_chosen_tokens(served):
    r = served.client().chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": PROMPTS[2]}], max_tokens=5,
        temperature=0, logprobs=True)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens and all(t.logprob <= 0 for t in content)
    assert all(t.top_logprobs == [] for t in content)


def test_top_logprobs_equal_the_library(served, smollm2):
    """top_logprobs (chat, also streamed) and the completions API's `logprobs: N` give the
    library's most likely alternatives at each token: greedy, so the chosen token is the
    first of them."""
    client = served.client()
    prompt = PROMPTS[3]
    want = generate(smollm2, prompt, chat=True, max_new_tokens=6, temperature=0.0,
                    logprobs=True, top_logprobs=4)[0]
    r = client.chat.completions.create(model="smollm2", max_tokens=6, temperature=0,
                                       messages=[{"role": "user", "content": prompt}],
                                       logprobs=True, top_logprobs=4)
    content = r.choices[0].logprobs.content
    assert len(content) == len(want.token_ids) == len(want.top_logprobs)
    for entry, tok, alts in zip(content, want.token_ids, want.top_logprobs, strict=True):
        assert [a.token for a in entry.top_logprobs] == [
            smollm2.tokenizer.decode([t]) for t, _ in alts]
        assert [a.logprob for a in entry.top_logprobs] == pytest.approx(
            [lp for _, lp in alts], abs=1e-4)  # other shapes than the library's
        assert alts[0][0] == tok and entry.top_logprobs[0].logprob == pytest.approx(
            entry.logprob, abs=1e-6)
        values = [a.logprob for a in entry.top_logprobs]
        assert values == sorted(values, reverse=True)
    chunks = client.chat.completions.create(model="smollm2", max_tokens=6, temperature=0,
                                            messages=[{"role": "user", "content": prompt}],
                                            logprobs=True, top_logprobs=4, stream=True)
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs
                for t in c.choices[0].logprobs.content]
    assert [[a.token for a in t.top_logprobs] for t in streamed] == [
        [a.token for a in t.top_logprobs] for t in content]
    c = client.completions.create(model="smollm2", prompt="The capital of France is",
                                  max_tokens=4, temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    assert len(lp.top_logprobs) == len(lp.tokens) == 4
    assert all(len(alts) == 2 and max(alts.values()) == pytest.approx(chosen, abs=1e-6)
               for alts, chosen in zip(lp.top_logprobs, lp.token_logprobs, strict=True))
    r = httpx.post(served.base + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"prompt": "hi", "logprobs": 6})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs"


def test_concurrent_streaming_clients_get_their_own_answers(served, smollm2):
    """32 concurrent streams over 4 slots: every answer complete, none mixed up."""
    want = {p: generate(smollm2, p, chat=True, max_new_tokens=6, temperature=0.0)[0].text
            for p in PROMPTS}

    def one(i):
        p = PROMPTS[i % len(PROMPTS)]
        stream = served.client().chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": p}], max_tokens=6,
            temperature=0, stream=True)
        return p, "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(32)))
    assert all(text == want[p] for p, text in results), results


def test_client_that_disconnects_frees_its_slot(served):
    before = _metric(served, "jaxinfer_requests_cancelled")
    with httpx.stream("POST", served.base + "/v1/completions",
                      headers={"Authorization": f"Bearer {KEY}"},
                      json={"prompt": "Tell me a long story.", "max_tokens": 400,
                            "stream": True, "ignore_eos": True}, timeout=120) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    deadline = time.time() + 30
    while _metric(served, "jaxinfer_requests_cancelled") <= before or \
            _metric(served, "jaxinfer_active_slots") > 0:
        assert time.time() < deadline, "the slot was not freed"
        time.sleep(0.2)


@pytest.mark.parametrize("body, status, param", [
    ({"model": "smollm2"}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 5}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10_000}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}, 400,
     "stop"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 0}, 400, "n"),
    ({"messages": [{"role": "user", "content": "hi"}], "presence_penalty": 2.5}, 400,
     "presence_penalty"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "min_tokens": 5}, 400,
     "min_tokens"),
    ({"messages": "hi"}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 3}, 400, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 21},
     400, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "logprobs": 6}, 400, "logprobs"),
    ({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
])
def test_bad_requests_get_4xx_and_the_server_keeps_serving(served, body, status, param):
    r = httpx.post(served.base + "/v1/chat/completions", json=body,
                   headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"]
    ok = served.client().completions.create(model="smollm2", prompt="Hi", max_tokens=2)
    assert ok.choices[0].text is not None


def test_shared_system_prompt_hits_the_prefix_cache(served):
    system = {"role": "system", "content": "You are a helpful assistant who answers in one short "
                                          "sentence, politely, and never uses lists or markdown."}
    client = served.client()
    before = _metric(served, "jaxinfer_prefix_cache_hits")
    answers = [client.chat.completions.create(
        model="smollm2", messages=[system, {"role": "user", "content": q}], max_tokens=4,
        temperature=0).choices[0].message.content for q in ("Hi!", "Hello!", "Hi!")]
    assert answers[0] == answers[2]
    assert _metric(served, "jaxinfer_prefix_cache_hits") >= before + 2


def test_malformed_json_api_key_and_health(served):
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    r = httpx.post(served.base + "/v1/completions", content=b"{not json", headers=auth)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(served.base + "/v1/completions", content=b"x" * (2 << 20), headers=auth)
    assert r.status_code == 413
    with pytest.raises(openai.AuthenticationError):
        served.client(key="wrong").models.list()
    assert [m.id for m in served.client().models.list().data] == ["smollm2"]
    assert httpx.get(served.base + "/health").json()["status"] == "ok"
    assert "jaxinfer_generated_tokens" in httpx.get(served.base + "/metrics").text


def test_full_queue_answers_429(smollm2):
    s = Served(create_app(smollm2, model_name="m", slots=1, max_len=64, max_queue=1))
    try:
        def one(_):
            return httpx.post(s.base + "/v1/completions", timeout=120,
                              json={"prompt": "Hello", "max_tokens": 40, "ignore_eos": True})

        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            codes = [r.status_code for r in pool.map(one, range(6))]
        assert 429 in codes and 200 in codes, codes
        r = next(r for r in [one(0)] if r.status_code in (200, 429))
        assert r.status_code == 200 or r.headers["retry-after"] == "1"
        assert json.loads(one(0).text)["choices"]  # still serving
    finally:
        s.stop()


def test_sampling_defaults_when_a_request_sets_none(smollm2):
    """A request without sampling fields gets the checkpoint's defaults, else the fallback
    (llama.cpp-like) ones; what it sets wins (temperature 0: greedy)."""
    import dataclasses

    from jaxinfer.sampling import FALLBACK, Sampling
    from jaxinfer.serve.api import parse_request

    def sampling(model, **fields):
        body = {"messages": [{"role": "user", "content": "hi"}], "seed": 5, **fields}
        return parse_request(body, "chat", model, "smollm2", 512).samplings[0]

    assert sampling(smollm2) == Sampling(**FALLBACK, seed=5)
    assert sampling(smollm2, temperature=0, top_p=1) == Sampling(
        **{**FALLBACK, "temperature": 0.0, "top_p": 1.0}, seed=5)
    own = dataclasses.replace(smollm2, sampling_defaults={"temperature": 0.3, "top_k": 7})
    assert sampling(own) == Sampling(**{**FALLBACK, "temperature": 0.3, "top_k": 7}, seed=5)


def test_mesh_placed_server_serves_the_same_greedy_answers(smollm2):
    """The server on a placed model (data 2 x model 3 of the virtual CPU devices: slots split
    over data, heads over model) answers greedy requests exactly as one-device generate.
    Prompts are prefilled 16 tokens a step (one admit shape to compile up front)."""
    from jaxinfer.parallel import Placement

    placement = Placement((2, 3))
    s = Served(create_app(placement.apply(smollm2), model_name="smollm2", slots=2, max_len=256,
                          max_queue=8, api_key=KEY, prefill_tokens=16), start_timeout_s=900)
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(lambda p: s.client().chat.completions.create(
                model="smollm2", messages=[{"role": "user", "content": p}], max_tokens=8,
                temperature=0).choices[0].message.content, PROMPTS[:2]))
    finally:
        s.stop()
    for prompt, got in zip(PROMPTS[:2], answers, strict=True):
        assert got == generate(smollm2, prompt, chat=True, max_new_tokens=8, temperature=0.0)[0].text
