"""Parallel inference on 8 virtual CPU devices: meshes, sharding rules, pmap.

Greedy tokens must be identical to one device for every placement, on SmolLM2 (9 query heads,
3 KV heads: tensor parallelism over 3) and on a tiny random Llama (4 heads, 2 KV heads).
"""

import argparse
import dataclasses
import json

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import models
from jaxinfer.engine import DecodeState
from jaxinfer.errors import InputError
from jaxinfer.generate import Engine, Request, engine_for, generate_ids
from jaxinfer.model import Model
from jaxinfer.parallel import (
    RULES,
    Placement,
    default_mesh_shape,
    make_mesh,
    param_shardings,
    shard_params,
    spec_for,
)
from jaxinfer.parallel.cli_support import (
    add_parallel_args,
    devices_command,
    parse_mesh,
    setup_parallel,
    tiny_model,
)
from jaxinfer.parallel.sharding import field_axes
from jaxinfer.sampling import Sampling
from models.cache import logical

P = PartitionSpec


def _tokens(model, prompts, new_tokens):
    req = Request(prompts=prompts, sampling=[Sampling()] * len(prompts),
                  max_new_tokens=new_tokens, stop_token_ids=())
    return [c.token_ids for c in generate_ids(model, req)]


# ----------------------------------------------------------------------------- tiny model

TINY_PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9], [10, 11], [12]]


@pytest.fixture(scope="module")
def tiny():
    model = tiny_model(seed=0)
    return model, _tokens(model, TINY_PROMPTS, 10)


@pytest.mark.parametrize("mesh,pmap", [
    ((1, 1), False),  # one device: the model is left alone
    (None, True),  # pmap over all 8 local devices
    ((1, 4), False),  # tensor parallel; 2 KV heads do not divide 4: replicated
    ((2, 2), False),  # data x tensor
    ((8, 1), False),  # pure data parallel (4 prompts padded to 8 rows)
], ids=["one-device", "pmap", "tensor4", "data2xtensor2", "data8"])
def test_tiny_tokens_identical(tiny, mesh, pmap):
    model, ref = tiny
    placement = Placement(mesh, pmap=pmap)
    placed = placement.apply(model)
    assert _tokens(placed, TINY_PROMPTS, 10) == ref
    info = placement.info()
    assert info["pmap"] is pmap and info["num_processes"] == 1
    assert info["num_devices"] == info["mesh"]["data"] * info["mesh"]["model"]
    if mesh == (1, 1):
        assert placed is model
    if mesh == (1, 4):
        assert any("'kv_heads' = 2" in n for n in placement.notes), placement.notes


# ------------------------------------------------------------------------------- SmolLM2


@pytest.fixture(scope="module")
def smol(smollm2):
    tok = smollm2.tokenizer
    prompts = [tok.encode("The capital of France is"), tok.encode("def fibonacci(n):")]
    return smollm2, prompts, _tokens(smollm2, prompts, 8)


_PLACED = {}


def _smol_placed(smollm2, key):
    if key not in _PLACED:
        mesh, pmap = key
        placement = Placement(mesh, pmap=pmap)
        _PLACED[key] = (placement, placement.apply(smollm2))
    return _PLACED[key]


@pytest.mark.parametrize("mesh,pmap", [
    (None, True),  # pmap over all 8 local devices
    ((1, 3), False),  # tensor parallel over the 3 KV heads / 9 query heads
    ((2, 3), False),  # data x tensor
    ((4, 1), False),  # pure data parallel
], ids=["pmap", "tensor3", "data2xtensor3", "data4"])
def test_smollm2_tokens_identical(smol, mesh, pmap):
    model, prompts, ref = smol
    placement, placed = _smol_placed(model, (mesh, pmap))
    assert placement.notes == []
    assert _tokens(placed, prompts, 8) == ref


def test_smollm2_one_device_placement_is_the_model(smol):
    model, prompts, ref = smol
    assert Placement((1, 1)).apply(model) is model


def test_tensor_parallel_weights_really_split(smol):
    model, _, _ = smol
    placement, placed = _smol_placed(model, ((1, 3), False))
    devices = list(placement.mesh.devices.flat)
    assert len(devices) == 3
    q = placed.params["layers"]["attn"]["q"]
    assert q.sharding.spec == P(None, None, "model")
    assert placed.params["embed"].sharding.spec == P("model", None)  # vocab (tied head)
    assert placed.params["layers"]["mlp"]["down"].sharding.spec == P(None, "model", None)
    sharded_total, per_device = 0, dict.fromkeys(devices, 0)
    for leaf in jax.tree.leaves(placed.params):
        if "model" not in leaf.sharding.spec:
            assert all(s.data.nbytes == leaf.nbytes for s in leaf.addressable_shards)
            continue
        sharded_total += leaf.nbytes
        for shard in leaf.addressable_shards:
            per_device[shard.device] += shard.data.nbytes
    assert sharded_total > 0.95 * placed.weight_bytes
    for d, nbytes in per_device.items():
        assert nbytes == pytest.approx(sharded_total / 3, rel=1e-6), (d, nbytes)


