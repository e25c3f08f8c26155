"""Tests for jaxinfer.loading.gguf: GGUF reading, dequantization and the Hugging Face mapping.

Synthetic files are written with gguf.GGUFWriter into tmp_path. The real-model tests use the
SmolLM2-135M-Instruct Q4_1 GGUF and compare against transformers' own GGUF loader.
"""

import contextlib

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter
from gguf.quants import quantize

from jaxinfer.errors import CheckpointError
from jaxinfer.loading.gguf import (
    SUPPORTED_TYPES,
    GGUFFile,
    hf_config_from_gguf,
    hf_tensor_items,
    hf_tensor_names,
    load_hf_tensor,
)

T = GGMLQuantizationType


def write_gguf(path, tensors, arch="llama", metadata=None):
    """Write a GGUF file. tensors: name -> array (F32/F16) or (packed uint8 array, type)."""
    w = GGUFWriter(str(path), arch)
    for key, value in (metadata or {}).items():
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_array(key, value)
    for name, t in tensors.items():
        if isinstance(t, tuple):
            w.add_tensor(name, t[0], raw_dtype=t[1])
        else:
            w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def llamacpp_permute(w, n_head):
    """What llama.cpp's converter does to HF q_proj / k_proj rows."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


# ----------------------------------------------------------------------------- tiny llama

TINY = dict(vocab=40, hidden=64, heads=4, kv_heads=2, head_dim=16, inter=96, layers=2)


def tiny_llama_hf(seed=0, tied=True):
    """Random HF-layout state dict of a tiny llama."""
    rng = np.random.default_rng(seed)
    h, q, kv, inter = TINY["hidden"], TINY["heads"] * 16, TINY["kv_heads"] * 16, TINY["inter"]
    shapes = {"model.embed_tokens.weight": (TINY["vocab"], h), "model.norm.weight": (h,)}
    for i in range(TINY["layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (inter, h),
            p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        }
    if not tied:
        shapes["lm_head.weight"] = (TINY["vocab"], h)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


GGUF_OF_HF = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def tiny_llama_gguf(path, hf, drop_meta=(), extra_meta=None, drop_tensor=None,
                    extra_tensors=None):
    """Convert an HF tiny-llama state dict to GGUF the way llama.cpp does (F32 tensors)."""
    tensors = {}
    for name, w in hf.items():
        if name == "model.embed_tokens.weight":
            g = "token_embd.weight"
        elif name == "model.norm.weight":
            g = "output_norm.weight"
        elif name == "lm_head.weight":
            g = "output.weight"
        else:
            _, _, i, *rest = name.split(".")
            g = f"blk.{i}.{GGUF_OF_HF['.'.join(rest[:-1])]}.weight"
        if "q_proj" in name:
            w = llamacpp_permute(w, TINY["heads"])
        elif "k_proj" in name:
            w = llamacpp_permute(w, TINY["kv_heads"])
        if g != drop_tensor:
            tensors[g] = w
    meta = {
        "llama.context_length": 256,
        "llama.embedding_length": TINY["hidden"],
        "llama.block_count": TINY["layers"],
        "llama.feed_forward_length": TINY["inter"],
        "llama.attention.head_count": TINY["heads"],
        "llama.attention.head_count_kv": TINY["kv_heads"],
        "llama.attention.layer_norm_rms_epsilon": 1e-5,
        "llama.rope.freq_base": 50000.0,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.tokens": [f"t{i}" for i in range(TINY["vocab"])],
    }
    meta = {k: v for k, v in meta.items() if k not in drop_meta} | (extra_meta or {})
    return write_gguf(path, tensors | (extra_tensors or {}), metadata=meta)


def llamacpp_rope_factors(theta, head_dim, factor, low, high, old_context):
    """rope_freqs.weight as llama.cpp's converter computes it for Llama 3.1 rope scaling."""
    factors = []
    for freq in 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim):
        wavelen = 2 * np.pi / freq
        if wavelen < old_context / high:
            factors.append(1.0)
        elif wavelen > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, np.float32)


