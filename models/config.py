"""Frozen, hashable model configurations (usable as static jit arguments).

One dataclass per family. Field comments give the meaning; named presets build the configs
of well-known checkpoints. Converting a Hugging Face `config.json` into these lives in the
runtime (`jaxinfer.loading.hf_config`), not here.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """RoPE frequency scaling. kind: "linear", "llama3" or "factors" (each inverse frequency
    divided by its own factor: llama.cpp's rope_freqs.weight, as written for Llama 3.1)."""

    kind: str
    factor: float = 1.0  # linear, llama3
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position_embeddings: int = 8192  # llama3 only
    factors: tuple[float, ...] | None = None  # factors only: one per frequency [H/2]

    def __post_init__(self):
        if self.factors is not None:  # a tuple of floats whatever came in (hashable)
            object.__setattr__(self, "factors", tuple(float(f) for f in self.factors))


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig:
    """Llama-family decoder (Llama 2/3, SmolLM2, Mistral, Qwen2/3, Phi-3, Gemma 3, and the
    mixture-of-experts Mixtral and Qwen3-MoE): RMSNorm, RoPE, a gated MLP, GQA. The fields
    after `sliding_windows` describe Gemma 3's differences, the last three the MoE layers;
    their defaults are Llama's."""

    vocab_size: int  # V
    d_model: int  # D, residual width
    n_layers: int  # L
    n_heads: int  # N, query heads
    n_kv_heads: int  # K, key/value heads (N % K == 0; K == N is MHA, K == 1 is MQA)
    head_dim: int  # H
    d_ff: int  # F, SwiGLU hidden width (of each expert in a MoE layer)
    max_seq_len: int  # longest position the model was trained for
    norm_eps: float = 1e-5  # RMSNorm epsilon
    rope_theta: float = 10000.0  # RoPE base
    rope_scaling: RopeScaling | None = None
    tie_embeddings: bool = False  # LM head shares the token embedding
    qkv_bias: bool = False  # bias on q/k/v projections (Qwen2, Llama attention_bias)
    o_bias: bool = False  # bias on the attention output projection (Llama attention_bias)
    mlp_bias: bool = False  # bias on gate/up/down projections
    # Per-layer sliding attention window (a query sees keys with q_pos - k_pos < window);
    # None means every layer attends to the full context.
    sliding_windows: tuple[int | None, ...] | None = None
    # RoPE base of the sliding-window layers, without rope_scaling (Gemma 3's local layers);
    # None: every layer uses rope_theta and rope_scaling.
    local_rope_theta: float | None = None
    activation: str = "silu"  # gated MLP: "silu" (SwiGLU) or "gelu_tanh" (GeGLU, Gemma)
    norm_plus_one: bool = False  # RMSNorm scales by (1 + w), w stored as in HF (Gemma)
    post_norms: bool = False  # RMSNorm on the attention and MLP outputs too (Gemma 3)
    qk_norm: bool = False  # RMSNorm over each head of q and k before RoPE (Gemma 3, Qwen3)
    scale_embeddings: bool = False  # embeddings times sqrt(D), in their dtype (Gemma)
    # Attention scores are q.k * query_scale; None: 1 / sqrt(head_dim). Gemma 3:
    # query_pre_attn_scalar ** -0.5.
    query_scale: float | None = None
    # Mixture of experts (Mixtral, Qwen3-MoE): every layer's MLP is n_experts gated MLPs of
    # width d_ff and a router that picks n_experts_per_token of them for each token (softmax
    # over the experts, then the top k); 0: one dense MLP.
    n_experts: int = 0  # E
    n_experts_per_token: int = 0  # k, experts each token goes through
    norm_topk_prob: bool = True  # the k router weights renormalised to sum to 1 (Mixtral)

    def __post_init__(self):
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} not divisible by n_kv_heads {self.n_kv_heads}")
        if self.sliding_windows is not None and len(self.sliding_windows) != self.n_layers:
            raise ValueError("sliding_windows needs one entry per layer")
        if self.activation not in ("silu", "gelu_tanh"):
            raise ValueError(f"unknown activation {self.activation!r}; known: silu, gelu_tanh")
        if self.n_experts and not 1 <= self.n_experts_per_token <= self.n_experts:
            raise ValueError(f"n_experts_per_token {self.n_experts_per_token} must be in "
                             f"1..n_experts ({self.n_experts})")

    @property
    def family(self) -> str:
        return "llama"

    @classmethod
    def smollm2_135m(cls) -> LlamaConfig:
        """SmolLM2-135M(-Instruct)."""
        return cls(vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3,
                   head_dim=64, d_ff=1536, max_seq_len=8192, norm_eps=1e-5,
                   rope_theta=100000.0, tie_embeddings=True)

    @classmethod
    def llama3_8b(cls) -> LlamaConfig:
        """Llama 3.1 8B."""
        return cls(vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                   head_dim=128, d_ff=14336, max_seq_len=131072, norm_eps=1e-5,
                   rope_theta=500000.0,
                   rope_scaling=RopeScaling(kind="llama3", factor=8.0, low_freq_factor=1.0,
                                            high_freq_factor=4.0,
                                            original_max_position_embeddings=8192))

    @classmethod
    def gemma3_270m(cls) -> LlamaConfig:
        """Gemma 3 270M: 5 sliding-window (512) layers, then a global one, repeated."""
        windows = tuple(None if (i + 1) % 6 == 0 else 512 for i in range(18))
        return cls(vocab_size=262144, d_model=640, n_layers=18, n_heads=4, n_kv_heads=1,
                   head_dim=256, d_ff=2048, max_seq_len=32768, norm_eps=1e-6,
                   rope_theta=1_000_000.0, tie_embeddings=True, sliding_windows=windows,
                   local_rope_theta=10_000.0, activation="gelu_tanh", norm_plus_one=True,
                   post_norms=True, qk_norm=True, scale_embeddings=True, query_scale=256 ** -0.5)

    @classmethod
    def tiny(cls, **overrides) -> LlamaConfig:
        """A tiny model for tests."""
        base = dict(vocab_size=128, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                    head_dim=8, d_ff=64, max_seq_len=256)
        return cls(**(base | overrides))


@dataclasses.dataclass(frozen=True, kw_only=True)
class GPT2Config:
    """GPT-2: learned positions, pre-LayerNorm, GELU MLP, fused qkv, tied LM head."""

    vocab_size: int  # V
    d_model: int  # D
    n_layers: int  # L
    n_heads: int  # N (head_dim H = D // N)
    d_ff: int  # F, MLP hidden width (4 * D in GPT-2)
    max_seq_len: int  # P, number of learned positions
    norm_eps: float = 1e-5  # LayerNorm epsilon
    activation: str = "gelu_new"  # "gelu_new" (tanh approximation) or "gelu" (exact)

    @property
    def family(self) -> str:
        return "gpt2"

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def n_kv_heads(self) -> int:
        return self.n_heads

    @classmethod
    def tiny(cls, **overrides) -> GPT2Config:
        """A tiny model for tests."""
        base = dict(vocab_size=128, d_model=32, n_layers=2, n_heads=4, d_ff=128, max_seq_len=64)
        return cls(**(base | overrides))


ModelConfig = LlamaConfig | GPT2Config