def test_kv_cache_and_state_shardings(smol):
    model, _, _ = smol
    placement, _ = _smol_placed(model, ((2, 3), False))
    hook = placement.hook
    cache, state = field_axes(models.KVCache), field_axes(DecodeState)

    def spec(shape, axes):
        return hook.sharding(jnp.zeros(shape), *axes).spec

    assert spec((30, 2, 3, 64, 16), cache["k"]) == P(None, "data", "model", None, None)
    assert spec((2, 3, 64, 16), cache["k"]) == P("data", "model", None, None)  # per layer
    assert spec((2, 16), cache["pos"]) == P("data", None)
    assert spec((2,), state["length"]) == P("data")
    assert spec((2, 49152), state["seen"]) == P("data", "model")
    assert spec((2, 8), state["stop_ids"]) == P("data", None)  # per slot
    assert spec((), state["step"]) == P()


def test_every_decode_state_field_has_a_sharding_rule():
    """A field added to DecodeState (or KVCache) without logical axes fails here."""
    pytree = {f.name for f in dataclasses.fields(DecodeState) if f.metadata.get("pytree_node", True)}
    assert set(field_axes(DecodeState)) | {"cache"} == pytree
    assert set(field_axes(models.KVCache)) == {"k", "v", "pos", "end", "k_scale", "v_scale"}

    @flax.struct.dataclass
    class Extended:
        tokens: jax.Array = logical("batch")
        new_field: jax.Array = flax.struct.field()

    with pytest.raises(TypeError, match="Extended.new_field declares no logical axes"):
        field_axes(Extended)


# ------------------------------------------------------------------- quantized leaves


@flax.struct.dataclass
class Int8Weight:
    """int8 weight [..., in, out] with per-output-channel scales [..., out] (test leaf)."""

    q: jax.Array
    scale: jax.Array

    @classmethod
    def quantize(cls, w):
        scale = jnp.max(jnp.abs(w), axis=-2) / 127.0
        return cls(q=jnp.round(w / scale[..., None, :]).astype(jnp.int8), scale=scale)

    def matmul(self, x):
        return (x @ self.q.astype(x.dtype)) * self.scale.astype(x.dtype)


def test_quantized_leaves_shard_with_their_weights():
    model = tiny_model(seed=1)
    params = jax.tree.map(lambda x: x, model.params)
    for name in ("q", "k", "v", "o"):
        params["layers"]["attn"][name] = Int8Weight.quantize(params["layers"]["attn"][name])
    for name in ("gate", "up", "down"):
        params["layers"]["mlp"][name] = Int8Weight.quantize(params["layers"]["mlp"][name])
    qmodel = Model(config=model.config, params=params, tokenizer=None)
    mesh = make_mesh(2, 2)
    sh = param_shardings(params, model.config, mesh)
    assert sh["layers"]["attn"]["q"].q.spec == P(None, None, "model")  # [L, D, N*H]
    assert sh["layers"]["attn"]["q"].scale.spec == P(None, "model")  # [L, N*H]
    assert sh["layers"]["attn"]["o"].q.spec == P(None, "model", None)  # [L, N*H, D]
    assert sh["layers"]["attn"]["o"].scale.spec == P(None, None)  # [L, D]: embed, replicated
    assert sh["layers"]["mlp"]["down"].scale.spec == P(None, None)
    placed = Placement((2, 2)).apply(qmodel)
    leaf = placed.params["layers"]["mlp"]["up"]
    assert isinstance(leaf, Int8Weight) and leaf.q.dtype == jnp.int8
    assert leaf.q.sharding.spec == P(None, None, "model")
    assert leaf.scale.sharding.spec == P(None, "model")
    ids = [[3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]]
    np.testing.assert_allclose(placed.logits(ids), qmodel.logits(ids), atol=1e-4, rtol=1e-4)


def test_jaxinfer_quant_leaves_shard_with_their_weights():
    quant = pytest.importorskip("jaxinfer.quant")
    model = tiny_model(seed=0)
    mesh = make_mesh(2, 2)
    q8 = param_shardings(quant.quantize(model.params, scheme=quant.Int8()), model.config, mesh)
    up = q8["layers"]["mlp"]["up"]  # values int8 [L, D, F], scales [L, F]
    assert (up.values.spec, up.scales.spec) == (P(None, None, "model"), P(None, "model"))
    q4 = param_shardings(quant.quantize(model.params, scheme=quant.Int4(group_size=32)),
                         model.config, mesh)
    q = q4["layers"]["attn"]["q"]  # values [L, D/2, N*H] (nibbles), scales [L, D/32, N*H]
    assert (q.values.spec, q.scales.spec) == (P(None, None, "model"), P(None, None, "model"))


