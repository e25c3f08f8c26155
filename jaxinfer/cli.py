"""The `jaxinfer` command line: generate, chat, bench, eval, quantize, prune, devices.

Each subcommand validates its arguments before loading or compiling anything; any
JaxinferError is printed as one line on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from jaxinfer import profile
from jaxinfer.errors import InputError, JaxinferError
from jaxinfer.loading import convert_cache
from jaxinfer.loading.fetch import DEFAULT_MODEL, cache_dir
from jaxinfer.parallel.cli_support import add_parallel_args, devices_command, setup_parallel
from jaxinfer.sampling import FALLBACK
from jaxinfer.serve import AGING, PREFILL_TOKENS, PREFIX_CACHE_MB


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"checkpoint directory, .gguf file or built-in name (default {DEFAULT_MODEL})")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="parameter dtype (default: float32 on CPU, bfloat16 on GPU/TPU)")
    p.add_argument("--compile-cache", default=None,
                   help="persistent XLA compilation cache directory "
                        "(default $JAXINFER_COMPILE_CACHE or <cache>/xla)")
    p.add_argument("--no-compile-cache", action="store_true",
                   help="do not use the persistent compilation cache")
    # engine.KV_CACHES's keys, written out: importing the engine here would import jax
    p.add_argument("--kv-cache", choices=["float", "float16", "int8"], default="float",
                   help="KV cache storage (engine.KV_CACHES): float (parameter dtype), float16 "
                        "(half the bytes of float32, read as float32) or int8 with per-token "
                        "scales")
    p.add_argument("--profile", action="store_true",
                   help="print where start-up time goes to stderr (also JAXINFER_PROFILE=1)")
    _quant_args(p)


def _quant_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    if required:
        p.add_argument("--quant", choices=["int8", "int4", "w8a8", "native"], required=True,
                       help="quantization scheme")
    else:
        p.add_argument("--quant", choices=["auto", "none", "int8", "int4", "w8a8", "native"],
                       default="auto",
                       help="weights: auto (default: native for a GGUF file with Q8_0/Q4_0/"
                            "Q4_1 tensors where the native CPU kernels run and no placement "
                            "is asked for, else none), none (as stored, in --dtype), "
                            "int8/int4/w8a8 (quantize on load), native (keep a GGUF's Q8_0/"
                            "Q4_0/Q4_1 blocks packed)")
    p.add_argument("--group-size", type=int, default=None,
                   help="int4 group size (default: largest of 128/64/32 dividing every input dim)")
    p.add_argument("--asymmetric", action="store_true", help="int4 with a per-group minimum")
    p.add_argument("--quant-embed", choices=["int8", "same", "none"], default="int8",
                   help="embedding / LM head: int8 (default), the same scheme, or left float")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128)
    fallback = ", ".join(f"{k.replace('_', '-')} {v}" for k, v in FALLBACK.items())
    p.add_argument("--temperature", type=float, default=None,
                   help="0 = greedy. Sampling knobs not given come from the checkpoint "
                        f"(generation_config.json, GGUF general.sampling.*), else: {fallback}")
    p.add_argument("--top-k", type=int, default=None, help="0 = off")
    p.add_argument("--top-p", type=float, default=None, help="1 = off")
    p.add_argument("--min-p", type=float, default=None, help="0 = off")
    p.add_argument("--repetition-penalty", type=float, default=None, help="1 = off")
    p.add_argument("--presence-penalty", type=float, default=0.0,
                   help="OpenAI's, in [-2, 2], over the generated tokens (0 = off)")
    p.add_argument("--frequency-penalty", type=float, default=0.0,
                   help="OpenAI's, in [-2, 2], over the generated tokens (0 = off)")
    p.add_argument("--min-tokens", type=int, default=0,
                   help="no stop token before this many tokens are generated")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxinfer", description="JAX/Flax LLM inference")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate text for one or more prompts (one batch)")
    _common(g)
    g.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable)")
    _sampling_args(g)
    g.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    g.add_argument("--system", default=None, help="system message (with --chat)")
    g.add_argument("--json", action="store_true", help="print one JSON object")
    add_parallel_args(g)
    c = sub.add_parser("chat", help="interactive multi-turn chat with streaming")
    _common(c)
    _sampling_args(c)
    c.add_argument("--system", default=None, help="system message")
    b = sub.add_parser("bench", help="time prefill and decode")
    _common(b)
    b.add_argument("--batch-size", type=int, default=1)
    b.add_argument("--prompt-len", type=int, default=128)
    b.add_argument("--new-tokens", type=int, default=128)
    b.add_argument("--json", action="store_true")
    add_parallel_args(b)
    e = sub.add_parser("eval", help="sliding-window perplexity of a text file")
    _common(e)
    e.add_argument("--text-file", required=True, help="UTF-8 text to score")
    e.add_argument("--context", type=int, default=512, help="tokens per window")
    e.add_argument("--stride", type=int, default=256, help="step between windows")
    e.add_argument("--batch-size", type=int, default=4, help="windows per forward pass")
    e.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens")
    e.add_argument("--json", action="store_true")
    add_parallel_args(e)
    q = sub.add_parser("quantize", help="quantize once and save a checkpoint jaxinfer.load reads")
    q.add_argument("--model", default=DEFAULT_MODEL)
    q.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    _quant_args(q, required=True)
    q.add_argument("--method", choices=["rtn", "gptq"], default="rtn",
                   help="round-to-nearest, or GPTQ calibrated on --calibration-file (int4)")
    q.add_argument("--calibration-file", default=None, help="UTF-8 text for calibration")
    q.add_argument("--calibration-samples", type=int, default=64)
    q.add_argument("--calibration-len", type=int, default=512)
    q.add_argument("--out", required=True, help="output directory (must not exist)")
    q.set_defaults(compile_cache=None, no_compile_cache=True)
    _prune_parser(sub)
    _serve_parser(sub)
    d = sub.add_parser("devices", help="devices, processes and the mesh that would be chosen")
    _common(d)
    add_parallel_args(d)
    d.add_argument("--json", action="store_true")
    return parser


def _serve_parser(sub) -> None:
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (continuous batching)")
    _common(s)
    s.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--slots", type=int, default=8, help="requests decoded together (default 8)")
    s.add_argument("--max-len", type=int, default=2048,
                   help="tokens per request, prompt + completion (default 2048)")
    s.add_argument("--max-queue", type=int, default=64,
                   help="requests waiting for a slot before new ones get 429 (default 64)")
    s.add_argument("--api-key", default=os.environ.get("JAXINFER_API_KEY"),
                   help="require Authorization: Bearer KEY (default $JAXINFER_API_KEY)")
    s.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    s.add_argument("--prefill-tokens", type=int, default=PREFILL_TOKENS,
                   help="prompt tokens prefilled per engine step before its decode steps "
                        f"(power of two, 16..512; default {PREFILL_TOKENS})")
    s.add_argument("--schedule", choices=["shortest", "fifo"], default="shortest",
                   help="order in which waiting requests get slots: shortest prompt first, aged "
                        "by --aging (default), or first come, first served")
    s.add_argument("--aging", type=float, default=AGING,
                   help="with --schedule shortest: prompt tokens a waiting request gains per "
                        f"second in the queue (bounds how long a long prompt waits; default "
                        f"{AGING:g})")
    s.add_argument("--prefix-cache-mb", type=int, default=PREFIX_CACHE_MB,
                   help="memory for the KV of shared prompt prefixes (0: off; default "
                        f"{PREFIX_CACHE_MB})")
    s.add_argument("--served-model-name", default=None,
                   help="the model id clients use (default: --model)")
    add_parallel_args(s)


def _prune_parser(sub) -> None:
    p = sub.add_parser("prune", help="prune (magnitude, Wanda, N:M, structured), optionally "
                                     "recover and quantize, and save a checkpoint")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    p.add_argument("--method", choices=["magnitude", "wanda", "nm", "structured"], required=True)
    p.add_argument("--sparsity", type=float, default=0.5,
                   help="fraction of weights removed per output column (magnitude, wanda) or of "
                        "FFN channels (structured); default 0.5")
    p.add_argument("--n", type=int, default=2, help="N of N:M (kept per group), default 2")
    p.add_argument("--m", type=int, default=4, help="M of N:M (group size), default 4")
    p.add_argument("--score", choices=["wanda", "magnitude"], default=None,
                   help="importance score for nm/structured (default: wanda when "
                        "--calibration-file is given, else magnitude)")
    p.add_argument("--head-sparsity", type=float, default=0.0,
                   help="structured: fraction of each GQA group's query heads removed")
    p.add_argument("--calibration-file", default=None,
                   help="UTF-8 text for Wanda's activation norms and for recovery")
    p.add_argument("--calibration-samples", type=int, default=32)
    p.add_argument("--calibration-len", type=int, default=256)
    p.add_argument("--recover-steps", type=int, default=0,
                   help="distillation steps from the dense model after pruning (0: none)")
    p.add_argument("--recover-samples", type=int, default=256,
                   help="recovery windows cut from the calibration file (used in turn)")
    p.add_argument("--recover-len", type=int, default=128, help="tokens per recovery window")
    p.add_argument("--recover-batch", type=int, default=2, help="windows per recovery step")
    p.add_argument("--learning-rate", type=float, default=5e-5)
    p.add_argument("--mixed-precision", action="store_true",
                   help="recovery in bfloat16 compute with float32 master weights")
    p.add_argument("--quant", choices=["int8"], default=None,
                   help="quantize the pruned model (N:M leaves keep their pattern, int8 values)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--out", required=True, help="output directory (must not exist)")
    p.set_defaults(compile_cache=None, no_compile_cache=True)


def setup_compile_cache(args) -> None:
    """Turn on JAX's persistent compilation cache unless disabled, for every program: JAX
    keeps only programs that took at least a second to compile by default, and a warm start
    would then compile the engine's small programs (init_state, transfers) again each time."""
    if args.no_compile_cache:
        return
    import jax

    path = args.compile_cache or os.environ.get("JAXINFER_COMPILE_CACHE") or str(cache_dir() / "xla")
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    from jaxinfer import programs

    programs.enable(Path(path) / "programs")  # the engine's lowered programs, beside them


