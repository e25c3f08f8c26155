"""Phi-3 and the mixture-of-experts families (Mixtral, Qwen3-MoE) against transformers
(PyTorch, float32), on tiny random models saved with `save_pretrained`; expert parallelism on
8 virtual CPU devices; quantized experts; bad input.

Phi-3's fused qkv_proj / gate_up_proj are split into q, k, v / gate, up when loaded. The MoE
configs have 8 experts (2 per token) so a model=8 mesh puts one expert on each device.
"""

import dataclasses
import json
import os
import shutil
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from jax.sharding import PartitionSpec

import jaxinfer
from jaxinfer import kernels
from jaxinfer.errors import CheckpointError, ConfigError
from jaxinfer.generate import Request, generate_ids, run_layout, run_params
from jaxinfer.loading.hf_config import config_from_hf
from jaxinfer.loading.saved import load_quantized, save_quantized
from jaxinfer.parallel import Placement
from jaxinfer.quant import Int4, Int4Weight, Int8, Int8Weight, dequantize_params, plan, quantize
from jaxinfer.sampling import Sampling
from jaxinfer.sparse import sparsify

VOCAB = 211
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.1)
CASES = {
    # a sliding window shorter than the test sequences, on every layer (as Phi-3 mini's 2047)
    "phi3": ("Phi3Config", "Phi3ForCausalLM",
             dict(intermediate_size=96, sliding_window=5, pad_token_id=0)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(intermediate_size=48, num_local_experts=8, num_experts_per_tok=2)),
    # q/k norms, head_dim != hidden / heads, the top-k weights not renormalised
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(intermediate_size=96, moe_intermediate_size=32, head_dim=16,
                       num_experts=8, num_experts_per_tok=2, norm_topk_prob=False,
                       tie_word_embeddings=True)),
}


def build_hf(case: str, out_dir):
    """A tiny random transformers model of `case` saved into out_dir; returns it (float32)."""
    cfg_cls, model_cls, extra = CASES[case]
    torch.manual_seed(0)
    hf = getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**(COMMON | extra)))
    with torch.no_grad():  # random norms and routers (Qwen3-MoE's router starts at zero)
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.1 + 1.0)
            elif name.endswith("mlp.gate.weight") or "block_sparse_moe.gate" in name:
                p.copy_(torch.randn_like(p))
    hf.eval().save_pretrained(out_dir, safe_serialization=True)
    return hf


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    """(case, its directory, jaxinfer model, transformers model)."""
    path = tmp_path_factory.mktemp(request.param)
    hf = build_hf(request.param, path)
    return request.param, path, jaxinfer.load(path, dtype="float32", progress=False), hf


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    path = tmp_path_factory.mktemp("mixtral")
    hf = build_hf("mixtral", path)
    return path, jaxinfer.load(path, dtype="float32", progress=False), hf


def hf_logits(hf, tokens) -> np.ndarray:
    with torch.no_grad():
        return hf(torch.tensor(np.asarray(tokens)).long()).logits.float().numpy()


def greedy(model, prompts, n=8, params=None):
    req = Request(prompts=prompts, sampling=[Sampling()] * len(prompts), max_new_tokens=n,
                  stop_token_ids=())
    return [c.token_ids for c in generate_ids(model, req, params=params)]


def hf_greedy(hf, prompt, n=8):
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


PROMPTS = [[2, 5, 17, 3, 99, 4, 8], [7, 1, 150]]


# ----------------------------------------------------------------------------- parity


def test_config_and_params(case):
    name, path, model, _ = case
    c = model.config
    layers = model.params["layers"]
    if name == "phi3":
        assert c.n_experts == 0 and c.sliding_windows == (5, 5)
        assert layers["attn"]["q"].shape == (2, 64, 64) and layers["mlp"]["up"].shape == (2, 64, 96)
    else:
        assert (c.n_experts, c.n_experts_per_token) == (8, 2) and "mlp" not in layers
        assert c.norm_topk_prob == (name == "mixtral") and c.qk_norm == (name == "qwen3_moe")
        assert layers["moe"]["gate"].shape == (2, 8, 64, c.d_ff)
        assert layers["moe"]["router"].shape == (2, 64, 8)
        assert json.loads((path / "config.json").read_text())["model_type"] == name