# ---------------------------------------------------------------- rules and bad input


def test_rules_table_and_specs():
    mesh = make_mesh(2, 4)
    assert RULES["batch"] == "data" and RULES["embed"] is None
    assert all(RULES[a] == "model" for a in ("heads", "kv_heads", "mlp", "vocab", "qkv"))
    assert spec_for(("batch", "sequence"), (8, 5), mesh) == P("data", None)
    assert spec_for(("embed", "mlp"), (32, 64), mesh) == P(None, "model")
    # heads count in whole heads: 6 heads of 8 = 48 columns do not divide over 4
    assert spec_for(("embed", "heads"), (32, 48), mesh, units={"heads": 8}) == P(None, None)


def test_non_dividing_dimension_replicated_and_reported(smollm2):
    placement = Placement((1, 2)).check(smollm2.config)
    text = " ".join(placement.notes)
    assert "'heads' = 9" in text and "'kv_heads' = 3" in text and "layers/attn/q" in text


def test_non_dividing_dimension_refused_when_strict(smollm2):
    with pytest.raises(InputError, match=r"layers/attn/k: dimension 2 \('kv_heads', 3 heads\) "
                                         r"does not divide evenly over mesh axis 'model' of size 2"):
        Placement((1, 2), strict=True).apply(smollm2)
    with pytest.raises(InputError, match="'vocab', size 128"):
        spec_for(("vocab", "embed"), (128, 4), make_mesh(1, 3), strict=True)


def test_collision_refused():
    with pytest.raises(InputError, match="'heads' and 'mlp' both map to mesh axis 'model'"):
        spec_for(("heads", "mlp"), (8, 8), make_mesh(1, 2))
    model = tiny_model()
    rules = dict(RULES, embed="model")
    with pytest.raises(InputError, match="embed: logical axes 'vocab' and 'embed' both map"):
        shard_params(model.params, model.config, make_mesh(1, 2), rules=rules)


def test_too_many_devices():
    with pytest.raises(InputError, match="needs 16 devices, but only 8"):
        make_mesh(4, 4)
    with pytest.raises(InputError, match="needs 9 devices"):
        Placement((9, 1))
    with pytest.raises(InputError, match="only 8 local devices"):
        Placement((16, 1), pmap=True)
    with pytest.raises(InputError, match="model=1"):
        Placement((2, 2), pmap=True)


def test_mesh_flag_syntax():
    assert parse_mesh("data=2,model=4") == (2, 4)
    assert parse_mesh("model=3") == (1, 3)
    assert parse_mesh(" data=8 ") == (8, 1)
    for bad, msg in [("data=2,pipeline=2", "unknown axis 'pipeline'"), ("data:2", "AXIS=SIZE"),
                     ("model=0", "positive integer"), ("data=2,data=4", "given twice"),
                     ("", "no axis")]:
        with pytest.raises(InputError, match=msg):
            parse_mesh(bad)


def test_default_placement_from_shapes():
    smol = models.LlamaConfig.smollm2_135m()
    assert default_mesh_shape(smol, 8) == (8, 1)  # 3 does not divide 8 devices
    assert default_mesh_shape(smol, 6) == (2, 3)
    assert default_mesh_shape(smol, 3) == (1, 3)
    assert default_mesh_shape(models.LlamaConfig.tiny(), 8) == (4, 2)
    assert default_mesh_shape(models.LlamaConfig.llama3_8b(), 8) == (1, 8)
    assert default_mesh_shape(models.LlamaConfig.llama3_8b(), 16, local_devices=8) == (2, 8)


def test_default_placement_on_one_cpu_process_is_one_device(smollm2):
    placement = Placement()
    assert placement.apply(smollm2) is smollm2
    assert placement.info()["mesh"] == {"data": 1, "model": 1}
    assert "8 CPU devices share this host's cores" in placement.notes[0]


@pytest.mark.parametrize("mesh, pmap", [((2, 2), False), ((4, 1), True)])
def test_requests_join_a_running_batch_on_any_placement(tiny, mesh, pmap):
    """Continuous batching on a mesh and under pmap: a request admitted mid-run (into a slot
    of another device) gets the tokens it gets alone on one device."""
    model, _ = tiny
    placed = Placement(mesh, pmap=pmap).apply(model)
    eng = Engine(placed, slots=4, cache_len=64, buf_len=16)
    jobs = [(TINY_PROMPTS[0], Sampling(), 12), (TINY_PROMPTS[1], Sampling(temperature=1.0, seed=3),
                                               10), (TINY_PROMPTS[2], Sampling(), 6)]
    handles = [eng.submit(*jobs[0])]
    eng.advance(3)
    handles += [eng.submit(*j) for j in jobs[1:]]
    while not all(eng.finished(h) for h in handles):
        eng.advance(2)
    for h, (prompt, sampling, n) in zip(handles, jobs, strict=True):
        alone = generate_ids(model, Request(prompts=[prompt], sampling=[sampling],
                                            max_new_tokens=n, stop_token_ids=()))[0]
        assert eng.result(h)[0] == alone.token_ids