def _glibc_malloc(name: str, *args) -> None:
    """Call glibc's malloc tuning function `name` (nothing where the C library has none)."""
    import ctypes

    try:
        getattr(ctypes.CDLL(None), name)(*args)
    except (OSError, AttributeError):  # not glibc
        pass


def limit_malloc_arenas() -> None:
    """At most 2 glibc malloc arenas for the process (M_ARENA_MAX; the default is 8 per core).
    Each thread that allocates under contention (XLA's compiler and runtime threads) otherwise
    gets its own arena, which keeps what it freed: the cold `generate --quant native` of
    SmolLM2 peaked at 669 MB with the default and 614 MB with 2 arenas (2-core machine)."""
    _glibc_malloc("mallopt", -8, 2)  # M_ARENA_MAX


def trim_heap() -> None:
    """Hand the heap memory freed so far back to the OS (glibc's malloc_trim). glibc keeps
    freed chunks: after `prepare`, the ~80 MB of the load's own copies of SmolLM2's weights,
    which then counted in the peak of every later step (warm generate 530 -> 497 MB). The
    collection first frees the reference cycles that still hold most of them (malloc_trim
    alone gave back 21 MB, with it 84 MB; the collection takes about 0.1 s)."""
    import gc

    gc.collect()
    _glibc_malloc("malloc_trim", 0)