def test_logits_match_transformers(case):
    _, _, model, hf = case
    tokens = np.random.default_rng(0).integers(0, VOCAB, size=(2, 19))
    ours, ref = model.logits(tokens), hf_logits(hf, tokens)
    assert ours.shape == ref.shape == (2, 19, VOCAB)
    assert np.abs(ours - ref).max() <= 1e-4, np.abs(ours - ref).max()


def test_ragged_rows_match_each_row_alone(case):
    _, _, model, hf = case
    ours = model.logits(PROMPTS)
    for i, row in enumerate(PROMPTS):
        assert np.abs(ours[i, :len(row)] - hf_logits(hf, [row])[0]).max() <= 1e-4


def test_cached_decode_equals_full_forward(case):
    """Prefill 3 tokens, then one at a time through the per-layer KV cache."""
    from test_gemma3 import assert_cached_decode_equals_full_forward

    assert_cached_decode_equals_full_forward(case[2], VOCAB, 10)


@pytest.mark.parametrize("case", ["mixtral", "qwen3_moe"], indirect=True)
def test_greedy_generation_matches_transformers(case):
    """The engine (the native CPU kernels where they build, the float32 expert stacks too, with
    stacked layers and cache; else XLA with per-layer ones) decodes what transformers' greedy
    generate does. (Phi-3 loads
    into the Llama layout, which the Llama tests generate with already.)"""
    _, _, model, hf = case
    for prompt, out in zip(PROMPTS, greedy(model, PROMPTS), strict=True):
        assert out == hf_greedy(hf, prompt)


# ----------------------------------------------------------------------------- experts


def test_router_weights():
    """Softmax over the experts, top k, renormalised or not; zero weight elsewhere."""
    from models.moe import route

    logits = jnp.asarray([[2.0, 0.0, 1.0, -1.0]])
    p = np.exp([2.0, 0.0, 1.0, -1.0])
    p /= p.sum()
    np.testing.assert_allclose(route(logits, 2, False)[0], [p[0], 0, p[2], 0], rtol=1e-6)
    np.testing.assert_allclose(route(logits, 2, True)[0],
                               [p[0] / (p[0] + p[2]), 0, p[2] / (p[0] + p[2]), 0], rtol=1e-6)


def test_expert_parallel_tokens_identical_to_one_device(mixtral):
    """Experts over model=8 (one per device; the 4 heads and the vocabulary do not divide 8
    and are replicated): greedy tokens equal one device's, and the expert stacks really are
    split on their experts axis."""
    _, model, _ = mixtral
    ref = greedy(model, PROMPTS)
    placement = Placement((1, 8))
    placed = placement.apply(model)
    for name in ("gate", "up", "down"):
        leaf = placed.params["layers"]["moe"][name]
        assert leaf.sharding.spec == PartitionSpec(None, "model", None, None), name
        assert leaf.addressable_shards[0].data.shape[1] == 1
    assert greedy(placed, PROMPTS) == ref


