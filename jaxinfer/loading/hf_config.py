"""Hugging Face `config.json` dicts -> the frozen model configs of `models.config`.

Accepts both the older layout (`rope_theta`, `rope_scaling`) and transformers 5's
(`rope_parameters`). Every missing or unsupported field is one ConfigError naming the source
file and the field.
"""

from __future__ import annotations

from jaxinfer.errors import ConfigError
from models.config import GPT2Config, LlamaConfig, ModelConfig, RopeScaling

LLAMA_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3_text", "mixtral", "qwen3_moe")
# Families whose every layer has the config's sliding_window (when it is set).
WINDOW_ALL_LAYERS = ("mistral", "mixtral", "phi3", "qwen3_moe")
SUPPORTED = (*LLAMA_TYPES, "gemma3", "gpt2")  # gemma3: the text_config of the multimodal one


def _require(cfg: dict, key: str, source: str):
    if cfg.get(key) is None:
        raise ConfigError(f"{source}: missing required field {key!r}")
    return cfg[key]


def _rope(cfg: dict, source: str) -> tuple[float, RopeScaling | None]:
    """(theta, scaling) from rope_parameters / rope_theta / rope_scaling."""
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    partial = float(params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)))
    if partial != 1.0:
        raise ConfigError(f"{source}: partial_rotary_factor {partial} is not supported (RoPE "
                          "over the whole head only)")
    if kind == "default":
        return theta, None
    if kind == "linear":
        return theta, RopeScaling(kind="linear", factor=float(params["factor"]))
    if kind == "freq_factors":  # from a GGUF's rope_freqs.weight (see loading.gguf)
        return theta, RopeScaling(kind="factors", factors=tuple(map(float, params["factors"])))
    if kind == "llama3":
        try:
            return theta, RopeScaling(
                kind="llama3", factor=float(params["factor"]),
                low_freq_factor=float(params["low_freq_factor"]),
                high_freq_factor=float(params["high_freq_factor"]),
                original_max_position_embeddings=int(params["original_max_position_embeddings"]))
        except KeyError as e:
            raise ConfigError(f"{source}: llama3 RoPE scaling is missing field {e}") from None
    raise ConfigError(f"{source}: unsupported RoPE type {kind!r} (rope_scaling / rope_parameters); "
                      "supported: default, linear, llama3")


def _windows(cfg: dict, model_type: str, n_layers: int, source: str):
    """Per-layer sliding windows, or None when every layer attends fully."""
    window = cfg.get("sliding_window")
    if model_type in ("qwen2", "qwen3", "qwen3_moe") and not cfg.get("use_sliding_window", False):
        return None
    types = cfg.get("layer_types")
    if types is None and model_type == "gemma3_text":  # older configs: every k-th layer global
        pattern = int(cfg.get("sliding_window_pattern") or 6)
        types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                 for i in range(n_layers)]
    if types is not None:
        if len(types) != n_layers:
            raise ConfigError(f"{source}: layer_types has {len(types)} entries, expected {n_layers}")
        bad = set(types) - {"full_attention", "sliding_attention"}
        if bad:
            raise ConfigError(f"{source}: unsupported layer_types {sorted(bad)}")
        if "sliding_attention" in types and not window:
            raise ConfigError(f"{source}: sliding_attention layers need 'sliding_window'")
        out = tuple(int(window) if t == "sliding_attention" else None for t in types)
        return out if any(out) else None
    if window and model_type in WINDOW_ALL_LAYERS:
        return (int(window),) * n_layers
    return None


def _gemma3(cfg: dict, source: str) -> dict:
    """The LlamaConfig fields of a Gemma 3 text config beyond Llama's: per-layer-type RoPE
    (rope_parameters {full_attention, sliding_attention}, or the older rope_theta,
    rope_scaling and rope_local_base_freq), the query scale and Gemma's norms and GeGLU."""
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if cfg.get(key) is not None:
            raise ConfigError(f"{source}: {key} is not supported (Gemma 3 has none)")
    if cfg.get("use_bidirectional_attention"):
        raise ConfigError(f"{source}: use_bidirectional_attention is not supported")
    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise ConfigError(f"{source}: unsupported hidden_activation {act!r}; "
                          "supported: gelu_pytorch_tanh")
    params = cfg.get("rope_parameters") or {}
    if "full_attention" in params or "sliding_attention" in params:
        full = {"rope_parameters": params.get("full_attention") or {"rope_theta": 1e6}}
        local = {"rope_parameters": params.get("sliding_attention") or {"rope_theta": 1e4}}
    else:
        full = {"rope_theta": cfg.get("rope_theta", 1e6), "rope_scaling": cfg.get("rope_scaling")}
        local = {"rope_theta": cfg.get("rope_local_base_freq", 1e4)}
    theta, scaling = _rope(full, source)
    local_theta, local_scaling = _rope(local, source)
    if local_scaling is not None:
        raise ConfigError(f"{source}: RoPE scaling on sliding_attention layers is not supported")
    scalar = float(cfg.get("query_pre_attn_scalar") or 256)
    return dict(rope_theta=theta, rope_scaling=scaling, local_rope_theta=local_theta,
                activation="gelu_tanh", norm_plus_one=True, post_norms=True, qk_norm=True,
                scale_embeddings=True, query_scale=scalar ** -0.5,
                tie_embeddings=bool(cfg.get("tie_word_embeddings", True)))