def _status(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


GENERATING = ("generate", "chat", "bench", "serve")  # commands that only generate with the model


def _load(args, placement=None, calibration: dict | None = None):
    """Load --model, quantize it as --quant asks (calibration: GPTQ's method and text, see
    `quantize_model`) and place it on the devices when a placement is given.
    Returns (model, seconds)."""
    import jaxinfer

    t = time.perf_counter()
    quant = getattr(args, "quant", None)
    keep_packed = True if quant == "native" else (
        "auto" if quant == "auto" and _native_runs(placement) else False)
    with profile.phase("load"):
        model = jaxinfer.load(args.model, dtype=args.dtype, keep_packed=keep_packed)
    if quant not in (None, "auto", "none", "native"):
        from jaxinfer.quant.recipes import quantize_model

        with profile.phase("quantize"):
            model = quantize_model(model, quant, group_size=args.group_size,
                                   symmetric=not args.asymmetric, embed=args.quant_embed,
                                   **(calibration or {}))
    args.weights = _weights(model)
    if placement is not None:
        with profile.phase("placement"):
            model = placement.apply(model)
    if args.command in GENERATING:  # the weights in the run layout, held once
        from jaxinfer.generate import prepare

        with profile.phase("layout"):
            model = prepare(model)
            trim_heap()  # the load's copies of the weights are free now
    return model, time.perf_counter() - t


def _native_runs(placement) -> bool:
    """Whether `--quant auto` may keep a GGUF's blocks packed: the native CPU kernels run
    here (packed weights are slower than float32 on XLA alone) and the model stays on one
    device (no placement)."""
    import jax

    from jaxinfer import kernels

    one = placement.one_cpu_device if placement is not None else jax.default_backend() == "cpu"
    return one and kernels.available()


def _weights(model) -> str:
    """What a loaded (and quantized) model's weights are, for status lines and --json:
    "native Q4_1/Q8_0" for a GGUF's blocks kept packed, the quantization schemes of other
    quantized leaves (e.g. "int8"), and the float dtype of the rest (e.g. "float32")."""
    from jaxinfer import paths

    leaves = [x for _, x in paths.iter_leaves(model.params)]
    kinds = sorted({x.kind for x in leaves if hasattr(x, "kind")})
    schemes = sorted({x.scheme_dict()["name"] for x in leaves
                      if hasattr(x, "scheme_dict") and not hasattr(x, "kind")})
    floats = sorted({str(x.dtype) for x in leaves if not hasattr(x, "scheme_dict")})
    return ", ".join((["native " + "/".join(kinds)] if kinds else []) + schemes + floats)


def _given_sampling(args) -> dict:
    """The sampling knobs set on the command line (None: not given)."""
    return {knob: getattr(args, knob) for knob in FALLBACK}


def _sampling(args, model) -> tuple[dict, dict]:
    """(knob -> value, knob -> "flag" / "checkpoint" / "default"): the flags given, then the
    checkpoint's defaults, then jaxinfer.sampling.FALLBACK."""
    from jaxinfer.sampling import resolve

    return resolve(model.sampling_defaults, **_given_sampling(args))


def _gen_kwargs(args, model) -> dict:
    """Keyword arguments of text.stream / build_request for the flags and the model."""
    return dict(max_new_tokens=args.max_new_tokens, seed=args.seed, stop=args.stop,
                kv_cache=args.kv_cache, **_output_rules(args), **_sampling(args, model)[0])


def _output_rules(args) -> dict:
    """The penalties and min_tokens flags (not checkpoint defaults: plain values)."""
    return dict(presence_penalty=args.presence_penalty,
                frequency_penalty=args.frequency_penalty, min_tokens=args.min_tokens)


def _check_sampling(args) -> None:
    """Validate sampling flags before anything is loaded."""
    from jaxinfer.sampling import Sampling

    if args.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    given = {k: v for k, v in _given_sampling(args).items() if v is not None}
    Sampling(seed=args.seed, **given, **_output_rules(args)).validate()
    if args.min_tokens > args.max_new_tokens:
        raise InputError(f"--min-tokens ({args.min_tokens}) exceeds --max-new-tokens "
                         f"({args.max_new_tokens})")
    if any(not s for s in args.stop):
        raise InputError("--stop strings must be non-empty")


def cmd_generate(args) -> int:
    from jaxinfer.text import stream

    if any(not p for p in args.prompt):
        raise InputError("--prompt must not be empty")
    _check_sampling(args)
    placement = setup_parallel(args)
    model, load_s = _load(args, placement)
    _status(f"loaded {args.model} ({args.weights}) in {load_s:.1f}s; compiling and "
            "generating ...")
    results = []
    t0 = time.perf_counter()
    first = None
    live = len(args.prompt) == 1 and not args.json and placement.prints
    for ev in stream(model, args.prompt, chat=args.chat, system=args.system, results=results,
                     chunk=16, **_gen_kwargs(args, model)):
        first = first or time.perf_counter()
        if live:
            print(ev.text, end="", flush=True)
    total = time.perf_counter() - t0
    profile.record("first output (layout, compile or cache load, prefill)", (first or t0) - t0)
    profile.record("rest of generation", total - ((first or t0) - t0))
    n_tokens = sum(len(r.token_ids) for r in results)
    timings = {"load_s": round(load_s, 3), "first_output_s": round((first or t0) - t0, 3),
               "total_s": round(total, 3), "generated_tokens": n_tokens,
               "tokens_per_s": round(n_tokens / total, 2) if total > 0 else None}
    if not placement.prints:
        return 0
    if args.json:
        out = {"outputs": [{"prompt": r.prompt, "text": r.text, "token_ids": r.token_ids,
                            "finish_reason": r.finish_reason} for r in results],
               "timings": timings, "placement": placement.info(), "weights": args.weights,
               **_sampling_json(args, model)}
        print(json.dumps(out, ensure_ascii=False))
    elif live:
        print()
    else:
        for i, r in enumerate(results):
            print(f"--- [{i}] {r.prompt!r} ({r.finish_reason})\n{r.text}")
    if not args.json:
        _status(f"[{n_tokens} tokens in {total:.2f}s incl. compile]")
    return 0


def _sampling_json(args, model) -> dict:
    """The sampling settings a run used, for --json: {"sampling": {knob: value, "seed"},
    "sampling_source": {knob: "flag" / "checkpoint" / "default"}}."""
    values, sources = _sampling(args, model)
    return {"sampling": {**values, **_output_rules(args), "seed": args.seed},
            "sampling_source": sources}


def _describe_sampling(resolved: tuple[dict, dict]) -> str:
    """"temperature 0.8 (default), top_k 40 (checkpoint), ..." for a status line."""
    values, sources = resolved
    return ", ".join(f"{k} {v} ({sources[k]})" for k, v in values.items())


def cmd_chat(args) -> int:
    """The interactive chat (jaxinfer/chat.py): load once, then read messages until /exit."""
    from jaxinfer import chat

    _check_sampling(args)
    _status(f"loading {args.model} ...")
    model, load_s = _load(args)
    conversation = chat.Conversation(model, _gen_kwargs(args, model), system=args.system,
                                     notice=_status)
    _status(f"loaded {args.model} ({args.weights}) in {load_s:.1f}s; sampling: "
            f"{_describe_sampling(_sampling(args, model))}.\n{chat.HELP}")
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    return chat.run(conversation)


def cmd_bench(args) -> int:
    from jaxinfer.bench import run_bench

    for name in ("batch_size", "prompt_len", "new_tokens"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be >= 1")
    placement = setup_parallel(args)
    model, load_s = _load(args, placement)
    res = run_bench(model, batch_size=args.batch_size, prompt_len=args.prompt_len,
                    new_tokens=args.new_tokens, kv_cache=args.kv_cache)
    res["load_s"] = round(load_s, 3)
    res["model"] = args.model
    res["weights"] = args.weights
    res["placement"] = placement.info()
    from jaxinfer import kernels

    res["cpu_kernels"], res["cpu_isa"] = kernels.describe(), kernels.isa()
    if not placement.prints:
        return 0
    if args.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            print(f"{k:>24}: {v}")
    return 0


def read_text_file(path: str) -> str:
    """The UTF-8 text of a file given on the command line (InputError if unreadable)."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{Path(path)}: cannot read as UTF-8 text ({e})") from None


def cmd_eval(args) -> int:
    from jaxinfer.evaluate import perplexity_text

    text = read_text_file(args.text_file)
    if args.context < 2 or not 1 <= args.stride <= args.context or args.batch_size < 1:
        raise InputError("need --context >= 2, 1 <= --stride <= --context and --batch-size >= 1")
    placement = setup_parallel(args)
    model, _ = _load(args, placement)
    res = perplexity_text(model, text, max_tokens=args.max_tokens, context=args.context,
                          stride=args.stride, batch_size=args.batch_size)
    if not placement.prints:
        return 0
    if args.json:
        print(json.dumps({"perplexity": res["perplexity"], "tokens": res["tokens"],
                          "weights": args.weights}))
    else:
        print(f"perplexity {res['perplexity']:.4f} over {res['tokens']} tokens")
    return 0


def cmd_quantize(args) -> int:
    from jaxinfer.loading import save_quantized

    out = Path(args.out)
    if out.exists():
        raise InputError(f"{out}: already exists; choose a new --out directory")
    calibration = None
    if args.method == "gptq":
        if args.quant != "int4":
            raise InputError("--method gptq applies to --quant int4")
        if not args.calibration_file:
            raise InputError("--method gptq needs --calibration-file")
        text = read_text_file(args.calibration_file)
        calibration = dict(method="gptq", calibration_text=text,
                           calib_samples=args.calibration_samples,
                           calib_len=args.calibration_len)
    if args.quant == "native":
        raise InputError("--quant native keeps a GGUF packed at load time; nothing to save")
    model, load_s = _load(args, calibration=calibration)
    path = save_quantized(model, out)
    _status(f"quantized {args.model} ({args.quant}, {args.method}) in {load_s:.1f}s; "
            f"{model.weight_bytes / 1e6:.1f} MB of weights written to {path}")
    return 0


def cmd_prune(args) -> int:
    import jaxinfer
    from jaxinfer.loading import save_quantized
    from jaxinfer.sparse.recipes import PruneSettings, check_prune_args, prune_model

    out = Path(args.out)
    if out.exists():
        raise InputError(f"{out}: already exists; choose a new --out directory")
    settings = PruneSettings(
        method=args.method, sparsity=args.sparsity, n=args.n, m=args.m, score=args.score,
        head_sparsity=args.head_sparsity, calib_samples=args.calibration_samples,
        calib_len=args.calibration_len, recover_steps=args.recover_steps,
        recover_samples=args.recover_samples, recover_len=args.recover_len,
        recover_batch=args.recover_batch, learning_rate=args.learning_rate,
        mixed_precision=args.mixed_precision, quant=args.quant)
    check_prune_args(settings, args.calibration_file is not None)
    text = read_text_file(args.calibration_file) if args.calibration_file else None
    t = time.perf_counter()
    model = jaxinfer.load(args.model, dtype=args.dtype)
    pruned, report = prune_model(model, settings, text)
    path = save_quantized(pruned, out)
    report.update(out=str(path), seconds=round(time.perf_counter() - t, 1))
    if args.json:
        print(json.dumps(report))
    else:
        _status(f"pruned {args.model} ({args.method}) in {report['seconds']}s; "
                f"{pruned.weight_bytes / 1e6:.1f} MB of weights written to {path}")
        for k, v in report.items():
            print(f"{k:>16}: {v}")
    return 0


def cmd_serve(args) -> int:
    from jaxinfer.sampling import resolve
    from jaxinfer.serve.app import create_app, serve

    if not 0 < args.port < 65536 or args.slots < 1 or args.max_queue < 0 or args.max_len < 2:
        raise InputError("need 0 < --port < 65536, --slots >= 1, --max-queue >= 0, --max-len >= 2")
    if not 16 <= args.prefill_tokens <= 512 or args.prefill_tokens & (args.prefill_tokens - 1):
        raise InputError(f"--prefill-tokens must be a power of two from 16 to 512, got "
                         f"{args.prefill_tokens}")
    if not args.aging >= 0:
        raise InputError(f"--aging must be >= 0 prompt tokens per second, got {args.aging}")
    placement = setup_parallel(args)
    model, load_s = _load(args, placement)
    if args.max_len > model.config.max_seq_len:
        raise InputError(f"--max-len {args.max_len} exceeds the model's context of "
                         f"{model.config.max_seq_len}")
    _status(f"loaded {args.model} ({args.weights}) in {load_s:.1f}s; default sampling: "
            f"{_describe_sampling(resolve(model.sampling_defaults))}")
    app = create_app(model, model_name=args.served_model_name or args.model, slots=args.slots,
                     max_len=args.max_len, max_queue=args.max_queue, api_key=args.api_key,
                     timeout_s=args.timeout, kv_cache=args.kv_cache,
                     prefix_cache_bytes=args.prefix_cache_mb << 20,
                     prefill_tokens=args.prefill_tokens,
                     shortest_first=args.aging if args.schedule == "shortest" else None)
    serve(app, args.host, args.port)
    return 0


COMMANDS = {"serve": cmd_serve, "prune": cmd_prune, "quantize": cmd_quantize,
            "generate": cmd_generate, "chat": cmd_chat, "bench": cmd_bench, "eval": cmd_eval,
            "devices": devices_command}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    limit_malloc_arenas()
    if getattr(args, "profile", False):
        profile.enable()
    profile.mark_imports_done()
    try:
        with profile.phase("compile cache set-up"):
            setup_compile_cache(args)
            if profile.enabled():
                profile.watch_jax()
        code = COMMANDS[args.command](args)
        with profile.phase("wait for the converted-weights cache write"):
            convert_cache.wait_for_writes()
        return code
    except JaxinferError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        profile.report()


def run() -> None:
    """The `jaxinfer` command: `main`, then the process ends without Python's interpreter
    teardown (destroying jax's runtime took about 0.5 s of a 5 s warm `generate` here). What
    the command writes is complete by then: background cache writes are waited for, and every
    cache entry is written to a temporary name and renamed. An exception main lets through
    (a bug: its traceback), and a process of a `jax.distributed` run (its shutdown must reach
    the others), end the usual way."""
    code = main()
    convert_cache.wait_for_writes()
    jax = sys.modules.get("jax")
    if jax is not None and jax.distributed.is_initialized():
        sys.exit(code)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):  # a closed pipe or stream: nothing more can be said
        pass
    os._exit(code)


if __name__ == "__main__":
    run()