def test_quantized_experts(mixtral, tmp_path):
    """The default rules select each expert stack (not the router); int8 and int4 experts
    multiply as their dequantized weights do, and the engine's cached greedy decode (per-layer
    weights; the native kernels for the float attention, the router and the int8 experts)
    equals greedy argmax of the uncached forward."""
    _, model, _ = mixtral
    chosen = plan(model.params, scheme=Int8())
    assert {"layers/moe/gate", "layers/moe/up", "layers/moe/down"} <= set(chosen)
    assert "layers/moe/router" not in chosen
    q = quantize(model.params, [("layers/moe/{gate,up}", Int4(16)), ("layers/moe/down", Int8())])
    moe = q["layers"]["moe"]
    for name, kind in (("gate", Int4Weight), ("up", Int4Weight), ("down", Int8Weight)):
        assert isinstance(moe[name], kind), name
        assert moe[name].shape == model.params["layers"]["moe"][name].shape
    assert isinstance(moe["router"], jax.Array)
    qmodel = dataclasses.replace(model, params=q)
    tokens = np.random.default_rng(3).integers(0, VOCAB, size=(2, 12))
    lq = qmodel.logits(tokens)
    ld = dataclasses.replace(model, params=dequantize_params(q)).logits(tokens)
    assert np.abs(lq - ld).max() <= 1e-4, np.abs(lq - ld).max()
    saved = load_quantized(save_quantized(qmodel, tmp_path / "q"))
    assert saved.config == model.config
    np.testing.assert_array_equal(saved.logits(tokens), lq)
    prompt = PROMPTS[0]
    (out,) = greedy(qmodel, [prompt])
    logits = qmodel.logits([prompt + out])[0]
    assert out == np.argmax(logits[len(prompt) - 1:-1], axis=-1).tolist()
    run = run_params(qmodel)["layers"][0]["moe"]  # what the engine ran (per layer: int4 in
    assert isinstance(run["gate"], Int4Weight)  # groups of 16 is no kernel format)
    if kernels.isa() is not None:  # AVX2 / AVX-512 here: the router and int8 experts are
        assert isinstance(run["router"], kernels.NativeWeight)  # native kernel leaves
        assert isinstance(run["down"], kernels.NativeQuant) and run["down"].free == (8,)
    else:
        assert isinstance(run["down"], Int8Weight)


def _expert_rules(scheme: str, config) -> list:
    """Quantization rules of the expert stacks for `scheme` (float32: none); int4 in groups of
    32 (the 4-bit kernels take groups of whole 32-input blocks); a down projection whose F
    inputs have no such group (the tiny Mixtral's 48) is int8."""
    if scheme == "int8":
        return [("layers/moe/{gate,up,down}", Int8())]
    if scheme == "int4":
        return [("layers/moe/{gate,up}", Int4(32)),
                ("layers/moe/down", Int4(32) if config.d_ff % 32 == 0 else Int8())]
    return []


# One ISA per family keeps the engine compiles few: the most capable this CPU runs for Mixtral,
# AVX2 for Qwen3-MoE (both AVX2 on an AVX2-only machine); test_qkernels runs every expert
# format on every ISA.
_ISAS = kernels.supported_isas()
_HAVE_CXX = shutil.which(os.environ.get("CXX", "c++")) is not None
MOE_ISA = [pytest.param(case, isa, id=f"{isa}-{case}",
                        marks=pytest.mark.skipif(not _HAVE_CXX, reason="no C++ compiler"))
           for case, isa in ((("mixtral", _ISAS[0]), ("qwen3_moe", _ISAS[-1])) if _ISAS else ())]


@pytest.mark.parametrize("case,isa", MOE_ISA, indirect=True)
def test_expert_stacks_on_the_kernels_equal_xla(case, isa):
    """With the kernels on, the run layout keeps the layers stacked with every expert stack a
    kernel stack [L, E, ...] (float32: NativeWeight; int8, int4: NativeQuant). Prompt logits
    equal the XLA path's (`run_layout(native=False)`, as JAXINFER_NATIVE=0 runs) within 1e-4
    of their largest magnitude; int4 within 2e-2 (the 4-bit kernels take the activations
    quantized per block of 32, the XLA path float ones; test_qkernels checks the expert stacks
    against each expert's kernel leaf bit for bit). The engine's 8 greedy tokens (int8 experts for
    Mixtral, int4 for Qwen3-MoE; float32 in test_greedy_generation_matches_transformers) are
    the XLA path's argmax at every step."""
    name, _, model, _ = case
    prompt = PROMPTS[0]
    for scheme in ("float32", "int8", "int4"):
        rules = _expert_rules(scheme, model.config)
        params = quantize(model.params, rules) if rules else model.params
        native = run_layout(params, model.config)
        kind = kernels.NativeWeight if scheme == "float32" else kernels.NativeQuant
        for path, w in native["layers"]["moe"].items():
            want = kernels.NativeWeight if path == "router" else kind
            assert isinstance(w, want) and w.isa == isa, (scheme, path)
        greedy_too = scheme == {"mixtral": "int8"}.get(name, "int4")
        tokens = [prompt + (greedy(model, [prompt], params=native)[0] if greedy_too else [])]
        plain = run_layout(params, model.config, native=False)
        ref, got = (dataclasses.replace(model, params=p).logits(tokens)[0] for p in (plain, native))
        scale = np.abs(ref).max()
        assert np.abs(got - ref).max() <= (2e-2 if scheme == "int4" else 1e-4) * scale, scheme
        if greedy_too:
            assert tokens[0][len(prompt):] == np.argmax(ref[len(prompt) - 1:-1], -1).tolist()


