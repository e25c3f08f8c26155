"""Timing of prefill and decode for `jaxinfer bench` and the benchmark scripts."""

from __future__ import annotations

import resource
import time

import numpy as np

from jaxinfer.generate import Request, engine_for, submit_all
from jaxinfer.sampling import Sampling


def publish(header: str, *tables: list[str], out: str | None = None) -> str:
    """Print a benchmark report (header, then each Markdown table given as its lines) and,
    when `out` is given, write it to that file too. Returns the report."""
    text = header + "\n\n" + "\n\n".join("\n".join(t) for t in tables) + "\n"
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text)
    return text


def english_text() -> str:
    """Real English text every Python install has: the CPython documentation topics."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def prompt_ids(model, length: int) -> list[int]:
    """`length` token ids of real text (token 1.. of the documentation; random ids without a
    tokenizer)."""
    if model.tokenizer is None:
        rng = np.random.default_rng(0)
        return rng.integers(0, model.config.vocab_size, length).tolist()
    ids = model.tokenizer.encode(english_text()[: length * 8])
    return ids[:length]


def _timed_run(model, req: Request, new_tokens: int):
    """(prefill seconds incl. the first token, decode seconds, engine). Every prompt is
    prefilled first: more prompt tokens than one step's prefill budget take several."""
    t0 = time.perf_counter()
    eng = engine_for(model, req)
    handles = submit_all(eng, req)
    while not all(eng.live(h) for h in handles):
        eng.advance(0)
    eng.state.length.block_until_ready()
    t1 = time.perf_counter()
    eng.advance(new_tokens)
    eng.state.length.block_until_ready()
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, eng


def run_bench(model, *, batch_size: int, prompt_len: int, new_tokens: int,
              kv_cache: str = "float", repeats: int = 1) -> dict:
    """Greedy generation of `new_tokens` per row (stop tokens off) after a warm-up run.

    Returns ttft_s (prefill + first token), prefill and decode tokens/s, compile_s (extra time
    of the first run, i.e. compilation), peak_rss_mb and weight_bytes. With repeats > 1 the
    timed run is repeated: times are medians, decode_tokens_per_s_runs lists every run.
    """
    ids = prompt_ids(model, prompt_len)
    req = Request(prompts=[ids] * batch_size, sampling=[Sampling()] * batch_size,
                  max_new_tokens=new_tokens, stop_token_ids=(), kv_cache=kv_cache)
    cold_prefill, cold_decode, _ = _timed_run(model, req, new_tokens)
    runs = [_timed_run(model, req, new_tokens) for _ in range(max(1, repeats))]
    assert all(int(r[2].state.length[0]) == new_tokens for r in runs)
    prefill_s = float(np.median([r[0] for r in runs]))
    decode_s = float(np.median([r[1] for r in runs]))
    decode_tokens = batch_size * (new_tokens - 1)
    extra = {}
    if repeats > 1 and new_tokens > 1:
        extra["decode_tokens_per_s_runs"] = [round(decode_tokens / r[1], 2) for r in runs]
    return {
        "batch_size": batch_size, "prompt_len": prompt_len, "new_tokens": new_tokens,
        "kv_cache": kv_cache,
        "ttft_s": round(prefill_s, 4),
        "prefill_tokens_per_s": round(batch_size * prompt_len / prefill_s, 1),
        "decode_tokens_per_s": round(decode_tokens / decode_s, 2) if new_tokens > 1 else None,
        "compile_s": round(max(0.0, cold_prefill + cold_decode - prefill_s - decode_s), 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "weight_bytes": model.weight_bytes,
        **extra,
    }