def test_llama31_rope_freqs_equal_the_hf_directory(tmp_path):
    """A Llama 3.1-style GGUF (rope_freqs.weight, no scaling metadata) written from a tiny
    transformers model gives that model's logits."""
    import torch
    import transformers

    import jaxinfer

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    config = transformers.LlamaConfig(
        vocab_size=TINY["vocab"], hidden_size=TINY["hidden"], intermediate_size=TINY["inter"],
        num_hidden_layers=TINY["layers"], num_attention_heads=TINY["heads"],
        num_key_value_heads=TINY["kv_heads"], rms_norm_eps=1e-5, rope_theta=50000.0,
        rope_scaling=scaling, max_position_embeddings=256, tie_word_embeddings=True,
        initializer_range=0.2)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).eval()
    weights = {k: v.numpy() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    factors = llamacpp_rope_factors(50000.0, 16, 8.0, 1.0, 4.0, 64)
    assert len(set(factors.tolist())) > 2  # low, medium and high frequencies
    spm = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.scores": [0.0] * TINY["vocab"]}
    path = tiny_llama_gguf(tmp_path / "l31.gguf", weights, extra_meta=spm,
                           extra_tensors={"rope_freqs.weight": factors})
    model = jaxinfer.load(path, progress=False)
    assert model.config.rope_scaling.kind == "factors"
    tokens = np.random.default_rng(0).integers(0, TINY["vocab"], size=(1, 40))
    with torch.no_grad():
        ref = hf(torch.tensor(tokens)).logits.numpy()
    assert np.abs(model.logits(tokens) - ref).max() <= 1e-4
    bad = tiny_llama_gguf(tmp_path / "bad.gguf", weights, extra_meta=spm,
                          extra_tensors={"rope_freqs.weight": factors[:5]})
    with raises_checkpoint_error(bad, "rope_freqs.weight is F32 (5,), expected F32 (8,)"):
        jaxinfer.load(bad, progress=False)


@pytest.mark.parametrize("tied", [True, False])
def test_tiny_llama_round_trip(tmp_path, tied):
    hf = tiny_llama_hf(tied=tied)
    f = GGUFFile(tiny_llama_gguf(tmp_path / "tiny.gguf", hf))
    config = hf_config_from_gguf(f)
    assert config == {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 40,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "hidden_act": "silu",
        "rms_norm_eps": pytest.approx(1e-5),
        "rope_theta": 50000.0,
        "max_position_embeddings": 256,
        "tie_word_embeddings": tied,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "attention_bias": False,
        "mlp_bias": False,
    }
    assert sorted(hf_tensor_names(f, config)) == sorted(hf)  # exact HF names
    for name, w in hf_tensor_items(f, config):
        assert w.dtype == np.float32
        np.testing.assert_array_equal(w, hf[name], err_msg=name)  # permutation undone
    q = load_hf_tensor(f, config, "model.layers.1.self_attn.q_proj.weight")
    np.testing.assert_array_equal(q, hf["model.layers.1.self_attn.q_proj.weight"])


def test_metadata_plain_python(tmp_path):
    f = GGUFFile(tiny_llama_gguf(tmp_path / "tiny.gguf", tiny_llama_hf()))
    assert f.architecture == "llama"
    assert f.metadata["general.architecture"] == "llama"
    assert f.metadata["tokenizer.ggml.tokens"][:3] == ["t0", "t1", "t2"]
    assert type(f.metadata["llama.block_count"]) is int
    assert type(f.metadata["llama.rope.freq_base"]) is float
    assert not any(k.startswith("GGUF.") for k in f.metadata)
    assert f.tensor_shape("blk.0.ffn_down.weight") == (64, 96)  # (out, in)
    assert f.tensor_type("token_embd.weight") == "F32"


def test_rope_scaling_linear(tmp_path):
    extra = {"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0}
    path = tiny_llama_gguf(tmp_path / "t.gguf", tiny_llama_hf(), extra_meta=extra)
    config = hf_config_from_gguf(GGUFFile(path))
    assert config["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}


def test_optional_metadata_defaults(tmp_path):
    drop = ("llama.rope.freq_base", "llama.attention.head_count_kv", "tokenizer.ggml.bos_token_id")
    f = GGUFFile(tiny_llama_gguf(tmp_path / "t.gguf", tiny_llama_hf(), drop_meta=drop))
    config = hf_config_from_gguf(f)
    assert config["rope_theta"] == 10000.0
    assert config["num_key_value_heads"] == config["num_attention_heads"] == 4
    assert config["bos_token_id"] is None


# ----------------------------------------------------------------------------- dequantization

ROUND_TRIP_ATOL = {  # data uniform in [-1, 1]
    "F32": 0.0,
    "F16": 2**-11,
    "BF16": 2**-8,
    "Q8_0": 1 / 127,  # |error| <= d/2 with d = amax/127, plus f16 rounding of d
    "Q4_0": 1 / 8 + 1e-3,  # d = amax/8; the far end may clip by one step
    "Q4_1": 2 / 15,  # |error| <= d/2 with d = range/15, plus f16 rounding of d and min
}


@pytest.mark.parametrize("type_name", list(ROUND_TRIP_ATOL))
def test_load_round_trip(tmp_path, type_name):
    x = np.random.default_rng(1).uniform(-1, 1, (6, 64)).astype(np.float32)
    qtype = T[type_name]
    packed = quantize(x, qtype)
    tensor = packed if type_name in ("F32", "F16") else (packed, qtype)
    f = GGUFFile(write_gguf(tmp_path / "q.gguf", {"w": tensor}))
    assert f.tensor_type("w") == type_name
    assert f.tensor_shape("w") == (6, 64)
    y = f.load("w")
    assert y.dtype == np.float32 and y.shape == (6, 64)
    np.testing.assert_allclose(y, x, rtol=0, atol=ROUND_TRIP_ATOL[type_name])
    raw = f.raw("w")
    assert raw.dtype == np.uint8 and raw.shape[0] == 6 and not raw.flags.owndata
    assert raw.tobytes() == packed.tobytes()


# Where each block type keeps its float16 fields (d, and m / dmin where it has one).
F16_FIELDS = {"Q8_0": (0, 2), "Q4_0": (0, 2), "Q4_1": (0, 4), "Q5_0": (0, 2), "Q5_1": (0, 4),
              "Q4_K": (0, 4), "Q5_K": (0, 4), "Q6_K": (208, 210)}


@pytest.mark.parametrize("type_name", list(F16_FIELDS))
def test_dequantize_random_blocks_equals_gguf_reference(type_name):
    """Random bytes (finite float16 scales) -> the same floats as gguf's reference."""
    from gguf.quants import dequantize as reference

    from jaxinfer.loading.gguf import dequantize

    qtype = T[type_name]
    size = GGML_QUANT_SIZES[qtype][1]
    rng = np.random.default_rng(3)
    blocks = rng.integers(0, 256, (96, size), dtype=np.uint8)
    lo, hi = F16_FIELDS[type_name]
    halves = rng.uniform(-2, 2, (96, (hi - lo) // 2)).astype(np.float16)
    blocks[:, lo:hi] = halves.view(np.uint8)
    raw = blocks.reshape(8, -1)  # 8 rows of 12 blocks
    np.testing.assert_array_equal(dequantize(raw, type_name),
                                  reference(raw, qtype).reshape(-1))


def pack_q4_k_block(d, dmin, scales, mins, q):
    """block_q4_K bytes from f16 d/dmin, 8 six-bit scales and mins, 256 four-bit quants."""
    s = np.zeros(12, np.uint8)
    for j in range(4):
        s[j] = scales[j] | ((scales[j + 4] >> 4) << 6)
        s[j + 4] = mins[j] | ((mins[j + 4] >> 4) << 6)
        s[j + 8] = (scales[j + 4] & 0xF) | ((mins[j + 4] & 0xF) << 4)
    qs = np.zeros(128, np.uint8)
    for c in range(4):
        for i in range(32):
            qs[32 * c + i] = q[64 * c + i] | (q[64 * c + 32 + i] << 4)
    return np.float16(d).tobytes() + np.float16(dmin).tobytes() + s.tobytes() + qs.tobytes()


def pack_q6_k_block(d, scales, q):
    """block_q6_K bytes from f16 d, 16 int8 scales and 256 six-bit quants (stored + 32)."""
    ql, qh = np.zeros(128, np.uint8), np.zeros(64, np.uint8)
    for h in range(2):
        for i in range(32):
            a, b, c, e = (q[128 * h + 32 * k + i] for k in range(4))
            ql[64 * h + i] = (a & 0xF) | ((c & 0xF) << 4)
            ql[64 * h + 32 + i] = (b & 0xF) | ((e & 0xF) << 4)
            qh[32 * h + i] = (a >> 4) | ((b >> 4) << 2) | ((c >> 4) << 4) | ((e >> 4) << 6)
    return (
        ql.tobytes() + qh.tobytes() + np.array(scales, np.int8).tobytes() + np.float16(d).tobytes()
    )


def test_q4_k_known_block(tmp_path):
    rng = np.random.default_rng(4)
    blocks, expected = [], []
    for r, (d, dmin) in enumerate([(0.5, 0.25), (-2.0, 0.125)]):
        scales = [1, 2, 3, 63, 10 + r, 33, 47, 60]
        mins = [0, 5, 63, 7, 12, 40 + r, 1, 59]
        q = [int(v) for v in rng.integers(0, 16, 256)]
        blocks.append(pack_q4_k_block(d, dmin, scales, mins, q))
        expected.append([d * scales[i // 32] * q[i] - dmin * mins[i // 32] for i in range(256)])
    raw = np.frombuffer(b"".join(blocks), np.uint8).reshape(2, 144)
    f = GGUFFile(write_gguf(tmp_path / "k.gguf", {"w": (raw, T.Q4_K)}))
    assert f.tensor_type("w") == "Q4_K" and f.tensor_shape("w") == (2, 256)
    np.testing.assert_array_equal(f.load("w"), np.array(expected, np.float32))


def test_q6_k_known_block(tmp_path):
    rng = np.random.default_rng(6)
    blocks, expected = [], []
    for r, d in enumerate([0.125, -3.0]):
        scales = [1, -2, 3, -4, 5, 6, -7, 8, 127, -128, 11, 12, -13, 14, 15, -16 + r]
        q = [int(v) for v in rng.integers(0, 64, 256)]
        blocks.append(pack_q6_k_block(d, scales, q))
        expected.append([d * scales[i // 16] * (q[i] - 32) for i in range(256)])
    raw = np.frombuffer(b"".join(blocks), np.uint8).reshape(2, 210)
    f = GGUFFile(write_gguf(tmp_path / "k.gguf", {"w": (raw, T.Q6_K)}))
    assert f.tensor_type("w") == "Q6_K" and f.tensor_shape("w") == (2, 256)
    np.testing.assert_array_equal(f.load("w"), np.array(expected, np.float32))


# ----------------------------------------------------------------------------- bad input


@contextlib.contextmanager
def raises_checkpoint_error(path, *fragments):
    """pytest.raises for a CheckpointError whose message names path and each fragment."""
    with pytest.raises(CheckpointError) as info:
        yield info
    for fragment in (str(path), *fragments):
        assert fragment in str(info.value), f"{fragment!r} not in {str(info.value)!r}"


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello, this is not a model\n")
    with raises_checkpoint_error(path, "is not a GGUF file"):
        GGUFFile(path)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with raises_checkpoint_error(empty, "is not a GGUF file"):
        GGUFFile(empty)


def test_nonexistent_path(tmp_path):
    path = tmp_path / "missing.gguf"
    with raises_checkpoint_error(path, "no such"):
        GGUFFile(path)
    with raises_checkpoint_error(tmp_path):  # a directory is not a file either
        GGUFFile(tmp_path)


@pytest.mark.parametrize("keep", [0.5, -1, 24, 200])
def test_truncated_file(tmp_path, keep):
    full = tiny_llama_gguf(tmp_path / "full.gguf", tiny_llama_hf()).read_bytes()
    n = int(len(full) * keep) if isinstance(keep, float) else keep % len(full)
    path = tmp_path / "cut.gguf"
    path.write_bytes(full[:n])
    with raises_checkpoint_error(path, "truncated or corrupt"):
        GGUFFile(path)


@pytest.mark.parametrize("type_name", ["Q2_K", "IQ4_NL"])
def test_unsupported_tensor_type(tmp_path, type_name):
    qtype = T[type_name]
    block, size = GGML_QUANT_SIZES[qtype]
    raw = np.random.default_rng(0).integers(0, 256, (2, 2 * size), dtype=np.uint8)
    ok = np.ones(4, np.float32)
    path = write_gguf(tmp_path / "u.gguf", {"ok": ok, "blk.0.weird": (raw, qtype)})
    f = GGUFFile(path)
    assert f.tensor_type("blk.0.weird") == type_name
    assert f.tensor_shape("blk.0.weird") == (2, 2 * block)
    assert f.raw("blk.0.weird").tobytes() == raw.tobytes()  # raw bytes still available
    with raises_checkpoint_error(path, "blk.0.weird", type_name, ", ".join(SUPPORTED_TYPES)):
        f.load("blk.0.weird")
    np.testing.assert_array_equal(f.load("ok"), ok)


def test_unknown_tensor_name(tmp_path):
    path = write_gguf(tmp_path / "a.gguf", {"w": np.zeros(4, np.float32)})
    f = GGUFFile(path)
    for method in (f.load, f.raw, f.tensor_shape, f.tensor_type):
        with raises_checkpoint_error(path, "nope"):
            method("nope")


def test_unsupported_architecture(tmp_path):
    path = write_gguf(tmp_path / "g.gguf", {"w": np.zeros(4, np.float32)}, arch="gpt2")
    f = GGUFFile(path)
    assert f.architecture == "gpt2"
    with raises_checkpoint_error(path, "unsupported architecture gpt2",
                                 "supported: llama, gemma3"):
        hf_config_from_gguf(f)


@pytest.mark.parametrize(
    "key",
    [
        "llama.context_length",
        "llama.embedding_length",
        "llama.block_count",
        "llama.attention.head_count",
        "llama.attention.layer_norm_rms_epsilon",
    ],
)
def test_missing_metadata(tmp_path, key):
    path = tiny_llama_gguf(tmp_path / "m.gguf", tiny_llama_hf(), drop_meta=(key,))
    with raises_checkpoint_error(path, key):
        hf_config_from_gguf(GGUFFile(path))


@pytest.mark.parametrize(
    "key, value",
    [
        ("llama.block_count", "two"),
        ("llama.attention.head_count", 0),
        ("llama.attention.layer_norm_rms_epsilon", -1.0),
        ("llama.context_length", [1, 2]),
    ],
)
def test_bad_metadata_value(tmp_path, key, value):
    path = tiny_llama_gguf(
        tmp_path / "m.gguf", tiny_llama_hf(), drop_meta=(key,), extra_meta={key: value}
    )
    with raises_checkpoint_error(path, key):
        hf_config_from_gguf(GGUFFile(path))


def test_tensor_shape_mismatch(tmp_path):
    extra = {"llama.attention.head_count_kv": 4}  # the file's k_proj has 2 heads
    path = tiny_llama_gguf(
        tmp_path / "t.gguf",
        tiny_llama_hf(),
        extra_meta=extra,
        drop_meta=("llama.attention.head_count_kv",),
    )
    f = GGUFFile(path)
    config = hf_config_from_gguf(f)
    with raises_checkpoint_error(path, "blk.0.attn_k.weight", "(32, 64)"):
        list(hf_tensor_items(f, config))


def test_unsupported_rope_scaling(tmp_path):
    extra = {"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0}
    path = tiny_llama_gguf(tmp_path / "t.gguf", tiny_llama_hf(), extra_meta=extra)
    with raises_checkpoint_error(path, "yarn"):
        hf_config_from_gguf(path)


def test_missing_tensor(tmp_path):
    path = tiny_llama_gguf(tmp_path / "t.gguf", tiny_llama_hf(), drop_tensor="blk.1.ffn_up.weight")
    f = GGUFFile(path)
    config = hf_config_from_gguf(f)
    with raises_checkpoint_error(path, "blk.1.ffn_up.weight"):
        hf_tensor_items(f, config)


# ----------------------------------------------------------------------------- real model


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf_path):
    return GGUFFile(smollm2_gguf_path)


def test_smollm2_metadata(smollm2):
    meta = smollm2.metadata
    assert smollm2.architecture == "llama"
    assert len(meta["tokenizer.ggml.tokens"]) == 49152
    assert meta["tokenizer.ggml.tokens"][:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert len(meta["tokenizer.ggml.token_type"]) == 49152
    assert all(isinstance(m, str) for m in meta["tokenizer.ggml.merges"][:10])
    assert meta["tokenizer.ggml.pre"] == "smollm"
    assert "<|im_start|>" in meta["tokenizer.chat_template"]
    assert smollm2.tensor_type("blk.0.attn_q.weight") == "Q4_1"
    assert smollm2.tensor_shape("blk.0.attn_k.weight") == (192, 576)


def test_smollm2_matches_transformers(smollm2):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = hf_config_from_gguf(smollm2)
    # transformers maps GGUF names to HF names through a model instance; a meta one is enough.
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
    theirs = load_gguf_checkpoint(str(smollm2.path), return_tensors=True, model_to_load=model)
    for key in [
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
        "rope_theta", "max_position_embeddings", "tie_word_embeddings",
        "bos_token_id", "eos_token_id",
    ]:  # fmt: skip
        assert config[key] == theirs["config"][key], key
    # transformers' LlamaTensorProcessor also undoes llama.cpp's Q/K row permutation
    # (_reverse_permute_weights), so both sides should be in the true HF layout.
    tensors = theirs["tensors"]
    names = []
    for name, ours in hf_tensor_items(smollm2, config):
        names.append(name)
        expected = tensors.pop(name).numpy()
        assert ours.shape == expected.shape, name
        assert np.max(np.abs(ours - expected)) <= 1e-6, name
    assert not tensors, f"transformers has tensors we do not: {sorted(tensors)}"
    assert len(names) == 272 and "lm_head.weight" not in names


def test_smollm2_qk_permutation(smollm2):
    config = hf_config_from_gguf(smollm2)
    for proj, gguf_name, n_head in [("q_proj", "attn_q", 9), ("k_proj", "attn_k", 3)]:
        ours = load_hf_tensor(smollm2, config, f"model.layers.3.self_attn.{proj}.weight")
        stored = smollm2.load(f"blk.3.{gguf_name}.weight")
        assert not np.array_equal(ours, stored)
        np.testing.assert_array_equal(llamacpp_permute(ours, n_head), stored)


def test_smollm2_runs_in_transformers(smollm2):
    """End to end: the HF model with our weights predicts sensibly; un-permuted Q/K is worse."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = hf_config_from_gguf(smollm2)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).eval()
    state = model.state_dict()
    with torch.no_grad():
        for name, w in hf_tensor_items(smollm2, config):
            state[name].copy_(torch.from_numpy(w))
    vocab = {t: i for i, t in enumerate(smollm2.metadata["tokenizer.ggml.tokens"])}
    words = "The capital of France is Paris . The capital of Germany is Berlin".split()
    ids = torch.tensor([[vocab[w if i == 0 else "Ġ" + w] for i, w in enumerate(words)]])

    def loss():
        with torch.no_grad():
            out = model(ids, labels=ids)
        return out.loss.item(), out.logits[0, 4].argmax().item()

    good, predicted = loss()
    assert predicted == vocab["ĠParis"]
    with torch.no_grad():
        for i in range(config["num_hidden_layers"]):
            for proj, gguf_name in [("q_proj", "attn_q"), ("k_proj", "attn_k")]:
                stored = smollm2.load(f"blk.{i}.{gguf_name}.weight")
                state[f"model.layers.{i}.self_attn.{proj}.weight"].copy_(torch.from_numpy(stored))
    bad, _ = loss()
    assert good < bad - 0.2, (good, bad)