def test_magnitude_pruning_of_experts(mixtral):
    """Each expert's matrices are pruned per output column, like any projection."""
    _, model, _ = mixtral
    pruned = sparsify(model.params, method="magnitude", sparsity=0.5)
    for name in ("gate", "up", "down"):
        w = np.asarray(pruned["layers"]["moe"][name])
        assert ((w == 0).sum(-2) == w.shape[-2] // 2).all(), name
    assert pruned["layers"]["moe"]["router"] is model.params["layers"]["moe"]["router"]


# ----------------------------------------------------------------------------- bad input


def _config(case: str) -> dict:
    cfg_cls, _, extra = CASES[case]
    return getattr(transformers, cfg_cls)(**(COMMON | extra)).to_dict()


@pytest.mark.parametrize("case,field", [("mixtral", "num_local_experts"),
                                        ("mixtral", "num_experts_per_tok"),
                                        ("qwen3_moe", "moe_intermediate_size"),
                                        ("qwen3_moe", "norm_topk_prob")])
def test_missing_moe_field_names_the_file_and_field(tmp_path, case, field):
    cfg = _config(case)
    del cfg[field]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=rf"{tmp_path / 'config.json'}: missing required "
                                          rf"field '{field}'"):
        jaxinfer.load(tmp_path, progress=False)


def test_unknown_architecture_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    with pytest.raises(ConfigError, match=rf"{tmp_path / 'config.json'}: unsupported "
                                          r"architecture \(model_type 'mamba'\)"):
        jaxinfer.load(tmp_path, progress=False)


def test_unsupported_config_values():
    cfg = _config("phi3")
    longrope = cfg | {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4,
                                          "short_factor": [1.0] * 4, "long_factor": [2.0] * 4}}
    with pytest.raises(ConfigError, match=r"phi\.json: unsupported RoPE type 'longrope'"):
        config_from_hf(longrope, "phi.json")
    partial = cfg | {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                                         "partial_rotary_factor": 0.75}}
    with pytest.raises(ConfigError, match=r"phi\.json: partial_rotary_factor 0\.75"):
        config_from_hf(partial, "phi.json")
    dense_layers = _config("qwen3_moe") | {"mlp_only_layers": [1]}
    with pytest.raises(ConfigError, match=r"q\.json: decoder_sparse_step / mlp_only_layers"):
        config_from_hf(dense_layers, "q.json")
    too_many = _config("mixtral") | {"num_experts_per_tok": 9}
    with pytest.raises(ConfigError, match=r"m\.json: num_local_experts=8 and num_experts_per_tok=9"):
        config_from_hf(too_many, "m.json")


def _set_dtype(path, name: str, dtype: str) -> None:
    """Rewrite a safetensors header so tensor `name` claims `dtype` (data left as it is)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header[name]["dtype"] = dtype
    new = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def test_unsupported_tensor_type_and_missing_expert_name_the_file(mixtral, tmp_path):
    src, _, _ = mixtral
    bad = tmp_path / "f8"
    shutil.copytree(src, bad)
    name = "model.layers.1.block_sparse_moe.experts.3.w2.weight"
    _set_dtype(bad / "model.safetensors", name, "F8_E4M3")
    with pytest.raises(CheckpointError, match=rf"{bad / 'model.safetensors'}: tensor '{name}' "
                                              r"has unsupported dtype"):
        jaxinfer.load(bad, progress=False)
    from safetensors.numpy import load_file, save_file

    weights = load_file(src / "model.safetensors")
    del weights[name]
    missing = tmp_path / "missing"
    missing.mkdir()
    shutil.copy(src / "config.json", missing / "config.json")
    save_file(weights, missing / "model.safetensors")
    with pytest.raises(CheckpointError, match=rf"{missing}.*: missing tensor '{name}'"):
        jaxinfer.load(missing, progress=False)
