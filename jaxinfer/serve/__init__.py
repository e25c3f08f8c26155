"""`jaxinfer serve`: an OpenAI-compatible HTTP server over the slot engine (continuous
batching). app.py: routes; api.py: request validation and response objects; scheduler.py: the
engine thread; metrics.py: Prometheus metrics."""

# The server's scheduling defaults, one place for the CLI, create_app, the engine thread and
# scripts/bench_serve.py (this module imports nothing, so the CLI can read them at start-up).
PREFILL_TOKENS = 256  # prompt tokens prefilled per engine step before its decode steps
AGING = 256.0  # shortest prompt first, aged by this many prompt tokens per second of waiting
PREFIX_CACHE_MB = 256  # prompt prefixes' KV kept for reuse
