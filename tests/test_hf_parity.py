"""Logits parity with transformers (PyTorch CPU, float32) on tiny random checkpoints.

Each case builds a tiny randomly initialised transformers model, saves it with
`save_pretrained` (safetensors), loads it with `jaxinfer.load` and compares logits.
"""

import numpy as np
import pytest
import torch
import transformers

import jaxinfer

COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, vocab_size=211,
              max_position_embeddings=256, initializer_range=0.1)

CASES = {
    "llama_mha_tied": ("LlamaConfig", "LlamaForCausalLM",
                       dict(num_attention_heads=4, num_key_value_heads=4,
                            tie_word_embeddings=True)),
    "llama3_gqa_untied_rope_scaling_bias": (
        "LlamaConfig", "LlamaForCausalLM",
        dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
             attention_bias=True, mlp_bias=True, rope_theta=500000.0,
             rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "llama_mqa_head_dim": ("LlamaConfig", "LlamaForCausalLM",
                           dict(num_attention_heads=8, num_key_value_heads=1, head_dim=16)),
    "llama_linear_rope": ("LlamaConfig", "LlamaForCausalLM",
                          dict(num_attention_heads=4, num_key_value_heads=2,
                               rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "mistral_sliding_window": ("MistralConfig", "MistralForCausalLM",
                               dict(num_attention_heads=4, num_key_value_heads=2,
                                    sliding_window=5)),
    "qwen2_bias_mixed_window": ("Qwen2Config", "Qwen2ForCausalLM",
                                dict(num_attention_heads=4, num_key_value_heads=2,
                                     use_sliding_window=True, sliding_window=4,
                                     max_window_layers=1, tie_word_embeddings=True)),
    "qwen3_qk_norm": ("Qwen3Config", "Qwen3ForCausalLM",
                      dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                           tie_word_embeddings=True)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel",
             dict(n_embd=64, n_layer=3, n_head=4, n_positions=64, vocab_size=211,
                  initializer_range=0.1)),
}


def build_hf(case: str, out_dir, dtype=torch.float32):
    """Save a tiny random HF model for `case` into out_dir; return the torch model (float32)."""
    cfg_cls, model_cls, extra = CASES[case]
    kwargs = extra if case == "gpt2" else COMMON | extra
    config = getattr(transformers, cfg_cls)(**kwargs)
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # random norm weights, so a wrong norm mapping shows up
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name or name.endswith(".bias"):
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if name.endswith("weight") else 0.0))
    model.to(dtype).save_pretrained(out_dir, safe_serialization=True)
    return model.float()


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(tokens).long()).logits.float().numpy()


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case, tmp_path):
    hf = build_hf(case, tmp_path)
    model = jaxinfer.load(tmp_path, dtype="float32", progress=False)
    assert model.tokenizer is None  # no tokenizer files were saved
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 211, size=(2, 19)).astype(np.int32)
    ours = model.logits(tokens)
    ref = hf_logits(hf, tokens)
    assert ours.shape == ref.shape == (2, 19, 211)
    assert np.abs(ours - ref).max() <= 1e-4, np.abs(ours - ref).max()


@pytest.mark.parametrize("case", ["llama3_gqa_untied_rope_scaling_bias", "gpt2"])
def test_ragged_rows_match_each_row_alone(case, tmp_path):
    hf = build_hf(case, tmp_path)
    model = jaxinfer.load(tmp_path, progress=False)
    rows = [[5, 17, 3, 99, 4, 8, 2], [7, 1, 150]]
    ours = model.logits(rows)
    for i, row in enumerate(rows):
        ref = hf_logits(hf, np.array([row]))[0]
        assert np.abs(ours[i, :len(row)] - ref).max() <= 1e-4


def test_bfloat16_checkpoint_loads(tmp_path):
    build_hf("llama_mha_tied", tmp_path, dtype=torch.bfloat16)
    # The reference reloads the bfloat16 file as float32 (fresh RoPE buffers, upcast weights).
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    model = jaxinfer.load(tmp_path, dtype="float32", progress=False)
    tokens = np.arange(12, dtype=np.int32)[None]
    assert np.abs(model.logits(tokens) - hf_logits(hf, tokens)).max() <= 1e-4
    model16 = jaxinfer.load(tmp_path, dtype="bfloat16", progress=False)
    leaf = model16.params["layers"]["attn"]["q"]
    assert leaf.dtype == np.dtype("bfloat16")
    assert np.abs(model16.logits(tokens) - hf_logits(hf, tokens)).max() < 0.1


def test_sharded_checkpoint_with_index(tmp_path):
    cfg_cls, model_cls, extra = CASES["llama_mha_tied"]
    hf = build_hf("llama_mha_tied", tmp_path / "ref")
    hf.save_pretrained(tmp_path / "sharded", safe_serialization=True, max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    model = jaxinfer.load(tmp_path / "sharded", progress=False)
    tokens = np.arange(10, dtype=np.int32)[None]
    assert np.abs(model.logits(tokens) - hf_logits(hf, tokens)).max() <= 1e-4
