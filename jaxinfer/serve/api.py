"""OpenAI request bodies -> validated settings, and the response objects sent back.

`parse_request(body, kind, model, max_len)` checks every field it knows before anything is
admitted and raises `APIError` (an OpenAI-style error body: message, type, param, code) for the
first bad one. Fields a client may send that change nothing here (user, metadata, ...) are
accepted and ignored.
"""

from __future__ import annotations

import dataclasses
import time
import uuid

from jaxinfer.errors import InputError
from jaxinfer.sampling import MAX_TOP_LOGPROBS, Sampling, resolve
from jaxinfer.text import encode_prompt

MAX_N = 8
MAX_STOP = 4


class APIError(Exception):
    """An error answered with `status` and {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, \
            type, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


@dataclasses.dataclass
class Settings:
    """A validated request: prompt ids, one Sampling per choice, limits and output options."""

    prompt_ids: list[int]
    samplings: list[Sampling]
    max_new: int
    stop_ids: tuple[int, ...]
    stop_strings: tuple[str, ...]
    stream: bool
    include_usage: bool
    logprobs: bool
    top_logprobs: int = 0  # alternatives per token (with logprobs)


def _bad(param: str, what: str) -> APIError:
    return APIError(400, f"{param}: {what}", param=param)


def _number(body: dict, name: str, default, lo=None, hi=None, integer=False, lo_open=False):
    value = body.get(name)
    if value is None:
        return default
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise _bad(name, f"expected {'an integer' if integer else 'a number'}, got {value!r}")
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise _bad(name, f"must be {'>' if lo_open else '>='} {lo}, got {value!r}")
    if hi is not None and value > hi:
        raise _bad(name, f"must be <= {hi}, got {value!r}")
    return value


def _flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _bad(name, f"expected true or false, got {value!r}")
    return value


def _prompt_ids(body: dict, kind: str, model) -> list[int]:
    try:
        if kind == "chat":
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise _bad("messages", "expected a non-empty list of messages")
            flat = []
            for i, m in enumerate(messages):
                if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                    raise _bad(f"messages[{i}]", "expected an object with a 'role'")
                content = m.get("content")
                if isinstance(content, list):  # content parts: text only
                    if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                        raise _bad(f"messages[{i}].content", "only text parts are supported")
                    content = "".join(str(p.get("text", "")) for p in content)
                if not isinstance(content, str):
                    raise _bad(f"messages[{i}].content", "expected a string")
                flat.append({"role": m["role"], "content": content})
            if model.tokenizer is None or model.tokenizer.chat_template is None:
                raise APIError(400, "this model has no chat template; use /v1/completions",
                               param="messages")
            return encode_prompt(model, flat)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, list) and prompt and all(
                isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            bad = [t for t in prompt if not 0 <= t < model.config.vocab_size]
            if bad:
                raise _bad("prompt", f"token id {bad[0]} outside [0, {model.config.vocab_size})")
            return list(prompt)
        if not isinstance(prompt, str) or not prompt:
            raise _bad("prompt", "expected a non-empty string (or one list of token ids)")
        return encode_prompt(model, prompt)
    except InputError as e:
        raise APIError(400, str(e), param="messages" if kind == "chat" else "prompt") from None


def parse_request(body, kind: str, model, model_name: str, max_len: int) -> Settings:
    """Validate an OpenAI completions (kind "completion") or chat ("chat") body."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    name = body.get("model")
    if name is not None and name != model_name:
        raise APIError(404, f"model {name!r} does not exist; this server serves {model_name!r}",
                       param="model", code="model_not_found")
    presence = _number(body, "presence_penalty", 0.0, -2.0, 2.0)
    frequency = _number(body, "frequency_penalty", 0.0, -2.0, 2.0)
    min_tokens = _number(body, "min_tokens", 0, 0, integer=True)
    logprobs, top = _logprobs(body, kind)
    ids = _prompt_ids(body, kind, model)
    room = max_len - len(ids)
    if room < 1:
        raise _bad("messages" if kind == "chat" else "prompt",
                   f"{len(ids)} prompt tokens leave no room in the server's context of {max_len}")
    max_new = body.get("max_completion_tokens", body.get("max_tokens"))
    param = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    if max_new is None:
        max_new = room
    elif isinstance(max_new, bool) or not isinstance(max_new, int) or max_new < 1:
        raise _bad(param, f"expected an integer >= 1, got {max_new!r}")
    elif max_new > room:
        raise _bad(param, f"{len(ids)} prompt tokens + {max_new} exceed the server's context "
                          f"of {max_len} tokens")
    if min_tokens > max_new:
        raise _bad("min_tokens", f"expected at most {param} ({max_new}), got {min_tokens}")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else (stop or [])
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise _bad("stop", "expected a non-empty string or a list of them")
    if len(stop) > MAX_STOP:
        raise _bad("stop", f"at most {MAX_STOP} stop strings, got {len(stop)}")
    n = _number(body, "n", 1, 1, MAX_N, integer=True)
    seed = _number(body, "seed", None, 0, 2**32 - 1 - MAX_N, integer=True)
    if seed is None:
        seed = uuid.uuid4().int % (2**31)
    default, _ = resolve(model.sampling_defaults)  # the checkpoint's, else llama.cpp-like
    temperature = _number(body, "temperature", default["temperature"], 0.0, 2.0)
    top_p = _number(body, "top_p", default["top_p"], 0.0, 1.0, lo_open=True)
    top_k = _number(body, "top_k", default["top_k"], 0, integer=True)
    min_p = _number(body, "min_p", default["min_p"], 0.0, 1.0)
    rep = _number(body, "repetition_penalty", default["repetition_penalty"], 0.0, lo_open=True)
    samplings = [Sampling(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                          min_p=float(min_p), repetition_penalty=float(rep), seed=seed + i,
                          presence_penalty=float(presence), frequency_penalty=float(frequency),
                          min_tokens=int(min_tokens), top_logprobs=top)
                 for i in range(n)]
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise _bad("stream_options", "expected an object")
    stop_ids = () if _flag(body, "ignore_eos") else tuple(model.eos_token_ids)
    return Settings(prompt_ids=ids, samplings=samplings, max_new=max_new, stop_ids=stop_ids,
                    stop_strings=tuple(stop), stream=_flag(body, "stream"),
                    include_usage=bool(options.get("include_usage")),
                    logprobs=logprobs, top_logprobs=top)


