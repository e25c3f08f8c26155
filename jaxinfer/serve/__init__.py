"""`jaxinfer serve`: an OpenAI-compatible HTTP server over the slot engine (continuous
batching). app.py: routes; api.py: request validation and response objects; scheduler.py: the
engine thread; metrics.py: Prometheus metrics."""