def _moe(cfg: dict, model_type: str, source: str) -> dict:
    """The LlamaConfig fields of a mixture-of-experts config (Mixtral, Qwen3-MoE): experts,
    experts per token, their width (d_ff) and whether the top-k weights are renormalised.
    Every field is required (one ConfigError naming the file and the field)."""
    if model_type == "mixtral":
        experts, width, norm = "num_local_experts", "intermediate_size", None
    else:
        experts, width, norm = "num_experts", "moe_intermediate_size", "norm_topk_prob"
        if int(cfg.get("decoder_sparse_step") or 1) != 1 or cfg.get("mlp_only_layers"):
            raise ConfigError(f"{source}: decoder_sparse_step / mlp_only_layers (dense layers "
                              "between the MoE layers) are not supported; every layer must be MoE")
    # transformers treats num_experts and num_local_experts as one field (attribute_map)
    other = {"num_experts": "num_local_experts", "num_local_experts": "num_experts"}[experts]
    if cfg.get(experts) is None and cfg.get(other) is not None:
        cfg = {**cfg, experts: cfg[other]}
    req = {k: _require(cfg, k, source) for k in (experts, "num_experts_per_tok", width)
           + ((norm,) if norm else ())}
    n, k = int(req[experts]), int(req["num_experts_per_tok"])
    if n < 1 or not 1 <= k <= n:
        raise ConfigError(f"{source}: {experts}={n} and num_experts_per_tok={k}: need "
                          f"1 <= num_experts_per_tok <= {experts}")
    return dict(n_experts=n, n_experts_per_token=k, d_ff=int(req[width]),
                norm_topk_prob=bool(req[norm]) if norm else True)


def _llama(cfg: dict, model_type: str, source: str) -> LlamaConfig:
    req = {k: _require(cfg, k, source) for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads")}
    gemma = _gemma3(cfg, source) if model_type == "gemma3_text" else {}
    act = cfg.get("hidden_act", "silu")
    if act != "silu" and not gemma:
        raise ConfigError(f"{source}: unsupported hidden_act {act!r}; supported: silu")
    heads = int(req["num_attention_heads"])
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    if heads % kv_heads:
        raise ConfigError(f"{source}: num_attention_heads {heads} is not a multiple of "
                          f"num_key_value_heads {kv_heads}")
    theta, scaling = _rope(cfg, source)
    n_layers = int(req["num_hidden_layers"])
    attn_bias = bool(cfg.get("attention_bias", False))
    fields = dict(
        vocab_size=int(req["vocab_size"]), d_model=int(req["hidden_size"]), n_layers=n_layers,
        n_heads=heads, n_kv_heads=kv_heads,
        head_dim=int(cfg.get("head_dim") or req["hidden_size"] // heads),
        d_ff=int(req["intermediate_size"]),
        max_seq_len=int(cfg.get("max_position_embeddings") or 2048),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2" or attn_bias, o_bias=attn_bias,
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        sliding_windows=_windows(cfg, model_type, n_layers, source),
        qk_norm=model_type in ("qwen3", "qwen3_moe"),  # RMSNorm over each head of q and k
    )
    moe = _moe(cfg, model_type, source) if model_type in ("mixtral", "qwen3_moe") else {}
    return LlamaConfig(**(fields | gemma | moe))


def _gpt2(cfg: dict, source: str) -> GPT2Config:
    req = {k: _require(cfg, k, source) for k in ("vocab_size", "n_embd", "n_layer", "n_head",
                                                  "n_positions")}
    act = cfg.get("activation_function", "gelu_new")
    acts = {"gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new", "gelu": "gelu"}
    if act not in acts:
        raise ConfigError(f"{source}: unsupported activation_function {act!r}; "
                          f"supported: {', '.join(acts)}")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if cfg.get(flag):
            raise ConfigError(f"{source}: {flag}=true is not supported")
    if cfg.get("scale_attn_weights", True) is False:
        raise ConfigError(f"{source}: scale_attn_weights=false is not supported")
    d = int(req["n_embd"])
    return GPT2Config(vocab_size=int(req["vocab_size"]), d_model=d, n_layers=int(req["n_layer"]),
                      n_heads=int(req["n_head"]), d_ff=int(cfg.get("n_inner") or 4 * d),
                      max_seq_len=int(req["n_positions"]),
                      norm_eps=float(cfg.get("layer_norm_epsilon", 1e-5)), activation=acts[act])


def config_from_hf(cfg: dict, source: str) -> ModelConfig:
    """Model config from a Hugging Face config dict read from `source` (named in errors)."""
    if not isinstance(cfg, dict):
        raise ConfigError(f"{source}: expected a JSON object")
    model_type = cfg.get("model_type")
    if model_type is None:
        raise ConfigError(f"{source}: missing required field 'model_type'")
    if model_type not in SUPPORTED:
        raise ConfigError(f"{source}: unsupported architecture (model_type {model_type!r}); "
                          f"supported: {', '.join(SUPPORTED)}")
    if model_type == "gemma3":  # Gemma3ForConditionalGeneration: its language model
        text = cfg.get("text_config")
        if not isinstance(text, dict):
            raise ConfigError(f"{source}: model_type 'gemma3' needs a 'text_config' object")
        cfg, model_type = {**text, "model_type": "gemma3_text"}, "gemma3_text"
    try:
        if model_type == "gpt2":
            return _gpt2(cfg, source)
        return _llama(cfg, model_type, source)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: invalid value ({e})") from None


def eos_ids_from_hf(cfg: dict) -> tuple[int, ...]:
    """End-of-sequence ids named by a config or generation_config dict (int or list)."""
    eos = cfg.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]))