COMPLETION_TOP = 5  # the legacy completions API's most alternatives (`logprobs: N`)


def _logprobs(body: dict, kind: str) -> tuple[bool, int]:
    """(log-probs asked for, alternatives per token): chat's `logprobs` (true / false) and
    `top_logprobs` (0-20, with logprobs true); completions' `logprobs` (an integer 0-5: the
    chosen token's and that many alternatives; true / false are taken too)."""
    value = body.get("logprobs")
    if kind == "completion" and isinstance(value, int) and not isinstance(value, bool):
        return True, _number(body, "logprobs", 0, 0, COMPLETION_TOP, integer=True)
    on = _flag(body, "logprobs")
    top = _number(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS, integer=True)
    if top and not on:
        raise _bad("top_logprobs", "needs logprobs: true")
    return on, top


def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def logprobs_obj(kind: str, tokenizer, token_ids: list[int], logprobs: list[float],
                 top: list[list[tuple[int, float]]] | None = None) -> dict:
    """OpenAI's logprobs object for the chosen tokens and, per token, the most likely
    alternatives `top` ((id, log-prob) pairs, most likely first; None: none asked for)."""
    tokens = [tokenizer.decode([t]) for t in token_ids]
    alts = [[(tokenizer.decode([t]), lp) for t, lp in row] for row in top] if top else None
    if kind == "chat":
        return {"content": [
            {"token": t, "logprob": lp, "bytes": list(t.encode("utf-8")),
             "top_logprobs": [{"token": a, "logprob": alp, "bytes": list(a.encode("utf-8"))}
                              for a, alp in (alts[i] if alts else [])]}
            for i, (t, lp) in enumerate(zip(tokens, logprobs, strict=True))]}
    return {"tokens": tokens, "token_logprobs": logprobs,
            "top_logprobs": [dict(row) for row in alts] if alts else None, "text_offset": None}


def choice(kind: str, index: int, text: str, finish_reason: str | None, logprobs=None,
           stream: bool = False, first: bool = False) -> dict:
    """One entry of `choices` in a response (stream: a chunk's delta)."""
    if kind == "chat":
        body = {"delta": ({"role": "assistant", "content": text} if first else {"content": text})
                } if stream else {"message": {"role": "assistant", "content": text}}
    else:
        body = {"text": text}
    return {"index": index, **body, "logprobs": logprobs, "finish_reason": finish_reason}


def envelope(kind: str, rid: str, model_name: str, choices: list, stream: bool,
             usage_: dict | None = None) -> dict:
    obj = {"chat": "chat.completion", "completion": "text_completion"}[kind]
    if stream and kind == "chat":
        obj = "chat.completion.chunk"
    out = {"id": rid, "object": obj, "created": int(time.time()), "model": model_name,
           "choices": choices}
    if usage_ is not None:
        out["usage"] = usage_
    return out
