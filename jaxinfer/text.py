"""Text-level generation: `generate(model, prompts, ...)` and `stream(model, prompts, ...)`."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from jaxinfer.errors import InputError
from jaxinfer.generate import Completion, Request, StreamEvent, stream_requests
from jaxinfer.sampling import Sampling


def encode_prompt(model, prompt: str | Sequence[dict], chat: bool = False,
                  system: str | None = None) -> list[int]:
    """Token ids of a prompt: the one encoder behind every entry point (generate, stream, the
    CLI's generate / chat / eval, the Python API).

    prompt: text (with chat=True rendered through the chat template as one user turn, after
    `system` if given), or a list of chat messages ({"role", "content"}), always rendered
    through the template. A BOS token is put first when the tokenizer asks for one and the
    rendered text does not already start with it.
    """
    tok = model.tokenizer
    if tok is None:
        raise InputError(f"{model.source}: no tokenizer, so text prompts cannot be encoded")
    if isinstance(prompt, str):
        if not prompt:
            raise InputError("prompt must be a non-empty string")
        if chat:
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": prompt}]
            prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
    elif isinstance(prompt, Sequence) and prompt and all(isinstance(m, dict) for m in prompt):
        prompt = tok.apply_chat_template(list(prompt), add_generation_prompt=True)
    else:
        raise InputError("prompt must be a non-empty string or a non-empty list of chat "
                         f"messages, got {type(prompt).__name__}")
    ids = tok.encode(prompt)
    if tok.add_bos_token and tok.bos_token_id is not None and ids[:1] != [tok.bos_token_id]:
        ids = [tok.bos_token_id] + ids
    return ids


def build_request(model, prompt_ids: list[list[int]], *, max_new_tokens: int = 64,
                  temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                  min_p: float = 0.0, repetition_penalty: float = 1.0,
                  presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                  min_tokens: int = 0, top_logprobs: int = 0,
                  seed: int | Sequence[int] = 0, stop: Sequence[str] | str | None = None,
                  stop_token_ids: Sequence[int] | None = None,
                  kv_cache: str = "float") -> Request:
    """A validated Request (the sampling knobs: see `jaxinfer.sampling.Sampling`); `seed` is
    one seed for every row or one per row."""
    seeds = [seed] * len(prompt_ids) if isinstance(seed, int) else list(seed)
    if len(seeds) != len(prompt_ids):
        raise InputError(f"got {len(seeds)} seeds for {len(prompt_ids)} prompts")
    rows = [Sampling(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                     repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                     frequency_penalty=frequency_penalty, min_tokens=min_tokens,
                     top_logprobs=top_logprobs, seed=s)
            for s in seeds]
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    ids = tuple(model.eos_token_ids if stop_token_ids is None else stop_token_ids)
    return Request(prompts=prompt_ids, sampling=rows, max_new_tokens=int(max_new_tokens),
                   stop_token_ids=ids, stop_strings=stops, kv_cache=kv_cache)


def stream(model, prompts: str | Sequence[str], *, chat: bool = False,
           system: str | None = None, logprobs: bool = False, chunk: int = 8,
           results: list | None = None, **kwargs) -> Iterator[StreamEvent]:
    """Yield StreamEvents (row index, new text) as tokens arrive; see `generate` for options.

    If `results` is a list, the final Completions are appended to it at the end.
    """
    texts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not texts:
        raise InputError("no prompt given")
    ids = [encode_prompt(model, p, chat, system) for p in texts]
    req = build_request(model, ids, **kwargs)
    return stream_requests(model, texts, req, chunk=chunk, logprobs=logprobs, results=results)


def generate(model, prompts: str | Sequence[str], *, chat: bool = False,
             system: str | None = None, logprobs: bool = False, **kwargs) -> list[Completion]:
    """Generate text for one prompt or a batch (run together as one ragged batch).

    Options: max_new_tokens, temperature (0 = greedy), top_k, top_p, min_p,
    repetition_penalty, presence_penalty, frequency_penalty, min_tokens (OpenAI's), seed (int
    or one per prompt), stop (strings), stop_token_ids
    (default: the checkpoint's EOS ids), chat (apply the chat template), logprobs,
    top_logprobs (the most likely N ids and log-probs at each token, in
    Completion.top_logprobs), kv_cache ("float", "float16" or "int8": see jaxinfer.engine.KV_CACHES).
    Returns one Completion per prompt.
    """
    results: list[Completion] = []
    chunk = 16 if kwargs.get("stop") else 1 << 30  # stop strings are checked between chunks
    for _ in stream(model, prompts, chat=chat, system=system, logprobs=logprobs, chunk=chunk,
                    results=results, **kwargs):
        pass
    return results