def test_prefix_cache_on_a_mesh(tiny):
    """On a (2, 2) mesh the engine keeps prompt prefixes too: requests sharing whole blocks of
    an earlier prompt start from its cached (sharded) KV, one while another request runs, and
    get the tokens they get alone on one device; under pmap the cache stays off."""
    model, _ = tiny
    rng = np.random.default_rng(4)
    system = [int(t) for t in rng.integers(3, 120, 37)]
    prompts = [system + [5, 6, 7], system[:35] + [9, 8, 7, 6], system + [5, 6, 7]]
    sampling = Sampling(temperature=1.0, seed=5, repetition_penalty=1.2)
    placed = Placement((2, 2)).apply(model)
    eng = Engine(placed, slots=4, cache_len=96, buf_len=16, prefix_cache_bytes=1 << 24)
    handles = [eng.submit(prompts[0], sampling, 8)]
    while not eng.finished(handles[0]):
        eng.advance(4)
    handles += [eng.submit(prompts[1], sampling, 10)]
    eng.advance(2)
    handles += [eng.submit(prompts[2], sampling, 8)]
    while not all(eng.finished(h) for h in handles):
        eng.advance(3)
    assert (eng.prefixes.hits, eng.prefixes.misses) == (2, 1)
    for h, prompt, n in zip(handles, prompts, (8, 10, 8), strict=True):
        alone = generate_ids(model, Request(prompts=[prompt], sampling=[sampling],
                                            max_new_tokens=n, stop_token_ids=()))[0]
        assert eng.result(h)[0] == alone.token_ids
    pmapped = Placement((2, 1), pmap=True).apply(model)
    assert Engine(pmapped, slots=2, cache_len=64, buf_len=8,
                  prefix_cache_bytes=1 << 24).prefixes is None


def test_slots_padded_to_the_data_axis(tiny):
    model, _ = tiny
    placement = Placement((3, 1))
    placed = placement.apply(model)
    req = Request(prompts=[[1], [2], [3], [4]], sampling=[Sampling()], max_new_tokens=2,
                  stop_token_ids=())
    assert engine_for(model, req).slots == 4
    eng = engine_for(placed, req)
    assert eng.slots == 6 and eng.state.done.shape == (6,) and bool(np.all(eng.state.done))


def test_cli_support(smollm2_gguf_path, capsys):
    parser = argparse.ArgumentParser()
    parser.add_argument("--model")
    parser.add_argument("--json", action="store_true")
    add_parallel_args(parser)
    placement = setup_parallel(parser.parse_args(["--mesh", "data=2,model=3"]))
    assert placement.requested == (2, 3) and not placement.pmap
    with pytest.raises(InputError, match="model=1"):
        setup_parallel(parser.parse_args(["--pmap", "--mesh", "model=2"]))
    with pytest.raises(InputError, match="missing: --num-processes, --process-id"):
        setup_parallel(parser.parse_args(["--coordinator", "127.0.0.1:1234"]))
    assert devices_command(parser.parse_args(["--model", str(smollm2_gguf_path), "--json",
                                              "--mesh", "model=2"])) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["num_devices"] == 8 and out["num_processes"] == 1 and len(out["devices"]) == 8
    assert out["placement"] == {"mesh": {"data": 1, "model": 2}, "num_devices": 2,
                                "num_processes": 1, "pmap": False}
    assert any("'heads' = 9" in n for n in out["notes"])
    assert out["cpu_kernels"].startswith("native CPU kernels")  # which path runs, in one line


def test_placed_inputs_are_sharded(tiny):
    model, _ = tiny
    placement = Placement((2, 2))
    placed = placement.apply(model)
    req = Request(prompts=TINY_PROMPTS, sampling=[Sampling()], max_new_tokens=4,
                  stop_token_ids=())
    eng = engine_for(placed, req)
    for p in TINY_PROMPTS:
        eng.submit(p, Sampling(), 4)
    eng.advance(0)
    state = eng.state
    want = NamedSharding(placement.mesh, P(None, "data", "model"))
    assert state.cache.k.sharding.is_equivalent_to(want, 5)
    assert state.tokens.sharding.spec == P("data")
